"""Time to first token from the store against recomputing the prompt, and hole repair against
truncating at the hole — with a real model, a real store and every baseline measured in the run.

Run ``python -m benchmarks.worker [--quick] [--redis-url URL] [--dtype D] [--plot PATH]`` from
the repository root. The model is a randomly initialised Llama of realistic shape scaled to a
CPU (8 layers, hidden 1024, 16 query heads sharing 8 K/V heads of 64 dims, MLP 2816, vocabulary
32000; ``--quick``: the worker's tiny default model), built by ``ModelWorker`` with seed 0.
Prompts are prefixes of one random token sequence; blocks hold 256 tokens (``--quick``: 64).

- **dtype**: the recompute below at 1K tokens (``--quick``: 512) in float32 and in bfloat16, to
  choose ``--dtype`` (default bfloat16: about twice as fast as float32 on this CPU, which has
  AVX512-BF16). The rest runs in ``--dtype``.
- **Time to first token**, 512 to 8K tokens (``--quick``: 512 and 1K). Baseline: *recompute*,
  one forward pass over the whole prompt that fills a ``DynamicCache`` and takes the logits of
  the last position only, then the argmax. Against it, *restore* from each tier: lookup, lease,
  ``Engine.get`` of the prompt's full blocks (read, verified, decoded), the blocks concatenated
  into past K/V, a cache built from it, the model run over the tokens the blocks do not cover
  (every prompt here is a whole number of blocks, so that is the last token, whose K/V is
  recomputed because its logits are needed), and the argmax. The blocks are in G2 only (shared
  memory), in G3 only (LMDB in a temporary directory; evicted from G2, promotion off), or in G4
  only (a real ``redis-server``; a second engine with nothing in G2 or G3 finds them by its G4
  probe, as another node would; the probe is made once, before timing). Every restored first
  token must equal the recomputed one. Target: restore from G2 ≥ 10× faster than recompute at
  4K tokens.
- **One hole** (one missing block) at 10%, 50% and 90% of a 4K-token prompt (``--quick``: 1K),
  G2 only. Baseline: *truncate*, what vLLM, LMCache and SGLang do — restore the blocks before
  the hole and recompute every token from the hole to the end, then the argmax. Against it,
  ``await worker.repair(engine, tokens)`` (loads the blocks before the hole, computes only the
  hole, stores it) followed by the restore of the whole prompt as above. Both first tokens must
  equal the recomputed one.

Cases are sampled round-robin (a round is one sample of each; restores, which are cheap, three
of each per round), as ``benchmarks.report`` does, so that load from another process lands on a
baseline and the rows compared with it alike.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import Table, print_tables
from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES
from kvstore.core.keys import ModelSpec
from kvstore.engine.engine import Engine, EngineConfig
from kvstore.engine.placement import PlacementConfig
from kvstore.worker.model import ModelWorker, WorkerConfig, default_config
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

TIERS = ("G2", "G3", "G4")
TTFT_HEADERS = (
    "prompt",
    "path",
    "TTFT",
    "load (lookup + get + concat)",
    "model (cache + forward)",
    "speedup vs recompute",
    "target",
)
TTFT_TEXT = frozenset({"prompt", "path", "target"})
HOLE_HEADERS = (
    "hole",
    "tokens computed: repair / truncate",
    "truncate (baseline)",
    "repair + restore",
    "of which repair",
    "truncate ÷ repair",
    "first token",
)
HOLE_TEXT = frozenset({"hole", "tokens computed: repair / truncate", "first token"})
MODEL_HEADERS = ("dtype", "prompt", "recompute", "÷ float32")
MODEL_TEXT = frozenset({"dtype", "prompt"})


def model_config(quick: bool) -> Any:
    if quick:
        return default_config()
    import transformers

    return transformers.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=16384,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # As in the worker's default model: at transformers' 0.02 the output hardly depends on
        # the context, and a first token that ignores the past checks nothing.
        initializer_range=0.1,
    )


# -- the model step that every path ends with ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    token: int
    total_s: float
    load_s: float  # reading the store, up to the past K/V tensor
    model_s: float  # the cache, the forward pass, the argmax


def first_token(
    worker: ModelWorker, ids: torch.Tensor, past: torch.Tensor | None
) -> tuple[int, Any]:
    """The greedy first token after ``ids`` given ``past``, the K/V of a prefix of ``ids`` (or
    None), and the cache the forward pass filled. Only the last position's logits are computed,
    as a serving engine does (``ModelWorker.generate`` computes them for every position)."""
    start = 0 if past is None else int(past.shape[2])
    if past is not None and start == ids.numel():
        # The logits of the last token are needed: its K/V is recomputed with them.
        start -= 1
        past = past[:, :, :start]
    cache = worker.cache_from_kv(past) if past is not None and start else _dynamic_cache()
    positions = torch.arange(start, ids.numel())
    cache_arg, keep_arg = _forward_names(worker.model)
    with torch.no_grad():
        out = worker.model(
            input_ids=ids[None, start:],
            position_ids=positions[None],
            use_cache=True,
            **{cache_arg: cache, keep_arg: 1},
        )
    return int(out.logits[0, -1].argmax()), cache


def _dynamic_cache() -> Any:
    import transformers

    return transformers.DynamicCache()


def _forward_names(model: Any) -> tuple[str, str]:
    # transformers 5.24 takes the cache as ``cache`` and warns on ``past_key_values``; older
    # versions (the project allows >= 4.45) know only ``past_key_values``, and some spell
    # ``logits_to_keep`` as ``num_logits_to_keep``.
    params = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"
    return cache, keep


def recompute(worker: ModelWorker, ids: torch.Tensor) -> tuple[Timing, Any]:
    t0 = time.perf_counter()
    token, cache = first_token(worker, ids, None)
    t = time.perf_counter() - t0
    return Timing(token, t, 0.0, t), cache


async def load_past(
    engine: Engine, spec: ModelSpec, tokens: np.ndarray[Any, Any]
) -> torch.Tensor | None:
    """The K/V of the prompt's leading hit as one tensor; None when nothing is stored."""
    found = await engine.lookup(spec, tokens)
    keys = found.hashes[: found.hit_blocks]
    if not keys:
        return None
    lease = engine.reserve(keys)
    try:
        blocks = await engine.get(spec, keys)
    finally:
        engine.release(lease.lease_id)
    present = [b for b in blocks if b is not None]
    assert len(present) == len(keys), "a leased block vanished"
    return torch.cat(present, dim=2)


async def restore(engine: Engine, worker: ModelWorker, tokens: np.ndarray[Any, Any]) -> Timing:
    ids = worker.token_ids(tokens)
    t0 = time.perf_counter()
    past = await load_past(engine, worker.spec, tokens)
    t1 = time.perf_counter()
    token, _ = first_token(worker, ids, past)
    t2 = time.perf_counter()
    return Timing(token, t2 - t0, t1 - t0, t2 - t1)


def median(samples: Sequence[Timing], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# -- recompute by dtype --------------------------------------------------------------------------


def model_rows(
    worker: ModelWorker, quick: bool, tokens: np.ndarray[Any, Any], n: int, repeats: int
) -> list[tuple[str, ...]]:
    """The recompute baseline in float32 and in bfloat16 (the same weights, cast)."""
    ids = worker.token_ids(tokens[:n])
    # The baseline takes only the last position's logits; ModelWorker.generate, which computes
    # every position's, must pick the same token.
    want, _ = first_token(worker, ids, None)
    got = worker.generate(ids, max_new_tokens=1)
    assert got == [want], f"ModelWorker.generate picks {got}, the recompute baseline {want}"
    other = "bfloat16" if worker.config.dtype == "float32" else "float32"
    workers = {
        worker.config.dtype: worker,
        other: ModelWorker(
            WorkerConfig(seed=0, dtype=other, block_tokens=worker.config.block_tokens),
            model_config=model_config(quick),
        ),
    }
    samples: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for dtype in samples:  # warm-up
        first_token(workers[dtype], ids, None)
    for _ in range(repeats):
        for dtype, times in samples.items():
            t0 = time.perf_counter()
            first_token(workers[dtype], ids, None)
            times.append(time.perf_counter() - t0)
    base = statistics.median(samples["float32"])
    rows = []
    for dtype, times in samples.items():
        t = statistics.median(times)
        rows.append((dtype, f"{tokens_label(n)} tokens", ms(t), f"{t / base:.2f}×"))
    return rows


# -- time to first token -------------------------------------------------------------------------


@dataclass
class Stores:
    g2: Engine  # G2 only
    g3: Engine  # G2 + G3 + G4 (write-through), blocks evicted from G2: reads hit G3
    g4: Engine  # G2 + G4 on the same Redis namespace, nothing of its own: reads hit G4

    def by_tier(self) -> dict[str, Engine]:
        return {"G2": self.g2, "G3": self.g3, "G4": self.g4}

    async def close(self) -> None:
        for engine in (self.g2, self.g3, self.g4):
            await engine.close()


async def open_stores(spec: ModelSpec, num_blocks: int, redis_url: str, workdir: Path) -> Stores:
    block = HEADER_BYTES + spec.block_nbytes
    slot = block + 4096

    def g2(blocks: int) -> PinnedTierConfig:
        # Twice what is stored: placement evicts above 95% of capacity.
        return PinnedTierConfig(
            slot * (blocks + 4) * 2, pin="never", segment_prefix="kvstore-bench"
        )

    g4 = RedisTierConfig(
        url=redis_url,
        capacity_bytes=1 << 40,
        namespace=f"bench-worker-{time.monotonic_ns()}",
        timeout_ms=30_000,
    )
    no_promotion = PlacementConfig(promote_on_hit=False)
    engine = EngineConfig(move_queue_blocks=100_000)
    only_g2 = await Engine.open(StoreConfig(g2=g2(num_blocks), engine=engine))
    g3 = await Engine.open(
        StoreConfig(
            g2=g2(num_blocks),
            g3=LmdbTierConfig(str(workdir / "g3"), 4 * block * num_blocks),
            g4=g4,
            placement=no_promotion,
            engine=engine,
        )
    )
    only_g4 = await Engine.open(StoreConfig(g2=g2(0), g4=g4, placement=no_promotion, engine=engine))
    return Stores(only_g2, g3, only_g4)


async def fill(
    stores: Stores, spec: ModelSpec, tokens: np.ndarray[Any, Any], kv: torch.Tensor
) -> None:
    """Put the prompt's blocks where each engine is to read them from, and check they are there."""
    await stores.g2.put(spec, tokens, kv)
    await stores.g3.put(spec, tokens, kv, durable=True)  # G2, then G3 and G4 written through
    hashes = stores.g3.hashes(spec, tokens)
    await stores.g3.evict(hashes, "G2")
    for tier, engine in stores.by_tier().items():
        # For G4 this lookup is the one that finds the blocks (the G4 probe of an unknown block).
        found = await engine.lookup(spec, tokens)
        assert found.tiers == [tier] * len(hashes), f"{tier}: blocks in {set(found.tiers)}"


async def ttft_rows(
    worker: ModelWorker,
    stores: Stores,
    tokens: np.ndarray[Any, Any],
    lengths: Sequence[int],
    repeats: int,
    restores_per_round: int,
) -> tuple[list[tuple[str, ...]], dict[str, dict[int, float]], dict[int, int]]:
    """Rows, median TTFT in seconds per path and length, and the first token of each length."""
    series: dict[str, dict[int, float]] = {p: {} for p in ("recompute", *TIERS)}
    reference: dict[int, int] = {}
    rows: dict[int, list[tuple[str, ...]]] = {}
    filled = False
    # Longest first: its recompute fills the cache whose K/V is stored, and holds every shorter
    # prompt's K/V too (they are its prefixes).
    for n in sorted(lengths, reverse=True):
        prompt = tokens[:n]
        ids = worker.token_ids(prompt)
        samples: dict[str, list[Timing]] = {p: [] for p in series}
        for round_ in range(repeats):
            timing, cache = recompute(worker, ids)
            samples["recompute"].append(timing)
            if not filled:
                await fill(stores, worker.spec, prompt, worker.kv_from_cache(cache))
                filled = True
            del cache
            if round_ == 0:
                for engine in stores.by_tier().values():
                    await restore(engine, worker, prompt)  # warm-up
            # Restores are cheap next to a recompute: more of them per round steady their median.
            for _ in range(restores_per_round):
                for tier, engine in stores.by_tier().items():
                    samples[tier].append(await restore(engine, worker, prompt))
        want = samples["recompute"][0].token
        reference[n] = want
        for path, got in samples.items():
            bad = [s.token for s in got if s.token != want]
            assert not bad, f"{tokens_label(n)} tokens, {path}: first token {bad}, recompute {want}"
        base = median(samples["recompute"], "total_s")
        rows[n] = []
        for path, got in samples.items():
            t = median(got, "total_s")
            series[path][n] = t
            target = "—"
            if path == "G2" and n == 4096:
                target = f"{'yes' if base / t >= 10 else 'NO'} (≥ 10×)"
            rows[n].append(
                (
                    f"{tokens_label(n)} tokens",
                    "recompute (baseline)" if path == "recompute" else f"restore from {path}",
                    ms(t),
                    "—" if path == "recompute" else ms(median(got, "load_s")),
                    ms(median(got, "model_s")),
                    "1×" if path == "recompute" else f"{base / t:.1f}×",
                    target,
                )
            )
    return [row for n in sorted(lengths) for row in rows[n]], series, reference


# -- one hole: repair against truncation -----------------------------------------------------------


async def hole_rows(
    worker: ModelWorker,
    engine: Engine,
    tokens: np.ndarray[Any, Any],
    want: int,
    repeats: int,
) -> tuple[list[tuple[str, ...]], dict[str, dict[str, float]]]:
    spec = worker.spec
    bt = spec.block_tokens
    n = len(tokens)
    ids = worker.token_ids(tokens)
    hashes = engine.hashes(spec, tokens)
    num_blocks = len(hashes)
    rows: list[tuple[str, ...]] = []
    series: dict[str, dict[str, float]] = {"truncate": {}, "repair": {}}

    async def punch(hole: int) -> None:
        await engine.evict([hashes[hole]])  # from every tier
        found = await engine.lookup(spec, tokens)
        assert found.holes == [hole], f"expected a hole at block {hole}, lookup says {found.holes}"

    async def truncate() -> Timing:
        t0 = time.perf_counter()
        past = await load_past(engine, spec, tokens)
        t1 = time.perf_counter()
        token, _ = first_token(worker, ids, past)
        t2 = time.perf_counter()
        return Timing(token, t2 - t0, t1 - t0, t2 - t1)

    async def repair(hole: int) -> Timing:
        t0 = time.perf_counter()
        result = await worker.repair(engine, tokens)
        t1 = time.perf_counter()
        assert result.repaired == [hole], f"repaired {result.repaired}, hole {hole}"
        after = await restore(engine, worker, tokens)
        # Here load_s is the repair call and model_s the restore after it.
        return Timing(after.token, time.perf_counter() - t0, t1 - t0, after.total_s)

    for percent in (10, 50, 90):
        # The block holding the token at that position; a hole needs a present block after it.
        hole = min(n * percent // 100 // bt, num_blocks - 2)
        samples: dict[str, list[Timing]] = {"truncate": [], "repair": []}
        await punch(hole)
        await repair(hole)  # warm-up (the thread pool, the first put)
        for _ in range(repeats):
            await punch(hole)
            samples["truncate"].append(await truncate())
            samples["repair"].append(await repair(hole))
        for path, got in samples.items():
            bad = [s.token for s in got if s.token != want]
            assert not bad, f"hole at {percent}%, {path}: first token {bad}, recompute {want}"
        t_trunc = median(samples["truncate"], "total_s")
        t_repair = median(samples["repair"], "total_s")
        label = (
            f"{percent}%: block {hole} of {num_blocks} (tokens {hole * bt}–{(hole + 1) * bt - 1})"
        )
        series["truncate"][f"{percent}%"] = t_trunc
        series["repair"][f"{percent}%"] = t_repair
        rows.append(
            (
                label,
                f"{bt} + 1 / {n - hole * bt}",
                ms(t_trunc),
                ms(t_repair),
                ms(median(samples["repair"], "load_s")),
                f"{t_trunc / t_repair:.1f}×",
                "same as recompute",
            )
        )
    return rows, series


# -- the figure ----------------------------------------------------------------------------------


def plot(
    path: Path,
    ttft: dict[str, dict[int, float]],
    holes: dict[str, dict[str, float]],
    title: str,
    hole_prompt: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"recompute": "o-", "G2": "s-", "G3": "^-", "G4": "D-"}
    for name, points in ttft.items():
        xs = sorted(points)
        label = "recompute" if name == "recompute" else f"restore from {name}"
        left.plot(xs, [points[x] * 1e3 for x in xs], styles[name], label=label)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    lengths = sorted(ttft["recompute"])
    left.set_xticks(lengths, [tokens_label(n) for n in lengths])
    left.set_xlabel("prompt tokens")
    left.set_ylabel("time to first token (ms, log)")
    left.set_title("Time to first token")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    positions = list(holes["truncate"])
    x = np.arange(len(positions))
    width = 0.38
    trunc = [holes["truncate"][p] * 1e3 for p in positions]
    rep = [holes["repair"][p] * 1e3 for p in positions]
    right.bar(x - width / 2, trunc, width, label="truncate at the hole + recompute the rest")
    right.bar(x + width / 2, rep, width, label="repair the hole + restore")
    for i, (a, b) in enumerate(zip(trunc, rep, strict=True)):
        right.annotate(f"{a / b:.1f}×", (x[i], max(a, b)), ha="center", va="bottom")
    right.set_xticks(x, [f"hole at {p}" for p in positions])
    right.set_ylabel("time to first token (ms)")
    right.set_title(f"One missing block in a {tokens_label(hole_prompt)}-token prompt (G2)")
    right.grid(True, axis="y", alpha=0.3)
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver --------------------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, redis_url: str, workdir: Path
) -> tuple[list[Table], dict[str, Any]]:
    worker = ModelWorker(
        WorkerConfig(seed=0, dtype=args.dtype, block_tokens=args.block_tokens),
        model_config=model_config(args.quick),
    )
    cfg = worker.model.config
    params = sum(p.numel() for p in worker.model.parameters())
    shape = (
        f"Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} K/V heads of "
        f"{worker.spec.head_dim}, MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size}, "
        f"{params / 1e6:.0f} M parameters"
    )
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, max(args.lengths), dtype=np.int64)
    first_token(worker, worker.token_ids(tokens[: args.block_tokens]), None)  # warm-up

    m_rows = model_rows(worker, args.quick, tokens, args.model_tokens, args.repeats)
    stores = await open_stores(
        worker.spec, max(args.lengths) // args.block_tokens, redis_url, workdir
    )
    try:
        t_rows, ttft, reference = await ttft_rows(
            worker, stores, tokens, args.lengths, args.repeats, args.restores_per_round
        )
        h_rows, holes = await hole_rows(
            worker,
            stores.g2,
            tokens[: args.hole_tokens],
            reference[args.hole_tokens],
            args.repeats,
        )
    finally:
        await stores.close()
    quick = " (quick)" if args.quick else ""
    block_mib = worker.spec.block_nbytes / (1 << 20)
    tables = [
        Table(
            f"Recompute by dtype: {shape}; {threads} torch threads; median of {args.repeats}"
            f"{quick}",
            MODEL_HEADERS,
            m_rows,
            MODEL_TEXT,
        ),
        Table(
            f"Time to first token, restore vs recompute: {shape}, {args.dtype}, "
            f"{args.block_tokens}-token blocks ({block_mib:g} MiB); {threads} torch threads; "
            f"median of {args.repeats} (recompute), {args.repeats * args.restores_per_round} "
            f"(restore){quick}",
            TTFT_HEADERS,
            t_rows,
            TTFT_TEXT,
            group_columns=1,
        ),
        Table(
            f"One missing block in a {tokens_label(args.hole_tokens)}-token prompt, G2: repair "
            f"vs truncate (restore up to the hole, recompute the rest); {args.dtype}; median of "
            f"{args.repeats}{quick}",
            HOLE_HEADERS,
            h_rows,
            HOLE_TEXT,
        ),
    ]
    figure = {
        "ttft": ttft,
        "holes": holes,
        "title": f"{shape}\n{args.dtype}, {args.block_tokens}-token blocks; "
        f"{os.cpu_count()} CPUs, {threads} torch threads, no GPU; medians of {args.repeats} "
        f"recomputes, {args.repeats * args.restores_per_round} restores{quick}",
    }
    return tables, figure


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompts")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16"),
        help="compute and storage dtype (default bfloat16: the faster one on this CPU)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="where to save the figure (default benchmarks/worker.png; none with --quick)",
    )
    args = parser.parse_args(argv)
    args.repeats = 2 if args.quick else 3
    args.restores_per_round = 2 if args.quick else 3
    args.lengths = [512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192]
    args.block_tokens = 64 if args.quick else 256
    args.hole_tokens = 1024 if args.quick else 4096
    args.model_tokens = 512 if args.quick else 1024
    plot_path = args.plot
    if plot_path is None and not args.quick:
        plot_path = str(Path(__file__).with_name("worker.png"))
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-worker-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        url = args.redis_url
        if url is None:
            from tests.redis_servers import start_redis_server

            url = stack.enter_context(start_redis_server()).url
        tables, figure = asyncio.run(run(args, url, workdir))
    print_tables(tables, "transformers", "lmdb", "redis")
    if plot_path:
        plot(Path(plot_path), figure["ttft"], figure["holes"], figure["title"], args.hole_tokens)
        print(f"figure: {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
