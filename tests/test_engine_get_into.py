"""``Engine.get_into``: blocks read straight into tensors the caller owns, on real tiers (G2 shared
memory, G3 LMDB in a temporary directory).

Every block's content is derived from its own hash (``content``), so whatever lands in ``out`` can
be checked byte for byte against what must have been stored under that name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import lmdb
import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES
from kvstore.core.errors import InvalidArgumentError, SpecMismatchError
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from kvstore.engine.engine import Engine, EngineConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

# Three layers: a block is six (layer, K/V) rows of 4 tokens x 2 heads x 8 dims, spread along a
# prompt tensor's tokens between the other blocks' rows.
SPEC = ModelSpec(
    "get-into-test", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
)
BLOCK = HEADER_BYTES + SPEC.block_nbytes  # 896 bytes


def content(key: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF)
    return torch.randn(SPEC.block_shape, generator=g).to(torch.float16)


def prompt(n_blocks: int, seed: int) -> tuple[list[int], list[BlockHash], torch.Tensor]:
    """Tokens of ``n_blocks`` full blocks, their hashes and their K/V ``[3, 2, tokens, 2, 8]``."""
    tokens = [(seed * 7919 + i * 31) % 30_000 for i in range(n_blocks * SPEC.block_tokens)]
    hashes = block_hashes(SPEC, tokens)
    kv = torch.cat([content(h) for h in hashes], dim=2)
    return tokens, hashes, kv


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def sentinel(tokens: int) -> torch.Tensor:
    """A prompt-shaped out tensor filled with a value no block holds (a NaN pattern)."""
    return torch.full((3, 2, tokens, 2, 8), float("nan"), dtype=torch.float16)


def g2_config(capacity_bytes: int) -> PinnedTierConfig:
    return PinnedTierConfig(capacity_bytes, pin="never", segment_prefix="kvstore-gitest")


def config(tmp_path: Path, *, g2_blocks: int = 64, g3: bool = True) -> StoreConfig:
    return StoreConfig(
        g2=g2_config(g2_blocks * 1024),
        g3=LmdbTierConfig(str(tmp_path / "g3"), 1000 * BLOCK) if g3 else None,
        engine=EngineConfig(reaper_interval_s=0.05),
    )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    e = await Engine.open(config(tmp_path))
    yield e
    await e.close()


async def in_g2(engine: Engine, hashes: list[BlockHash]) -> list[bool]:
    """Ask the tier itself, not the index."""
    return await engine.tier("G2", SPEC.fingerprint).exists(hashes)


# -- what lands ----------------------------------------------------------------------------------


async def test_one_tensor_receives_the_bytes_that_were_put(engine: Engine) -> None:
    tokens, hashes, kv = prompt(5, seed=1)
    await engine.put(SPEC, tokens, kv)
    out = sentinel(7 * SPEC.block_tokens)  # room for two more blocks than asked for
    before = as_bytes(out)
    assert await engine.get_into(SPEC, hashes, out) == 5
    assert as_bytes(out[:, :, : 5 * SPEC.block_tokens]) == as_bytes(kv)
    assert as_bytes(out[:, :, 5 * SPEC.block_tokens :]) == as_bytes(
        torch.frombuffer(bytearray(before), dtype=torch.float16).view(out.shape)[
            :, :, 5 * SPEC.block_tokens :
        ]
    )
    stats = await engine.stats()
    assert stats.counters["read_hits"] == 5


async def test_a_slice_of_a_larger_tensor_and_a_list_of_blocks(engine: Engine) -> None:
    tokens, hashes, kv = prompt(4, seed=2)
    await engine.put(SPEC, tokens, kv)
    # A slice along the tokens (not contiguous): the blocks land in it and nowhere else.
    big = torch.zeros((3, 2, 10 * SPEC.block_tokens, 2, 8), dtype=torch.float16)
    window = big[:, :, 3 * SPEC.block_tokens : 7 * SPEC.block_tokens]
    assert not window.is_contiguous()
    assert await engine.get_into(SPEC, hashes, window) == 4
    assert as_bytes(window) == as_bytes(kv)
    assert not big[:, :, : 3 * SPEC.block_tokens].any()
    assert not big[:, :, 7 * SPEC.block_tokens :].any()
    # One tensor per block, one of them a non-contiguous view (heads and tokens swapped back).
    blocks = [torch.zeros(SPEC.block_shape, dtype=torch.float16) for _ in range(3)]
    blocks.append(torch.zeros((3, 2, 2, 4, 8), dtype=torch.float16).transpose(2, 3))
    assert await engine.get_into(SPEC, hashes, blocks) == 4
    for h, b in zip(hashes, blocks, strict=True):
        assert as_bytes(b) == as_bytes(content(h))


async def test_a_miss_ends_the_hit_and_leaves_the_rest_of_out_alone(engine: Engine) -> None:
    tokens, hashes, kv = prompt(5, seed=3)
    await engine.put(SPEC, tokens, kv)
    await engine.drain()
    assert await engine.evict([hashes[2]]) == 1  # from every tier
    out = sentinel(5 * SPEC.block_tokens)
    untouched = as_bytes(out[:, :, 2 * SPEC.block_tokens :])
    assert await engine.get_into(SPEC, hashes, out) == 2
    assert as_bytes(out[:, :, : 2 * SPEC.block_tokens]) == as_bytes(
        kv[:, :, : 2 * SPEC.block_tokens]
    )
    assert as_bytes(out[:, :, 2 * SPEC.block_tokens :]) == untouched
    unknown = [BlockHash(bytes(16)), *hashes]
    assert await engine.get_into(SPEC, unknown, sentinel(6 * SPEC.block_tokens)) == 0
    assert await engine.get_into(SPEC, [], sentinel(0)) == 0


async def test_a_g3_hit_lands_verified_and_is_promoted(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    tokens, hashes, kv = prompt(4, seed=4)
    e = await Engine.open(cfg)
    await e.put(SPEC, tokens, kv)
    await e.drain()  # the write-through copies are in G3
    await e.close()
    assert cfg.g3 is not None
    env = lmdb.open(cfg.g3.path, max_dbs=4, map_size=cfg.g3.map_size)
    with env.begin(db=env.open_db(b"blocks"), write=True) as txn:
        value = bytearray(txn.get(hashes[2]))
        value[HEADER_BYTES + 10] ^= 0x40  # one flipped bit in block 2's payload
        txn.put(hashes[2], value)
    env.close()
    e = await Engine.open(cfg)  # G2 starts empty: every block is read from G3
    try:
        out = sentinel(4 * SPEC.block_tokens)
        untouched = as_bytes(out[:, :, 2 * SPEC.block_tokens :])
        assert await e.get_into(SPEC, hashes, out) == 2  # the corrupt block ends the hit
        assert as_bytes(out[:, :, : 2 * SPEC.block_tokens]) == as_bytes(
            kv[:, :, : 2 * SPEC.block_tokens]
        )
        assert as_bytes(out[:, :, 2 * SPEC.block_tokens :]) == untouched
        stats = await e.stats()
        assert stats.counters["corrupt"] == 1
        assert (await e.lookup(SPEC, tokens)).tiers[2] is None
        await e.drain()
        assert await in_g2(e, hashes[:2]) == [True, True]  # promoted after the hit
        # From G2 now, the same bytes.
        again = sentinel(2 * SPEC.block_tokens)
        assert await e.get_into(SPEC, hashes[:2], again) == 2
        assert as_bytes(again) == as_bytes(kv[:, :, : 2 * SPEC.block_tokens])
    finally:
        await e.close()


async def test_g2_and_g3_hits_mixed_in_one_call(engine: Engine) -> None:
    tokens, hashes, kv = prompt(6, seed=5)
    await engine.put(SPEC, tokens, kv)
    await engine.drain()
    assert await engine.evict([hashes[1], hashes[4]], tier="G2") == 2
    assert await in_g2(engine, hashes) == [True, False, True, True, False, True]
    out = sentinel(6 * SPEC.block_tokens)
    assert await engine.get_into(SPEC, hashes, out) == 6
    assert as_bytes(out) == as_bytes(kv)


# -- bad input -----------------------------------------------------------------------------------


async def test_an_out_that_does_not_fit_raises_and_nothing_changes(engine: Engine) -> None:
    tokens, hashes, kv = prompt(3, seed=6)
    await engine.put(SPEC, tokens, kv)
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float16)

    bad: dict[str, tuple[object, type[Exception]]] = {
        "one token short": (sentinel(3 * SPEC.block_tokens - 1), SpecMismatchError),
        "another dtype": (sentinel(3 * SPEC.block_tokens).to(torch.bfloat16), SpecMismatchError),
        "4 kv heads": (zeros(3, 2, 12, 4, 8), SpecMismatchError),
        "layers and K/V swapped": (zeros(2, 3, 12, 2, 8), SpecMismatchError),
        "four dimensions": (zeros(3, 2, 12, 16), SpecMismatchError),
        "head_dim not contiguous": (zeros(3, 2, 12, 8, 2).transpose(3, 4), InvalidArgumentError),
        "two tensors for three blocks": ([zeros(*SPEC.block_shape)] * 2, InvalidArgumentError),
        "a block of 5 tokens": (
            [zeros(*SPEC.block_shape), zeros(*SPEC.block_shape), zeros(3, 2, 5, 2, 8)],
            SpecMismatchError,
        ),
        "bytes in the list": ([zeros(*SPEC.block_shape)] * 2 + [b"\0" * 768], InvalidArgumentError),
        "a bytearray": (bytearray(3 * SPEC.block_nbytes), InvalidArgumentError),
    }
    before = await engine.stats()
    for name, (out, error) in bad.items():
        parts = out if isinstance(out, list) else [out]
        tensors = [t for t in parts if isinstance(t, torch.Tensor)]
        seen = [as_bytes(t) for t in tensors]
        with pytest.raises(error):
            await engine.get_into(SPEC, hashes, out)  # type: ignore[arg-type]
        assert [as_bytes(t) for t in tensors] == seen, name
    after = await engine.stats()
    assert after.counters.get("read_hits", 0) == before.counters.get("read_hits", 0)
    assert after.index_blocks == before.index_blocks
    assert await in_g2(engine, hashes) == [True] * 3


async def test_a_block_of_another_namespace_is_not_read_as_this_one(engine: Engine) -> None:
    other = ModelSpec(
        "get-into-other",
        num_layers=3,
        num_kv_heads=2,
        head_dim=8,
        dtype="bfloat16",
        block_tokens=4,
    )
    tokens = list(range(2 * other.block_tokens))
    kv = torch.randn((3, 2, len(tokens), 2, 8)).to(torch.bfloat16)
    await engine.put(other, tokens, kv)
    hashes = block_hashes(other, tokens)
    out = sentinel(2 * SPEC.block_tokens)  # same size, another dtype and namespace
    assert await engine.get_into(SPEC, hashes, out) == 0
    assert out.isnan().all()


# -- eviction ------------------------------------------------------------------------------------


async def test_eviction_during_a_call_never_tears_a_block(tmp_path: Path) -> None:
    """G2 holds 10 blocks. While ``get_into`` waits for a G3 read in the middle of a prompt, a
    burst of puts evicts the prompt's later blocks from G2: each block lands whole, from G2
    (copied in one step that nothing can interrupt) or from G3 where it went."""
    e = await Engine.open(config(tmp_path, g2_blocks=10))
    try:
        tokens, hashes, kv = prompt(6, seed=7)
        await e.put(SPEC, tokens, kv)
        await e.drain()
        assert await e.evict([hashes[2]], tier="G2") == 1  # read from G3: the call waits there
        others = [prompt(4, seed=100 + i) for i in range(4)]

        async def burst() -> None:
            for other_tokens, _, other_kv in others:
                await e.put(SPEC, other_tokens, other_kv)

        out = sentinel(6 * SPEC.block_tokens)
        got, _ = await asyncio.gather(e.get_into(SPEC, hashes, out), burst())
        assert got == 6
        assert as_bytes(out) == as_bytes(kv)
        assert not all(await in_g2(e, hashes[3:]))  # the burst did evict them meanwhile
    finally:
        await e.close()


async def test_a_lease_keeps_the_blocks_in_g2_through_a_burst(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=10))
    try:
        tokens, hashes, kv = prompt(4, seed=8)
        await e.put(SPEC, tokens, kv)
        await e.drain()
        lease = e.reserve(hashes, ttl_s=30)
        others = [prompt(4, seed=200 + i) for i in range(4)]

        async def burst() -> None:
            for other_tokens, _, other_kv in others:
                await e.put(SPEC, other_tokens, other_kv)

        out = sentinel(4 * SPEC.block_tokens)
        got, _ = await asyncio.gather(e.get_into(SPEC, hashes, out), burst())
        assert got == 4
        assert as_bytes(out) == as_bytes(kv)
        assert await in_g2(e, hashes) == [True] * 4
        assert e.release(lease.lease_id)
    finally:
        await e.close()


async def test_a_long_read_lets_other_tasks_run(tmp_path: Path) -> None:
    """80 MiB from G2 in one call: other tasks run between its copies (every ``_YIELD_BYTES``),
    and every block still lands whole."""
    big = ModelSpec(
        "get-into-big",
        num_layers=8,
        num_kv_heads=8,
        head_dim=128,
        dtype="float16",
        block_tokens=32,
    )  # 1 MiB blocks
    n = 80
    g2 = g2_config(2 * n * (big.block_nbytes + 4096))
    e = await Engine.open(StoreConfig(g2=g2, engine=EngineConfig(reaper_interval_s=0.05)))
    try:
        tokens = list(range(n * big.block_tokens))
        kv = torch.randn((8, 2, len(tokens), 8, 128), generator=torch.Generator().manual_seed(3))
        kv = kv.to(torch.float16)
        await e.put(big, tokens, kv)
        out = torch.zeros_like(kv)
        task = asyncio.create_task(e.get_into(big, e.hashes(big, tokens), out))
        ticks = 0
        while not task.done():
            ticks += 1
            await asyncio.sleep(0)
        assert task.result() == n
        assert ticks >= 2  # it yielded at least once after its first start
        assert as_bytes(out) == as_bytes(kv)
    finally:
        await e.close()


# -- get (new tensors) ---------------------------------------------------------------------------


async def test_get_returns_each_block_or_none_from_any_tier(engine: Engine) -> None:
    tokens, hashes, kv = prompt(5, seed=9)
    await engine.put(SPEC, tokens, kv)
    await engine.drain()
    assert await engine.evict([hashes[1]]) == 1  # gone everywhere
    assert await engine.evict([hashes[3]], tier="G2") == 1  # in G3 only
    got = await engine.get(SPEC, [*hashes, BlockHash(bytes(16))])
    assert got[1] is None
    assert got[5] is None
    for i in (0, 2, 3, 4):
        t = got[i]
        assert t is not None
        assert (t.dtype, tuple(t.shape)) == (torch.float16, SPEC.block_shape)
        assert as_bytes(t) == as_bytes(content(hashes[i]))
    first, third = got[0], got[2]
    assert first is not None
    assert third is not None
    first.fill_(0)  # the tensors do not share memory
    assert as_bytes(third) == as_bytes(content(hashes[2]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_get_into_a_gpu_tensor(engine: Engine) -> None:
    tokens, hashes, kv = prompt(3, seed=10)
    await engine.put(SPEC, tokens, kv)
    out = torch.zeros((3, 2, 3 * SPEC.block_tokens, 2, 8), dtype=torch.float16, device="cuda")
    assert await engine.get_into(SPEC, hashes, out) == 3
    assert as_bytes(out.cpu()) == as_bytes(kv)
