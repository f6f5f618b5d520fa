"""How full G2 gets with blocks of many sizes, and what fragmentation costs, through the engine.

Run ``python -m benchmarks.g2_fill [--quick]`` from the repository root. An engine with G2 alone
(``--g2-mib``, default 1024) takes prompts of 1-4 blocks (a 24 MiB block alone) in four
namespaces whose blocks are 64 KiB, 512 KiB, 2 MiB and 24 MiB, chosen at random (fixed seed),
for ``--rounds`` times the tier's capacity. It reports:

- the share of G2's bytes that blocks filled when the first eviction came (the high watermark
  is 95 %: the tier evicts when a put would pass it, so the figure is at least 95 % less the
  largest put);
- once evictions run, the share in use after each put (mean and minimum), the fragmentation of
  the free bytes after each put (``1 - largest free extent / free bytes``, mean and maximum), and
  how many evictions were for fragmentation (free bytes too split for the incoming block) rather
  than capacity;
- the put throughput against a memcpy of the same bytes in the same run (numpy ``copyto`` into a
  pre-faulted buffer, block by block), to show what eviction and allocation cost per put.

The baseline of the capacity figures is the tier itself: 100 % of its bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.report import Table, print_tables
from kvstore.config import StoreConfig
from kvstore.core.keys import ModelSpec
from kvstore.engine.engine import Engine
from tiers.pinned_memory import PinnedTierConfig

MiB = 1 << 20
SPECS = [
    ModelSpec("fill/64k", num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16",
              block_tokens=64),
    ModelSpec("fill/512k", num_layers=8, num_kv_heads=4, head_dim=64, dtype="bfloat16",
              block_tokens=64),
    ModelSpec("fill/2m", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16",
              block_tokens=16),
    ModelSpec("fill/24m", num_layers=64, num_kv_heads=8, head_dim=128, dtype="bfloat16",
              block_tokens=96),
]  # fmt: skip


async def run(g2_mib: int, rounds: float, seed: int) -> list[tuple[str, ...]]:
    capacity = g2_mib * MiB
    config = StoreConfig(g2=PinnedTierConfig(capacity, pin="never", segment_prefix="kvstore-fill"))
    rng = random.Random(seed)
    # One K/V tensor per namespace and prompt length, filled once: the bytes do not matter here.
    kvs = {
        (s.name, n): torch.ones(
            (s.num_layers, 2, n * s.block_tokens, s.num_kv_heads, s.head_dim), dtype=torch.bfloat16
        )
        for s in SPECS
        for n in range(1, 5)
    }
    used_after: list[float] = []
    frag_after: list[float] = []
    first_eviction: float | None = None
    put_s = copy_s = 0.0
    stored_bytes = 0
    dst = np.ones(32 * MiB, dtype=np.uint8)
    async with await Engine.open(config) as engine:
        g2 = engine.tier("G2", b"")
        while stored_bytes < rounds * capacity:
            spec = rng.choice(SPECS)
            n = 1 if spec.block_nbytes > 8 * MiB else rng.randint(1, 4)
            kv = kvs[(spec.name, n)]
            tokens = [rng.randrange(1 << 30) for _ in range(n * spec.block_tokens)]
            used = (await g2.stats()).used_bytes  # the blocks' bytes, whatever they cost
            evictions = engine.counters.values.get("evictions", 0)
            start = time.perf_counter()
            await engine.put(spec, tokens, kv)
            put_s += time.perf_counter() - start
            src = kv.view(torch.uint8).numpy().reshape(-1)
            start = time.perf_counter()
            for i in range(0, len(src), spec.block_nbytes):
                np.copyto(dst[: spec.block_nbytes], src[i : i + spec.block_nbytes])
            copy_s += time.perf_counter() - start
            stored_bytes += n * spec.block_nbytes
            evicted = engine.counters.values.get("evictions", 0) > evictions
            if evicted and first_eviction is None:
                first_eviction = used / capacity
            if first_eviction is not None:
                stats = await g2.stats()
                used_after.append(stats.used_bytes / capacity)
                frag_after.append(stats.fragmentation)
        counters = engine.counters.values
    total = counters.get("evictions", 0)
    for_frag = counters.get("evictions_for_fragmentation", 0)
    rows = [
        ("in use at the first eviction", f"{first_eviction or 0:.1%}", "≥ 90 %"),
        ("in use after each put, mean", f"{statistics.fmean(used_after):.1%}", "—"),
        ("in use after each put, minimum", f"{min(used_after):.1%}", "—"),
        ("fragmentation after each put, mean", f"{statistics.fmean(frag_after):.1%}", "—"),
        ("fragmentation after each put, max", f"{max(frag_after):.1%}", "—"),
        ("evictions for fragmentation", f"{for_frag} of {total}", "—"),
        ("put throughput vs memcpy", f"{copy_s / put_s:.2f}× ({stored_bytes / put_s / 1e9:.2f} "
         f"GB/s against {stored_bytes / copy_s / 1e9:.2f})", "—"),
    ]  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3x the capacity instead of 10x")
    parser.add_argument("--g2-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (3.0 if args.quick else 10.0)
    rows = asyncio.run(run(args.g2_mib, rounds, args.seed))
    title = (
        f"G2 of {args.g2_mib} MiB filled {rounds:g}x over with 64 KiB / 512 KiB / 2 MiB / 24 MiB "
        f"blocks, seed {args.seed}"
    )
    text = frozenset({"figure", "target"})
    print_tables([Table(title, ("figure", "value", "target"), rows, text)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
