"""The hierarchy: lookup latency, hits per tier, background movement, and restart.

Run ``python -m benchmarks.engine [--quick] [--redis-url URL]`` from the repository root. Every
figure stands next to a baseline measured in the same run:

- lookup of a prompt whose blocks are all in G2, 1K to 128K tokens (256 tokens per block), against
  hashing the same prompt alone (``block_hashes``); target: 128K tokens in ≤ 3 ms;
- a read hit in G2, G3 and G4 through the engine (``Engine.read``: residency, verification of
  memory-tier blocks, recency) against the same tier's bare ``get``;
- background movement (G2 -> G3 and G2 -> G4 write-through, G3 -> G2 promotion) against the raw
  tier operations the move is made of;
- rebuilding the index from G3 at start, 100K blocks (10K with ``--quick``), against listing the
  same LMDB keys with raw ``lmdb``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from benchmarks.report import Table, amedians_s, print_tables
from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, encode_block
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.engine.engine import Engine, EngineConfig
from kvstore.engine.placement import PlacementConfig
from tiers.lmdb_store import LmdbTier, LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

HEADERS = ("what", "size", "engine", "baseline", "baseline value", "ratio", "target")
TEXT = frozenset({"what", "size", "baseline", "target"})
MiB = 1 << 20


def store_config(
    workdir: Path, block_bytes: int, num_blocks: int, redis_url: str | None, promote: bool
) -> StoreConfig:
    slot = block_bytes + 4096
    return StoreConfig(
        g2=PinnedTierConfig(
            slot * (num_blocks + 8) * 2, pin="never", segment_prefix="kvstore-bench"
        ),
        g3=LmdbTierConfig(str(workdir / f"g3-{time.monotonic_ns()}"), 4 * block_bytes * num_blocks),
        g4=None
        if redis_url is None
        else RedisTierConfig(
            url=redis_url,
            capacity_bytes=1 << 40,
            namespace=f"bench{time.monotonic_ns()}",
            timeout_ms=30_000,
        ),
        placement=PlacementConfig(promote_on_hit=promote),
        engine=EngineConfig(move_queue_blocks=100_000),
    )


async def lookup_rows(repeats: int, workdir: Path) -> list[tuple[str, ...]]:
    spec = ModelSpec(
        "bench/lookup", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=256
    )
    rows = []
    cfg = store_config(workdir, HEADER_BYTES + spec.block_nbytes, 512, None, promote=False)
    cfg = StoreConfig(g2=cfg.g2, placement=cfg.placement, engine=cfg.engine)  # G2 only
    engine = await Engine.open(cfg)
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 152_064, 131_072, dtype=np.int64)
        kv = torch.zeros((2, 2, 131_072, 1, 8), dtype=torch.float16)
        await engine.put(spec, tokens, kv)
        for n in (1024, 4096, 16_384, 65_536, 131_072):
            prompt = tokens[:n]
            found = await engine.lookup(spec, prompt)
            assert found.hit_tokens == n, "every block must be a G2 hit"

            async def lookup(p: np.ndarray[Any, Any] = prompt) -> None:
                await engine.lookup(spec, p)

            async def hashing(p: np.ndarray[Any, Any] = prompt) -> None:
                block_hashes(spec, p)

            t, base = await amedians_s(lookup, hashing, repeats * 5)
            target = "—" if n != 131_072 else f"{'yes' if t <= 3e-3 else 'NO'} (≤ 3 ms)"
            rows.append(
                (
                    "lookup, all in G2",
                    f"{n // 1024}K tokens",
                    f"{t * 1e3:.3f} ms",
                    "block_hashes alone",
                    f"{base * 1e3:.3f} ms",
                    f"{t / base:.2f}×",
                    target,
                )
            )
    finally:
        await engine.close()
    return rows


def blocks_for(spec: ModelSpec, n: int, seed: int) -> list[tuple[Any, ...]]:
    hashes = block_hashes(
        spec, list(range(seed * 1_000_000, seed * 1_000_000 + n * spec.block_tokens))
    )
    g = torch.Generator().manual_seed(seed)
    return [
        (h, None, torch.randn(spec.block_shape, generator=g).to(torch.bfloat16)) for h in hashes
    ]


async def tier_rows(
    repeats: int, num_blocks: int, redis_url: str, workdir: Path
) -> list[tuple[str, ...]]:
    # 2 MiB blocks: 32 layers x 2 x 16 tokens x 8 KV heads x 128 x bf16.
    spec = ModelSpec(
        "bench/tiers",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        block_tokens=16,
    )
    nbytes = HEADER_BYTES + spec.block_nbytes
    total = nbytes * num_blocks
    rows: list[tuple[str, ...]] = []
    engine = await Engine.open(store_config(workdir, nbytes, num_blocks, redis_url, promote=False))
    try:
        items = blocks_for(spec, num_blocks, seed=1)
        keys = [h for h, _, _ in items]
        # Write-through G2 -> G3 and G2 -> G4, timed to the moment both copies are done.
        t0 = time.perf_counter()
        await engine.put_blocks(spec, items, durable=True)
        t_through = time.perf_counter() - t0
        encoded = [(h, encode_block(spec, h, t)) for h, _, t in items]
        g3_raw = LmdbTier(LmdbTierConfig(str(workdir / "raw-g3"), 2 * total))
        g4 = engine.tier("G4", spec.fingerprint)
        t0 = time.perf_counter()
        await g3_raw.put(encoded)
        t_g3_put = time.perf_counter() - t0
        await g3_raw.close()
        rows.append(
            (
                "write-through G2→G3+G4 (durable put)",
                "2 MiB",
                f"{total / t_through / 1e9:.2f} GB/s",
                "G3 put alone",
                f"{total / t_g3_put / 1e9:.2f} GB/s",
                f"{t_g3_put / t_through:.2f}×",
                "—",
            )
        )

        for tier in ("G2", "G3", "G4"):
            raw = engine.tier(tier, spec.fingerprint)

            async def via_engine() -> None:
                for i in range(0, len(keys), 8):
                    assert None not in await engine.read(spec, keys[i : i + 8])

            async def via_tier(raw: Any = raw) -> None:
                for i in range(0, len(keys), 8):
                    assert None not in await raw.get(keys[i : i + 8])

            t, base = await amedians_s(via_engine, via_tier, repeats)
            per_block_ms = t / num_blocks * 1e3
            rows.append(
                (
                    f"read hit in {tier}",
                    "2 MiB",
                    f"{total / t / 1e9:.2f} GB/s ({per_block_ms:.2f} ms/block)",
                    f"{tier} get alone",
                    f"{total / base / 1e9:.2f} GB/s",
                    f"{base / t:.2f}×",
                    "—",
                )
            )
            if tier != "G4":
                await engine.evict(keys, tier)  # next round hits the tier below

        # Promotion G3 -> G2: blocks only in G3 (and G4); reads hit G3 and queue promotions.
        engine.placement.config = PlacementConfig(promote_on_hit=True)
        await engine.put_blocks(spec, items, durable=True)
        await engine.evict(keys, "G2")
        t0 = time.perf_counter()
        for i in range(0, len(keys), 8):
            await engine.read(spec, keys[i : i + 8])
        await engine.drain()
        t_promote = time.perf_counter() - t0
        g3 = engine.tier("G3", spec.fingerprint)
        g2 = engine.tier("G2", spec.fingerprint)
        await engine.evict(keys, "G2")
        t0 = time.perf_counter()
        for i in range(0, len(keys), 8):
            values = await g3.get(keys[i : i + 8])
            await g2.put([(k, v) for k, v in zip(keys[i : i + 8], values, strict=True) if v])
        t_raw = time.perf_counter() - t0
        await g2.delete(keys)
        rows.append(
            (
                "read G3 + promote G3→G2",
                "2 MiB",
                f"{total / t_promote / 1e9:.2f} GB/s",
                "G3 get + G2 put",
                f"{total / t_raw / 1e9:.2f} GB/s",
                f"{t_raw / t_promote:.2f}×",
                "—",
            )
        )
        await g4.delete(keys)
    finally:
        await engine.close()
    return rows


async def restart_rows(num_blocks: int, workdir: Path) -> list[tuple[str, ...]]:
    spec = ModelSpec(
        "bench/restart", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=16
    )
    path = workdir / "restart-g3"
    nbytes = HEADER_BYTES + spec.block_nbytes
    cfg = LmdbTierConfig(str(path), nbytes * num_blocks * 2)
    tier = LmdbTier(cfg)
    tokens = np.arange(num_blocks * spec.block_tokens, dtype=np.int64)
    hashes = block_hashes(spec, tokens)
    t = torch.zeros(spec.block_shape, dtype=torch.float16)
    parents = [None, *hashes[:-1]]
    for i in range(0, num_blocks, 10_000):
        await tier.put(
            [
                (h, encode_block(spec, h, t, parent_hash=p))
                for h, p in zip(hashes[i : i + 10_000], parents[i : i + 10_000], strict=True)
            ]
        )
    await tier.close()
    store = StoreConfig(
        g2=PinnedTierConfig(64 * MiB, pin="never", segment_prefix="kvstore-bench"), g3=cfg
    )
    t0 = time.perf_counter()
    engine = await Engine.open(store)
    t_open = time.perf_counter() - t0
    found = len(engine.index)
    await engine.close()
    assert found == num_blocks, f"rebuilt {found} of {num_blocks}"
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    db = env.open_db(b"blocks", create=False)
    t0 = time.perf_counter()
    with env.begin(db=db) as txn:
        n = sum(1 for _ in txn.cursor().iternext(keys=True, values=False))
    t_raw = time.perf_counter() - t0
    env.close()
    assert n == num_blocks
    return [
        (
            "restart: rebuild index from G3",
            f"{num_blocks // 1000}K blocks",
            f"{t_open:.2f} s",
            "raw lmdb key listing",
            f"{t_raw:.3f} s",
            f"{t_open / t_raw:.1f}× slower",
            "—",
        )
    ]


async def run(args: argparse.Namespace, redis_url: str, workdir: Path) -> list[tuple[str, ...]]:
    rows = await lookup_rows(args.repeats, workdir)
    rows += await tier_rows(args.repeats, args.num_blocks, redis_url, workdir)
    rows += await restart_rows(args.restart_blocks, workdir)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="less data, fewer repeats")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    args = parser.parse_args(argv)
    args.repeats = 2 if args.quick else 5
    args.num_blocks = 16 if args.quick else 64
    args.restart_blocks = 10_000 if args.quick else 100_000
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-engine-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        url = args.redis_url
        if url is None:
            from tests.redis_servers import start_redis_server

            url = stack.enter_context(start_redis_server()).url
        rows = asyncio.run(run(args, url, workdir))
    title = (
        f"Engine: lookup, hits per tier, movement, restart; median of {args.repeats}"
        f"{' (quick)' if args.quick else ''}"
    )
    print_tables([Table(title, HEADERS, rows, TEXT)], "lmdb", "redis")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
