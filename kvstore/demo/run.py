"""``run_demo``: the turns of ``kvstore demo`` (each prompt answered without kvstore and with it,
the new blocks stored) and the hole section (a block evicted, recomputing from the hole timed
against ``ModelWorker.repair``), on an embedded ``Engine``. Nothing is printed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvstore.core.keys import BlockHash, ModelSpec, root_hash
from kvstore.demo.model import (
    Runner,
    build_worker,
    describe_model,
    describe_tiers,
    make_scenario,
    store_config,
)
from kvstore.demo.results import DemoOptions, DemoResult, HoleRepair, Progress, Scenario, TurnResult
from kvstore.engine.engine import Engine
from kvstore.worker.model import ModelWorker

__all__ = ["run_demo"]


@dataclass(slots=True)
class _Answer:
    tokens: list[int]
    prefill_s: float  # up to the first token
    load_s: float  # lookup and read, within prefill_s
    hit_tokens: int
    cache: Any  # prompt + answer[:-1]


async def _without_store(runner: Runner, prompt: list[int], answer_tokens: int) -> _Answer:
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
    runner: Runner,
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


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Run:
    """What the turns and the hole section work on, built once by ``run_demo``."""

    runner: Runner
    engine: Engine
    options: DemoOptions
    scenario: Scenario
    result: DemoResult  # filled in as they go
    say: Progress

    def parts(self) -> tuple[Runner, Engine, DemoOptions, Scenario, DemoResult, Progress]:
        return self.runner, self.engine, self.options, self.scenario, self.result, self.say


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
    runner = Runner(worker)
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
                describe_tiers(config),
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
            run = _Run(runner, engine, options, scenario, result, say)
            await _turns(run)
            if options.repair:
                result.repair = await _hole_repair(run)
            await engine.drain()  # the repaired block's write-through copies
            result.tier_blocks = (await engine.stats()).index_blocks
        finally:
            await engine.close()
    result.elapsed_s = time.perf_counter() - started
    return result


async def _turns(run: _Run) -> None:
    runner, engine, options, scenario, result, say = run.parts()
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


async def _hole_repair(run: _Run) -> HoleRepair | None:
    """Evict a middle block of the stored conversation, then compare recomputing from the hole
    with repairing it; ``None`` when fewer than three blocks are stored (no middle)."""
    runner, engine, options, scenario, result, say = run.parts()
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


