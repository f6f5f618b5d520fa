"""``kvstore demo``: a long shared document answered over several turns by a small model on the
CPU, with and without kvstore, printing per turn the prefill time of each and the prefix hit rate;
then a hole punched into the stored conversation and repaired.

Operations, in the order ``run_demo`` calls them:

1. ``build_worker(options)`` — the model: a Llama built from a config with a fixed seed (big
   enough that prefill takes visible time on a CPU), or a local transformers checkpoint.
2. ``make_scenario(options, vocab_size)`` — the document and one question per turn, token ids
   drawn from a seeded generator (there is no tokenizer offline).
3. ``Engine.open(store_config(...))`` — an embedded store as ``kvstore serve`` runs it: G2 shared
   memory + G3 LMDB (in a temporary directory unless ``data_dir`` is given), G4 with a Redis URL.
4. Per turn: the prompt is the conversation so far plus a new question. (a) Without kvstore:
   prefill the whole prompt and pick the first token. (b) With kvstore (run first, see
   ``_turns``): lookup, read the stored prefix blocks, prefill only the rest. Both decode the
   answer greedily; the tokens must be identical. The new full blocks of the prompt and answer
   are then stored.
5. The hole: one middle block of the stored conversation is evicted; lookup reports the hole;
   recomputing from the hole is timed against ``ModelWorker.repair``, which computes only the
   hole's block, and the answers are compared again.

The demo runs the model itself (``worker.model``) rather than through ``ModelWorker.generate``:
it needs the time to the first token apart from decoding, and the cache the answer leaves
behind, to store its blocks; ``generate`` returns only tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console

from kvstore.core.errors import KVStoreError
from kvstore.demo.report import print_result
from kvstore.demo.results import HEAD_DIM, DemoOptions

__all__ = ["demo"]

_DEFAULTS = DemoOptions()


@contextlib.contextmanager
def _quiet_cache_keyword_notices() -> Iterator[None]:
    """Hide transformers' notices that ``past_key_values`` is now ``cache`` (from code paths
    that still pass the old name, as a checkpoint's own remote code may): they are for
    developers, not for someone watching the demo."""
    generic = logging.getLogger("transformers.utils.generic")
    level = generic.level
    generic.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            yield
    finally:
        generic.setLevel(level)


# The sizes of the run, in --help order: option -> (DemoOptions field, smallest value, help).
_SIZES = {
    "--turns": ("turns", 1, "Questions asked about the document, one after another."),
    "--doc-tokens": ("doc_tokens", 1, "Tokens of the shared document the turns are about."),
    "--question-tokens": ("question_tokens", 1, "Tokens of each question."),
    "--answer-tokens": ("answer_tokens", 1, "Tokens the model generates per turn (greedy)."),
    "--block-tokens": ("block_tokens", 1, None),
    "--seed": ("seed", 0, "Seeds the model's weights and the token ids."),
    "--layers": ("layers", 1, "Layers of the built model."),
    "--hidden": (
        "hidden",
        HEAD_DIM,
        f"Hidden size of the built model (a multiple of {HEAD_DIM}).",
    ),
}


def _size_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options of ``_SIZES``, each defaulting to ``DemoOptions``' value."""
    for flag, (field, smallest, help_text) in reversed(_SIZES.items()):
        fn = click.option(
            flag,
            type=click.IntRange(min=smallest),
            default=getattr(_DEFAULTS, field),
            show_default=True,
            help=help_text,
        )(fn)
    return fn


@click.command("demo")
@_size_options
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A local transformers checkpoint folder instead of the built model.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep G3 in DIR/g3 (a second run finds the blocks); default: a temporary directory.",
)
@click.option("--redis-url", default=None, metavar="URL", help="Add G4 on this Redis server.")
@click.option("--repair/--no-repair", default=True, show_default=True, help="The hole section.")
def demo(model_dir: str | None, data_dir: str | None, redis_url: str | None, **fields: Any) -> None:
    """A long document answered over several turns by a small model on this machine: per turn
    the prefill time with and without kvstore and the prefix hit rate, then a hole repaired.

    Exits 1 if any answer with kvstore differs from the one without.
    """
    console = Console()
    try:
        options = DemoOptions(
            model_dir=model_dir or "",
            data_dir=data_dir or "",
            redis_url=redis_url or "",
            **fields,  # the sizes and --repair, as DemoOptions names them
        )
        from kvstore.demo.run import run_demo

        with _quiet_cache_keyword_notices(), console.status("starting") as status:
            result = asyncio.run(run_demo(options, progress=status.update))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    print_result(console, result)
    if not result.identical:
        raise SystemExit(1)
