"""The hierarchy on real tiers: G2 shared memory, G3 LMDB, G4 a real redis-server.

Every block's content is derived from its own hash (``content``), so any block that comes back
can be checked against what must have been stored under that name.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import pytest
import redis
import torch
from redis_servers import RedisServer

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, decode_block
from kvstore.core.errors import (
    InvalidArgumentError,
    OverloadedError,
    SpecMismatchError,
    TierFullError,
)
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from kvstore.engine.engine import Engine, EngineConfig
from kvstore.engine.placement import PlacementConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

SPEC = ModelSpec(
    "engine-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
)
BLOCK = HEADER_BYTES + SPEC.block_nbytes  # 640 bytes
SLOT = 1024


def content(key: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF)
    return torch.randn(SPEC.block_shape, generator=g).to(torch.float16)


def prompt_kv(tokens: list[int]) -> torch.Tensor:
    hashes = block_hashes(SPEC, tokens)
    kv = torch.zeros((2, 2, len(tokens), 2, 8), dtype=torch.float16)
    for i, h in enumerate(hashes):
        kv[:, :, i * 4 : (i + 1) * 4] = content(h)
    return kv


def config(
    tmp_path: Path,
    *,
    g2_blocks: int = 64,
    g3_blocks: int | None = 1000,
    g4: RedisServer | None = None,
    placement: PlacementConfig | None = None,
    engine: EngineConfig | None = None,
    g3_path: Path | None = None,
) -> StoreConfig:
    return StoreConfig(
        g2=PinnedTierConfig(g2_blocks * SLOT, pin="never", segment_prefix="kvstore-etest"),
        g3=None
        if g3_blocks is None
        else LmdbTierConfig(str(g3_path or tmp_path / "g3"), g3_blocks * BLOCK),
        g4=None
        if g4 is None
        else RedisTierConfig(
            url=g4.url,
            capacity_bytes=1 << 30,
            namespace=f"e{uuid.uuid4().hex[:8]}",
            timeout_ms=5000,
        ),
        placement=placement or PlacementConfig(),
        engine=engine or EngineConfig(reaper_interval_s=0.05),
    )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    e = await Engine.open(config(tmp_path))
    yield e
    await e.close()


def chains(n: int, blocks: int, seed: int, shared: int = 0) -> list[list[int]]:
    """``n`` prompts of ``blocks`` blocks; the first ``shared`` blocks are common to all."""
    rng = random.Random(seed)
    common = [rng.randrange(30_000) for _ in range(shared * 4)]
    return [
        common + [rng.randrange(30_000) for _ in range((blocks - shared) * 4)] for _ in range(n)
    ]


async def resident(engine: Engine, tier: str, hashes: list[BlockHash]) -> list[bool]:
    """Ask the tier itself, not the index."""
    return await engine.tier(tier, SPEC.fingerprint).exists(hashes)


# -- lookup and holes ---------------------------------------------------------------------------


async def test_put_then_lookup_reports_every_block(engine: Engine) -> None:
    tokens = chains(1, 6, seed=1)[0] + [1, 2]  # a trailing partial block is not stored
    result = await engine.put(SPEC, tokens, prompt_kv(tokens))
    assert result.stored == 6
    assert result.already == 0
    found = await engine.lookup(SPEC, tokens)
    assert found.tiers == ["G2"] * 6
    assert found.hit_blocks == 6
    assert found.hit_tokens == 24
    assert found.holes == []
    again = await engine.put(SPEC, tokens, prompt_kv(tokens))
    assert (again.stored, again.already) == (0, 6)


async def test_lookup_shows_holes_after_eviction_from_every_tier(engine: Engine) -> None:
    tokens = chains(1, 8, seed=2)[0]
    await engine.put(SPEC, tokens, prompt_kv(tokens))
    hashes = block_hashes(SPEC, tokens)
    await engine.drain()
    assert await engine.evict([hashes[2], hashes[5], hashes[6]]) == 3
    found = await engine.lookup(SPEC, tokens)
    assert found.tiers == ["G2", "G2", None, "G2", "G2", None, None, "G2"]
    assert found.hit_blocks == 2
    assert found.holes == [2, 5, 6]
    # The missing blocks are gone from the tiers themselves, not only from the index.
    assert await resident(engine, "G2", [hashes[2]]) == [False]
    assert await resident(engine, "G3", [hashes[2]]) == [False]
    # A prompt past the stored prefix: missing tail, no holes.
    longer = tokens + [7] * 8
    found = await engine.lookup(SPEC, longer)
    assert found.tiers[8:] == [None, None]
    assert found.holes == [2, 5, 6]


async def test_lookup_takes_no_lease_and_changes_nothing_stored(engine: Engine) -> None:
    tokens = chains(1, 3, seed=3)[0]
    await engine.put(SPEC, tokens, prompt_kv(tokens))
    before = (await engine.stats()).tiers["G2"].num_blocks
    await engine.lookup(SPEC, tokens)
    await engine.lookup(SPEC, chains(1, 3, seed=99)[0])
    stats = await engine.stats()
    assert stats.num_leases == 0
    assert stats.tiers["G2"].num_blocks == before


async def test_bad_input_is_refused_and_stores_nothing(engine: Engine) -> None:
    tokens = chains(1, 2, seed=4)[0]
    with pytest.raises(SpecMismatchError, match="K/V shape"):
        await engine.put(SPEC, tokens, torch.zeros((2, 2, 8, 2, 4), dtype=torch.float16))
    with pytest.raises(SpecMismatchError, match="dtype"):
        await engine.put(SPEC, tokens, prompt_kv(tokens).float())
    with pytest.raises(InvalidArgumentError, match="fewer than"):
        await engine.put(SPEC, tokens, prompt_kv(tokens)[:, :, :5])
    other = replace(SPEC, model_id="other")
    data = await engine.read(SPEC, [])
    assert data == []
    await engine.put(SPEC, tokens, prompt_kv(tokens))
    (h0, h1) = block_hashes(SPEC, tokens)
    (blob,) = await engine.read(SPEC, [h0])
    assert blob is not None
    with pytest.raises(SpecMismatchError, match="not of namespace"):
        await engine.put_encoded(other, [(h0, None, blob)])
    with pytest.raises(InvalidArgumentError, match="says it is"):
        await engine.put_encoded(SPEC, [(h1, h0, blob)])
    stats = await engine.stats()
    assert stats.num_blocks == 2


# -- capacity, eviction, leaf-first ------------------------------------------------------------


async def test_eviction_under_pressure_never_punches_holes(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=40, g3_blocks=150))
    try:
        prompts = chains(12, 10, seed=5, shared=3) + chains(12, 8, seed=6, shared=2)
        for tokens in prompts:
            await e.put(SPEC, tokens, prompt_kv(tokens))
            await e.drain()
            for tier, cap in (("G2", 40 * SLOT), ("G3", 150 * BLOCK)):
                stats = (await e.stats()).tiers[tier]
                assert stats.used_bytes <= cap
        assert (await e.stats()).counters.get("evictions", 0) > 0
        for tier in ("G2", "G3"):
            for tokens in prompts:
                hashes = block_hashes(SPEC, tokens)
                there = await resident(e, tier, hashes)
                # Within one tier, every chain is a prefix: present, then absent, never again.
                first_gap = there.index(False) if False in there else len(there)
                assert not any(there[first_gap:]), f"{tier} has a hole: {there}"
        # G2 used its room: filled to around the watermarks, not emptied.
        assert (await e.stats()).tiers["G2"].num_blocks >= 30
    finally:
        await e.close()


async def test_evicted_blocks_are_demoted_and_still_readable(tmp_path: Path) -> None:
    e = await Engine.open(
        config(
            tmp_path, g2_blocks=8, placement=PlacementConfig(g3_write="back", promote_on_hit=False)
        )
    )
    try:
        prompts = chains(4, 4, seed=7)
        for tokens in prompts:
            await e.put(SPEC, tokens, prompt_kv(tokens))
        await e.drain()
        first = block_hashes(SPEC, prompts[0])
        # Write-back: the first prompt reached G3 only by being evicted from G2.
        assert await resident(e, "G2", first) == [False] * 4
        assert await resident(e, "G3", first) == [True] * 4
        for h, t in zip(first, await e.get(SPEC, first), strict=True):
            assert t is not None
            assert torch.equal(t, content(h))
        assert (await e.stats()).counters["demotions"] >= 4
    finally:
        await e.close()


async def test_put_fails_clearly_when_everything_is_leased(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=4, g3_blocks=None))
    try:
        tokens = chains(1, 4, seed=8)[0]
        await e.put(SPEC, tokens, prompt_kv(tokens))
        e.reserve(block_hashes(SPEC, tokens), ttl_s=60)
        more = chains(1, 2, seed=9)[0]
        with pytest.raises(TierFullError, match="leased, pinned or being written"):
            await e.put(SPEC, more, prompt_kv(more))
        assert (await e.lookup(SPEC, more)).present_blocks == 0
    finally:
        await e.close()


async def test_leased_block_survives_pressure_then_goes_after_expiry(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=10, g3_blocks=None))
    try:
        keep = chains(1, 1, seed=10)[0]
        await e.put(SPEC, keep, prompt_kv(keep))
        (kept,) = block_hashes(SPEC, keep)
        lease = e.reserve([kept], ttl_s=0.3)
        assert lease.keys == (kept,)
        for tokens in chains(20, 2, seed=11):
            await e.put(SPEC, tokens, prompt_kv(tokens))
        assert await resident(e, "G2", [kept]) == [True]
        (back,) = await e.get(SPEC, [kept])
        assert back is not None
        assert torch.equal(back, content(kept))
        await asyncio.sleep(0.5)  # the reaper reclaims the lease; nobody calls release
        assert (await e.stats()).num_leases == 0
        for tokens in chains(20, 2, seed=12):
            await e.put(SPEC, tokens, prompt_kv(tokens))
        assert await resident(e, "G2", [kept]) == [False]
    finally:
        await e.close()


async def test_release_and_pins(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=10, g3_blocks=None))
    try:
        a = chains(1, 2, seed=13)[0]
        await e.put(SPEC, a, prompt_kv(a))
        ha = block_hashes(SPEC, a)
        lease = e.reserve(ha)
        assert e.release(lease.lease_id)
        assert not e.release(lease.lease_id)
        assert e.pin(ha) == 2
        for tokens in chains(20, 2, seed=14):
            await e.put(SPEC, tokens, prompt_kv(tokens))
        assert await resident(e, "G2", ha) == [True, True]
        assert await e.evict(ha) == 0  # pinned: not even an operator's evict moves it
        assert e.unpin(ha) == 2
        assert await e.evict(ha) == 2
        assert (await e.lookup(SPEC, a)).present_blocks == 0
        with pytest.raises(InvalidArgumentError, match="lease ttl"):
            e.reserve(ha, ttl_s=10_000)
    finally:
        await e.close()


# -- movement across G2, G3, G4 ----------------------------------------------------------------


async def test_blocks_move_down_and_up_bit_exact(tmp_path: Path, redis_server: RedisServer) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=16, g4=redis_server))
    try:
        tokens = chains(1, 4, seed=15)[0]
        hashes = block_hashes(SPEC, tokens)
        await e.put(SPEC, tokens, prompt_kv(tokens), durable=True)
        # Write-through: G3 and G4 hold every block, byte for byte.
        for tier in ("G2", "G3", "G4"):
            values = await e.tier(tier, SPEC.fingerprint).get(hashes)
            for h, v in zip(hashes, values, strict=True):
                assert v is not None
                assert torch.equal(decode_block(SPEC, h, v), content(h))
        # Evict from G2 and G3: the blocks are in G4 only; a read brings them back up.
        assert await e.evict(hashes, "G2") == 4
        assert await e.evict(hashes, "G3") == 4
        assert (await e.lookup(SPEC, tokens)).tiers == ["G4"] * 4
        got = await e.get(SPEC, hashes)
        assert all(
            t is not None and torch.equal(t, content(h)) for h, t in zip(hashes, got, strict=True)
        )
        g4 = e.tier("G4", SPEC.fingerprint)
        reads = (await g4.stats()).num_gets
        await e.drain()
        # The promotions copied the bytes the read had verified: no second read of G4.
        assert (await g4.stats()).num_gets == reads
        assert (await e.lookup(SPEC, tokens)).tiers == ["G2"] * 4
        assert await resident(e, "G2", hashes) == [True] * 4
        assert (await e.stats()).counters["promotions"] == 4
        values = await e.tier("G2", SPEC.fingerprint).get(hashes)
        assert all(
            v is not None and torch.equal(decode_block(SPEC, h, v), content(h))
            for h, v in zip(hashes, values, strict=True)
        )
    finally:
        await e.close()


async def test_g4_probe_finds_blocks_another_node_wrote(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg_a = config(tmp_path / "a", g4=redis_server)
    assert cfg_a.g4 is not None
    cfg_b = replace(config(tmp_path / "b", g4=redis_server), g4=cfg_a.g4)
    a = await Engine.open(cfg_a)
    b = await Engine.open(cfg_b)
    try:
        tokens = chains(1, 5, seed=16)[0]
        await a.put(SPEC, tokens, prompt_kv(tokens), durable=True)
        found = await b.lookup(SPEC, tokens)
        assert found.tiers == ["G4"] * 5
        assert (await b.stats()).counters["g4_probe_hits"] == 5
        hashes = block_hashes(SPEC, tokens)
        got = await b.get(SPEC, hashes)
        assert all(
            t is not None and torch.equal(t, content(h)) for h, t in zip(hashes, got, strict=True)
        )
    finally:
        await a.close()
        await b.close()


# -- restart -------------------------------------------------------------------------------------


async def test_restart_finds_g3_blocks_again(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    e = await Engine.open(cfg)
    prompts = chains(5, 6, seed=17, shared=2)
    for tokens in prompts:
        await e.put(SPEC, tokens, prompt_kv(tokens))
    await e.drain()
    await e.close()
    seen: list[tuple[int, int]] = []
    e = await Engine.open(cfg, progress=lambda done, total: seen.append((done, total)))
    try:
        assert seen[-1] == (22, 22)  # 2 shared + 5 x 4 own blocks
        for tokens in prompts:
            found = await e.lookup(SPEC, tokens)
            assert found.tiers == ["G3"] * 6
        hashes = block_hashes(SPEC, prompts[0])
        got = await e.get(SPEC, hashes)
        assert all(
            t is not None and torch.equal(t, content(h)) for h, t in zip(hashes, got, strict=True)
        )
        # The chains came back too: eviction from G3 is still leaf-first.
        entry = e.index.get(hashes[3])
        assert entry is not None
        assert entry.parent == hashes[2]
    finally:
        await e.close()


# -- corruption ----------------------------------------------------------------------------------


async def test_corrupt_block_in_g3_is_reported_missing_and_removed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    e = await Engine.open(cfg)
    tokens = chains(1, 4, seed=18)[0]
    hashes = block_hashes(SPEC, tokens)
    await e.put(SPEC, tokens, prompt_kv(tokens))
    await e.drain()
    await e.close()
    assert cfg.g3 is not None
    env = lmdb.open(cfg.g3.path, max_dbs=4, map_size=cfg.g3.map_size)
    with env.begin(db=env.open_db(b"blocks"), write=True) as txn:
        value = bytearray(txn.get(hashes[1]))
        value[HEADER_BYTES + 10] ^= 0x40
        txn.put(hashes[1], value)
    env.close()
    e = await Engine.open(cfg)
    try:
        got = await e.get(SPEC, hashes)
        assert got[1] is None
        assert all(
            t is not None and torch.equal(t, content(h))
            for i, (h, t) in enumerate(zip(hashes, got, strict=True))
            if i != 1
        )
        found = await e.lookup(SPEC, tokens)
        assert found.tiers == ["G2", None, "G2", "G2"] or found.tiers[1] is None
        assert found.holes == [1]
        assert await resident(e, "G3", [hashes[1]]) == [False]
        stats = await e.stats()
        assert stats.counters["corrupt"] == 1
        events = e.events.since(0)
        assert events is not None
        assert [(ev.kind, ev.key, ev.tier) for ev in events if ev.kind == "corrupt"] == [
            ("corrupt", hashes[1], "G3")
        ]
    finally:
        await e.close()


async def test_corrupt_block_in_g4_is_reported_missing_and_removed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    e = await Engine.open(config(tmp_path, g3_blocks=None, g4=redis_server))
    try:
        tokens = chains(1, 3, seed=19)[0]
        hashes = block_hashes(SPEC, tokens)
        await e.put(SPEC, tokens, prompt_kv(tokens), durable=True)
        await e.evict(hashes, "G2")
        g4 = e.tier("G4", SPEC.fingerprint)
        raw = redis.Redis.from_url(redis_server.url)
        key = g4.head_key(hashes[0])  # type: ignore[attr-defined]
        value = bytearray(raw.get(key) or b"")
        value[-1] ^= 0xFF
        raw.set(key, bytes(value))
        raw.close()
        got = await e.get(SPEC, hashes)
        assert got[0] is None
        assert got[1] is not None
        assert torch.equal(got[1], content(hashes[1]))
        assert (await g4.exists([hashes[0]])) == [False]
        found = await e.lookup(SPEC, tokens)
        assert found.tiers[0] is None
        assert found.holes == [0]
        assert (await e.stats()).counters["corrupt"] == 1
    finally:
        await e.close()


# -- backpressure, durability, concurrency --------------------------------------------------------


async def test_a_burst_of_puts_meets_backpressure_not_unbounded_memory(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    e = await Engine.open(
        config(
            tmp_path,
            g2_blocks=2000,
            g4=redis_server,
            engine=EngineConfig(move_queue_blocks=8, num_movers=1, admit_timeout_ms=0),
        )
    )
    try:
        redis_server.pause()  # G4 stops answering: write-through copies pile up
        outcomes: list[str] = []
        for tokens in chains(10, 2, seed=20):
            try:
                await e.put(SPEC, tokens, prompt_kv(tokens))
                outcomes.append("ok")
            except OverloadedError as exc:
                outcomes.append(str(exc))
            assert e.queue_depth <= 8  # stats() would wait on the paused G4
        refused = [o for o in outcomes if o != "ok"]
        assert refused
        assert all("background copies are pending" in o for o in refused)
    finally:
        redis_server.resume()
        await e.close()


async def test_durable_put_is_on_g3_when_it_returns(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    e = await Engine.open(cfg)
    try:
        tokens = chains(1, 3, seed=21)[0]
        await e.put(SPEC, tokens, prompt_kv(tokens), durable=True)
        assert await resident(e, "G3", block_hashes(SPEC, tokens)) == [True] * 3
    finally:
        await e.close()


async def test_many_concurrent_clients_get_only_the_right_bytes(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g2_blocks=48, g3_blocks=400))
    prompts = chains(30, 6, seed=22, shared=2)
    checked = 0

    async def client(n: int) -> None:
        nonlocal checked
        rng = random.Random(n)
        for _ in range(15):
            tokens = rng.choice(prompts)[: rng.randrange(1, 7) * 4]
            action = rng.random()
            if action < 0.4:
                await e.put(SPEC, tokens, prompt_kv(tokens))
            elif action < 0.7:
                found = await e.lookup(SPEC, tokens)
                lease = e.reserve(found.hashes[: found.hit_blocks])
                got = await e.get(SPEC, found.hashes[: found.hit_blocks])
                e.release(lease.lease_id)
                for h, t in zip(found.hashes, got, strict=False):
                    if t is not None:
                        assert torch.equal(t, content(h))
                        checked += 1
            else:
                hashes = block_hashes(SPEC, tokens)
                for h, t in zip(hashes, await e.get(SPEC, hashes), strict=True):
                    if t is not None:
                        assert torch.equal(t, content(h))
                        checked += 1

    try:
        await asyncio.gather(*(client(n) for n in range(12)))
        await e.drain()
        assert checked > 50
        stats = await e.stats()
        assert stats.tiers["G2"].used_bytes <= 48 * SLOT
        assert stats.counters.get("corrupt", 0) == 0
    finally:
        await e.close()


async def test_events_have_sequence_numbers_and_resume(engine: Engine) -> None:
    tokens = chains(1, 2, seed=23)[0]
    await engine.put(SPEC, tokens, prompt_kv(tokens))
    await engine.drain()
    events = engine.events.since(0)
    assert events is not None
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [(e.kind, e.tier) for e in events]
    assert kinds.count(("stored", "G2")) == 2
    assert kinds.count(("moved", "G3")) == 2
    last = engine.events.last_seq
    assert engine.events.since(last) == []
    waiter = asyncio.create_task(engine.events.wait(last, timeout_s=5))
    await asyncio.sleep(0)
    await engine.evict(block_hashes(SPEC, tokens)[1:])
    await asyncio.wait_for(waiter, 1)
    newer = engine.events.since(last)
    assert newer is not None
    assert {e.kind for e in newer} == {"removed"}


def test_event_log_reports_a_watcher_that_fell_behind() -> None:
    from kvstore.engine.events import EventLog

    async def go() -> Any:
        log = EventLog(capacity=4)
        for i in range(10):
            log.append("stored", BlockHash(bytes([i]) * 16), "G2", b"")
        return log.since(2), log.since(6)

    behind, recent = asyncio.run(go())
    assert behind is None
    assert recent is not None
    assert [e.seq for e in recent] == [7, 8, 9, 10]


async def test_engine_config_errors() -> None:
    from kvstore.core.errors import ConfigError

    with pytest.raises(ConfigError, match="watermarks"):
        PlacementConfig(high_watermark=0.5, low_watermark=0.8)
    with pytest.raises(ConfigError, match="lease ttls"):
        EngineConfig(default_lease_ttl_s=0)


async def test_reaper_runs_without_calls(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path, g3_blocks=None))
    try:
        tokens = chains(1, 1, seed=24)[0]
        await e.put(SPEC, tokens, prompt_kv(tokens))
        e.reserve(block_hashes(SPEC, tokens), ttl_s=0.1)
        e.pin(block_hashes(SPEC, tokens), ttl_s=0.1)
        await asyncio.sleep(0.4)  # several reaper rounds (every 0.05 s here)
        stats = await e.stats()
        assert stats.num_leases == 0
        assert stats.counters["expired_leases"] == 1
        assert stats.counters["expired_pins"] == 1
    finally:
        await e.close()


async def test_flush_stage_and_slots(tmp_path: Path) -> None:
    e = await Engine.open(config(tmp_path))
    try:
        tokens = chains(1, 3, seed=25)[0]
        hashes = block_hashes(SPEC, tokens)
        await e.put(SPEC, tokens, prompt_kv(tokens), durable=True, owner="team-a")
        assert e.usage_of("team-a") == 3 * BLOCK
        assert e.usage_of("team-b") == 0
        assert await e.flush("G2") == 3
        assert (await e.lookup(SPEC, tokens)).tiers == ["G3"] * 3
        assert await e.stage(SPEC, hashes) == [True, True, True]
        assert (await e.lookup(SPEC, tokens)).tiers == ["G2"] * 3
        for h, got in zip(hashes, await e.get(SPEC, hashes), strict=True):
            assert got is not None
            assert torch.equal(got, content(h))
        assert await e.flush() == 3
        assert (await e.lookup(SPEC, tokens)).present_blocks == 0
        assert e.usage_of("team-a") == 0
    finally:
        await e.close()


async def wait_until(predicate: Any, what: str, timeout_s: float = 30.0) -> None:
    """Wait for a state of the engine (a copy in flight, a tombstone), not for a time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def nothing_left(e: Engine, hashes: list[BlockHash]) -> None:
    """Every background move done, and no tier holds any of ``hashes`` (asked of the tiers)."""
    await e.drain()
    assert e.moves_in_flight == 0
    assert e.tombstones == 0
    for tier in e.tier_names:
        assert await resident(e, tier, hashes) == [False] * len(hashes), tier
    assert all(e.index.get(h) is None for h in hashes)


G3_BIT = 1 << 2  # BlockEntry.writing bit of G3


async def test_flush_right_after_puts_leaves_nothing_in_any_tier(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Flush races the write-through copies (G2 -> G3, G2 -> G4) of the puts before it, at
    # whatever point each copy is: the flushed blocks must never come back.
    e = await Engine.open(config(tmp_path, g2_blocks=256, g4=redis_server))
    try:
        for round_ in range(50):
            prompts = chains(3, 4, seed=1000 + round_, shared=1)
            for tokens in prompts:
                await e.put(SPEC, tokens, prompt_kv(tokens))
            await e.flush()
            await nothing_left(e, [h for t in prompts for h in block_hashes(SPEC, t)])
    finally:
        await e.close()


async def test_a_flush_discards_a_copy_held_mid_write_to_g3(tmp_path: Path) -> None:
    cfg = config(tmp_path, engine=EngineConfig(num_movers=1, reaper_interval_s=0.05))
    assert cfg.g3 is not None
    e = await Engine.open(cfg)
    # Another process holds LMDB's write lock: G3's writer, and so the copy, waits for it.
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import lmdb, sys\n"
        f"env = lmdb.open({cfg.g3.path!r}, max_dbs=4, map_size={cfg.g3.map_size})\n"
        "txn = env.begin(write=True)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
        "txn.abort()\n",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert await holder.stdout.readline() == b"held\n"
        tokens = chains(1, 2, seed=28)[0]
        hashes = block_hashes(SPEC, tokens)
        await e.put(SPEC, tokens, prompt_kv(tokens))
        await wait_until(
            lambda: any((entry := e.index.get(h)) and entry.writing & G3_BIT for h in hashes),
            "a copy to G3 to be writing",
        )
        flush = asyncio.create_task(e.flush())
        await wait_until(lambda: e.tombstones >= 1, "the flush to mark the copied block")
        holder.stdin.write(b"go\n")
        await holder.stdin.drain()
        assert await flush == 2
        await nothing_left(e, hashes)
        assert (await e.stats()).counters["copies_discarded"] >= 1
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        await e.close()


async def test_a_block_evicted_everywhere_mid_copy_does_not_come_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    e = await Engine.open(config(tmp_path, g3_blocks=None, g4=redis_server))
    try:
        tokens = chains(1, 2, seed=26)[0]
        hashes = block_hashes(SPEC, tokens)
        redis_server.pause()  # the write-through copies to G4 hang in flight
        try:
            await e.put(SPEC, tokens, prompt_kv(tokens))
            await wait_until(lambda: e.moves_in_flight == 2, "both copies to G4 in flight")
            evict = asyncio.create_task(e.evict(hashes))
            await wait_until(lambda: e.tombstones == 2, "the evict to mark both removed")
            assert not evict.done()  # it waits for the copies to end
        finally:
            redis_server.resume()
        assert await evict == 2
        assert e.moves_in_flight == 0  # nothing left running when evict returned
        await nothing_left(e, hashes)
    finally:
        await e.close()


async def test_a_flush_discards_a_promotion_held_mid_read(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    e = await Engine.open(config(tmp_path, g3_blocks=None, g4=redis_server))
    try:
        tokens = chains(1, 1, seed=29)[0]
        hashes = block_hashes(SPEC, tokens)
        await e.put(SPEC, tokens, prompt_kv(tokens), durable=True)
        assert await e.evict(hashes, "G2") == 1  # now only in G4
        redis_server.pause()  # the copy back up to G2 hangs reading G4
        try:
            stage = asyncio.create_task(e.stage(SPEC, hashes))
            await wait_until(lambda: e.moves_in_flight == 1, "the copy G4 -> G2 to start")
            flush = asyncio.create_task(e.flush())
            await wait_until(lambda: e.tombstones == 1, "the flush to mark the block removed")
        finally:
            redis_server.resume()
        assert await stage == [False]
        assert await flush == 1
        await nothing_left(e, hashes)
    finally:
        await e.close()


async def test_compressed_g4_blocks_are_promoted_raw(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from kvstore.core.block_format import Codec, read_header

    cfg = config(tmp_path, g3_blocks=None, g4=redis_server)
    assert cfg.g4 is not None
    e = await Engine.open(replace(cfg, g4=replace(cfg.g4, codec=Codec.ZSTD_PLANES)))
    try:
        tokens = chains(1, 2, seed=27)[0]
        hashes = block_hashes(SPEC, tokens)
        await e.put(SPEC, tokens, prompt_kv(tokens), durable=True)
        (stored,) = await e.tier("G4", SPEC.fingerprint).get(hashes[:1])
        assert stored is not None
        assert read_header(stored).codec is Codec.ZSTD_PLANES
        await e.evict(hashes, "G2")
        got = await e.get(SPEC, hashes)
        assert all(t is not None and torch.equal(t, content(h))
                   for h, t in zip(hashes, got, strict=True))
        await e.drain()
        values = await e.tier("G2", SPEC.fingerprint).get(hashes)
        for value in values:
            assert value is not None
            assert read_header(value).codec is Codec.RAW
    finally:
        await e.close()
