"""Disaggregated serving: the hand-off from a prefill node to a decode node through the shared
G4, the decode node's time to first token, and G4 on one Redis against a three-master cluster.

Run ``python -m benchmarks.disaggregated [--quick]`` from the repository root. It starts its
own ``redis-server`` and three-master Redis Cluster (tests/redis_servers.py), and two kvstore
services in this process (one event loop), each with its own G2 and no G3, sharing the Redis as
G4. Every figure stands next to a baseline measured in the same run, samples alternating:

- **Hand-off** of one prompt's K/V (16 blocks of 2 MiB, bfloat16, a 32-layer 8-KV-head shape):
  ``put(durable=True)`` through the prefill node's service (G2, then write-through to G4, waited
  for) and ``get_prefix`` through the decode node's service (a lookup that probes G4 for the
  unknown blocks, G4 reads with checksums, the bytes handed to the client through shared memory),
  against raw redis-py (asyncio) pipelining ``SET`` of the same 16 values and then ``GET``.
  A fresh prompt each sample, so that the decode node never has the blocks already.
- **Time to first token on the decode node** for a 2K- and a 4K-token prompt on the model of
  ``benchmarks.worker`` (8 layers, hidden 1024, 8 K/V heads, float32; ``--quick``: the tiny
  default):
  without the prefill node's K/V (the decode node prefills the prompt itself) against with it
  (``kvstore.roles.nodes.decode`` with one new token: fetch from its service, which finds the blocks
  in G4, then the model over the last token). The first tokens must agree.
- **G4 throughput**: ``RedisTier.put`` and ``get`` of 64 blocks of 2 MiB on one Redis and on the
  cluster (all on this machine: the cluster's shards share its two cores, so this shows the
  cost of the cluster client, not the scale-out of three hosts).

The ratio column is the baseline's time over kvstore's (above 1: kvstore is faster); for the G4
rows, the cluster's throughput over one Redis's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import redis.asyncio as aredis
import torch

from benchmarks.report import Table, amedians_s, print_tables
from benchmarks.worker import first_token, model_config
from client import AsyncClient
from kvstore.config import StoreConfig
from kvstore.core.block_format import encode_block
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.roles.nodes import decode, prefill
from kvstore.service.server import KVStoreServer, ServerConfig
from kvstore.worker.model import ModelWorker, WorkerConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig

MiB = 1 << 20
HANDOFF_SPEC = ModelSpec(
    "bench-handoff", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16
)
HEADERS = ("what", "size", "kvstore", "baseline", "baseline value", "ratio")
TEXT = frozenset({"what", "size", "baseline"})


def node_config(redis_url: str, g4_namespace: str, slot: int, slots: int) -> StoreConfig:
    return StoreConfig(
        g2=PinnedTierConfig(
            slot * slots, pin="never", segment_prefix=f"kvstore-bdis{uuid.uuid4().hex[:6]}"
        ),
        g3=None,
        g4=RedisTierConfig(
            url=redis_url, capacity_bytes=1 << 40, namespace=g4_namespace, timeout_ms=30000
        ),
        server=ServerConfig(listen="127.0.0.1:0", max_message_bytes=64 * MiB),
    )


async def handoff(redis_url: str, repeats: int) -> list[Sequence[str]]:
    spec = HANDOFF_SPEC
    num_blocks = 16
    tokens_per = num_blocks * spec.block_tokens
    slot = spec.block_nbytes + 4096
    kv = torch.randn((spec.num_layers, 2, tokens_per, spec.num_kv_heads, spec.head_dim)).to(
        torch.bfloat16
    )
    rng = random.Random(0)
    a_srv = KVStoreServer(node_config(redis_url, "handoff", slot, 64))
    b_srv = KVStoreServer(node_config(redis_url, "handoff", slot, 64))
    a_port, b_port = await a_srv.start(), await b_srv.start()
    raw = aredis.Redis.from_url(redis_url)
    values = [
        bytes(encode_block(spec, h, kv[:, :, i * 16 : (i + 1) * 16]))
        for i, h in enumerate(block_hashes(spec, list(range(tokens_per))))
    ]
    put_s: list[float] = []
    get_s: list[float] = []
    try:
        async with (
            AsyncClient(f"127.0.0.1:{a_port}", timeout_s=120) as a,
            AsyncClient(f"127.0.0.1:{b_port}", timeout_s=120) as b,
        ):

            async def ours() -> None:
                tokens = [rng.randrange(0, 1 << 30) for _ in range(tokens_per)]
                t0 = asyncio.get_running_loop().time()
                await a.put(spec, tokens, kv, durable=True)
                t1 = asyncio.get_running_loop().time()
                past, n = await b.get_prefix(spec, tokens)
                t2 = asyncio.get_running_loop().time()
                assert n == tokens_per
                assert torch.equal(past, kv)
                put_s.append(t1 - t0)
                get_s.append(t2 - t1)
                # Keep G2 of both nodes from filling: the next sample uses new blocks.
                await a.flush("G2")
                await b.flush("G2")

            raw_put: list[float] = []
            raw_get: list[float] = []

            async def baseline() -> None:
                keys = [f"bench-raw:{uuid.uuid4().hex}:{i}" for i in range(num_blocks)]
                t0 = asyncio.get_running_loop().time()
                async with raw.pipeline(transaction=False) as pipe:
                    for key, value in zip(keys, values, strict=True):
                        pipe.set(key, value)
                    await pipe.execute()
                t1 = asyncio.get_running_loop().time()
                async with raw.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.get(key)
                    got = await pipe.execute()
                t2 = asyncio.get_running_loop().time()
                assert got[0] == values[0]
                raw_put.append(t1 - t0)
                raw_get.append(t2 - t1)
                await raw.delete(*keys)

            await amedians_s(ours, baseline, repeats)
    finally:
        await raw.aclose()
        await a_srv.stop(0)
        await b_srv.stop(0)
    size = f"{num_blocks} × {spec.block_nbytes // MiB} MiB"
    med = np.median
    return [
        _row("prefill put, durable (G2 + G4)", size, med(put_s), "raw redis-py SET", med(raw_put)),
        _row(
            "decode get_prefix (G4 probe + read)",
            size,
            med(get_s),
            "raw redis-py GET",
            med(raw_get),
        ),
        _row(
            "hand-off, put + get",
            size,
            med([p + g for p, g in zip(put_s, get_s, strict=True)]),
            "raw SET + GET",
            med([p + g for p, g in zip(raw_put, raw_get, strict=True)]),
        ),
    ]


def _row(what: str, size: str, ours: float, base: str, theirs: float) -> Sequence[str]:
    return (
        what,
        size,
        f"{ours * 1000:.1f} ms",
        base,
        f"{theirs * 1000:.1f} ms",
        f"{theirs / ours:.2f}×",
    )


async def decode_ttft(redis_url: str, quick: bool, repeats: int) -> list[Sequence[str]]:
    worker = ModelWorker(
        WorkerConfig(
            # float32: the first tokens are compared exactly. In bfloat16 the last token's logits
            # over a cache and inside a full pass round apart, and a near-tie argmax flipped in
            # one of six prompts in a run here.
            seed=0,
            dtype="float32",
            block_tokens=64 if quick else 256,
        ),
        model_config=model_config(quick),
    )
    spec = worker.spec
    slot = spec.block_nbytes + 4096
    lengths = (512, 1024) if quick else (2048, 4096)
    a_srv = KVStoreServer(node_config(redis_url, "ttft", slot, 256))
    b_srv = KVStoreServer(node_config(redis_url, "ttft", slot, 256))
    a_port, b_port = await a_srv.start(), await b_srv.start()
    rows: list[Sequence[str]] = []
    rng = random.Random(1)
    try:
        async with (
            AsyncClient(f"127.0.0.1:{a_port}", timeout_s=300) as a,
            AsyncClient(f"127.0.0.1:{b_port}", timeout_s=300) as b,
        ):
            for n in lengths:
                rows.append(await _ttft_at(worker, a, b, n, rng, repeats))
                await b.flush("G2")
    finally:
        await a_srv.stop(0)
        await b_srv.stop(0)
    return rows


async def _ttft_at(
    worker: ModelWorker, a: AsyncClient, b: AsyncClient, n: int, rng: random.Random, repeats: int
) -> Sequence[str]:
    vocab = int(worker.model.config.vocab_size)
    pending: list[list[int]] = []
    firsts: list[tuple[int, list[int]]] = []
    # Each with-sample needs a fresh prompt that the prefill node stored (untimed: its work).
    for _ in range(repeats + 1):
        tokens = [rng.randrange(3, vocab) for _ in range(n)]
        await prefill(worker, a, tokens)
        pending.append(tokens)

    async def with_kv() -> None:
        tokens = pending.pop()
        result = await decode(worker, b, tokens, max_new_tokens=1)
        assert result.hit_tokens == n
        firsts.append((result.tokens[0], tokens))

    async def without() -> None:
        first_token(worker, torch.tensor([rng.randrange(3, vocab) for _ in range(n)]), None)

    t_with, t_without = await amedians_s(with_kv, without, repeats)
    # After the timing: the decode node's first tokens against recomputing each prompt.
    for got, tokens in firsts:
        want, _ = first_token(worker, torch.tensor(tokens), None)
        assert got == want, (got, want)
    return (
        "decode node TTFT, prefix from the prefill node (G4)",
        f"{n} tokens",
        f"{t_with * 1000:.1f} ms",
        "decode node prefills itself",
        f"{t_without * 1000:.1f} ms",
        f"{t_without / t_with:.1f}×",
    )


async def g4_throughput(single_url: str, cluster_url: str, repeats: int) -> list[Sequence[str]]:
    spec = HANDOFF_SPEC
    num_blocks = 64
    kv = torch.randn((spec.num_layers, 2, 16, spec.num_kv_heads, spec.head_dim)).to(torch.bfloat16)
    hashes = block_hashes(spec, list(range(num_blocks * 16)))
    blocks = [(h, bytes(encode_block(spec, h, kv))) for h in hashes]
    tiers = {
        "one Redis": RedisTier(
            RedisTierConfig(
                url=single_url, capacity_bytes=1 << 40, namespace="tp", timeout_ms=60000
            )
        ),
        "3-master cluster": RedisTier(
            RedisTierConfig(
                url=cluster_url,
                cluster=True,
                capacity_bytes=1 << 40,
                namespace="tp",
                timeout_ms=60000,
            )
        ),
    }
    out: dict[str, tuple[float, float]] = {}
    try:
        single, cluster = tiers["one Redis"], tiers["3-master cluster"]

        def put_of(tier: RedisTier) -> Any:
            async def put() -> None:
                await tier.delete(hashes)
                await tier.put(blocks)

            return put

        def get_of(tier: RedisTier) -> Any:
            async def get() -> None:
                got = await tier.get(hashes)
                assert all(g is not None for g in got)

            return get

        p1, p3 = await amedians_s(put_of(single), put_of(cluster), repeats)
        g1, g3 = await amedians_s(get_of(single), get_of(cluster), repeats)
        out = {"put": (p3, p1), "get": (g3, g1)}
    finally:
        for tier in tiers.values():
            await tier.close()
    size = f"{num_blocks} × {spec.block_nbytes // MiB} MiB"
    total = num_blocks * (spec.block_nbytes + 128)
    rows = []
    for op, (cl, one) in out.items():
        rows.append(
            (
                f"G4 {op}, 3-master cluster",
                size,
                f"{total / cl / 1e9:.2f} GB/s",
                "one Redis",
                f"{total / one / 1e9:.2f} GB/s",
                f"{one / cl:.2f}×",
            )
        )
    return rows


async def run(args: argparse.Namespace, single_url: str, cluster_url: str) -> list[Table]:
    repeats = 3 if args.quick else 7
    rows = await handoff(single_url, repeats)
    rows += await decode_ttft(single_url, args.quick, 3 if args.quick else 5)
    rows += await g4_throughput(single_url, cluster_url, repeats)
    return [
        Table(
            "Disaggregated prefill/decode through G4, against raw redis-py and recompute",
            HEADERS,
            rows,
            TEXT,
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, tiny model")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tests.redis_servers import start_redis_cluster, start_redis_server

    with ExitStack() as stack:
        single = stack.enter_context(start_redis_server())
        cluster = stack.enter_context(start_redis_cluster())
        tables = asyncio.run(run(args, single.url, cluster.url))
    print_tables(tables, "transformers", "redis", "grpcio")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
