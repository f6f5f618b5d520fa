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
import importlib
import inspect
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table

from kvstore.block_format import HEADER_BYTES
from kvstore.config import StoreConfig
from kvstore.engine import Engine
from kvstore.errors import ConfigError, KVStoreError
from kvstore.keys import BlockHash, ModelSpec, root_hash
from kvstore.worker import ModelWorker, WorkerConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

__all__ = [
    "DemoOptions",
    "DemoResult",
    "HoleRepair",
    "Scenario",
    "TurnResult",
    "build_worker",
    "demo",
    "demo_model_config",
    "describe_model",
    "make_scenario",
    "print_result",
    "repair_table",
    "run_demo",
    "store_config",
    "turns_table",
]

Progress = Callable[[str], None]

HEAD_DIM = 64
VOCAB_SIZE = 8192
# Ids 0-2 are pad, bos and eos in the default config: the made-up text stays clear of them.
FIRST_TOKEN = 3
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class DemoOptions:
    turns: int = 4
    doc_tokens: int = 3072
    question_tokens: int = 48
    answer_tokens: int = 32
    block_tokens: int = 32
    seed: int = 0  # the weights of the built model and the token ids of the scenario
    layers: int = 8  # the built model's shape (ignored with model_dir)
    hidden: int = 512  # hidden size; query heads of 64 dims, a quarter as many K/V heads
    model_dir: str = ""  # a local transformers checkpoint instead of the built model
    data_dir: str = ""  # G3 lives in <data_dir>/g3 and is kept; empty: a temporary directory
    redis_url: str = ""  # adds G4
    repair: bool = True  # the hole section after the turns

    def __post_init__(self) -> None:
        for name in ("turns", "doc_tokens", "question_tokens", "answer_tokens", "block_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"demo seed must be >= 0, got {self.seed}")
        if self.layers < 1 or self.hidden < HEAD_DIM or self.hidden % HEAD_DIM:
            raise ConfigError(
                f"demo model: need layers >= 1 and hidden a multiple of {HEAD_DIM}, got "
                f"layers={self.layers}, hidden={self.hidden}"
            )

    @property
    def total_tokens(self) -> int:
        """Positions the longest prompt and its answer take (the hole section adds a turn)."""
        turns = self.turns + (1 if self.repair else 0)
        return self.doc_tokens + turns * (self.question_tokens + self.answer_tokens)


_DEFAULTS = DemoOptions()


@dataclass(frozen=True, slots=True)
class Scenario:
    document: list[int]
    questions: list[list[int]]  # one per turn, then the hole section's


@dataclass(frozen=True, slots=True)
class TurnResult:
    turn: int  # from 1
    prompt: list[int]
    hit_tokens: int  # the stored prefix kvstore served
    prefill_ms_without: float  # whole prompt from scratch, up to the first token
    prefill_ms_with: float  # lookup, read, the rest of the prompt, up to the first token
    load_ms: float  # the lookup and read part of prefill_ms_with
    stored_blocks: int  # new blocks of prompt + answer stored after the turn
    answer_without: list[int]
    answer_with: list[int]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / len(self.prompt)

    @property
    def speedup(self) -> float:
        return self.prefill_ms_without / self.prefill_ms_with

    @property
    def identical(self) -> bool:
        return self.answer_without == self.answer_with


@dataclass(frozen=True, slots=True)
class HoleRepair:
    prompt: list[int]
    block_tokens: int
    stored_blocks: int  # the stored run before the eviction
    hole: int  # the block evicted
    holes_reported: list[int]  # by the lookup after the eviction
    hit_tokens_with_hole: int  # the leading run the lookup then reports
    scratch_ms: float  # prefill of the whole prompt without kvstore
    recompute_ms: float  # lookup, read up to the hole, prefill from the hole
    repair_ms: float  # ModelWorker.repair: lookup, read, compute the hole, store it
    repaired: list[int]  # blocks repair computed and stored
    after_repair_ms: float  # then: lookup, read the whole stored run, prefill the rest
    hit_tokens_after_repair: int
    answer_scratch: list[int]
    answer_recompute: list[int]
    answer_repaired: list[int]

    @property
    def recompute_tokens(self) -> int:
        return len(self.prompt) - self.hit_tokens_with_hole

    @property
    def repaired_tokens(self) -> int:
        """Tokens through the model on the repair path: the hole, then the unstored rest."""
        return len(self.repaired) * self.block_tokens + (
            len(self.prompt) - self.hit_tokens_after_repair
        )

    @property
    def identical(self) -> bool:
        return self.answer_scratch == self.answer_recompute == self.answer_repaired


@dataclass(slots=True)
class DemoResult:
    options: DemoOptions
    model: str  # a description of the model
    spec: ModelSpec
    tiers: list[str]  # "G2 (shared memory)", ...
    blocks_at_open: int  # found in G3 when the store opened (a kept data_dir)
    turns: list[TurnResult] = field(default_factory=list)
    repair: HoleRepair | None = None
    tier_blocks: dict[str, int] = field(default_factory=dict)  # at the end
    elapsed_s: float = 0.0

    @property
    def identical(self) -> bool:
        """Every answer with kvstore (and after the repair) equals the one without."""
        turns_ok = all(t.identical for t in self.turns)
        return turns_ok and (self.repair is None or self.repair.identical)


# -- model, scenario, store ----------------------------------------------------------------------


def _transformers() -> Any:
    # By name, as kvstore/worker.py does: mypy would otherwise analyse all of transformers.
    return importlib.import_module("transformers")


def demo_model_config(options: DemoOptions) -> Any:
    """A Llama with grouped-query attention (64-dim heads, four query heads per K/V head)."""
    heads = options.hidden // HEAD_DIM
    return _transformers().LlamaConfig(
        hidden_size=options.hidden,
        intermediate_size=3 * options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max(8192, options.total_tokens),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # As worker.default_config explains: wider than transformers' 0.02, so that the answer
        # depends on the context and comparing answers with and without kvstore tests something.
        initializer_range=0.1,
    )


def build_worker(options: DemoOptions) -> ModelWorker:
    config = WorkerConfig(
        model_dir=options.model_dir, seed=options.seed, block_tokens=options.block_tokens
    )
    if options.model_dir:
        worker = ModelWorker(config)
    else:
        worker = ModelWorker(config, model_config=demo_model_config(options))
    limit = getattr(worker.model.config, "max_position_embeddings", None)
    if limit is not None and options.total_tokens > limit:
        raise ConfigError(
            f"the demo needs {options.total_tokens} positions, the model has {limit}: "
            "use fewer --doc-tokens or --turns"
        )
    return worker


def describe_model(worker: ModelWorker, options: DemoOptions) -> str:
    cfg = worker.model.config
    params = sum(p.numel() for p in worker.model.parameters())
    spec = worker.spec
    kv_heads = f"{spec.num_kv_heads} K/V head{'s' if spec.num_kv_heads > 1 else ''}"
    shape = (
        f"{cfg.model_type}, {spec.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} query heads on {kv_heads} of {spec.head_dim}, "
        f"vocabulary {cfg.vocab_size}, {params / 1e6:.1f} M parameters, {spec.dtype}"
    )
    if options.model_dir:
        return f"{spec.model_id} from {options.model_dir} ({shape})"
    return f"{shape}, random weights (seed {options.seed})"


def make_scenario(options: DemoOptions, vocab_size: int) -> Scenario:
    """The document and the questions: token ids from a seeded generator."""
    rng = np.random.default_rng(options.seed)
    low = FIRST_TOKEN if vocab_size > FIRST_TOKEN else 0

    def draw(n: int) -> list[int]:
        return [int(t) for t in rng.integers(low, vocab_size, size=n)]

    document = draw(options.doc_tokens)
    questions = [draw(options.question_tokens) for _ in range(options.turns + int(options.repair))]
    return Scenario(document, questions)


def store_config(options: DemoOptions, spec: ModelSpec, data_dir: Path) -> StoreConfig:
    """G2 sized for every block of the demo (twice over, so nothing is evicted), G3 in
    ``data_dir/g3``, and G4 when a Redis URL is given."""
    slot = (HEADER_BYTES + spec.block_nbytes + _PAGE - 1) // _PAGE * _PAGE
    blocks = math.ceil(options.total_tokens / options.block_tokens)
    g4 = None
    if options.redis_url:
        g4 = RedisTierConfig(options.redis_url, capacity_bytes=4 << 30, namespace="kvstore-demo")
    return StoreConfig(
        g2=PinnedTierConfig(
            capacity_bytes=max(64, 2 * blocks) * slot,
            slot_bytes=slot,
            segment_prefix="kvstore-demo",
        ),
        g3=LmdbTierConfig(str(data_dir / "g3"), capacity_bytes=4 << 30),
        g4=g4,
    )


def _describe_tiers(config: StoreConfig) -> list[str]:
    out = []
    for name, cfg in config.tiers():
        where = getattr(cfg, "path", None) or getattr(cfg, "url", None) or "shared memory"
        out.append(f"{name} ({where})")
    return out


# -- the model -----------------------------------------------------------------------------------


class _Runner:
    """Forward passes of one worker's model over a transformers cache, in a worker thread.

    The keyword the cache is passed under is read from the model's signature: transformers 5
    renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker
        params = inspect.signature(worker.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params

    def new_cache(self) -> Any:
        return _transformers().DynamicCache()

    @torch.no_grad()
    def first_token(self, ids: torch.Tensor, cache: Any, start: int) -> int:
        """Run ``ids`` at positions ``start...`` over ``cache`` (which holds exactly ``start``
        tokens) and return the greedy next token. Grad mode is per thread: set here."""
        return self._step(ids, cache, start)

    @torch.no_grad()
    def decode(self, first: int, cache: Any, start: int, n: int) -> list[int]:
        """``n`` greedy tokens from ``first`` (included), which goes in at position ``start``."""
        out = [first]
        while len(out) < n:
            out.append(self._step(torch.tensor([out[-1]]), cache, start + len(out) - 1))
        return out

    def _step(self, ids: torch.Tensor, cache: Any, start: int) -> int:
        worker = self.worker
        positions = torch.arange(start, start + ids.numel(), device=worker.device)
        kwargs: dict[str, Any] = {self._cache_kw: cache}
        if self._keep_last:
            # Only the last position's logits: for a 3K-token prompt the full [tokens, vocab]
            # logits cost as much as a few layers, and both paths would pay for nothing.
            kwargs["logits_to_keep"] = 1
        output = worker.model(
            input_ids=ids.to(worker.device)[None],
            position_ids=positions[None],
            cache_position=positions,
            use_cache=True,
            **kwargs,
        )
        return int(output.logits[0, -1].argmax())


@dataclass(slots=True)
class _Answer:
    tokens: list[int]
    prefill_s: float  # up to the first token
    load_s: float  # lookup and read, within prefill_s
    hit_tokens: int
    cache: Any  # prompt + answer[:-1]


async def _without_store(runner: _Runner, prompt: list[int], answer_tokens: int) -> _Answer:
    ids = runner.worker.token_ids(prompt)
    cache = runner.new_cache()
    t0 = time.perf_counter()
    first = await asyncio.to_thread(runner.first_token, ids, cache, 0)
    prefill_s = time.perf_counter() - t0
    tokens = await asyncio.to_thread(runner.decode, first, cache, len(prompt), answer_tokens)
    return _Answer(tokens, prefill_s, 0.0, 0, cache)


async def _load_prefix(
    engine: Engine, spec: ModelSpec, prompt: list[int]
) -> tuple[torch.Tensor | None, int]:
    """Lookup and read the leading run of stored blocks under a lease: their K/V as one tensor
    and the tokens it covers."""
    found = await engine.lookup(spec, prompt)
    n = found.hit_blocks
    if n == 0:
        return None, 0
    lease = engine.reserve(found.hashes[:n])
    try:
        blocks = await engine.get(spec, found.hashes[:n])
    finally:
        engine.release(lease.lease_id)
    usable: list[torch.Tensor] = []
    for block in blocks:
        if block is None:  # failed verification since the lookup: the prefix ends there
            break
        usable.append(block)
    if not usable:
        return None, 0
    return torch.cat(usable, dim=2), len(usable) * spec.block_tokens


async def _with_store(
    runner: _Runner,
    engine: Engine,
    prompt: list[int],
    answer_tokens: int,
) -> _Answer:
    worker = runner.worker
    ids = worker.token_ids(prompt)
    t0 = time.perf_counter()
    past, hit = await _load_prefix(engine, worker.spec, prompt)
    # The first token needs the logits of the prompt's last token: a prefix covering the whole
    # prompt gives that token back to be computed.
    start = min(hit, len(prompt) - 1)
    if past is None or start == 0:
        cache = runner.new_cache()
        start = 0
    else:
        cache = worker.cache_from_kv(past[:, :, :start])
    load_s = time.perf_counter() - t0
    first = await asyncio.to_thread(runner.first_token, ids[start:], cache, start)
    prefill_s = time.perf_counter() - t0
    tokens = await asyncio.to_thread(runner.decode, first, cache, len(prompt), answer_tokens)
    return _Answer(tokens, prefill_s, load_s, hit, cache)


async def _store(engine: Engine, worker: ModelWorker, conversation: list[int], cache: Any) -> int:
    """Store the full blocks of what ``cache`` holds (the conversation but its last token, which
    the model never ran) that the store does not have; returns how many."""
    spec = worker.spec
    kv = worker.kv_from_cache(cache)
    hashes: list[BlockHash] = engine.hashes(spec, conversation[: kv.shape[2]])
    # Asked of the store, not taken from the turn's hit: blocks past the prompt's may be there
    # already (a kept data_dir), in G3 only, and a put would copy them into G2 again.
    found = await engine.lookup_hashes(spec, hashes)
    bt = spec.block_tokens
    items = [
        (hashes[i], root_hash(spec) if i == 0 else hashes[i - 1], kv[:, :, i * bt : (i + 1) * bt])
        for i, tier in enumerate(found.tiers)
        if tier is None
    ]
    if not items:
        return 0
    result = await engine.put_blocks(spec, items)
    # Let the write-through copies to G3 (and G4) finish, so that they neither compete with the
    # next turn's timings nor are lost if the demo is stopped.
    await engine.drain()
    return result.stored


# -- the demo ------------------------------------------------------------------------------------


async def run_demo(
    options: DemoOptions,
    *,
    worker: ModelWorker | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Run the whole demo; ``worker`` (from ``build_worker(options)``) may be passed in to
    share one model between runs. Nothing is printed: ``progress`` gets a line per step."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    if worker is None:
        say("building the model")
        worker = build_worker(options)
    runner = _Runner(worker)
    scenario = make_scenario(options, int(worker.model.config.vocab_size))
    with contextlib.ExitStack() as stack:
        if options.data_dir:
            data_dir = Path(options.data_dir)
        else:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-")))
        config = store_config(options, worker.spec, data_dir)
        say("opening the store")
        engine = await Engine.open(config)
        try:
            result = DemoResult(
                options,
                describe_model(worker, options),
                worker.spec,
                _describe_tiers(config),
                len(engine.index),
            )
            if config.g4 is not None:
                # One round trip now: an unreachable Redis is an error here, not a warning per
                # block for the rest of the run.
                await engine.tier("G4", worker.spec.fingerprint).exists([root_hash(worker.spec)])
            # One pass before anything is timed: the very first forward pays for lazy setup.
            say("warming up the model")
            warm = scenario.document[:1024]
            await asyncio.to_thread(
                runner.first_token, worker.token_ids(warm), runner.new_cache(), 0
            )
            await _turns(runner, engine, options, scenario, result, say)
            if options.repair:
                result.repair = await _hole_repair(runner, engine, options, scenario, result, say)
            await engine.drain()  # the repaired block's write-through copies
            result.tier_blocks = (await engine.stats()).index_blocks
        finally:
            await engine.close()
    result.elapsed_s = time.perf_counter() - started
    return result


async def _turns(
    runner: _Runner,
    engine: Engine,
    options: DemoOptions,
    scenario: Scenario,
    result: DemoResult,
    say: Progress,
) -> None:
    conversation = list(scenario.document)
    for turn in range(1, options.turns + 1):
        prompt = conversation + scenario.questions[turn - 1]
        head = f"turn {turn}/{options.turns} ({len(prompt)} tokens)"
        # With kvstore first: a forward pass at a length seen before runs faster (the first at a
        # new length took 5-30% longer in runs here), and in turn 1, with nothing stored, both
        # runs have the same length: the second one's gain must not flatter kvstore.
        say(f"{head}: lookup, read the stored prefix, prefill the rest")
        with_ = await _with_store(runner, engine, prompt, options.answer_tokens)
        say(f"{head}: prefill without kvstore")
        without = await _without_store(runner, prompt, options.answer_tokens)
        say(f"{head}: storing the new blocks")
        conversation = prompt + with_.tokens
        stored = await _store(engine, runner.worker, conversation, with_.cache)
        result.turns.append(
            TurnResult(
                turn=turn,
                prompt=prompt,
                hit_tokens=with_.hit_tokens,
                prefill_ms_without=without.prefill_s * 1e3,
                prefill_ms_with=with_.prefill_s * 1e3,
                load_ms=with_.load_s * 1e3,
                stored_blocks=stored,
                answer_without=without.tokens,
                answer_with=with_.tokens,
            )
        )


async def _hole_repair(
    runner: _Runner,
    engine: Engine,
    options: DemoOptions,
    scenario: Scenario,
    result: DemoResult,
    say: Progress,
) -> HoleRepair | None:
    """Evict a middle block of the stored conversation, then compare recomputing from the hole
    with repairing it; ``None`` when fewer than three blocks are stored (no middle)."""
    worker = runner.worker
    spec = worker.spec
    last = result.turns[-1]
    prompt = last.prompt + last.answer_with + scenario.questions[-1]
    before = await engine.lookup(spec, prompt)
    stored = before.hit_blocks
    if stored < 3:
        return None
    hole = stored // 2
    say(f"evicting block {hole} of {stored}")
    await engine.evict([before.hashes[hole]])
    found = await engine.lookup(spec, prompt)

    say(f"hole: prefill without kvstore ({len(prompt)} tokens)")
    scratch = await _without_store(runner, prompt, options.answer_tokens)
    say("hole: recompute from the hole")
    recompute = await _with_store(runner, engine, prompt, options.answer_tokens)
    say(f"hole: repair block {hole}")
    t0 = time.perf_counter()
    repaired = await worker.repair(engine, prompt)
    repair_s = time.perf_counter() - t0
    say("hole: read the repaired prefix, prefill the rest")
    after = await _with_store(runner, engine, prompt, options.answer_tokens)
    return HoleRepair(
        prompt=prompt,
        block_tokens=spec.block_tokens,
        stored_blocks=stored,
        hole=hole,
        holes_reported=found.holes,
        hit_tokens_with_hole=found.hit_tokens,
        scratch_ms=scratch.prefill_s * 1e3,
        recompute_ms=recompute.prefill_s * 1e3,
        repair_ms=repair_s * 1e3,
        repaired=repaired.repaired,
        after_repair_ms=after.prefill_s * 1e3,
        hit_tokens_after_repair=after.hit_tokens,
        answer_scratch=scratch.tokens,
        answer_recompute=recompute.tokens,
        answer_repaired=after.tokens,
    )


# -- output --------------------------------------------------------------------------------------


def _yes(ok: bool) -> str:
    return "[green]yes" if ok else "[bold red]NO"


def _table(title: str, columns: list[tuple[str, JustifyMethod]]) -> Table:
    # No rules between columns and no edges: the turns' ten columns then fit 80 characters.
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table


def turns_table(result: DemoResult) -> Table:
    table = _table(
        "Prefill per turn, up to the first token: without kvstore and with it",
        [
            ("turn", "right"),
            ("prompt\ntokens", "right"),
            ("hit\ntokens", "right"),
            ("hit %", "right"),
            ("without\nms", "right"),
            ("with\nms", "right"),
            ("of it\nread ms", "right"),
            ("speedup", "right"),
            ("blocks\nstored", "right"),
            ("same\ntokens", "center"),
        ],
    )
    for t in result.turns:
        table.add_row(
            str(t.turn),
            str(t.prompt_tokens),
            str(t.hit_tokens),
            f"{100 * t.hit_rate:.1f}",
            f"{t.prefill_ms_without:.0f}",
            f"{t.prefill_ms_with:.0f}",
            f"{t.load_ms:.0f}",
            f"{t.speedup:.1f}x",
            str(t.stored_blocks),
            _yes(t.identical),
        )
    return table


def repair_table(repair: HoleRepair) -> Table:
    table = _table(
        f"A hole at block {repair.hole}: recompute from it, or repair it",
        [
            ("path", "left"),
            ("tokens\ncomputed", "right"),
            ("ms", "right"),
            ("speedup", "right"),
            ("same\ntokens", "center"),
        ],
    )
    rows = [
        ("without kvstore", len(repair.prompt), repair.scratch_ms, "reference"),
        (
            "recompute from the hole",
            repair.recompute_tokens,
            repair.recompute_ms,
            _yes(repair.answer_recompute == repair.answer_scratch),
        ),
        (
            "repair the hole, then read",
            repair.repaired_tokens,
            repair.repair_ms + repair.after_repair_ms,
            _yes(repair.answer_repaired == repair.answer_scratch),
        ),
    ]
    for path, tokens, ms, same in rows:
        table.add_row(path, str(tokens), f"{ms:.0f}", f"{repair.scratch_ms / ms:.1f}x", same)
    return table


def print_result(console: Console, result: DemoResult) -> None:
    opts = result.options
    found = f"; {result.blocks_at_open} blocks found in G3" if result.blocks_at_open else ""
    console.print(f"[bold]model[/]     {result.model}")
    console.print(
        f"[bold]store[/]     {' + '.join(result.tiers)}; {opts.block_tokens} tokens per block "
        f"({result.spec.block_nbytes / 1024:.0f} KiB){found}"
    )
    console.print(
        f"[bold]scenario[/]  a shared document of {opts.doc_tokens} tokens, then {opts.turns} "
        f"turns; each appends a {opts.question_tokens}-token question to the conversation so "
        f"far and the model answers {opts.answer_tokens} tokens (greedy). There is no tokenizer "
        f"offline: the token ids come from a generator seeded with {opts.seed}, and the answers "
        "are token ids, not words."
    )
    console.print(
        "[dim]without: the whole prompt from scratch. with: lookup + read of the stored prefix "
        "+ prefill of the rest. same tokens: the two answers are identical.[/]"
    )
    console.print(turns_table(result))
    r = result.repair
    if r is not None:
        after = r.stored_blocks - r.hole - 1
        console.print(
            f"Evicted block {r.hole} of the {r.stored_blocks} stored blocks of the conversation: "
            f"lookup reports holes {r.holes_reported} and a leading hit of "
            f"{r.hit_tokens_with_hole} tokens.\n"
            f"- recompute from the hole: read {r.hit_tokens_with_hole} tokens, prefill the "
            f"{r.recompute_tokens} after them.\n"
            f"- repair: ModelWorker.repair computed blocks {r.repaired} "
            f"({len(r.repaired) * r.block_tokens} tokens) in {r.repair_ms:.0f} ms, keeping the "
            f"{after} blocks after the hole; then read {r.hit_tokens_after_repair} tokens and "
            f"prefill the {len(r.prompt) - r.hit_tokens_after_repair} after them."
        )
        console.print(repair_table(r))
    elif opts.repair:
        console.print("[yellow]No hole section: fewer than 3 blocks were stored.")
    blocks = ", ".join(f"{name} {n}" for name, n in result.tier_blocks.items())
    console.print(f"Blocks held at the end: {blocks}. Ran in {result.elapsed_s:.1f} s.")
    if result.identical:
        console.print("[green]Generated tokens are identical with and without kvstore.")
    else:
        console.print("[bold red]Generated tokens DIFFER with and without kvstore.")


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
        with _quiet_cache_keyword_notices(), console.status("starting") as status:
            result = asyncio.run(run_demo(options, progress=status.update))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    print_result(console, result)
    if not result.identical:
        raise SystemExit(1)


if __name__ == "__main__":
    demo()
