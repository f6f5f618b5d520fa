"""The engine: carries out what placement decides, over the tiers, keeping the index true.

Operations, in the order a client uses them:

1. ``Engine.open(config)`` — open the tiers; rebuild the index from G3's block headers (G1 and G2
   start empty; G4 is found by lookups).
2. ``put(spec, tokens, kv)`` / ``put_blocks`` / ``put_encoded`` — admit full blocks into the top
   tier (evicting down to the low watermark first if needed), then copy them in the background
   to the write-through tiers.
3. ``lookup(spec, tokens)`` — per-block residency, leading hit, holes; blocks unknown here are
   probed in G4 in one batch. Takes no lease.
4. ``reserve(keys, ttl_s)`` -> ``Lease``; ``read`` the blocks (verified encoded bytes), ``get``
   them (new tensors) or ``get_into(spec, keys, out)`` (tensors the caller reuses: the fast
   path, one copy from G2); ``release(lease_id)``.
5. ``pin`` / ``unpin``, ``evict``, ``stats``, ``events`` (the log watchers follow), ``close``.

Three objects share the work (as vLLM's offload code splits it): the ``BlockIndex`` keeps the books,
``Placement`` decides, and this class moves bytes. Background moves (write-through copies,
promotions) go through one bounded queue worked by a few tasks: a burst of puts waits for room
(backpressure) and fails with ``OverloadedError`` after ``admit_timeout_ms`` instead of growing
memory. Moves carry keys, not bytes, so a full queue costs kilobytes.

Every move verifies the block (``verify_block``) before writing it elsewhere; a block that fails
is deleted where it was found, counted, logged as a ``corrupt`` event and treated as missing.

Concurrency: everything runs on one event loop, so the index needs no lock. Making room in a
tier is serialised per tier (an ``asyncio.Lock``) so two admissions cannot pick the same victims;
locks are only ever taken top-down (G1 before G2 before G3), so demotion chains cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from kvstore.core.block_format import HEADER_BYTES, NO_PARENT, read_header
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError, KVStoreError, TierError
from kvstore.core.keys import BlockHash, ExtraKey, ModelSpec
from kvstore.engine.config import EngineConfig, StoreLayout
from kvstore.engine.index import Lease
from kvstore.engine.reads import ReadPath
from kvstore.engine.state import EngineStats, LookupResult, ProgressCallback, PutResult, log
from tiers.base import Tier, TierStats
from tiers.gpu_memory import GpuMemoryTier
from tiers.lmdb_store import LmdbTier
from tiers.pinned_memory import PinnedMemoryTier
from tiers.redis_store import RedisTier, RedisTierStats

__all__ = ["Engine", "EngineConfig", "EngineStats", "LookupResult", "ProgressCallback", "PutResult"]


# Blocks of one lookup looked up in the index between two yields to the event loop (~3 ms).
_LOOKUP_SLICE = 16384
# How long the touch of a Lookup may wait, to be done once for the same prompt looked up again
# meanwhile. Recency at this granularity orders eviction just as well; a Lookup holds nothing.
_TOUCH_DELAY_S = 0.005


class Engine(ReadPath):
    """The engine (see the module docstring); its parts are split by path: ``EngineState``
    (state.py), ``WritePath`` (writes.py), ``ReadPath`` (reads.py)."""

    # -- life cycle ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, config: StoreLayout, *, progress: ProgressCallback | None = None) -> Engine:
        tiers: dict[str, Tier] = {}
        try:
            if config.g1 is not None:
                tiers["G1"] = GpuMemoryTier(config.g1)
            tiers["G2"] = PinnedMemoryTier(config.g2)
            if config.g3 is not None:
                tiers["G3"] = LmdbTier(config.g3)
        except BaseException:
            for tier in tiers.values():
                await tier.close()
            raise
        g4_factory = None
        if config.g4 is not None:
            g4_config = config.g4

            def g4_factory(namespace: bytes) -> Tier:
                import dataclasses

                # One key space per model namespace: "<prefix>:<namespace>-<fingerprint>:{hash}".
                ns = f"{g4_config.namespace}-{namespace.hex()[:16]}"
                return RedisTier(dataclasses.replace(g4_config, namespace=ns))

        engine = cls(config, tiers, g4_factory=g4_factory)
        await engine.rebuild(progress)
        engine.start()
        return engine

    def start(self) -> None:
        """Start the background movers and the lease reaper."""
        if self._tasks:
            return
        for i in range(self.engine_config.num_movers):
            self._tasks.append(asyncio.create_task(self._mover(), name=f"kvstore-mover-{i}"))
        self._tasks.append(asyncio.create_task(self._reaper(), name="kvstore-reaper"))

    async def rebuild(self, progress: ProgressCallback | None = None) -> int:
        """Fill the index from G3's stored block headers; returns how many blocks were found."""
        g3 = self._tiers.get("G3")
        if not isinstance(g3, LmdbTier):
            return 0
        total = (await g3.stats()).num_blocks
        found = 0
        async for key, header_bytes, nbytes in g3.iter_headers():
            try:
                header = read_header(header_bytes, total_nbytes=nbytes)
            except CorruptBlockError as exc:
                # Reading it would fail verification anyway: drop it now.
                await g3.delete([key])
                self._on_corrupt("G3", key, str(exc))
                continue
            parent = None if header.parent_hash == NO_PARENT else BlockHash(header.parent_hash)
            self.index.add_resident(
                key, "G3", namespace=header.fingerprint, parent=parent, nbytes=nbytes
            )
            found += 1
            if progress is not None and found % 1024 == 0:
                progress(found, total)
        if progress is not None:
            progress(found, total)
        return found

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for tier in [*self._tiers.values(), *self._g4.values()]:
            await tier.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def queue_depth(self) -> int:
        """Background moves waiting in the queue."""
        return self._queue.qsize()

    async def drain(self) -> None:
        """Wait until every queued background move has finished (tests, orderly shutdown)."""
        await self._queue.join()

    # -- lookup --------------------------------------------------------------------------------

    # Lookups whose touch is due (``_touch_soon``), by the last hash of their prompt, oldest first.
    _pending_touches: dict[BlockHash, LookupResult] | None = None

    async def lookup(
        self,
        spec: ModelSpec,
        tokens: Sequence[int] | Any,
        *,
        salt: bytes = b"",
        extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    ) -> LookupResult:
        """Residency of every full block of ``tokens``. Takes no lease; touches what it finds."""
        return await self.lookup_hashes(
            spec, self.hashes(spec, tokens, salt=salt, extra_keys=extra_keys)
        )

    async def lookup_hashes(
        self, spec: ModelSpec, hashes: Sequence[BlockHash], *, touch_later: bool = False
    ) -> LookupResult:
        """``lookup`` of hashes already computed. ``touch_later``: the blocks found are touched
        within ``_TOUCH_DELAY_S`` after this returns instead of before, and once for repeated
        lookups of one prompt meanwhile (the service's Lookup, whose reply need not wait for
        the recency update, and which engines repeat)."""
        self.counters.add("lookups")
        hottest_many = self.index.hottest_many
        if len(hashes) <= _LOOKUP_SLICE:
            tiers = hottest_many(hashes)
        else:
            tiers = []
            for start in range(0, len(hashes), _LOOKUP_SLICE):
                if start:
                    # A huge prompt's index work in slices: other requests run in between.
                    await asyncio.sleep(0)
                tiers += hottest_many(hashes[start : start + _LOOKUP_SLICE])
        # Blocks this node knows only in G4 are asked again, in the same round trip as the
        # unknown ones: G4 is shared, and a lost Redis Cluster shard, the TTL or another node's
        # eviction may have removed them since this node found them.
        probe: list[int] = []
        if self.engine_config.g4_probe and "G4" in self.placement.order:
            probe = [i for i, t in enumerate(tiers) if t is None or t == "G4"]
        if probe:
            g4 = self.tier("G4", spec.fingerprint)
            answered = True
            try:
                found = await g4.exists([hashes[i] for i in probe])
            except TierError as exc:
                self.counters.add("g4_probe_errors")
                log.warning("G4 probe failed, reporting those blocks missing: %s", exc)
                found = [False] * len(probe)
                answered = False
            nbytes = HEADER_BYTES + spec.block_nbytes
            for i, there in zip(probe, found, strict=True):
                if there and tiers[i] is None:
                    parent = hashes[i - 1] if i > 0 else None
                    self.index.add_resident(
                        hashes[i], "G4", namespace=spec.fingerprint, parent=parent, nbytes=nbytes
                    )
                    tiers[i] = "G4"
                    self.counters.add("g4_probe_hits")
                elif not there and tiers[i] == "G4":
                    tiers[i] = None
                    # A probe that failed as a whole forgets nothing: G4 may come back with them.
                    if answered:
                        self.index.remove(hashes[i], "G4")
                        self.counters.add("g4_probe_gone")
        result = LookupResult(list(hashes), tiers, spec.block_tokens)
        if touch_later and 0 < len(hashes) <= _LOOKUP_SLICE:
            self._touch_soon(result)
        else:
            for start in range(0, len(hashes), _LOOKUP_SLICE):
                if start:
                    await asyncio.sleep(0)
                self._touch_found(result, start, start + _LOOKUP_SLICE)
        return result

    def _touch_soon(self, found: LookupResult) -> None:
        """Touch what ``found`` found within ``_TOUCH_DELAY_S``, once however often the prompt
        is looked up meanwhile: an engine polls the lookups of its waiting requests every
        scheduler step, and the touch of 512 blocks costs as much as their lookup."""
        pending = self._pending_touches
        if pending is None:
            # What waits is bounded by what can be hashed meanwhile: ~10K blocks per core.
            pending = self._pending_touches = {}
            asyncio.get_running_loop().call_later(_TOUCH_DELAY_S, self._apply_touches)
        # The last hash names the whole prefix (the hashes chain); the newest lookup of it wins,
        # and moves to the end, so the touches land in the order of the lookups.
        key = found.hashes[-1]
        pending.pop(key, None)
        pending[key] = found

    def _apply_touches(self) -> None:
        pending, self._pending_touches = self._pending_touches, None
        for found in (pending or {}).values():
            self._touch_found(found)

    def _touch_found(self, found: LookupResult, start: int = 0, end: int | None = None) -> None:
        hashes, tiers = found.hashes, found.tiers
        if start or end is not None:
            hashes, tiers = hashes[start:end], tiers[start:end]
        # Most lookups find every block: then there is nothing to filter.
        if None in tiers:
            hashes = [h for h, t in zip(hashes, tiers, strict=True) if t]
        self.index.touch(hashes)

    # -- leases, pins, eviction by request -----------------------------------------------------

    def reserve(self, keys: Sequence[bytes], ttl_s: float | None = None) -> Lease:
        """Hold blocks against eviction and demotion until released or ``ttl_s`` passes.

        Only blocks this node knows are held (``lease.keys``); lookup first."""
        ttl = self.engine_config.default_lease_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= self.engine_config.max_lease_ttl_s:
            raise InvalidArgumentError(
                f"lease ttl must be in (0, {self.engine_config.max_lease_ttl_s}] s, got {ttl}"
            )
        lease = self.index.add_lease([BlockHash(bytes(k)) for k in keys], ttl, time.monotonic())
        self.counters.add("leases")
        return lease

    def release(self, lease_id: int) -> bool:
        return self.index.release_lease(lease_id)

    def pin(self, keys: Sequence[bytes], ttl_s: float | None = None) -> int:
        if ttl_s is not None and not ttl_s > 0:
            raise InvalidArgumentError(f"pin ttl must be positive, got {ttl_s}")
        return self.index.pin([BlockHash(bytes(k)) for k in keys], ttl_s, time.monotonic())

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self.index.unpin([BlockHash(bytes(k)) for k in keys])

    async def evict(self, keys: Sequence[bytes], tier: str | None = None) -> int:
        """Remove blocks from one tier (demoting as placement says) or, with ``tier=None``,
        from every tier. Leased and pinned blocks are skipped. Returns blocks removed.

        Removal from every tier is final: copies of those blocks that are running (a write-
        through copy, a promotion) land nothing, and this returns once they have ended, so no
        tier holds any of the blocks afterwards (unless they are put again meanwhile)."""
        if tier is not None and tier not in self.placement.order:
            raise InvalidArgumentError(f"tier {tier!r} is not configured ({self.tier_names})")
        removed = 0
        settling: list[asyncio.Event] = []
        for raw in keys:
            key = BlockHash(bytes(raw))
            entry = self.index.get(key)
            if entry is None or self.index.is_protected(key):
                continue
            if tier is not None:
                if self.index.in_tier(key, tier):
                    async with self._room_locks[tier]:
                        removed += await self._evict_one(key, tier, "request")
                continue
            held = entry.tiers()
            if key in self._copying:
                self._removals[key] = self._removals.get(key, 0) + 1
                settling.append(self._settled[key])
            for name in held:
                await self.tier(name, entry.namespace).delete([key])
                self.index.remove(key, name)
                self.events.append(
                    "removed", key, name, entry.namespace, entry.parent, reason="request"
                )
            removed += bool(held)
        for settled in settling:
            await settled.wait()
        self.counters.add("evicted_by_request", removed)
        return removed

    async def flush(self, tier: str | None = None) -> int:
        """Remove every block that is not leased or pinned from one tier (demoting as placement
        says) or from every tier. Returns blocks removed."""
        if tier is None:
            return await self.evict([e.key for e in self.index.entries()])
        if tier not in self.placement.order:
            raise InvalidArgumentError(f"tier {tier!r} is not configured ({self.tier_names})")
        return await self.evict(list(self.index.keys_in(tier)), tier)

    # -- inspection ----------------------------------------------------------------------------

    async def stats(self) -> EngineStats:
        tiers: dict[str, TierStats] = {}
        counters = dict(self.counters.values)
        for name in self.placement.order:
            if name == "G4":
                for tier in self._g4.values():
                    with contextlib.suppress(KVStoreError):
                        g4 = await tier.stats()
                        tiers[f"G4/{tier.config.namespace}"] = g4  # type: ignore[attr-defined]
                        if isinstance(g4, RedisTierStats):
                            # Blocks reported missing because their Redis Cluster shard was lost.
                            counters["g4_unreachable"] = (
                                counters.get("g4_unreachable", 0) + g4.num_unreachable
                            )
            else:
                tiers[name] = await self._tiers[name].stats()
        return EngineStats(
            tiers=tiers,
            index_bytes={n: self.index.bytes_in(n) for n in self.placement.order},
            index_blocks={n: self.index.num_in(n) for n in self.placement.order},
            num_blocks=len(self.index),
            num_leases=self.index.num_leases,
            queue_depth=self._queue.qsize(),
            counters=counters,
        )


