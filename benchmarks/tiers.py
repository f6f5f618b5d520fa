"""Tier throughput against the raw store underneath, measured in the same run.

Run ``python -m benchmarks.tiers [--quick] [--redis-url URL]`` from the repository root. For blocks
of 64 KiB, 2 MiB and 32 MiB (bfloat16 K/V, header included) it times each tier's ``put``, ``get``
and ``get_into`` (into reused, pre-faulted buffers), the in-process engine's reads into tensors,
and, right next to them, the baseline:

- G1 (on cpu) and G2: a memcpy of the same bytes into pre-faulted buffers for ``put`` and
  ``get_into``, block by block (numpy ``copyto`` per block: the bytes are separate blocks, so one
  copy of one large buffer would be a baseline no store of blocks can reach); for ``get``, which
  must hand out new memory, copies into fresh ``bytes`` kept for the batch, as ``get`` keeps them
  (fresh memory costs page faults: ~10 ms per 32 MiB here, which is why ``get_into`` with reused
  buffers exists);
- the engine (G2 only, the blocks in G2): ``Engine.get_into`` into slices of one reused,
  pre-faulted K/V tensor ``[layers, 2, tokens, kv_heads, head_dim]``, against the same memcpy
  (the engine copies the payloads, 128 header bytes per block fewer than the baseline), one
  call per 16 MiB as for the tiers; ``Engine.get`` (new tensors) against the copies into fresh
  ``bytes``;
- G3: raw ``lmdb`` with the same settings — one write transaction per batch; ``txn.get`` per key
  (values kept for the batch) for ``get``, and a copy from the zero-copy view into the same
  reused buffers for ``get_into``;
- G4: raw redis-py, pipelined ``SET``/``GET`` of the whole values (the faster of the sync and the
  asyncio client), against a ``redis-server`` this benchmark starts (or ``--redis-url``);
- G1 on CUDA, when this machine has a CUDA device (otherwise a line says the rows are omitted):
  ``put`` from page-locked host memory and ``get`` (into fresh ``bytes``), against a bare
  device-to-device copy of the same bytes (``dst.copy_(src)`` block by block, synchronized); the
  same put against a bare pinned host-to-device copy (``non_blocking`` block by block, then
  synchronized), the bound a put from the host can reach; and a put from G2's segment (pinned with
  ``cudaHostRegister``: the G2->G1 promotion's copy) against the same host-to-device copy.
  ``--g1-cuda`` measures only these rows (no LMDB, no Redis: for a GPU machine without
  ``redis-server``).

Targets: G2 ≥ 0.8× memcpy, engine get into tensors ≥ 0.7× memcpy, G3 ≥ 0.8× raw LMDB, G4 ≥ 0.8×
raw redis-py. Every tier and every baseline of one block size is set up first and then sampled
round-robin (``report.medians_s``): one sample of each per round, so that a tier and its
baseline see the same load on this shared machine (timed one after the other, G3 put came out
at 2.82x of raw LMDB for 2 MiB blocks and 0.31x for 32 MiB in one run; sampled round-robin,
0.87x-0.98x and 0.82x-0.91x). Puts are timed into an empty store each time (keys deleted before
each sample, untimed); the put leaves the blocks in place for the gets that follow it in the
round.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import redis
import redis.asyncio as aredis
import torch

from benchmarks.report import Case, Settings, Table, medians_s, print_tables
from kvstore.config import StoreConfig
from kvstore.core.block_format import encode_block, torch_dtype
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.engine.engine import Engine
from tiers.base import Buffer, Tier
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.lmdb_store import LmdbTier, LmdbTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig

KiB = 1 << 10
MiB = 1 << 20
HEADERS = ("tier", "block", "op", "tier GB/s", "baseline", "baseline GB/s", "ratio", "target")
TEXT = frozenset({"tier", "block", "op", "baseline", "target"})
# By tier, or by (tier, op) where one op of a tier has its own.
TARGETS: dict[str | tuple[str, str], float] = {
    "G2": 0.8,
    "G3": 0.8,
    "G4": 0.8,
    ("engine", "get into tensors"): 0.7,
}
# One call moves the whole data set (256 MiB), tens to hundreds of ms: one call per sample.
FULL = Settings(repeats=9, warmup=1, min_sample_s=0.0)
QUICK = Settings(repeats=3, warmup=1, min_sample_s=0.0)

Block = tuple[bytes, bytearray]
NO_CUDA = "no CUDA device: the G1-on-CUDA rows are omitted"


def spec_for(block_bytes: int) -> ModelSpec:
    """bfloat16 K/V: 64 KiB is 2 layers x 2 x 64 tokens x 2 KV heads x 64 dims x 2 bytes; 2 MiB and
    32 MiB are 32 layers x 2 x (16 or 256) tokens x 8 KV heads x 128 dims x 2 bytes."""
    if block_bytes == 64 * KiB:
        return ModelSpec(
            "bench/tiers",
            num_layers=2,
            num_kv_heads=2,
            head_dim=64,
            dtype="bfloat16",
            block_tokens=64,
        )
    return ModelSpec(
        "bench/tiers",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        block_tokens=block_bytes // (128 * KiB),
    )


BLOCK_BYTES = (64 * KiB, 2 * MiB, 32 * MiB)


def memory_tier_configs(capacity_bytes: int) -> tuple[GpuTierConfig, PinnedTierConfig]:
    """G1 (on the CPU) and G2 of ``capacity_bytes``: the one place their settings are written."""
    return (
        GpuTierConfig(capacity_bytes, device="cpu"),
        PinnedTierConfig(capacity_bytes, pin="never", segment_prefix="kvstore-bench"),
    )


def make_blocks(spec: ModelSpec, total_bytes: int) -> list[Block]:
    n = max(2, total_bytes // spec.block_nbytes)
    g = torch.Generator().manual_seed(spec.block_nbytes)
    out: list[Block] = []
    for h in block_hashes(spec, list(range(n * spec.block_tokens))):
        t = torch.randn(spec.block_shape, generator=g).to(torch.bfloat16)
        out.append((h, encode_block(spec, h, t)))
    return out


def batches(blocks: Sequence[Block], block_bytes: int) -> list[list[Block]]:
    # 16 MiB per call: a prefix fetch moves several blocks at once
    per = max(1, 16 * MiB // block_bytes)
    return [list(blocks[i : i + per]) for i in range(0, len(blocks), per)]


class Bench:
    """The cases of one block size: every tier's ops and every baseline, timed together."""

    def __init__(self, runner: asyncio.Runner, block_bytes: int, total_bytes: int) -> None:
        self.runner = runner
        self.spec = spec_for(block_bytes)
        self.label = (
            f"{block_bytes // MiB} MiB" if block_bytes >= MiB else f"{block_bytes // KiB} KiB"
        )
        self.blocks = make_blocks(self.spec, total_bytes)
        self.nbytes = sum(len(v) for _, v in self.blocks)
        self.batches = batches(self.blocks, block_bytes)
        self.keys = [k for k, _ in self.blocks]
        self.key_batches = [[k for k, _ in b] for b in self.batches]
        # Reused, pre-faulted destination buffers: the same ones for baselines and get_into.
        self.buffers = [np.ones(len(v), dtype=np.uint8) for _, v in self.blocks]
        self.cases: dict[str, Callable[[], object] | Case] = {}
        self.rows: list[tuple[str, ...]] = []
        self.closers: list[Callable[[], object]] = []

    def sync(self, coroutine_fn: Callable[[], Coroutine[Any, Any, object]]) -> Callable[[], object]:
        """A plain callable that runs one async op on the benchmark's event loop."""
        return lambda: self.runner.run(coroutine_fn())

    # -- cases ---------------------------------------------------------------------------------

    def add_memcpy_baselines(self) -> None:
        def memcpy() -> None:
            for (_, value), buf in zip(self.blocks, self.buffers, strict=True):
                np.copyto(buf, np.frombuffer(value, dtype=np.uint8))

        def copy_to_new() -> None:
            for batch in self.batches:
                kept = [bytes(v) for _, v in batch]
                assert len(kept) == len(batch)

        self.cases["memcpy"] = memcpy
        self.cases["copy to new bytes"] = copy_to_new

    def batched(self, items: Sequence[tuple[bytes, Buffer]]) -> list[list[tuple[bytes, Buffer]]]:
        """``items`` (one per block) in the calls of ``self.batches``."""
        per = len(self.batches[0])
        return [list(items[i : i + per]) for i in range(0, len(items), per)]

    def put_case(self, tier: Tier, source: Sequence[Sequence[tuple[bytes, Buffer]]]) -> Case:
        """Every block put from ``source``, one call per batch, into ``tier`` emptied first."""

        async def put() -> None:
            for batch in source:
                assert await tier.put(batch) == len(batch)

        async def clear() -> None:
            await tier.delete(self.keys)

        return Case(self.sync(put), reset=self.sync(clear))

    def get_case(self, tier: Tier) -> Callable[[], object]:
        """Every block read from ``tier`` into fresh ``bytes``, one call per batch."""

        async def get() -> None:
            for keys in self.key_batches:
                for value in await tier.get(keys):
                    assert value is not None

        return self.sync(get)

    def add_tier(self, name: str, tier: Tier) -> None:
        async def get_into() -> None:
            i = 0
            for keys in self.key_batches:
                sizes = await tier.get_into(keys, self.buffers[i : i + len(keys)])
                assert None not in sizes
                i += len(keys)

        # Order matters within a round: the put leaves the blocks in place for both gets.
        self.cases[f"{name} put"] = self.put_case(tier, self.batches)
        self.cases[f"{name} get"] = self.get_case(tier)
        self.cases[f"{name} get_into"] = self.sync(get_into)
        self.closers.append(self.sync(tier.close))

    def add_engine(self, capacity_bytes: int) -> None:
        """The in-process engine with G2 alone, every block in it."""
        spec = self.spec
        _, g2 = memory_tier_configs(capacity_bytes)
        engine = self.runner.run(Engine.open(StoreConfig(g2=g2)))
        self.closers.append(self.sync(engine.close))
        parent = None
        for batch in self.batches:
            items = []
            for key, value in batch:
                items.append((key, parent, value))
                parent = key
            assert self.runner.run(engine.put_encoded(spec, items)).stored == len(batch)
        # One prompt's K/V, pre-faulted; each call fills the slice of its blocks.
        tokens = len(self.blocks) * spec.block_tokens
        kv = torch.ones(
            (spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim),
            dtype=torch_dtype(spec.dtype),
        )
        per = len(self.key_batches[0]) * spec.block_tokens

        async def get_into() -> None:
            for i, keys in enumerate(self.key_batches):
                got = await engine.get_into(spec, keys, kv[:, :, i * per : i * per + per])
                assert got == len(keys)

        async def get() -> None:
            for keys in self.key_batches:
                assert None not in await engine.get(spec, keys)

        self.cases["engine get into tensors"] = self.sync(get_into)
        self.cases["engine get"] = self.sync(get)

    def add_g1_cuda(self, capacity_bytes: int) -> None:
        """G1 on the current CUDA device: puts from pinned host memory and from a pinned G2, gets;
        and the bare copies they are compared with, over the same bytes block by block."""
        device = torch.device("cuda", torch.cuda.current_device())
        # Every block side by side in one page-locked buffer, as an engine's pinned staging.
        host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        spans: list[tuple[int, int]] = []
        start = 0
        for _, value in self.blocks:
            host[start : start + len(value)].numpy()[:] = np.frombuffer(value, dtype=np.uint8)
            spans.append((start, start + len(value)))
            start += len(value)
        whole = host.numpy().data
        pinned: list[tuple[bytes, Buffer]] = [
            (k, whole[a:b]) for (k, _), (a, b) in zip(self.blocks, spans, strict=True)
        ]
        _, g2_config = memory_tier_configs(capacity_bytes)
        g2 = PinnedMemoryTier(replace(g2_config, pin="require"))
        self.closers.append(self.sync(g2.close))
        assert self.runner.run(g2.put(self.blocks)) == len(self.blocks)
        g2_views: list[tuple[bytes, Buffer]] = []
        for key in self.keys:
            view = g2.view_of(key)
            assert view is not None
            g2_views.append((key, view))
        g1 = GpuMemoryTier(GpuTierConfig(capacity_bytes, device=str(device)))
        self.closers.append(self.sync(g1.close))
        src = host.to(device)
        dst = torch.empty_like(src)

        def d2d() -> None:
            for a, b in spans:
                dst[a:b].copy_(src[a:b])
            torch.cuda.synchronize(device)

        def h2d() -> None:
            for a, b in spans:
                dst[a:b].copy_(host[a:b], non_blocking=True)
            torch.cuda.synchronize(device)

        self.cases["d2d copy"] = d2d
        self.cases["pinned h2d copy"] = h2d
        # Order matters within a round: the last put leaves the blocks in place for the get.
        self.cases["G1 (cuda) put from G2"] = self.put_case(g1, self.batched(g2_views))
        self.cases["G1 (cuda) put"] = self.put_case(g1, self.batched(pinned))
        self.cases["G1 (cuda) get"] = self.get_case(g1)

    def add_raw_lmdb(self, path: Path, map_size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=map_size, max_dbs=4, sync=False, metasync=False)
        db = env.open_db(b"blocks")

        def put() -> None:
            for batch in self.batches:
                with env.begin(db=db, write=True) as txn:
                    for k, v in batch:
                        txn.put(k, v)

        def clear() -> None:
            with env.begin(db=db, write=True) as txn:
                for k in self.keys:
                    txn.delete(k)

        def get() -> None:
            for keys in self.key_batches:
                with env.begin(db=db) as txn:
                    kept = [txn.get(k) for k in keys]
                assert None not in kept

        def get_into() -> None:
            i = 0
            for keys in self.key_batches:
                with env.begin(db=db, buffers=True) as txn:
                    for k in keys:
                        value = txn.get(k)
                        assert value is not None
                        np.copyto(self.buffers[i], np.frombuffer(value, dtype=np.uint8))
                        i += 1

        self.cases["raw lmdb put"] = Case(put, reset=clear)
        self.cases["raw lmdb get"] = get
        self.cases["raw lmdb view + copy"] = get_into
        self.closers.append(env.close)

    def add_raw_redis(self, url: str) -> None:
        sync = redis.Redis.from_url(url)
        asy = aredis.Redis.from_url(url)
        names = [b"raw:" + k for k in self.keys]

        def sync_set() -> None:
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

        def clear() -> None:
            sync.delete(*names)

        def sync_get() -> None:
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

        self.cases["redis-py sync SET"] = Case(sync_set, reset=clear)
        self.cases["redis-py async SET"] = Case(self.sync(async_set), reset=clear)
        self.cases["redis-py sync GET"] = sync_get
        self.cases["redis-py async GET"] = self.sync(async_get)
        self.closers += [clear, sync.close, self.sync(asy.aclose)]

    # -- results -------------------------------------------------------------------------------

    def row(self, tier: str, op: str, ours: float, baseline: str, base: float) -> None:
        ratio = base / ours  # times -> throughput ratio
        target = TARGETS.get((tier, op), TARGETS.get(tier))
        verdict = "—" if target is None else f"{'yes' if ratio >= target else 'NO'} (≥ {target}×)"
        self.rows.append(
            (
                tier,
                self.label,
                op,
                f"{self.nbytes / ours / 1e9:.2f}",
                baseline,
                f"{self.nbytes / base / 1e9:.2f}",
                f"{ratio:.2f}×",
                verdict,
            )
        )

    def report(self, times: dict[str, float]) -> None:
        for name in ("G1 (cpu)", "G2"):
            self.row(name, "put", times[f"{name} put"], "memcpy", times["memcpy"])
            self.row(
                name, "get", times[f"{name} get"], "copy to new bytes", times["copy to new bytes"]
            )
            self.row(name, "get_into", times[f"{name} get_into"], "memcpy", times["memcpy"])
        into = times["engine get into tensors"]
        self.row("engine", "get into tensors", into, "memcpy", times["memcpy"])
        new = times["copy to new bytes"]
        self.row("engine", "get (new tensors)", times["engine get"], "copy to new bytes", new)
        self.row("G3", "put", times["G3 put"], "raw lmdb put", times["raw lmdb put"])
        self.row("G3", "get", times["G3 get"], "raw lmdb get", times["raw lmdb get"])
        self.row(
            "G3",
            "get_into",
            times["G3 get_into"],
            "raw lmdb view + copy",
            times["raw lmdb view + copy"],
        )
        # The faster of the two clients is the baseline, as a user would pick it.
        redis_set = min(times["redis-py sync SET"], times["redis-py async SET"])
        redis_get = min(times["redis-py sync GET"], times["redis-py async GET"])
        self.row("G4", "put", times["G4 put"], "redis-py pipelined SET", redis_set)
        self.row("G4", "get", times["G4 get"], "redis-py pipelined GET", redis_get)
        self.row("G4", "get_into", times["G4 get_into"], "redis-py pipelined GET", redis_get)

    def report_g1_cuda(self, times: dict[str, float]) -> None:
        name, d2d, h2d = "G1 (cuda)", times["d2d copy"], times["pinned h2d copy"]
        put = times[f"{name} put"]
        self.row(name, "put (pinned host)", put, "d2d copy", d2d)
        self.row(name, "put (pinned host)", put, "pinned h2d copy", h2d)
        self.row(name, "get", times[f"{name} get"], "d2d copy", d2d)
        self.row(name, "put from G2", times[f"{name} put from G2"], "pinned h2d copy", h2d)


def measure(
    runner: asyncio.Runner,
    settings: Settings,
    block_bytes: int,
    total_bytes: int,
    redis_url: str | None,
    workdir: Path,
    g1_cuda_only: bool = False,
) -> list[tuple[str, ...]]:
    """The rows of one block size: every tier's, and G1 on CUDA's where there is CUDA; with
    ``g1_cuda_only``, G1 on CUDA's alone (no LMDB, no Redis)."""
    bench = Bench(runner, block_bytes, total_bytes)
    capacity = (max(len(v) for _, v in bench.blocks) + 4096) * (len(bench.blocks) + 1)
    try:
        if g1_cuda_only:
            bench.add_g1_cuda(capacity)
            bench.report_g1_cuda(medians_s(bench.cases, settings))
            return bench.rows
        bench.add_memcpy_baselines()
        g1, g2 = memory_tier_configs(capacity)
        bench.add_tier("G1 (cpu)", GpuMemoryTier(g1))
        bench.add_tier("G2", PinnedMemoryTier(g2))
        bench.add_engine(2 * capacity)  # under the engine's high watermark: nothing is evicted
        lmdb_config = LmdbTierConfig(str(workdir / f"g3-{block_bytes}"), 2 * bench.nbytes)
        bench.add_raw_lmdb(workdir / f"raw-lmdb-{block_bytes}", lmdb_config.map_size)
        # Built on the benchmark's loop: the tier's executors and clients belong to that loop.
        bench.add_tier("G3", runner.run(_build(lambda: LmdbTier(lmdb_config))))
        assert redis_url is not None
        bench.add_raw_redis(redis_url)
        redis_config = RedisTierConfig(
            url=redis_url, capacity_bytes=4 * bench.nbytes, namespace="bench", timeout_ms=30_000
        )
        g4 = runner.run(_build(lambda: RedisTier(redis_config)))
        bench.add_tier("G4", g4)
        bench.closers.insert(0, bench.sync(lambda: g4.delete(bench.keys)))
        if torch.cuda.is_available():
            bench.add_g1_cuda(capacity)
        times = medians_s(bench.cases, settings)
        bench.report(times)
        if torch.cuda.is_available():
            bench.report_g1_cuda(times)
    finally:
        for close in bench.closers:
            close()
    return bench.rows


async def _build(factory: Callable[[], Tier]) -> Tier:
    return factory()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="less data, fewer repeats")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument(
        "--g1-cuda", action="store_true", help="only the G1-on-CUDA rows (no LMDB, no Redis)"
    )
    args = parser.parse_args(argv)
    total_mib = 64 if args.quick else 256
    settings = QUICK if args.quick else FULL
    cuda = torch.cuda.is_available()
    if args.g1_cuda and not cuda:
        print(NO_CUDA)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-"))
    rows: list[tuple[str, ...]] = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        url = args.redis_url
        if url is None and not args.g1_cuda:
            from tests.redis_servers import start_redis_server

            url = stack.enter_context(start_redis_server()).url
        runner = stack.enter_context(asyncio.Runner())
        for block_bytes in BLOCK_BYTES:
            rows += measure(
                runner, settings, block_bytes, total_mib * MiB, url, workdir, args.g1_cuda
            )
    title = (
        f"{'G1 on CUDA' if args.g1_cuda else 'Tier'} throughput vs raw baselines, {total_mib} MiB "
        f"per op per block size, tiers and baselines sampled round-robin, median of "
        f"{settings.repeats}{' (quick)' if args.quick else ''}"
        f"{f', {torch.cuda.get_device_name()}' if cuda else ''}"
    )
    print_tables([Table(title, HEADERS, rows, TEXT, group_columns=2)], "lmdb", "redis", "cupy")
    if not cuda:
        print(NO_CUDA)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
