"""What every benchmark shares: round-robin median timing, the machine line, and the output (rich
tables on the terminal, then the same tables in Markdown for ``benchmarks/RESULTS.md``).

Operations, in the order a benchmark uses them:

1. ``medians_s({name: fn or Case(fn, reset)}, settings)`` — median seconds per call of each case,
   the cases sampled round-robin.
2. ``Table(title, headers, rows, text_columns, group_columns)`` — one result table.
3. ``print_tables([...], *packages)`` — rich tables, then Markdown with ``environment()``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

__all__ = [
    "Case",
    "Settings",
    "Table",
    "amedians_s",
    "environment",
    "markdown",
    "medians_s",
    "print_tables",
]


@dataclass(frozen=True, slots=True)
class Settings:
    """How hard ``medians_s`` samples: rounds, untimed warm-up calls, and the shortest sample."""

    repeats: int
    warmup: int
    min_sample_s: float


@dataclass(frozen=True, slots=True)
class Case:
    """A timed call with an untimed ``reset`` before each call (to empty a store before a put).

    A case with a reset is called once per sample: ``min_sample_s`` does not apply to it.
    """

    fn: Callable[[], object]
    reset: Callable[[], object] | None = None


def medians_s(
    cases: Mapping[str, Callable[[], object] | Case], settings: Settings
) -> dict[str, float]:
    """Median seconds per call of each case.

    The cases are sampled round-robin, one sample of each per round, so that a burst of load from
    another process slows a baseline and the rows compared with it alike instead of landing on
    one row (this machine is shared; timing one case after another gave ratios off by 40% in
    the hashing benchmark, and G3 put at 2.82x and 0.31x of raw LMDB in the tier benchmark).
    A sample repeats the call often enough to last ``min_sample_s``, which keeps timer
    resolution and loop overhead out of fast calls.
    """
    normal = {name: c if isinstance(c, Case) else Case(c) for name, c in cases.items()}
    numbers: dict[str, int] = {}
    for name, case in normal.items():
        for _ in range(settings.warmup):
            _call(case)
        once = _call(case)
        numbers[name] = (
            1 if case.reset is not None else max(1, int(settings.min_sample_s / max(once, 1e-9)))
        )
    samples: dict[str, list[float]] = {name: [] for name in normal}
    for _ in range(settings.repeats):
        for name, case in normal.items():
            number = numbers[name]
            if number == 1:
                samples[name].append(_call(case))
                continue
            fn = case.fn
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(times) for name, times in samples.items()}


async def amedians_s(
    a: Callable[[], Awaitable[object]], b: Callable[[], Awaitable[object]], repeats: int
) -> tuple[float, float]:
    """Median seconds of the coroutine functions ``a`` and ``b``, sampled alternately (a, b, a,
    b, ...) after one warm-up call each, for the same reason as ``medians_s``."""
    await a()
    await b()
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, samples[0]), (b, samples[1])):
            start = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _call(case: Case) -> float:
    if case.reset is not None:
        case.reset()
    start = time.perf_counter()
    case.fn()
    return time.perf_counter() - start


def environment(*packages: str) -> str:
    """One line naming the machine and the versions that the numbers depend on."""
    extras = "".join(f", {name} {_version(name)}" for name in packages)
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
        + extras
    )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


@dataclass(frozen=True, slots=True)
class Table:
    """One result table. ``group_columns`` leading columns name a group (a block size, a dtype):
    the terminal table draws a rule between groups so that each group's baseline stays visible."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    text_columns: frozenset[str]
    group_columns: int = 0


def markdown(table: Table) -> str:
    align = ["---" if h in table.text_columns else "---:" for h in table.headers]
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def _rich(table: Table, caption: str) -> RichTable:
    out = RichTable(title=table.title, caption=caption)
    for header in table.headers:
        out.add_column(header, justify="left" if header in table.text_columns else "right")
    previous: Sequence[str] | None = None
    for row in table.rows:
        group = row[: table.group_columns]
        if table.group_columns and previous is not None and group != previous:
            out.add_section()
        previous = group
        # Text, not str: rich would read "list[int]" or "[3, 2]" in a cell as markup.
        out.add_row(*(Text(cell) for cell in row))
    return out


def print_tables(tables: Sequence[Table], *packages: str) -> None:
    """Every table for the terminal, then every table in Markdown, titled with ``environment``."""
    env = environment(*packages)
    console = Console(width=max(Console().width, 160))
    for table in tables:
        console.print(_rich(table, env))
        print()
    for table in tables:
        print(f"**{table.title}** — {env}")
        print()
        print(markdown(table))
        print()
