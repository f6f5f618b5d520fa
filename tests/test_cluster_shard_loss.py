"""G4 on a three-master Redis Cluster that loses a shard mid-run, and gets it back.

A master is killed with SIGKILL while kvstore runs (no replica, persistence off: its blocks are
gone, and ``cluster-require-full-coverage no`` lets the other masters keep serving their slots).
What a user must see: the blocks on the other shards are still found, the lost shard's blocks
are missing — holes where stored blocks follow — instead of the whole batch failing, and no call
waits for a timeout; the model worker repairs the holes and greedy generation from the fetched
prefix is the same as from scratch; Lookup and Stats answer throughout; and when the shard is
started again on its port, with its ``nodes.conf``, the same tiers and servers use it again
without a restart of kvstore. Plus the same at the tier level, and a killed master whose replica
takes over.

Real parts only: redis-server processes killed with SIGKILL and started again, two gRPC servers
in-process — a "prefill" node that stores the prompts and a "decode" node with the default model
worker — each with its own G2 and G4 on the cluster as its only lower tier (no G3), so the decode
node reads the prefill node's blocks from the cluster alone. The cluster is this module's own:
it kills a shard.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import pytest
import torch
from redis_servers import RedisClusterServers, RedisServer, start_redis_cluster
from test_redis_store import BIG, CHUNK, SMALL, make_blocks, wait_replicated

from client import AsyncClient
from kvstore.config import StoreConfig
from kvstore.core.errors import TierUnavailableError
from kvstore.core.keys import BlockHash
from kvstore.engine.engine import EngineConfig
from kvstore.service.server import KVStoreServer, ServerConfig
from kvstore.worker.model import ModelWorker, WorkerConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig, RedisTierStats

pytest.importorskip("transformers")

BT = 16  # the default worker's block_tokens
BLOCKS = 10  # full blocks per prompt
NEW_TOKENS = 8
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # float32; see tests/test_worker.py
TIMEOUT_MS = 2000
SLOT = 64 * 1024  # a default-model block is 32 KiB + header
# Without it a cluster whose master died refuses every command once the others mark it failed.
PARTIAL_COVERAGE = ("--cluster-require-full-coverage", "no")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with start_redis_cluster(node_timeout_ms=2000, extra_args=PARTIAL_COVERAGE) as servers:
        yield servers


@pytest.fixture
def healthy(cluster: RedisClusterServers) -> RedisClusterServers:
    """The module's cluster with every master running (a failed test may have left one dead)."""
    for server in list(cluster.servers):
        if server.proc.poll() is not None:
            cluster.restart(server)
    return cluster


@pytest.fixture(scope="module")
def model() -> ModelWorker:
    return ModelWorker(WorkerConfig())


def prompt(seed: int, tail: int = 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(BLOCKS * BT + tail)]


def owners(cluster: RedisClusterServers, names: Sequence[str]) -> list[int]:
    """The port of the master that serves each key, from the cluster's own slot map."""
    live = next(s for s in cluster.servers if s.proc.poll() is None)
    client = live.client()
    try:
        ranges = [
            (int(lo), int(hi), int(master[1]))
            for lo, hi, master, *_ in client.execute_command("CLUSTER", "SLOTS")
        ]
        slots = [int(client.execute_command("CLUSTER", "KEYSLOT", name)) for name in names]
    finally:
        client.close()
    return [next(port for lo, hi, port in ranges if lo <= slot <= hi) for slot in slots]


def keys_held(server: RedisServer, pattern: str) -> set[str]:
    """The keys one node holds (SCAN on a cluster node lists only its own)."""
    client = server.client()
    try:
        return {name.decode() for name in client.scan_iter(match=pattern, count=1000)}
    finally:
        client.close()


def pick_victim(cluster: RedisClusterServers, ports: list[int]) -> RedisServer:
    """The master (not the startup node of the url) that holds the most of ``ports``' blocks."""
    candidates = [s for s in cluster.servers if s.port != cluster.ports[0]]
    return max(candidates, key=lambda s: ports.count(s.port))


# -- the tier alone -------------------------------------------------------------------------------


async def test_a_killed_shards_blocks_are_misses_and_the_same_tier_recovers(
    healthy: RedisClusterServers,
) -> None:
    cluster = healthy
    blocks = make_blocks(SMALL, 24, seed=40) + make_blocks(BIG, 6, seed=41)  # BIG: 3 chunks
    keys = [k for k, _ in blocks]
    config = RedisTierConfig(
        url=cluster.url,
        cluster=True,
        capacity_bytes=1 << 30,
        namespace="tierloss",
        chunk_bytes=CHUNK,
        timeout_ms=TIMEOUT_MS,
    )
    async with RedisTier(config) as tier:
        assert await tier.put(blocks) == len(blocks)
        port_of = owners(cluster, [tier.head_key(k) for k in keys])
        victim = pick_victim(cluster, port_of)
        lost = [i for i, port in enumerate(port_of) if port == victim.port]
        assert any(i < 24 for i in lost), "no whole block on the victim"
        assert any(i >= 24 for i in lost), "no chunked block on the victim"
        want = [None if i in lost else v for i, (_, v) in enumerate(blocks)]

        victim.kill()
        start = time.monotonic()
        assert await tier.get(keys) == want
        assert await tier.exists(keys) == [w is not None for w in want]
        buffers = [bytearray(len(v) + 7) for _, v in blocks]
        sizes = await tier.get_into(keys, buffers)
        assert sizes == [None if w is None else len(w) for w in want]
        for w, buffer in zip(want, buffers, strict=True):
            if w is not None:
                assert buffer[: len(w)] == w
        # Refused connections: no call waited for a timeout.
        assert time.monotonic() - start < TIMEOUT_MS / 1000
        stats = await tier.stats()
        assert isinstance(stats, RedisTierStats)
        assert (stats.num_blocks, stats.num_unreachable) == (len(blocks) - len(lost), 3 * len(lost))

        # Writes that touch the lost shard fail, and the batch leaves nothing behind.
        fresh = make_blocks(SMALL, 12, seed=42)
        fresh_ports = owners(cluster, [tier.head_key(k) for k, _ in fresh])
        assert victim.port in fresh_ports
        with pytest.raises(TierUnavailableError, match=f"127.0.0.1:{victim.port}"):
            await tier.put(fresh)
        assert await tier.exists([k for k, _ in fresh]) == [False] * len(fresh)
        elsewhere = [b for b, port in zip(fresh, fresh_ports, strict=True) if port != victim.port]
        assert await tier.put(elsewhere) == len(elsewhere)
        with pytest.raises(TierUnavailableError, match=f"127.0.0.1:{victim.port}"):
            await tier.delete(keys)
        with pytest.raises(TierUnavailableError, match=f"127.0.0.1:{victim.port}"):
            _ = [k async for k in tier.iter_keys()]
        assert await tier.get(keys) == want  # the failed delete removed nothing

        # Back on its port, empty (no persistence): the same tier object writes and reads it.
        cluster.restart(victim)
        assert await tier.get(keys) == want
        assert await tier.put(blocks) == len(lost)
        assert await tier.get(keys) == [v for _, v in blocks]
        assert await tier.put(fresh) == len(fresh) - len(elsewhere)
        assert await tier.get([k for k, _ in fresh]) == [v for _, v in fresh]
        assert len(keys_held(victim, "kvstore:tierloss:*")) > 0


# -- the service: a prefill node, a decode node and a model worker -------------------------------


def node_config(cluster: RedisClusterServers, namespace: str) -> StoreConfig:
    """G2 and G4 only: what a node does not hold in its own memory comes from the cluster."""
    return StoreConfig(
        g2=PinnedTierConfig(96 * SLOT, pin="never", segment_prefix="kvstore-shardloss"),
        g4=RedisTierConfig(
            url=cluster.url,
            cluster=True,
            capacity_bytes=1 << 30,
            namespace=namespace,
            timeout_ms=TIMEOUT_MS,
        ),
        engine=EngineConfig(reaper_interval_s=0.05),
        server=ServerConfig(listen="127.0.0.1:0", max_prompt_tokens=4096),
    )


@asynccontextmanager
async def serving(
    config: StoreConfig, workers: tuple[ModelWorker, ...] = ()
) -> AsyncIterator[tuple[KVStoreServer, str]]:
    server = KVStoreServer(config, workers=workers)
    port = await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def assert_blocks(got: torch.Tensor, want: torch.Tensor, repaired: list[int]) -> None:
    """Repaired blocks within tolerance of the prefill, the others bit for bit."""
    assert got.shape == want.shape
    for i in range(got.shape[2] // BT):
        block, original = got[:, :, i * BT : (i + 1) * BT], want[:, :, i * BT : (i + 1) * BT]
        if i in repaired:
            torch.testing.assert_close(block, original, **TOLERANCE)
        else:
            assert torch.equal(block, original), f"block {i} changed"


async def g4_blocks(kv: AsyncClient) -> int:
    (g4,) = [t for t in (await kv.stats()).tiers if t.tier == "G4"]
    return g4.num_blocks


async def test_holes_of_a_killed_shard_are_repaired_and_the_tier_recovers_when_it_returns(
    healthy: RedisClusterServers, model: ModelWorker
) -> None:
    cluster = healthy
    prompts = [prompt(seed) for seed in (1, 2, 3)]
    wants = [model.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    fulls = [model.prefill(p) for p in prompts]
    config = node_config(cluster, "shardloss")
    async with (
        serving(config) as (prefill_node, prefill_target),
        serving(config, (model,)) as (_, decode_target),
        AsyncClient(prefill_target) as prefill,
        AsyncClient(decode_target) as decode,
    ):
        hashes: list[list[BlockHash]] = []
        for p, full in zip(prompts, fulls, strict=True):
            put = await prefill.put(model.spec, p, full, durable=True)  # in G4 when it returns
            assert put.stored == BLOCKS
            hashes.append(put.hashes)
        g4 = prefill_node.engine.tier("G4", model.spec.fingerprint)
        assert isinstance(g4, RedisTier)
        every = [h for hs in hashes for h in hs]
        port_of = dict(zip(every, owners(cluster, [g4.head_key(h) for h in every]), strict=True))
        # The chains spread over every shard, and each shard holds what the slot map says.
        pattern = f"kvstore:{g4.config.namespace}:*"
        for server in cluster.servers:
            mine = {g4.head_key(h) for h, port in port_of.items() if port == server.port}
            assert mine
            assert keys_held(server, pattern) == mine
        # The decode node has seen none of these prompts; this lookup opens its connections to
        # every shard, so that the kill finds them pooled (mid-run, not before the first use).
        assert (await decode.lookup(model.spec, prompt(99))).hit_blocks == 0
        # The decode node also finds the first prompt before the kill: it then knows those blocks
        # as G4 blocks, and a lookup after the kill must ask G4 again rather than trust that.
        assert (await decode.lookup(model.spec, prompts[0])).hit_blocks == BLOCKS
        victim = pick_victim(cluster, list(port_of.values()))
        lost = [[i for i, h in enumerate(hs) if port_of[h] == victim.port] for hs in hashes]
        ends = [max(i for i in range(BLOCKS) if i not in gone) + 1 for gone in lost]
        holes = [[i for i in gone if i < end] for gone, end in zip(lost, ends, strict=True)]
        assert all(holes), f"every prompt should have a hole on shard {victim.port}: {lost}"

        victim.kill()
        for p, gone, hole in zip(prompts, lost, holes, strict=True):
            start = time.monotonic()
            found = await decode.lookup(model.spec, p)
            assert time.monotonic() - start < TIMEOUT_MS / 1000
            assert found.tiers == [None if i in gone else "G4" for i in range(BLOCKS)]
            assert found.holes == hole
        assert (await decode.stats()).counters["g4_probe_gone"] == len(lost[0])
        # Stats answer on both nodes, and G4 counts the blocks of the shards still there.
        assert await g4_blocks(decode) == 3 * BLOCKS - sum(map(len, lost))
        assert await g4_blocks(prefill) == 3 * BLOCKS - sum(map(len, lost))

        # The worker recomputes the holes on the decode node (Repair for two prompts, Fetch with
        # repair_holes for the third); they land in its G2, and the prefix reads in full.
        for n, (p, full, want, hole, end) in enumerate(
            zip(prompts, fulls, wants, holes, ends, strict=True)
        ):
            if n < 2:
                result = await decode.repair(model.spec, p)
                assert (result.repaired, result.hit_blocks) == (hole, end)
                past, hit = await decode.get_prefix(model.spec, p)
            else:
                past, hit = await decode.get_prefix(model.spec, p, repair_holes=True)
            assert hit == end * BT
            assert_blocks(past, full[:, :, :hit], hole)
            assert model.generate(p, past, max_new_tokens=NEW_TOKENS) == want
            after = await decode.lookup(model.spec, p)
            assert after.holes == []
            assert [after.tiers[i] for i in hole] == ["G2"] * len(hole)
        stats = await decode.stats()
        assert stats.counters["repaired_blocks"] == sum(map(len, holes))

        # The shard comes back on its port, empty; neither server is restarted. A new prompt
        # stored durably on the prefill node reaches every shard, the returned one too, and the
        # decode node finds all of it in G4 and reads it back bit for bit.
        cluster.restart(victim)
        fresh = prompt(7)
        full = model.prefill(fresh)
        put = await prefill.put(model.spec, fresh, full, durable=True)
        assert put.stored == BLOCKS
        fresh_ports = owners(cluster, [g4.head_key(h) for h in put.hashes])
        assert victim.port in fresh_ports
        assert keys_held(victim, pattern) == {
            g4.head_key(h)
            for h, port in zip(put.hashes, fresh_ports, strict=True)
            if port == victim.port
        }
        found = await decode.lookup(model.spec, fresh)
        assert found.tiers == ["G4"] * BLOCKS
        past, hit = await decode.get_prefix(model.spec, fresh)
        assert hit == BLOCKS * BT
        assert torch.equal(past, full[:, :, :hit])
        assert model.generate(fresh, past, max_new_tokens=NEW_TOKENS) == model.generate(
            fresh, max_new_tokens=NEW_TOKENS
        )


# -- a master with a replica ----------------------------------------------------------------------


async def test_a_killed_master_is_missing_until_its_replica_takes_over() -> None:
    blocks = make_blocks(SMALL, 12, seed=43)
    keys = [k for k, _ in blocks]
    with start_redis_cluster(replicas=1, node_timeout_ms=500, extra_args=PARTIAL_COVERAGE) as c:
        config = RedisTierConfig(
            url=c.url, cluster=True, capacity_bytes=1 << 30, timeout_ms=TIMEOUT_MS
        )
        async with RedisTier(config) as tier:
            assert await tier.put(blocks) == len(blocks)
            port_of = owners(c, [tier.head_key(k) for k in keys])
            victim = next(s for s in c.masters() if s.port != c.ports[0] and s.port in port_of)
            wait_replicated(victim)
            victim.kill()
            # At once, before the replica is promoted: the victim's blocks are misses.
            got = await tier.get(keys)
            assert got == [
                None if port == victim.port else v
                for port, (_, v) in zip(port_of, blocks, strict=True)
            ]
            # Then the replica takes the slots over, and the tier finds it without being made
            # again: every block is back (the replica had them all).
            deadline = time.monotonic() + 20
            while got != [v for _, v in blocks]:
                assert time.monotonic() < deadline, "the tier never followed the failover"
                await asyncio.sleep(0.1)
                got = await tier.get(keys)
            more = make_blocks(SMALL, 12, seed=44)
            assert await tier.put(more) == len(more)
            assert await tier.get([k for k, _ in more]) == [v for _, v in more]
