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
from collections.abc import Iterator

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


@click.command("demo")
@click.option(
    "--turns",
    type=click.IntRange(min=1),
    default=_DEFAULTS.turns,
    show_default=True,
    help="Questions asked about the document, one after another.",
)
@click.option(
    "--doc-tokens",
    type=click.IntRange(min=1),
    default=_DEFAULTS.doc_tokens,
    show_default=True,
    help="Tokens of the shared document the turns are about.",
)
@click.option(
    "--question-tokens",
    type=click.IntRange(min=1),
    default=_DEFAULTS.question_tokens,
    show_default=True,
    help="Tokens of each question.",
)
@click.option(
    "--answer-tokens",
    type=click.IntRange(min=1),
    default=_DEFAULTS.answer_tokens,
    show_default=True,
    help="Tokens the model generates per turn (greedy).",
)
@click.option(
    "--block-tokens", type=click.IntRange(min=1), default=_DEFAULTS.block_tokens, show_default=True
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=_DEFAULTS.seed,
    show_default=True,
    help="Seeds the model's weights and the token ids.",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=_DEFAULTS.layers,
    show_default=True,
    help="Layers of the built model.",
)
@click.option(
    "--hidden",
    type=click.IntRange(min=HEAD_DIM),
    default=_DEFAULTS.hidden,
    show_default=True,
    help=f"Hidden size of the built model (a multiple of {HEAD_DIM}).",
)
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
def demo(
    turns: int,
    doc_tokens: int,
    question_tokens: int,
    answer_tokens: int,
    block_tokens: int,
    seed: int,
    layers: int,
    hidden: int,
    model_dir: str | None,
    data_dir: str | None,
    redis_url: str | None,
    repair: bool,
) -> None:
    """A long document answered over several turns by a small model on this machine: per turn
    the prefill time with and without kvstore and the prefix hit rate, then a hole repaired.

    Exits 1 if any answer with kvstore differs from the one without.
    """
    console = Console()
    try:
        options = DemoOptions(
            turns=turns,
            doc_tokens=doc_tokens,
            question_tokens=question_tokens,
            answer_tokens=answer_tokens,
            block_tokens=block_tokens,
            seed=seed,
            layers=layers,
            hidden=hidden,
            model_dir=model_dir or "",
            data_dir=data_dir or "",
            redis_url=redis_url or "",
            repair=repair,
        )
        from kvstore.demo.run import run_demo

        with _quiet_cache_keyword_notices(), console.status("starting") as status:
            result = asyncio.run(run_demo(options, progress=status.update))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    print_result(console, result)
    if not result.identical:
        raise SystemExit(1)
