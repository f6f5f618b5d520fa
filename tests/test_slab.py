"""The memory tiers allocate by bytes (tiers/slab.py): the offset allocator against a model of it,
blocks of many sizes in one G1/G2 slab, and the engine filling G2 with a production-like mix of
block sizes before it evicts, leaf-first, saying why."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, encode_block
from kvstore.core.errors import BlockTooLargeError, TierFullError
from kvstore.core.extents import GRANULARITY, Extents
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from kvstore.engine.engine import Engine
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
from tiers.slab import SlabTable

KiB, MiB = 1 << 10, 1 << 20

# Payloads of 64 KiB, 512 KiB, 2 MiB and 24 MiB (bfloat16): a small model with few heads, a
# mid-size one, an 8B Llama's 16-token block, a 70B-class model's 96-token block.
SPECS = [
    ModelSpec("mix/64k", num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16",
              block_tokens=64),
    ModelSpec("mix/512k", num_layers=8, num_kv_heads=4, head_dim=64, dtype="bfloat16",
              block_tokens=64),
    ModelSpec("mix/2m", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16",
              block_tokens=16),
    ModelSpec("mix/24m", num_layers=64, num_kv_heads=8, head_dim=128, dtype="bfloat16",
              block_tokens=96),
]
assert [s.block_nbytes for s in SPECS] == [64 * KiB, 512 * KiB, 2 * MiB, 24 * MiB]


# -- the allocator --------------------------------------------------------------------------------


def test_extents_best_fit_and_coalescing() -> None:
    e = Extents(64 * KiB, granularity=1 * KiB)
    a = e.allocate(10 * KiB)
    b = e.allocate(1)  # rounded up to one granule
    c = e.allocate(20 * KiB)
    assert (a, b, c) == (0, 10 * KiB, 11 * KiB)
    assert e.allocated == 31 * KiB
    assert e.largest_free == 33 * KiB
    e.free(b, 1)
    # Best fit: the 1 KiB hole between a and c, not the 33 KiB tail.
    assert e.allocate(512) == 10 * KiB
    e.free(10 * KiB, 512)
    e.free(a, 10 * KiB)  # merges with the 1 KiB hole after it
    assert e.stats().free_extents == 2
    assert e.largest_free == 33 * KiB
    assert e.stats().fragmentation == pytest.approx(1 - 33 / 44)
    e.free(c, 20 * KiB)  # merges both sides: one extent again
    assert e.stats().free_extents == 1
    assert e.largest_free == 64 * KiB
    assert e.stats().fragmentation == 0.0
    assert e.allocate(65 * KiB) is None


def test_fits_is_what_allocate_would_do() -> None:
    e = Extents(10 * KiB, granularity=1 * KiB)
    starts = [e.allocate(1 * KiB) for _ in range(10)]
    for s in starts[::2]:
        e.free(s, 1 * KiB)  # five 1 KiB holes: 5 KiB free, none larger than 1 KiB
    assert e.free_bytes == 5 * KiB
    assert e.fits([1 * KiB] * 5)
    assert not e.fits([1 * KiB] * 6)
    assert not e.fits([2 * KiB])
    assert e.allocated == 5 * KiB  # fits allocated nothing


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40 * KiB)), min_size=1, max_size=300))
def test_extents_against_a_model(ops: list[tuple[bool, int]]) -> None:
    """Random allocations and frees: the free extents and the live allocations always tile the slab
    exactly, free extents are never adjacent (merged), and an allocation fails only when no free
    extent is large enough."""
    g = 512
    e = Extents(256 * KiB, granularity=g)
    live: dict[int, int] = {}  # start -> requested bytes
    rng = random.Random(len(ops))
    for is_alloc, n in ops:
        if is_alloc or not live:
            start = e.allocate(n)
            if start is None:
                assert e.largest_free < e.cost(n)
            else:
                assert start % g == 0
                live[start] = n
        else:
            start = rng.choice(sorted(live))
            e.free(start, live.pop(start))
        spans = sorted([(s, e.cost(n), "used") for s, n in live.items()]
                       + [(s, size, "free") for s, size in e._by_start.items()])
        pos = 0
        for s, size, _ in spans:
            assert s == pos, "extents overlap or leave a gap"
            pos += size
        assert pos == e.capacity
        kinds = [k for _, _, k in spans]
        assert all(not (a == b == "free") for a, b in itertools.pairwise(kinds))
        assert e.allocated == sum(e.cost(n) for n in live.values())
        assert e.largest_free == max((size for size in e._by_start.values()), default=0)


def test_a_failed_batch_allocates_nothing() -> None:
    table = SlabTable("G2", 8 * KiB)
    keys = [BlockHash(bytes([i]) * 16) for i in range(3)]
    with pytest.raises(TierFullError, match="no free extent"):
        table.allocate([(keys[0], 4 * KiB), (keys[1], 4 * KiB), (keys[2], 1)])
    assert table.stats().free_bytes == 8 * KiB
    with pytest.raises(BlockTooLargeError, match="larger than the whole tier"):
        table.allocate([(keys[0], 8 * KiB + 1)])


# -- the tiers ------------------------------------------------------------------------------------


def _blocks(spec: ModelSpec, n: int, seed: int) -> list[tuple[bytes, bytearray]]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n * spec.block_tokens,), generator=g).tolist()
    out = []
    for i, h in enumerate(block_hashes(spec, tokens)):
        t = torch.full(spec.block_shape, float(seed * 100 + i), dtype=torch.bfloat16)
        out.append((bytes(h), encode_block(spec, h, t)))
    return out


@pytest.mark.parametrize("kind", ["g1-cpu", "g2"])
async def test_memory_tiers_hold_blocks_of_every_size_at_their_cost(kind: str) -> None:
    capacity = 64 * MiB
    tier: GpuMemoryTier | PinnedMemoryTier
    if kind == "g2":
        tier = PinnedMemoryTier(PinnedTierConfig(capacity, pin="never", segment_prefix="kvstore-s"))
    else:
        tier = GpuMemoryTier(GpuTierConfig(capacity, device="cpu"))
    try:
        blocks = [b for i, spec in enumerate(SPECS) for b in _blocks(spec, 2, seed=i)]
        assert await tier.put(blocks) == len(blocks)
        for (key, value), got in zip(blocks, await tier.get([k for k, _ in blocks]), strict=True):
            assert got is not None, key.hex()
            assert bytes(got) == bytes(value), key.hex()
        stats = await tier.stats()
        payload = sum(len(v) for _, v in blocks)
        assert stats.used_bytes == payload  # bytes, not slots
        assert stats.num_blocks == 8
        # Rounding to the granularity is all the overhead: under one granule per block.
        stored = payload - (HEADER_BYTES * 8 if kind == "g1-cpu" else 0)
        assert stored <= stats.allocated_bytes < stored + 8 * GRANULARITY
        assert stats.largest_free_bytes == capacity - stats.allocated_bytes
        assert stats.fragmentation == 0.0
        # Free every other block: the holes are free bytes that no 24 MiB block fits in.
        await tier.delete([k for k, _ in blocks[::2]])
        stats = await tier.stats()
        assert 0 < stats.fragmentation < 1
        assert stats.free_extents >= 2
        # A block larger than the whole tier gets a clear error and changes nothing.
        big = ModelSpec("mix/huge", num_layers=128, num_kv_heads=8, head_dim=128,
                        dtype="bfloat16", block_tokens=132)  # over 64 MiB
        with pytest.raises(BlockTooLargeError, match="larger than the whole tier"):
            await tier.put(_blocks(big, 1, seed=9))
        assert (await tier.stats()).num_blocks == 4
    finally:
        await tier.close()


# -- the engine: fill, evict leaf-first, say why --------------------------------------------------


async def test_g2_fills_with_mixed_block_sizes_before_evicting_leaf_first() -> None:
    """G2 of 640 MiB, prompts in four namespaces whose blocks are 64 KiB, 512 KiB, 2 MiB and 24 MiB
    (1-4 blocks, one of 24 MiB): eviction starts only when the bytes run out (>= 90 % in use
    before the first one; with the 8 MiB slots of before, this mix could not even be stored),
    evicts least recently used chains tail first (never a block whose child is still in G2), and
    every removal says why.

    Eviction starts when a put would pass the high watermark (95 %), so the tier is at least
    95 % less the largest put full when it does: 3.8 % here for a 24 MiB block."""
    capacity = 640 * MiB
    config = StoreConfig(g2=PinnedTierConfig(capacity, pin="never", segment_prefix="kvstore-s"))
    rng = random.Random(16)
    async with await Engine.open(config) as engine:
        resident: dict[BlockHash, BlockHash | None] = {}  # G2 contents, from the event log
        chains: list[list[BlockHash]] = []
        peak = 0  # the most in use after any put before the first eviction
        used_before_first_eviction: int | None = None
        seq = 0
        removed: list[tuple[BlockHash, str | None]] = []
        for n in range(400):
            spec = rng.choice(SPECS)
            blocks = 1 if spec.block_nbytes > 8 * MiB else rng.randint(1, 4)
            tokens = [rng.randrange(50_000) for _ in range(blocks * spec.block_tokens)]
            kv = torch.full(
                (spec.num_layers, 2, len(tokens), spec.num_kv_heads, spec.head_dim),
                float(n % 97),
                dtype=torch.bfloat16,
            )
            used = engine.index.bytes_in("G2")
            result = await engine.put(spec, tokens, kv)
            assert result.stored == blocks
            chains.append(list(result.hashes))
            events = engine.events.since(seq)
            assert events is not None
            seq = engine.events.last_seq
            for event in events:
                if event.kind == "stored":
                    resident[event.key] = event.parent
                elif event.kind == "removed":
                    # Leaf-first: nothing in G2 still hangs off what is being removed.
                    children = [k for k, p in resident.items() if p == event.key]
                    assert not children, f"{event.key.hex()} evicted before its children"
                    del resident[event.key]
                    removed.append((event.key, event.reason))
                    if used_before_first_eviction is None:
                        used_before_first_eviction = used
            if used_before_first_eviction is None:
                peak = max(peak, engine.index.bytes_in("G2"))
            if len(removed) > 50:
                break
        assert used_before_first_eviction is not None, "the mix never filled G2"
        assert used_before_first_eviction == peak
        assert peak >= 0.9 * capacity, f"{peak / capacity:.1%} in use before the first eviction"
        # Least recently used first: the first victim is the tail of the oldest prompt.
        assert removed[0] == (chains[0][-1], "capacity")
        assert {reason for _, reason in removed} <= {"capacity", "fragmentation"}
        # The index and the tier agree on every byte.
        stats = await engine.stats()
        g2 = stats.tiers["G2"]
        assert g2.used_bytes == sum(
            HEADER_BYTES + next(s for s in SPECS if s.fingerprint == e.namespace).block_nbytes
            for e in engine.index.entries()
            if engine.index.in_tier(e.key, "G2")
        )
        assert g2.num_blocks == len(resident)
        assert g2.used_bytes <= capacity


async def test_fragmented_g2_evicts_more_instead_of_failing() -> None:
    """Free bytes split into holes too small for the next block: the engine evicts on (reason
    "fragmentation") until an extent is large enough, rather than refusing the put."""
    spec_small, spec_big = SPECS[0], SPECS[2]  # 64 KiB and 2 MiB blocks
    small_cost = -(-(HEADER_BYTES + spec_small.block_nbytes) // GRANULARITY) * GRANULARITY
    capacity = 64 * small_cost * 8  # 512 small blocks' worth (~32 MiB)
    config = StoreConfig(g2=PinnedTierConfig(capacity, pin="never", segment_prefix="kvstore-s"))
    async with await Engine.open(config) as engine:
        # Fill with single-block prompts of 64 KiB up to just under the high watermark.
        hashes: list[BlockHash] = []
        i = 0
        while engine.index.bytes_in("G2") + small_cost <= 0.95 * capacity:
            tokens = list(range(i * 64, (i + 1) * 64))
            kv = torch.full((2, 2, 64, 2, 64), float(i % 50), dtype=torch.bfloat16)
            hashes.extend((await engine.put(spec_small, tokens, kv)).hashes)
            i += 1
        # Free every other block by request: about half the bytes free, in 64 KiB holes.
        await engine.evict(hashes[::2], "G2")
        g2 = (await engine.stats()).tiers["G2"]
        assert g2.largest_free_bytes < 2 * MiB + HEADER_BYTES
        assert g2.free_extents > 100
        seq = engine.events.last_seq
        tokens = list(range(10**6, 10**6 + 16))
        kv = torch.full((32, 2, 16, 8, 128), 3.0, dtype=torch.bfloat16)
        result = await engine.put(spec_big, tokens, kv)
        assert result.stored == 1
        events = engine.events.since(seq)
        assert events is not None
        reasons = [e.reason for e in events if e.kind == "removed"]
        assert reasons
        assert set(reasons) == {"fragmentation"}
        got = await engine.get(spec_big, list(result.hashes))
        assert got[0] is not None
        assert torch.equal(got[0], kv[:, :, :16])
