"""Shared output of the benchmarks: one rich table on the terminal and the same rows as Markdown
for ``benchmarks/RESULTS.md``, with a line describing the machine."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text


def environment() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
    )


def markdown(
    headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: frozenset[str]
) -> str:
    align = ["---" if h in text_columns else "---:" for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_report(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: frozenset[str]
) -> None:
    table = Table(title=title, caption=environment())
    for header in headers:
        table.add_column(header, justify="left" if header in text_columns else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: cells are data, never rich markup
    Console(width=max(Console().width, 120)).print(table)
    print()
    print(f"**{title}** — {environment()}")
    print()
    print(markdown(headers, rows, text_columns))
    print()
