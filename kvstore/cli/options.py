"""Options and helpers that several ``kvstore`` commands share, defined once: where the server
is, how to authenticate, the model a worker runs, the prompt given as a file of token ids or of
text, how a table, a size and a progress bar are printed.

A group of options that several commands take together is a bundle: ``bundle(name, cls,
options)`` adds the options and hands the command their values as one frozen ``cls`` (here
``Connection`` and ``ModelChoice``), so that the long parameter list is written once, in the
dataclass, and not again in every command that takes the group.

Nothing here imports torch, transformers or our engine and server at module level: every
command module imports this one, and ``kvstore ls --help`` should not wait for any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kvstore.worker.model import ModelWorker

__all__ = [
    "CONNECT_OPTIONS",
    "DEFAULT_SERVER",
    "MODEL_OPTIONS",
    "PROMPT_FILE_OPTIONS",
    "Connection",
    "ModelChoice",
    "bundle",
    "check_server",
    "connect_options",
    "env_option",
    "model_options",
    "one_line",
    "print_table",
    "progress_bar",
    "read_tokens",
    "rebuild_progress",
    "seconds_option",
    "server_option",
    "size",
    "stderr",
    "stdout",
    "tls_ca_option",
    "token_option",
    "with_options",
]

# Rich resolves sys.stdout / sys.stderr when it prints, so click's test runner still sees these.
stdout = Console()
stderr = Console(stderr=True)

DEFAULT_SERVER = "127.0.0.1:50051"

Option = Callable[[Any], Any]


def check_server(ctx: click.Context, param: click.Parameter, value: str) -> str:
    value = value.strip()
    if value.startswith(("unix:", "unix-abstract:")):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{value!r}: use HOST:PORT (or unix:/path)")
    return value


def env_option(*decls: str, envvar: str, **attrs: Any) -> Option:
    """A click option that may also come from ``envvar``, named in ``--help``."""
    return click.option(*decls, envvar=envvar, show_envvar=True, **attrs)


def seconds_option(flag: str, dest: str, default: float | None, **attrs: Any) -> Option:
    """A duration in seconds, above 0; its default shown unless there is none."""
    attrs.setdefault("show_default", default is not None)
    if "envvar" in attrs:
        attrs["show_envvar"] = True
    return click.option(
        flag,
        dest,
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        metavar="SECONDS",
        **attrs,
    )


server_option = env_option(
    "--server",
    envvar="KVSTORE_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    metavar="HOST:PORT",
    callback=check_server,
    help="The kvstore server (or unix:/path).",
)
token_option = env_option(
    "--token",
    envvar="KVSTORE_TOKEN",
    help="Bearer token of a tenant (an admin tenant for ls, inspect, events, flush and worker).",
)
tls_ca_option = env_option(
    "--tls-ca",
    envvar="KVSTORE_TLS_CA",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM file of the CA that signed the server's certificate: turns TLS on.",
)
CONNECT_OPTIONS = (server_option, token_option, tls_ca_option)
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
PROMPT_FILE_OPTIONS = (
    click.option(
        "--tokens-file",
        type=_FILE,
        metavar="FILE",
        help="Token ids: integers separated by whitespace or commas, a JSON array (or an object "
        'with "input_ids"), or a .npy integer array.',
    ),
    click.option(
        "--text-file",
        type=_FILE,
        metavar="FILE",
        help="A text file, read as UTF-8 bytes with each byte one token id (no tokenizer is "
        "available offline): this finds blocks stored from the same bytes, not from a model's "
        "tokenizer. Use --tokens-file with your tokenizer's ids for real prompts.",
    ),
)


MODEL_OPTIONS = (
    env_option(
        "--model",
        "model_dir",
        envvar="KVSTORE_WORKER_MODEL",
        type=click.Path(exists=True, file_okay=False),
        metavar="DIR",
        help="A local transformers causal LM (Llama, Qwen2, Mistral, GPT-2, ...). Default: the "
        "small built-in model, built from a config with --seed.",
    ),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
    click.option(
        "--dtype",
        type=click.Choice(["float32", "float16", "bfloat16"]),
        default="float32",
        show_default=True,
        help="The model's compute dtype, and its blocks' dtype.",
    ),
    env_option(
        "--block-tokens",
        envvar="KVSTORE_WORKER_BLOCK_TOKENS",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        help="Tokens per block of the model's namespace.",
    ),
    click.option("--device", default="cpu", show_default=True, help="torch device of the model."),
)


def with_options(options: tuple[Option, ...]) -> Option:
    """Apply a tuple of click options, the first one listed first in ``--help``."""

    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def bundle(name: str, cls: type[Any], options: tuple[Option, ...]) -> Option:
    """Apply ``options`` (whose destinations are the fields of the dataclass ``cls``) and hand
    the command their values as one ``cls``, in its parameter ``name``."""
    fields = tuple(field.name for field in dataclasses.fields(cls))

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = cls(**{field: kwargs.pop(field) for field in fields})
            return fn(*args, **kwargs)

        return with_options(options)(command)

    return decorate


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the server is and the credentials to reach it (``CONNECT_OPTIONS``)."""

    server: str
    token: str | None
    tls_ca: str | None


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The model a worker or a role runs (``MODEL_OPTIONS``)."""

    model_dir: str | None
    seed: int
    dtype: str
    block_tokens: int
    device: str

    def worker(self) -> ModelWorker:
        """The ``ModelWorker`` of these options (transformers is imported only here: it takes
        seconds, and the other commands never need it)."""
        from kvstore.worker.model import ModelWorker, WorkerConfig

        config = WorkerConfig(
            model_dir=self.model_dir or "",
            seed=self.seed,
            dtype=self.dtype,
            block_tokens=self.block_tokens,
            device=self.device,
        )
        with stdout.status("loading the model"):
            return ModelWorker(config)


connect_options = bundle("connection", Connection, CONNECT_OPTIONS)
model_options = bundle("model", ModelChoice, MODEL_OPTIONS)


def progress_bar(
    what: str = "{task.description}", *, console: Console = stdout, transient: bool = False
) -> Progress:
    """The bar every long operation shows: what, the bar, done of total, the time so far."""
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


@contextlib.contextmanager
def rebuild_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar for the index rebuild at start; yields the engine's progress callback."""
    with progress_bar("rebuilding the index from G3", transient=True) as progress:
        task = progress.add_task("rebuild", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield report


def one_line(text: str) -> str:
    return " ".join(text.split())


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def print_table(table: Table, console: Console) -> None:
    """A rich table on a terminal; plain tab-separated lines when the output is a pipe or a
    file (``# title``, a header line, one line per row, markup dropped): rich fits a table to
    80 columns off a terminal and cuts cells (``32.1 K…``), which no script can read."""
    if console.is_terminal:
        console.print(table)
        return

    def plain(value: Any) -> str:
        if isinstance(value, Text):
            return value.plain
        return Text.from_markup(str(value)).plain

    lines = []
    if table.title:
        lines.append(f"# {plain(table.title)}")
    if table.show_header:
        lines.append("\t".join(plain(column.header) for column in table.columns))
    for row in zip(*(list(column.cells) for column in table.columns), strict=True):
        lines.append("\t".join(plain(cell) for cell in row))
    if table.caption:
        lines.append(f"# {plain(table.caption)}")
    click.echo("\n".join(lines), file=console.file)


_TOKENS_FORMS = (
    "token ids as integers separated by whitespace or commas, a JSON array of integers, a JSON "
    'object with an "input_ids" (or "tokens") array, or a .npy integer array'
)


def read_tokens(tokens_file: Path | None, text_file: Path | None) -> np.ndarray[Any, Any]:
    if (tokens_file is None) == (text_file is None):
        raise click.UsageError("give the prompt with exactly one of --tokens-file and --text-file")
    if text_file is not None:
        return np.frombuffer(text_file.read_bytes(), dtype=np.uint8).astype(np.int64)
    assert tokens_file is not None
    hint = "--tokens-file"
    if tokens_file.suffix == ".npy":
        try:
            array = np.load(tokens_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{tokens_file}: {exc}", param_hint=hint) from None
        if array.dtype.kind not in "iu":
            raise click.BadParameter(
                f"{tokens_file} holds {array.dtype}, not integers", param_hint=hint
            )
        return cast(np.ndarray[Any, Any], array.reshape(-1))
    try:
        text = tokens_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(
            f"{tokens_file}: cannot read it as text: {exc}", param_hint=hint
        ) from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        return _json_tokens(tokens_file, stripped, hint)
    words = text.replace(",", " ").split()
    for position, word in enumerate(words):
        if not word.lstrip("+-").isdigit():
            shown = word if len(word) <= 20 else word[:20] + "..."
            raise click.BadParameter(
                f"{tokens_file}: word {position + 1} is {shown!r}, not an integer; expected "
                f"{_TOKENS_FORMS}",
                param_hint=hint,
            )
    return np.array([int(w) for w in words], dtype=np.int64)


def _json_tokens(path: Path, text: str, hint: str) -> np.ndarray[Any, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"{path}: not valid JSON ({exc}); expected {_TOKENS_FORMS}", param_hint=hint
        ) from None
    if isinstance(data, dict):
        key = next((k for k in ("input_ids", "tokens", "token_ids") if k in data), None)
        if key is None:
            raise click.BadParameter(
                f"{path}: a JSON object without an \"input_ids\" or \"tokens\" array (it has "
                f"{sorted(data)[:8]}); expected {_TOKENS_FORMS}",
                param_hint=hint,
            )
        data = data[key]
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
            data = data[0]  # a batch of one, as tokenizers return it
    if not isinstance(data, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in data
    ):
        raise click.BadParameter(
            f"{path}: the JSON holds no flat array of integers; expected {_TOKENS_FORMS}",
            param_hint=hint,
        )
    return np.array(data, dtype=np.int64)
