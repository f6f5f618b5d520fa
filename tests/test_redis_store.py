"""G4 (``RedisTier``) against real Redis: a standalone server and a three-master Redis Cluster
from ``conftest.py``, plus dedicated servers for the tests that stop, starve or break one.

What the contract suite (``test_tier_contract.py``) cannot see lives here: the key layout,
chunking of large blocks and where the chunks land in a cluster, TTLs, the ZSTD codec, and how
the tier behaves when Redis is unreachable, hung or out of memory. Assertions are on bytes
returned, bytes found in Redis and exceptions raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import torch
from redis_servers import (
    RedisServer,
    corrupt_redis_block,
    free_port,
    start_redis_cluster,
    start_redis_server,
)

from kvstore.core.block_format import Codec, decode_block, encode_block, read_header, torch_dtype
from kvstore.core.errors import ConfigError, TierFullError, TierUnavailableError
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from tiers.redis_store import MANIFEST_MAGIC, RedisTier, RedisTierConfig, parse_manifest

CHUNK = 64 * 1024
# 8 KiB blocks: stored whole under the head key.
SMALL = ModelSpec(
    "test/redis-small", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16", block_tokens=16
)
# 128 KiB + header: three chunks of at most 64 KiB.
BIG = ModelSpec(
    "test/redis-big", num_layers=4, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_tokens=32
)
BIG_CHUNKS = -(-(BIG.block_nbytes + 128) // CHUNK)

Blocks = list[tuple[BlockHash, bytearray]]


def make_blocks(spec: ModelSpec, n: int, seed: int) -> Blocks:
    """A chain of ``n`` blocks with random (seeded) K/V."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n * spec.block_tokens,), generator=gen).tolist()
    dtype = torch_dtype(spec.dtype)
    return [
        (h, encode_block(spec, h, torch.randn(spec.block_shape, generator=gen).to(dtype)))
        for h in block_hashes(spec, tokens)
    ]


T = TypeVar("T")


def hang_bound_s(timeout_ms: int) -> float:
    """Generous: this checks that nothing hangs, not how fast a failure is reported."""
    return 3 * timeout_ms / 1000 + 1.0


async def eventually(call: Callable[[], Awaitable[T]], within_s: float = 20.0) -> T:
    """``call()`` once it stops timing out: a short tier timeout, meant for the failure under
    test, can also be passed by a healthy server on a loaded machine."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except TierUnavailableError:
            if time.monotonic() > deadline:
                raise


@dataclass(frozen=True)
class Target:
    url: str
    cluster: bool
    ports: list[int]


RawClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """Each test gets its own keys on the shared servers."""
    return "t" + hashlib.blake2b(request.node.nodeid.encode(), digest_size=6).hexdigest()


@pytest.fixture(params=["standalone", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return Target(cluster.url, True, cluster.ports)
    server = request.getfixturevalue("redis_server")
    return Target(server.url, False, [server.port])


@pytest.fixture
async def open_tier(target: Target, namespace: str) -> AsyncIterator[Callable[..., RedisTier]]:
    opened: list[RedisTier] = []

    def open_(**overrides: Any) -> RedisTier:
        settings: dict[str, Any] = {
            "url": target.url,
            "cluster": target.cluster,
            "capacity_bytes": 1 << 30,
            "namespace": namespace,
            "chunk_bytes": CHUNK,
            "timeout_ms": 5000,
        }
        settings.update(overrides)
        on_corrupt = settings.pop("on_corrupt", None)
        tier = RedisTier(RedisTierConfig(**settings), on_corrupt)
        opened.append(tier)
        return tier

    yield open_
    for tier in opened:
        await tier.close()


@pytest.fixture
async def raw(target: Target) -> AsyncIterator[RawClient]:
    """A plain client of the same Redis, to look at what the tier stored."""
    client: RawClient
    if target.cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(target.url)
    else:
        client = redis.asyncio.Redis.from_url(target.url)
    yield client
    await client.aclose()


async def raw_get(raw: RawClient, name: str) -> bytes | None:
    value = await raw.get(name)
    assert value is None or isinstance(value, bytes)  # decode_responses is off
    return value


async def raw_exists(raw: RawClient, names: list[str]) -> list[bool]:
    return [bool(await raw.exists(name)) for name in names]


def all_keys(tier: RedisTier, key: bytes, num_chunks: int) -> list[str]:
    return [tier.head_key(key), *(tier.chunk_key(key, i) for i in range(num_chunks))]


# -- round trips --------------------------------------------------------------------------------


async def test_round_trip_is_bit_exact_small_and_chunked(
    open_tier: Callable[..., RedisTier], raw: RawClient
) -> None:
    tier = open_tier()
    small, big = make_blocks(SMALL, 4, seed=1), make_blocks(BIG, 3, seed=2)
    blocks = small + big
    missing = make_blocks(SMALL, 5, seed=3)[4][0]

    assert await tier.put(blocks) == 7
    got = await tier.get([k for k, _ in blocks] + [missing])
    assert got == [v for _, v in blocks] + [None]
    back = got[5]
    assert back is not None
    assert torch.equal(decode_block(BIG, big[1][0], back), decode_block(BIG, big[1][0], big[1][1]))

    # Small blocks are the head value itself; big ones a manifest plus chunks of <= chunk_bytes.
    assert await raw_get(raw, tier.head_key(small[0][0])) == bytes(small[0][1])
    key, value = big[0]
    manifest = await raw_get(raw, tier.head_key(key))
    assert manifest is not None
    assert manifest[:4] == MANIFEST_MAGIC
    assert parse_manifest(manifest) == (BIG_CHUNKS, len(value))
    chunks = [await raw_get(raw, tier.chunk_key(key, i)) for i in range(BIG_CHUNKS)]
    assert all(c is not None and 0 < len(c) <= CHUNK for c in chunks)
    assert b"".join(c for c in chunks if c is not None) == value
    assert await raw.exists(tier.chunk_key(key, BIG_CHUNKS)) == 0

    # get_into: the same bytes, assembled straight in the caller's buffers.
    buffers = [bytearray(len(big[0][1]) + 7) for _ in range(len(blocks) + 1)]
    sizes = await tier.get_into([k for k, _ in blocks] + [missing], buffers)
    assert sizes == [len(v) for _, v in blocks] + [None]
    for (_, value), buf in zip(blocks, buffers, strict=False):
        assert buf[: len(value)] == value

    assert await tier.put(blocks) == 0
    assert await tier.exists([k for k, _ in blocks] + [missing]) == [True] * 7 + [False]
    stats = await tier.stats()
    assert (stats.tier, stats.num_blocks) == ("G4", 7)
    assert stats.used_bytes == sum(len(v) for _, v in blocks)
    assert stats.capacity_bytes == 1 << 30
    assert {k async for k in tier.iter_keys()} == {k for k, _ in blocks}


async def test_delete_removes_heads_and_chunks(
    open_tier: Callable[..., RedisTier], raw: RawClient
) -> None:
    tier = open_tier()
    small, big = make_blocks(SMALL, 2, seed=4), make_blocks(BIG, 2, seed=5)
    await tier.put(small + big)
    missing = make_blocks(SMALL, 3, seed=6)[2][0]
    names = [*all_keys(tier, big[0][0], BIG_CHUNKS), tier.head_key(small[0][0])]

    assert await tier.delete([big[0][0], small[0][0], missing]) == 2
    assert await raw_exists(raw, names) == [False] * len(names)
    assert await tier.delete([big[0][0], small[0][0]]) == 0
    assert await tier.get([k for k, _ in small + big]) == [None, small[1][1], None, big[1][1]]
    assert (await tier.stats()).num_blocks == 2


@pytest.mark.parametrize("read", ["get", "get_into"])
async def test_missing_chunk_is_a_miss_and_drops_the_block(
    open_tier: Callable[..., RedisTier], raw: RawClient, read: str
) -> None:
    tier = open_tier()
    (key, value), (other, other_value) = make_blocks(BIG, 2, seed=7)
    await tier.put([(key, value), (other, other_value)])
    await raw.unlink(tier.chunk_key(key, 1))  # as an allkeys-lru eviction would

    if read == "get":
        assert await tier.get([key, other]) == [None, other_value]
    else:
        buffers = [bytearray(len(value)), bytearray(len(value))]
        assert await tier.get_into([key, other], buffers) == [None, len(other_value)]
        assert buffers[1] == other_value
    names = all_keys(tier, key, BIG_CHUNKS)
    assert await raw_exists(raw, names) == [False] * len(names)
    assert await tier.exists([key]) == [False]
    assert (await tier.stats()).num_corrupt == 0  # gone, not corrupt


@pytest.mark.parametrize("read", ["get", "get_into"])
async def test_manifest_that_disagrees_with_its_chunks_is_corrupt(
    open_tier: Callable[..., RedisTier], raw: RawClient, read: str
) -> None:
    reports: list[bytes] = []
    tier = open_tier(on_corrupt=lambda name, key, reason: reports.append(key))
    (key, value), (other, other_value) = make_blocks(BIG, 2, seed=28)
    await tier.put([(key, value), (other, other_value)])
    # One chunk fewer than stored, and a total that matches neither.
    await raw.set(
        tier.head_key(key), MANIFEST_MAGIC + struct.pack("<IQ", BIG_CHUNKS - 1, len(value) - 1000)
    )
    if read == "get":
        assert await tier.get([key, other]) == [None, other_value]
    else:
        buffers = [bytearray(len(value)), bytearray(len(value))]
        assert await tier.get_into([key, other], buffers) == [None, len(other_value)]
        assert buffers[1] == other_value
    assert reports == [key]
    assert await raw.exists(tier.head_key(key)) == 0
    assert (await tier.stats()).num_corrupt == 1


async def test_cluster_keeps_a_block_on_one_shard_and_spreads_a_chain(
    redis_cluster: Any, namespace: str
) -> None:
    config = RedisTierConfig(
        url=redis_cluster.url,
        cluster=True,
        capacity_bytes=1 << 30,
        namespace=namespace,
        chunk_bytes=CHUNK,
    )
    blocks = make_blocks(BIG, 16, seed=8)
    tier = RedisTier(config)
    try:
        assert await tier.put(blocks) == 16
        node_of: dict[str, int] = {}
        for port in redis_cluster.ports:
            # SCAN on a cluster node lists the keys that node holds.
            node = redis.Redis(host="127.0.0.1", port=port)
            try:
                for name in node.scan_iter(match=f"kvstore:{namespace}:*", count=1000):
                    node_of[name.decode()] = port
            finally:
                node.close()
        assert len(node_of) == 16 * (1 + BIG_CHUNKS)
        for key, _ in blocks:
            assert {node_of[n] for n in all_keys(tier, key, BIG_CHUNKS)} == {
                node_of[tier.head_key(key)]
            }
        assert len({node_of[tier.head_key(k)] for k, _ in blocks}) >= 2
        assert await tier.get([k for k, _ in blocks]) == [v for _, v in blocks]
    finally:
        await tier.close()


# -- layout, TTL, codec ---------------------------------------------------------------------------


async def test_keys_carry_prefix_and_namespace(
    open_tier: Callable[..., RedisTier], raw: RawClient, namespace: str
) -> None:
    tier = open_tier(key_prefix="kvtest:g4")
    key, value = make_blocks(SMALL, 1, seed=9)[0]
    big_key, big_value = make_blocks(BIG, 1, seed=10)[0]
    await tier.put([(key, value), (big_key, big_value)])

    head = f"kvtest:g4:{namespace}:{{{key.hex()}}}"
    assert tier.head_key(key) == head
    assert tier.chunk_key(big_key, 2) == f"kvtest:g4:{namespace}:{{{big_key.hex()}}}:2"
    assert await raw_get(raw, head) == bytes(value)
    assert await raw.exists(f"kvstore:{namespace}:{{{key.hex()}}}") == 0

    # Another namespace on the same server sees nothing of this one.
    other = open_tier(key_prefix="kvtest:g4", namespace=namespace + "x")
    assert await other.get([key, big_key]) == [None, None]
    assert [k async for k in other.iter_keys()] == []
    assert (await other.stats()).num_blocks == 0
    assert await other.delete([key]) == 0
    assert await tier.get([key]) == [value]


async def test_ttl_expires_every_key(open_tier: Callable[..., RedisTier], raw: RawClient) -> None:
    tier = open_tier(ttl_s=0.5)
    key, value = make_blocks(SMALL, 1, seed=11)[0]
    big_key, big_value = make_blocks(BIG, 1, seed=12)[0]
    await tier.put([(key, value), (big_key, big_value)])
    names = [tier.head_key(key), *all_keys(tier, big_key, BIG_CHUNKS)]
    for name in names:
        assert 0 < await raw.pttl(name) <= 500
    assert await tier.get([key, big_key]) == [value, big_value]

    await asyncio.sleep(0.7)
    assert await tier.get([key, big_key]) == [None, None]
    assert await raw_exists(raw, names) == [False] * len(names)


async def test_zstd_planes_round_trip_stores_less(open_tier: Callable[..., RedisTier]) -> None:
    tier = open_tier(codec=Codec.ZSTD_PLANES, zstd_level=3)
    small = make_blocks(SMALL, 3, seed=13)
    big = make_blocks(BIG, 9, seed=14)  # > 1 MiB: compressed in worker threads
    assert await tier.put(small) == 3
    assert await tier.put(big) == 9

    for spec, blocks in ((SMALL, small), (BIG, big)):
        got = await tier.get([k for k, _ in blocks])
        for (key, value), back in zip(blocks, got, strict=True):
            assert back is not None
            assert read_header(back).codec is Codec.ZSTD_PLANES
            assert torch.equal(decode_block(spec, key, back), decode_block(spec, key, value))
    stats = await tier.stats()
    assert stats.num_blocks == 12
    assert stats.used_bytes < 0.95 * sum(len(v) for _, v in small + big)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
async def test_unreachable_url_raises_unavailable_quickly(cluster: bool) -> None:
    port = free_port()
    config = RedisTierConfig(
        url=f"redis://user:s3cret@127.0.0.1:{port}/0"
        if not cluster
        else f"redis://127.0.0.1:{port}",
        cluster=cluster,
        capacity_bytes=1 << 20,
        timeout_ms=300,
    )
    (key, value) = make_blocks(SMALL, 1, seed=15)[0]
    async with RedisTier(config) as tier:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: tier.get([key]),
            lambda: tier.put([(key, value)]),
            lambda: tier.exists([key]),
            tier.stats,
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(TierUnavailableError, match=f"127.0.0.1:{port}") as info:
                await call()
            assert time.monotonic() - start < hang_bound_s(300)
            assert "s3cret" not in str(info.value)
            assert info.value.tier == "G4"


async def test_silent_listener_times_out() -> None:
    # Accepts connections (the kernel does, from the backlog) and never says a word.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        (key, _) = make_blocks(SMALL, 1, seed=16)[0]
        config = RedisTierConfig(url=url, capacity_bytes=1 << 20, timeout_ms=300)
        async with RedisTier(config) as tier:
            start = time.monotonic()
            with pytest.raises(TierUnavailableError):
                await tier.get([key])
            assert time.monotonic() - start < hang_bound_s(300)


async def test_stopped_server_times_out_then_the_same_tier_recovers() -> None:
    blocks = make_blocks(SMALL, 2, seed=17) + make_blocks(BIG, 1, seed=18)
    with start_redis_server() as server:
        config = RedisTierConfig(
            url=server.url, capacity_bytes=1 << 30, timeout_ms=300, chunk_bytes=CHUNK
        )
        async with RedisTier(config) as tier:
            await tier.put(blocks[:1])
            server.pause()
            try:
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: tier.get([blocks[0][0]]),
                    lambda: tier.put(blocks[1:]),
                ]
                for call in calls:
                    start = time.monotonic()
                    with pytest.raises(TierUnavailableError, match=r"did not answer|Timeout"):
                        await call()
                    assert time.monotonic() - start < hang_bound_s(300)
            finally:
                server.resume()
            assert await tier.get([blocks[0][0]]) == [blocks[0][1]]
            assert await tier.put(blocks) == 2
            assert await tier.get([k for k, _ in blocks]) == [v for _, v in blocks]


async def test_a_cancelled_call_is_cancelled_not_completed() -> None:
    """redis-py can swallow a cancellation that lands while it parses a pipeline's replies and
    return normally; the tier must still end a cancelled call with CancelledError, so that a
    cancelled request (a client's deadline, a shutdown) does not carry on."""
    blocks = make_blocks(SMALL, 400, seed=30)
    keys = [k for k, _ in blocks]
    with start_redis_server() as server:
        config = RedisTierConfig(url=server.url, capacity_bytes=1 << 30, timeout_ms=5000)
        async with RedisTier(config) as tier:
            await tier.put(blocks)
            cancelled_mid_flight = 0
            for step in range(40):
                call = asyncio.create_task(tier.get(keys))
                await asyncio.sleep(step * 0.0002)
                if call.done():
                    continue
                call.cancel()
                cancelled_mid_flight += 1
                with pytest.raises(asyncio.CancelledError):
                    await call
            assert cancelled_mid_flight > 0
            assert await tier.get(keys[:1]) == [blocks[0][1]]


async def test_restarted_server_is_used_again_by_the_same_tier() -> None:
    blocks = make_blocks(SMALL, 2, seed=23)
    server = start_redis_server()
    try:
        config = RedisTierConfig(url=server.url, capacity_bytes=1 << 30, timeout_ms=300)
        async with RedisTier(config) as tier:
            assert await tier.put(blocks[:1]) == 1
            server.stop()  # pooled connections now point at a dead process
            with pytest.raises(TierUnavailableError, match="unavailable"):
                await tier.get([blocks[0][0]])
            server = start_redis_server(port=server.port)
            # Persistence is off: the block is gone, but the tier answers again.
            assert await tier.get([blocks[0][0]]) == [None]
            assert await tier.put(blocks) == 2
            assert await tier.get([k for k, _ in blocks]) == [v for _, v in blocks]
    finally:
        server.stop()


async def test_stopped_cluster_node_times_out_then_the_same_tier_recovers() -> None:
    blocks = make_blocks(BIG, 8, seed=24)
    with start_redis_cluster() as cluster:
        config = RedisTierConfig(
            url=cluster.url, cluster=True, capacity_bytes=1 << 30, timeout_ms=300, chunk_bytes=CHUNK
        )
        async with RedisTier(config) as tier:
            assert await eventually(lambda: tier.put(blocks)) == 8
            keys = [k for k, _ in blocks]
            # Well under cluster-node-timeout: the other nodes do not fail it over.
            cluster.servers[1].pause()
            try:
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: tier.get(keys),
                    lambda: tier.put(make_blocks(BIG, 8, seed=25)),
                ]
                for call in calls:
                    start = time.monotonic()
                    with pytest.raises(TierUnavailableError):
                        await call()
                    assert time.monotonic() - start < hang_bound_s(300)
            finally:
                cluster.servers[1].resume()
            # The same tier object works again once the node answers (no fixed time: loaded
            # machines answered the first call after the resume late).
            assert await eventually(lambda: tier.get(keys)) == [v for _, v in blocks]
            assert (await eventually(tier.stats)).num_blocks >= 8


async def test_cluster_failover_is_followed_without_recreating_the_tier() -> None:
    old, new = make_blocks(SMALL, 12, seed=26), make_blocks(SMALL, 12, seed=27)
    with start_redis_cluster(replicas=1, node_timeout_ms=500) as cluster:
        config = RedisTierConfig(
            url=cluster.url, cluster=True, capacity_bytes=1 << 30, timeout_ms=500
        )
        async with RedisTier(config) as tier:
            assert await tier.put(old) == 12
            victim = next(s for s in cluster.masters() if s.port != cluster.ports[0])
            wait_replicated(victim)
            # Hung, not dead: connections to it time out instead of being refused, which
            # redis-py alone does not take as a reason to re-read the slot map.
            victim.pause()
            # Calls fail within the timeout until a replica has taken over the victim's slots.
            deadline = time.monotonic() + 20
            while True:
                start = time.monotonic()
                try:
                    got = await tier.get([k for k, _ in old])
                    break
                except TierUnavailableError:
                    assert time.monotonic() - start < hang_bound_s(500)
                    assert time.monotonic() < deadline, "no replica took over"
                    await asyncio.sleep(0.1)
            assert got == [v for _, v in old]
            assert await tier.put(new) == 12
            assert await tier.get([k for k, _ in new]) == [v for _, v in new]


def wait_replicated(master: RedisServer) -> None:
    """Until the master's replica has everything the master wrote."""
    client = master.client()
    try:
        deadline = time.monotonic() + 10
        while True:
            info = client.info("replication")
            if info.get("slave0", {}).get("offset") == info["master_repl_offset"]:
                return
            assert time.monotonic() < deadline, f"replica never caught up: {info}"
            time.sleep(0.02)
    finally:
        client.close()


async def test_out_of_memory_raises_full_and_keeps_nothing_of_the_batch() -> None:
    with start_redis_server() as server:
        admin = server.client()
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", str(used + 2 * 1024 * 1024))
        config = RedisTierConfig(url=server.url, capacity_bytes=1 << 30, chunk_bytes=CHUNK)
        batches = [make_blocks(BIG, 4, seed=100 + i) for i in range(40)]
        stored: Blocks = []
        tier = RedisTier(config)
        try:
            failed: Blocks | None = None
            message = ""
            for batch in batches:
                try:
                    assert await tier.put(batch) == 4
                except TierFullError as exc:
                    failed, message = batch, str(exc)
                    break
                stored += batch
            assert failed is not None, "maxmemory was never reached"
            assert "out of memory" in message
            assert stored, "the server took nothing at all"
            names = [n for key, _ in failed for n in all_keys(tier, key, BIG_CHUNKS)]
            assert sum(admin.exists(n) for n in names) == 0
            assert await tier.get([k for k, _ in stored]) == [v for _, v in stored]
            assert (await tier.stats()).num_blocks == len(stored)

            admin.config_set("maxmemory", "0")
            assert await tier.put(failed) == 4
        finally:
            await tier.close()
            admin.close()


@pytest.mark.parametrize("spec", [SMALL, BIG], ids=["small", "chunked"])
async def test_corrupt_value_is_dropped_and_reported(
    open_tier: Callable[..., RedisTier], raw: RawClient, target: Target, spec: ModelSpec
) -> None:
    reports: list[tuple[str, bytes, str]] = []
    tier = open_tier(on_corrupt=lambda name, key, reason: reports.append((name, key, reason)))
    blocks = make_blocks(spec, 3, seed=19)
    await tier.put(blocks)
    bad = blocks[1][0]
    await corrupt_redis_block(target.url, target.cluster, tier, bad)

    assert await tier.get([k for k, _ in blocks]) == [blocks[0][1], None, blocks[2][1]]
    assert (await tier.stats()).num_corrupt == 1
    assert [(name, key) for name, key, _ in reports] == [("G4", bad)]
    assert "checksum" in reports[0][2]
    names = all_keys(tier, bad, BIG_CHUNKS if spec is BIG else 0)
    assert await raw_exists(raw, names) == [False] * len(names)
    assert await tier.get([bad]) == [None]
    assert (await tier.stats()).num_corrupt == 1


# -- connections and configuration ------------------------------------------------------------


async def test_more_tasks_than_connections_queue_instead_of_failing(
    open_tier: Callable[..., RedisTier],
) -> None:
    tier = open_tier(max_connections=2)
    blocks = make_blocks(SMALL, 4, seed=20) + make_blocks(BIG, 2, seed=21)
    await tier.put(blocks)
    keys = [k for k, _ in blocks]
    results = await asyncio.gather(*(tier.get(keys) for _ in range(24)))
    assert all(r == [v for _, v in blocks] for r in results)


async def test_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with start_redis_server("--unixsocket", str(sock), "--unixsocketperm", "700") as server:
        assert server.proc.poll() is None
        blocks = make_blocks(SMALL, 2, seed=22)
        config = RedisTierConfig(url=f"unix://{sock}", capacity_bytes=1 << 20)
        async with RedisTier(config) as tier:
            assert await tier.put(blocks) == 2
            assert await tier.get([k for k, _ in blocks]) == [v for _, v in blocks]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": "http://127.0.0.1:6379"}, "must start with"),
        ({"url": "unix:///tmp/r.sock", "cluster": True}, "unix socket"),
        ({"url": "redis://:6379"}, "names no host"),
        ({"capacity_bytes": 0}, "capacity_bytes"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"chunk_bytes": 100}, "chunk_bytes"),
        ({"namespace": "a:b"}, "namespace"),
        ({"namespace": "a{b}"}, "namespace"),
        ({"key_prefix": "k*"}, "key_prefix"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"zstd_level": 0}, "zstd_level"),
        ({"codec": 1}, "codec"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_config_is_validated(overrides: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"url": "redis://127.0.0.1:6379/0", "capacity_bytes": 1 << 20}
    settings.update(overrides)
    with pytest.raises(ConfigError, match=message):
        RedisTierConfig(**settings)
