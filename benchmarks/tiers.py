"""Tier throughput against the raw store underneath, measured in the same run.

Run ``python -m benchmarks.tiers [--quick] [--redis-url URL]`` from the repository root. For blocks
of 2 MiB and 32 MiB (bfloat16 K/V, header included) it times each tier's ``put``, ``get`` and
``get_into`` (into reused, pre-faulted buffers) and, right next to them, the baseline:

- G1 (on cpu) and G2: a memcpy of the same bytes into a pre-faulted buffer (numpy ``copyto``) for
  ``put`` and ``get_into``; for ``get``, which must hand out new memory, copies into fresh
  ``bytes`` kept for the batch, as ``get`` keeps them (fresh memory costs page faults: ~10 ms per
  32 MiB here, which is why ``get_into`` with reused buffers exists);
- G3: raw ``lmdb`` with the same settings — one write transaction per batch; ``txn.get`` per key
  (values kept for the batch) for ``get``, and a copy from the zero-copy view into the same
  reused buffers for ``get_into``;
- G4: raw redis-py, pipelined ``SET``/``GET`` of the whole values (the faster of the sync and the
  asyncio client), against a ``redis-server`` this benchmark starts (or ``--redis-url``).

Targets: G2 ≥ 0.8× memcpy, G3 ≥ 0.8× raw LMDB, G4 ≥ 0.8× raw redis-py. Median of several repeats;
puts are timed into an empty store each time (keys deleted between repeats, untimed).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import redis
import redis.asyncio as aredis
import torch

from benchmarks.report import print_report
from kvstore.block_format import encode_block
from kvstore.keys import ModelSpec, block_hashes
from tiers.base import Tier
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.lmdb_store import LmdbTier, LmdbTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig

MiB = 1 << 20
HEADERS = ("tier", "block", "op", "tier GB/s", "baseline", "baseline GB/s", "ratio", "target")
TEXT = frozenset({"tier", "block", "op", "baseline", "target"})
TARGETS = {"G2": 0.8, "G3": 0.8, "G4": 0.8}


def spec_for(block_mib: int) -> ModelSpec:
    # 32 layers x 2 x tokens x 8 KV heads x 128 dims x 2 bytes: 16 tokens = 2 MiB, 256 = 32 MiB.
    return ModelSpec(
        "bench/tiers",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        block_tokens=block_mib * 8,
    )


def make_blocks(block_mib: int, total_mib: int) -> list[tuple[bytes, bytearray]]:
    spec = spec_for(block_mib)
    n = max(2, total_mib // block_mib)
    g = torch.Generator().manual_seed(block_mib)
    out = []
    for h in block_hashes(spec, list(range(n * spec.block_tokens))):
        t = torch.randn(spec.block_shape, generator=g).to(torch.bfloat16)
        out.append((h, encode_block(spec, h, t)))
    return out


async def timed(
    fn: Callable[[], Awaitable[Any]],
    repeats: int,
    reset: Callable[[], Awaitable[Any]] | None = None,
) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up; ``reset`` runs untimed."""
    samples = []
    for i in range(repeats + 1):
        if reset is not None:
            await reset()
        t0 = time.perf_counter()
        await fn()
        if i:  # the first run warms caches and connections
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def batches(
    blocks: Sequence[tuple[bytes, bytearray]], block_mib: int
) -> list[list[tuple[bytes, bytearray]]]:
    per = max(1, 16 // block_mib)  # 16 MiB per call: a prefix fetch moves several blocks at once
    return [list(blocks[i : i + per]) for i in range(0, len(blocks), per)]


class Bench:
    def __init__(self, repeats: int, block_mib: int, total_mib: int) -> None:
        self.repeats = repeats
        self.block_mib = block_mib
        self.blocks = make_blocks(block_mib, total_mib)
        self.nbytes = sum(len(v) for _, v in self.blocks)
        self.batches = batches(self.blocks, block_mib)
        self.keys = [k for k, _ in self.blocks]
        self.key_batches = [[k for k, _ in b] for b in self.batches]
        # Reused, pre-faulted destination buffers: the same ones for baselines and get_into.
        self.buffers = [np.ones(len(v), dtype=np.uint8) for _, v in self.blocks]
        self.rows: list[tuple[str, ...]] = []

    def gbps(self, seconds: float) -> float:
        return self.nbytes / seconds / 1e9

    def row(self, tier: str, op: str, ours: float, baseline: str, base: float) -> None:
        ratio = base / ours  # times -> throughput ratio
        target = TARGETS.get(tier)
        verdict = "—" if target is None else f"{'yes' if ratio >= target else 'NO'} (≥ {target}×)"
        self.rows.append(
            (
                tier,
                f"{self.block_mib} MiB",
                op,
                f"{self.gbps(ours):.2f}",
                baseline,
                f"{self.gbps(base):.2f}",
                f"{ratio:.2f}×",
                verdict,
            )
        )

    async def tier_ops(self, tier: Tier) -> tuple[float, float, float]:
        async def put() -> None:
            for batch in self.batches:
                await tier.put(batch)

        async def clear() -> None:
            await tier.delete(self.keys)

        async def get() -> None:
            for keys in self.key_batches:
                for value in await tier.get(keys):
                    assert value is not None

        async def get_into() -> None:
            i = 0
            for keys in self.key_batches:
                sizes = await tier.get_into(keys, self.buffers[i : i + len(keys)])
                assert None not in sizes
                i += len(keys)

        t_put = await timed(put, self.repeats, clear)
        await put()
        return t_put, await timed(get, self.repeats), await timed(get_into, self.repeats)

    async def memcpy(self) -> float:
        async def copy() -> None:
            for (_, value), buf in zip(self.blocks, self.buffers, strict=True):
                np.copyto(buf, np.frombuffer(value, dtype=np.uint8))

        return await timed(copy, self.repeats)

    async def copy_to_new(self) -> float:
        async def copy() -> None:
            for batch in self.batches:
                kept = [bytes(v) for _, v in batch]
                assert len(kept) == len(batch)

        return await timed(copy, self.repeats)

    async def memory_tier(self, name: str, tier: Tier) -> None:
        base = await self.memcpy()
        base_new = await self.copy_to_new()
        t_put, t_get, t_into = await self.tier_ops(tier)
        await tier.close()
        self.row(name, "put", t_put, "memcpy", base)
        self.row(name, "get", t_get, "copy to new bytes", base_new)
        self.row(name, "get_into", t_into, "memcpy", base)

    async def lmdb(self, workdir: Path) -> None:
        capacity = 2 * self.nbytes
        config = LmdbTierConfig(str(workdir / "g3"), capacity)
        (workdir / "raw").mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(workdir / "raw"), map_size=config.map_size, max_dbs=4, sync=False, metasync=False
        )
        db = env.open_db(b"blocks")

        async def raw_put() -> None:
            for batch in self.batches:
                with env.begin(db=db, write=True) as txn:
                    for k, v in batch:
                        txn.put(k, v)

        async def raw_clear() -> None:
            with env.begin(db=db, write=True) as txn:
                for k in self.keys:
                    txn.delete(k)

        async def raw_get() -> None:
            for keys in self.key_batches:
                with env.begin(db=db) as txn:
                    kept = [txn.get(k) for k in keys]
                assert None not in kept

        async def raw_get_into() -> None:
            i = 0
            for keys in self.key_batches:
                with env.begin(db=db, buffers=True) as txn:
                    for k in keys:
                        np.copyto(self.buffers[i], np.frombuffer(txn.get(k), dtype=np.uint8))
                        i += 1

        base_put = await timed(raw_put, self.repeats, raw_clear)
        await raw_put()
        base_get = await timed(raw_get, self.repeats)
        base_into = await timed(raw_get_into, self.repeats)
        env.close()
        tier = LmdbTier(config)
        t_put, t_get, t_into = await self.tier_ops(tier)
        await tier.close()
        self.row("G3", "put", t_put, "raw lmdb put", base_put)
        self.row("G3", "get", t_get, "raw lmdb get", base_get)
        self.row("G3", "get_into", t_into, "raw lmdb view + copy", base_into)

    async def redis(self, url: str) -> None:
        sync = redis.Redis.from_url(url)
        asy = aredis.Redis.from_url(url)

        async def sync_set() -> None:
            for batch in self.batches:
                pipe = sync.pipeline(transaction=False)
                for k, v in batch:
                    pipe.set(b"raw:" + k, v)
                pipe.execute()

        async def async_set() -> None:
            for batch in self.batches:
                pipe = asy.pipeline(transaction=False)
                for k, v in batch:
                    pipe.set(b"raw:" + k, v)
                await pipe.execute()

        async def raw_clear() -> None:
            sync.delete(*[b"raw:" + k for k in self.keys])

        async def sync_get() -> None:
            for keys in self.key_batches:
                pipe = sync.pipeline(transaction=False)
                for k in keys:
                    pipe.get(b"raw:" + k)
                assert None not in pipe.execute()

        async def async_get() -> None:
            for keys in self.key_batches:
                pipe = asy.pipeline(transaction=False)
                for k in keys:
                    pipe.get(b"raw:" + k)
                assert None not in await pipe.execute()

        base_put = min(
            await timed(sync_set, self.repeats, raw_clear),
            await timed(async_set, self.repeats, raw_clear),
        )
        await async_set()
        base_get = min(await timed(sync_get, self.repeats), await timed(async_get, self.repeats))
        await raw_clear()
        sync.close()
        await asy.aclose()
        tier = RedisTier(
            RedisTierConfig(
                url=url, capacity_bytes=4 * self.nbytes, namespace="bench", timeout_ms=30_000
            )
        )
        t_put, t_get, t_into = await self.tier_ops(tier)
        await tier.delete(self.keys)
        await tier.close()
        self.row("G4", "put", t_put, "redis-py pipelined SET", base_put)
        self.row("G4", "get", t_get, "redis-py pipelined GET", base_get)
        self.row("G4", "get_into", t_into, "redis-py pipelined GET", base_get)


async def run(args: argparse.Namespace, redis_url: str, workdir: Path) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for block_mib in (2, 32):
        bench = Bench(args.repeats, block_mib, args.total_mib)
        slot = max(len(v) for _, v in bench.blocks) + 4096
        capacity = slot * (len(bench.blocks) + 1)
        await bench.memory_tier("G1 (cpu)", GpuMemoryTier(GpuTierConfig(capacity, slot, "cpu")))
        await bench.memory_tier(
            "G2",
            PinnedMemoryTier(
                PinnedTierConfig(capacity, slot, pin="never", segment_prefix="kvstore-bench")
            ),
        )
        await bench.lmdb(workdir / f"lmdb-{block_mib}")
        await bench.redis(redis_url)
        rows += bench.rows
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="less data, fewer repeats")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    args = parser.parse_args(argv)
    args.total_mib = 64 if args.quick else 256
    args.repeats = 2 if args.quick else 5
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        url = args.redis_url
        if url is None:
            from tests.redis_servers import start_redis_server

            url = stack.enter_context(start_redis_server()).url
        rows = asyncio.run(run(args, url, workdir))
    title = (
        f"Tier throughput vs raw baselines, {args.total_mib} MiB per op per block size, "
        f"median of {args.repeats}{' (quick)' if args.quick else ''}"
    )
    print_report(title, HEADERS, rows, TEXT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
