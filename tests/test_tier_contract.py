"""One contract, every tier: DictTier, G1 (on cpu), G2 (unpinned shared memory), G3 (LMDB in a
temporary directory), G4 (a real redis-server) and G4 on a real three-master Redis Cluster.

Each test body is the same for every tier; only opening a tier, limiting its capacity and
corrupting a stored value from outside differ, and those live in the ``Kind`` classes below.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import redis
import torch

from kvstore.core.block_format import HEADER_BYTES, decode_block, encode_block
from kvstore.core.errors import InvalidArgumentError, TierFullError
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from tiers.base import Tier
from tiers.dict_store import DictTier, DictTierConfig
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.lmdb_store import LmdbTier, LmdbTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig
from tiers.slab import GRANULARITY

SPEC = ModelSpec(
    "contract", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
)
BLOCK_NBYTES = HEADER_BYTES + SPEC.block_nbytes
# The memory tiers round every block up to their allocator's granularity; G1 keeps the header on
# the host. Capacities are counted in blocks of SPEC (float16), so "full" is exact.
G1_BLOCK_COST = -(-SPEC.block_nbytes // GRANULARITY) * GRANULARITY
G2_BLOCK_COST = -(-BLOCK_NBYTES // GRANULARITY) * GRANULARITY


def block_for(tokens: list[int], spec: ModelSpec = SPEC) -> list[tuple[BlockHash, bytearray]]:
    """Blocks whose contents are derived from their tokens, so any returned block can be checked."""
    out = []
    for i, h in enumerate(block_hashes(spec, tokens)):
        g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF)
        t = torch.randn(spec.block_shape, generator=g).to(getattr(torch, spec.dtype))
        t.view(-1)[0] = float(i)
        out.append((h, encode_block(spec, h, t)))
    return out


def chain(
    n_blocks: int, seed: int = 0, spec: ModelSpec = SPEC
) -> list[tuple[BlockHash, bytearray]]:
    rng = random.Random(seed)
    return block_for([rng.randrange(50_000) for _ in range(n_blocks * spec.block_tokens)], spec)


class Kind:
    persistent = False
    exact_capacity = True  # capacity enforced by our own byte count (not Redis maxmemory)

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.reports: list[tuple[str, bytes, str]] = []

    def on_corrupt(self, tier: str, key: bytes, reason: str) -> None:
        self.reports.append((tier, key, reason))

    def open(self, capacity_blocks: int = 1000) -> Tier:
        raise NotImplementedError

    def reopen(self, tier: Tier) -> Tier:
        raise NotImplementedError

    async def corrupt(self, tier: Tier, key: bytes) -> Tier:
        """Flip a payload byte of ``key`` behind the tier's back; returns the tier to read with."""
        raise NotImplementedError

    async def limit(self, tier: Tier) -> Tier:
        """Make ``tier`` refuse puts soon; tiers that count bytes themselves were opened small."""
        return tier


class DictKind(Kind):
    def open(self, capacity_blocks: int = 1000) -> Tier:
        return DictTier(DictTierConfig(capacity_blocks * BLOCK_NBYTES), self.on_corrupt)


class G1Kind(Kind):
    def open(self, capacity_blocks: int = 1000) -> Tier:
        return GpuMemoryTier(
            GpuTierConfig(capacity_blocks * G1_BLOCK_COST, device="cpu"), self.on_corrupt
        )


class G2Kind(Kind):
    def open(self, capacity_blocks: int = 1000) -> Tier:
        return PinnedMemoryTier(
            PinnedTierConfig(
                capacity_blocks * G2_BLOCK_COST, pin="never", segment_prefix="kvstore-test"
            ),
            self.on_corrupt,
        )


class G3Kind(Kind):
    persistent = True

    def open(self, capacity_blocks: int = 1000) -> Tier:
        self.config = LmdbTierConfig(
            str(self.tmp_path / f"g3-{uuid.uuid4().hex[:6]}"), capacity_blocks * BLOCK_NBYTES
        )
        return LmdbTier(self.config, self.on_corrupt)

    def reopen(self, tier: Tier) -> Tier:
        return LmdbTier(self.config, self.on_corrupt)

    async def corrupt(self, tier: Tier, key: bytes) -> Tier:
        # LMDB forbids opening one environment twice in a process: close, edit the file, reopen.
        await tier.close()
        env = lmdb.open(self.config.path, max_dbs=4, map_size=self.config.map_size)
        db = env.open_db(b"blocks")
        with env.begin(db=db, write=True) as txn:
            value = bytearray(txn.get(key))
            value[HEADER_BYTES + 3] ^= 0xFF
            txn.put(key, value)
        env.close()
        return self.reopen(tier)


class G4Kind(Kind):
    persistent = True
    exact_capacity = False
    cluster = False

    def server(self) -> Any:
        return self.request.getfixturevalue("redis_cluster" if self.cluster else "redis_server")

    def open(self, capacity_blocks: int = 1000) -> Tier:
        self.config = RedisTierConfig(
            url=self.server().url,
            capacity_bytes=capacity_blocks * BLOCK_NBYTES,
            cluster=self.cluster,
            namespace=f"contract-{uuid.uuid4().hex[:8]}",
            timeout_ms=5000,
        )
        return RedisTier(self.config, self.on_corrupt)

    def reopen(self, tier: Tier) -> Tier:
        return RedisTier(self.config, self.on_corrupt)

    def raw_clients(self) -> list[redis.Redis]:
        server = self.server()
        ports = server.ports if self.cluster else [server.port]
        return [redis.Redis(host="127.0.0.1", port=p) for p in ports]

    async def corrupt(self, tier: Tier, key: bytes) -> Tier:
        from redis_servers import corrupt_redis_block

        await corrupt_redis_block(self.server().url, self.cluster, tier, key)  # type: ignore[arg-type]
        return tier

    async def limit(self, tier: Tier) -> Tier:
        # Redis enforces capacity itself (maxmemory, noeviction): give it room for a few blocks
        # above what it uses now. The finalizer restores an unlimited server for other tests.
        for client in self.raw_clients():
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", str(used + 128 * 1024))
        self.request.addfinalizer(self._unlimit)
        return tier

    def _unlimit(self) -> None:
        for client in self.raw_clients():
            client.config_set("maxmemory", "0")
            client.close()


class G4ClusterKind(G4Kind):
    cluster = True


KINDS: dict[str, type[Kind]] = {
    "dict": DictKind,
    "g1-cpu": G1Kind,
    "g2": G2Kind,
    "g3": G3Kind,
    "g4": G4Kind,
    "g4-cluster": G4ClusterKind,
}


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    return KINDS[request.param](request, tmp_path)


@pytest.fixture(params=[k for k, cls in KINDS.items() if cls.persistent])
def persistent_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    """The tiers whose bytes live outside the process: they survive a reopen and can rot."""
    return KINDS[request.param](request, tmp_path)


@pytest.fixture
async def tier(kind: Kind) -> AsyncIterator[Tier]:
    t = kind.open()
    yield t
    await t.close()


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
async def test_round_trip_is_bit_exact(tier: Tier, dtype: str) -> None:
    spec = ModelSpec(
        "contract", num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype, block_tokens=4
    )
    blocks = chain(6, seed=1, spec=spec)
    assert await tier.put(blocks) == 6
    got = await tier.get([k for k, _ in blocks])
    for (key, value), back in zip(blocks, got, strict=True):
        assert back == value
        assert back is not None
        assert torch.equal(decode_block(spec, key, back), decode_block(spec, key, value))


async def test_miss_is_none_and_order_is_kept(tier: Tier) -> None:
    blocks = chain(3, seed=2)
    await tier.put(blocks[1:2])
    got = await tier.get([blocks[0][0], blocks[1][0], blocks[2][0]])
    assert got == [None, blocks[1][1], None]
    assert await tier.get([]) == []
    assert await tier.exists([k for k, _ in blocks]) == [False, True, False]


async def test_put_is_idempotent(tier: Tier) -> None:
    blocks = chain(4, seed=3)
    assert await tier.put(blocks[:2]) == 2
    assert await tier.put(blocks) == 2
    assert await tier.put(blocks) == 0
    assert await tier.put(blocks[:1] + blocks[:1]) == 0
    stats = await tier.stats()
    assert stats.num_blocks == 4
    assert stats.used_bytes == 4 * BLOCK_NBYTES


async def test_delete_counts(tier: Tier) -> None:
    blocks = chain(5, seed=4)
    await tier.put(blocks)
    keys = [k for k, _ in blocks]
    assert await tier.delete(keys[:2]) == 2
    assert await tier.delete(keys[:3]) == 1
    assert await tier.delete(keys[:3]) == 0
    assert await tier.exists(keys) == [False, False, False, True, True]
    assert await tier.get(keys[:1]) == [None]


async def test_stats_accounting(tier: Tier) -> None:
    blocks = chain(5, seed=5)
    before = await tier.stats()
    assert before.num_blocks == 0
    assert before.used_bytes == 0
    await tier.put(blocks)
    await tier.get([blocks[0][0], blocks[1][0], b"\x01" * 16])
    await tier.delete([blocks[4][0]])
    stats = await tier.stats()
    assert stats.num_blocks == 4
    assert stats.used_bytes == 4 * BLOCK_NBYTES
    assert (stats.num_gets, stats.num_hits, stats.num_misses) == (3, 2, 1)
    assert (stats.num_puts, stats.num_deletes, stats.num_corrupt) == (5, 1, 0)
    assert stats.capacity_bytes == tier.capacity_bytes


async def test_keys_lists_everything_stored(tier: Tier) -> None:
    blocks = chain(7, seed=6)
    await tier.put(blocks)
    await tier.delete([blocks[0][0]])
    assert {k async for k in tier.iter_keys()} == {k for k, _ in blocks[1:]}


async def test_bad_arguments_change_nothing(tier: Tier) -> None:
    blocks = chain(2, seed=7)
    with pytest.raises(InvalidArgumentError, match="16 bytes"):
        await tier.get([b"short"])
    with pytest.raises(InvalidArgumentError, match="is block"):
        await tier.put([(blocks[0][0], blocks[1][1])])
    with pytest.raises(InvalidArgumentError, match="not a block"):
        await tier.put([(blocks[0][0], b"garbage" * 40)])
    with pytest.raises(InvalidArgumentError, match="not one bytes object"):
        await tier.exists(blocks[0][0])  # type: ignore[arg-type]
    assert (await tier.stats()).num_blocks == 0


async def test_full_tier_raises_and_stores_nothing_of_the_batch(kind: Kind) -> None:
    tier = await kind.limit(kind.open(capacity_blocks=4))
    try:
        blocks = chain(6 if kind.exact_capacity else 2000, seed=8)
        if kind.exact_capacity:
            assert await tier.put(blocks[:3]) == 3
            with pytest.raises(TierFullError):
                await tier.put(blocks[3:5])
            assert await tier.exists([k for k, _ in blocks[3:5]]) == [False, False]
            assert await tier.put(blocks[3:4]) == 1
            with pytest.raises(TierFullError):
                await tier.put(blocks[4:5])
            # Room again after a delete: the tier never evicted anything by itself.
            assert await tier.delete([blocks[0][0]]) == 1
            assert await tier.put(blocks[4:5]) == 1
            assert (await tier.stats()).num_blocks == 4
        else:
            stored: list[bytes] = []
            full: TierFullError | None = None
            for key, value in blocks:
                try:
                    await tier.put([(key, value)])
                except TierFullError as exc:
                    full = exc
                    break
                stored.append(key)
            assert full is not None, "Redis never reported that it was full"
            assert stored, "the server took nothing at all"
            assert all(await tier.exists(stored))
    finally:
        await tier.close()


async def test_many_concurrent_tasks(tier: Tier) -> None:
    prompts = [chain(6, seed=100 + i) for i in range(8)]
    expected = {k: v for p in prompts for k, v in p}

    async def worker(n: int) -> int:
        rng = random.Random(n)
        checked = 0
        for _ in range(25):
            p = rng.choice(prompts)
            if rng.random() < 0.5:
                await tier.put(p[: rng.randrange(1, 7)])
            else:
                keys = [k for k, _ in p]
                for key, value in zip(keys, await tier.get(keys), strict=True):
                    if value is not None:
                        assert value == expected[key]
                        checked += 1
        return checked

    results = await asyncio.gather(*(worker(n) for n in range(16)))
    assert sum(results) > 0
    keys = list(expected)
    got = await tier.get(keys)
    stored = [k for k, v in zip(keys, got, strict=True) if v is not None]
    assert all(v == expected[k] for k, v in zip(keys, got, strict=True) if v is not None)
    stats = await tier.stats()
    assert stats.num_blocks == len(stored)
    assert stats.used_bytes == len(stored) * BLOCK_NBYTES


async def test_persistence_across_reopen(persistent_kind: Kind) -> None:
    kind = persistent_kind
    tier = kind.open()
    blocks = chain(5, seed=9)
    await tier.put(blocks)
    await tier.close()
    again = kind.reopen(tier)
    try:
        assert await again.get([k for k, _ in blocks]) == [v for _, v in blocks]
        stats = await again.stats()
        assert stats.num_blocks == 5
        assert stats.used_bytes == 5 * BLOCK_NBYTES
        assert {k async for k in again.iter_keys()} == {k for k, _ in blocks}
    finally:
        await again.close()


async def test_corrupt_value_is_reported_and_never_returned(persistent_kind: Kind) -> None:
    kind = persistent_kind
    tier = kind.open()
    blocks = chain(3, seed=10)
    await tier.put(blocks)
    tier = await kind.corrupt(tier, blocks[1][0])
    reports = kind.reports
    try:
        got = await tier.get([k for k, _ in blocks])
        assert got == [blocks[0][1], None, blocks[2][1]]
        assert (await tier.stats()).num_corrupt == 1
        assert [(r[0], r[1]) for r in reports] == [(tier.name, blocks[1][0])]
        assert "checksum" in reports[0][2]
        # Deleted, so the next read is a plain miss, not a second report.
        assert await tier.exists([blocks[1][0]]) == [False]
        assert await tier.get([blocks[1][0]]) == [None]
        assert (await tier.stats()).num_corrupt == 1
    finally:
        await tier.close()


async def test_get_into_caller_buffers(tier: Tier) -> None:
    blocks = chain(4, seed=11)
    await tier.put(blocks[:3])
    buffers = [bytearray(BLOCK_NBYTES + 10) for _ in range(4)]
    sizes = await tier.get_into([k for k, _ in blocks], buffers)
    assert sizes == [BLOCK_NBYTES] * 3 + [None]
    for (_, value), buf in zip(blocks[:3], buffers[:3], strict=True):
        assert buf[:BLOCK_NBYTES] == value
    # numpy arrays and CPU tensors are buffers too.
    arr = torch.zeros(BLOCK_NBYTES, dtype=torch.uint8)
    assert await tier.get_into([blocks[1][0]], [arr]) == [BLOCK_NBYTES]
    assert bytes(arr.numpy()) == bytes(blocks[1][1])
    with pytest.raises(InvalidArgumentError, match="too small"):
        await tier.get_into([blocks[0][0]], [bytearray(100)])
    with pytest.raises(InvalidArgumentError, match="writable"):
        await tier.get_into([blocks[0][0]], [bytes(BLOCK_NBYTES)])
    with pytest.raises(InvalidArgumentError, match="1 keys but 2 buffers"):
        await tier.get_into([blocks[0][0]], [bytearray(10), bytearray(10)])


async def test_put_with_fills_the_destination_once(tier: Tier) -> None:
    from kvstore.core.block_format import encode_block_into

    key = block_hashes(SPEC, [9, 9, 9, 9])[0]
    t = torch.randn(SPEC.block_shape).to(torch.float16)

    def fill(out: memoryview) -> int:
        return encode_block_into(SPEC, key, t, out)

    def broken(out: memoryview) -> int:
        out[:8] = b"garbage!"
        raise RuntimeError("the producer failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        await tier.put_with(key, BLOCK_NBYTES, broken)
    assert await tier.exists([key]) == [False]
    assert await tier.put_with(key, BLOCK_NBYTES, fill) is True
    assert await tier.put_with(key, BLOCK_NBYTES, fill) is False
    (back,) = await tier.get([key])
    assert back is not None
    assert torch.equal(decode_block(SPEC, key, back), t)
    stats = await tier.stats()
    assert (stats.num_blocks, stats.used_bytes, stats.num_puts) == (1, BLOCK_NBYTES, 1)
    other = block_hashes(SPEC, [8, 8, 8, 8])[0]
    with pytest.raises(InvalidArgumentError, match="is block"):
        await tier.put_with(other, BLOCK_NBYTES, fill)  # writes a block named `key`
    assert await tier.exists([other]) == [False]
