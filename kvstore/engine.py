"""The engine: carries out what placement decides, over the tiers, keeping the index true.

Operations, in the order a client uses them:

1. ``Engine.open(config)`` — open the tiers; rebuild the index from G3's block headers (G1 and G2
   start empty; G4 is found by lookups).
2. ``put(spec, tokens, kv)`` / ``put_blocks`` / ``put_encoded`` — admit full blocks into the top
   tier (evicting down to the low watermark first if needed), then copy them in the background
   to the write-through tiers.
3. ``lookup(spec, tokens)`` — per-block residency, leading hit, holes; blocks unknown here are
   probed in G4 in one batch. Takes no lease.
4. ``reserve(keys, ttl_s)`` -> ``Lease``; ``read`` / ``get`` the blocks; ``release(lease_id)``.
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
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import xxhash

from kvstore.block_format import (
    HEADER_BYTES,
    NO_PARENT,
    Codec,
    check_block_tensor,
    copy_payload_and_checksum,
    decode_block,
    encode_block_into,
    read_header,
    transcode_block,
    verify_block,
)
from kvstore.errors import (
    ConfigError,
    CorruptBlockError,
    InvalidArgumentError,
    KVStoreError,
    OverloadedError,
    SpecMismatchError,
    TierError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.events import EventLog
from kvstore.index import TIER_NAMES, BlockIndex, Lease
from kvstore.keys import DIGEST_BYTES, BlockHash, ExtraKey, ModelSpec, block_hashes, root_hash
from kvstore.placement import Placement
from tiers.base import BlockBytes, Tier, TierStats
from tiers.gpu_memory import GpuMemoryTier
from tiers.lmdb_store import LmdbTier
from tiers.pinned_memory import PinnedMemoryTier
from tiers.redis_store import RedisTier, RedisTierStats

if TYPE_CHECKING:
    from kvstore.config import StoreConfig

__all__ = ["Engine", "EngineConfig", "EngineStats", "LookupResult", "PutResult"]

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    move_queue_blocks: int = 4096  # pending background copies; puts wait when it is full
    num_movers: int = 2
    admit_timeout_ms: int = 2000  # how long a put waits for room before OverloadedError
    default_lease_ttl_s: float = 30.0
    max_lease_ttl_s: float = 600.0
    reaper_interval_s: float = 0.5  # expired leases and pins are reclaimed this often
    event_log_size: int = 65536
    g4_probe: bool = True  # lookups ask G4 for blocks this node does not know
    # After a copy into a tier fails because the tier is down (Redis unreachable, a disk
    # error), durable puts that need the tier are refused at once with TierUnavailableError, and
    # background copies into it are skipped, for this long; then the next copy tries again.
    tier_retry_s: float = 5.0

    def __post_init__(self) -> None:
        if self.move_queue_blocks < 1 or self.num_movers < 1:
            raise ConfigError("engine.move_queue_blocks and engine.num_movers must be >= 1")
        if not 0 < self.default_lease_ttl_s <= self.max_lease_ttl_s:
            raise ConfigError("engine lease ttls need 0 < default_lease_ttl_s <= max_lease_ttl_s")
        if self.admit_timeout_ms < 0 or self.reaper_interval_s <= 0:
            raise ConfigError("engine.admit_timeout_ms >= 0 and reaper_interval_s > 0 required")
        if not self.tier_retry_s >= 0:
            raise ConfigError("engine.tier_retry_s must be >= 0")


@dataclass(frozen=True, slots=True)
class LookupResult:
    """Where each full block of a prompt is: a tier name, or None when it is missing."""

    hashes: list[BlockHash]
    tiers: list[str | None]
    block_tokens: int

    @property
    def hit_blocks(self) -> int:
        """Length of the leading run of present blocks (the usable prefix)."""
        for i, tier in enumerate(self.tiers):
            if tier is None:
                return i
        return len(self.tiers)

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * self.block_tokens

    @property
    def holes(self) -> list[int]:
        """Missing blocks with a present block after them (a perforated prefix)."""
        last_present = max((i for i, t in enumerate(self.tiers) if t is not None), default=-1)
        return [i for i in range(last_present) if self.tiers[i] is None]

    @property
    def present_blocks(self) -> int:
        return sum(t is not None for t in self.tiers)


@dataclass(frozen=True, slots=True)
class PutResult:
    hashes: list[BlockHash]
    stored: int  # newly admitted into the top tier
    already: int  # were there already


@dataclass(frozen=True, slots=True)
class EngineStats:
    tiers: dict[str, TierStats]
    index_bytes: dict[str, int]
    index_blocks: dict[str, int]
    num_blocks: int
    num_leases: int
    queue_depth: int
    counters: dict[str, int]


@dataclass(slots=True)
class _Move:
    kind: Literal["copy", "promote"]
    key: BlockHash
    namespace: bytes
    src: str
    dst: str
    done: asyncio.Future[bool] | None = None
    # A promotion of a block just read (and verified) carries its bytes: the copy then need not
    # read the source tier again, which competes with the reads of the hits (LMDB's page-ins, a
    # fresh buffer per block).
    data: bytes | None = None


# Blocks below G2 that ``payload_sources`` reads in one call.
_LOWER_BATCH = 32

# Bytes of the promotions queued with their data (``_Move.data``); the ones beyond it read their
# source again when their turn comes.
_PROMOTE_DATA_BYTES = 256 << 20


@dataclass(slots=True)
class _Counters:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n


# Blocks of one lookup looked up in the index between two yields to the event loop (~3 ms).
_LOOKUP_SLICE = 16384


class Engine:
    def __init__(
        self,
        config: StoreConfig,
        tiers: dict[str, Tier],
        *,
        g4_factory: Callable[[bytes], Tier] | None = None,
    ) -> None:
        """Prefer ``await Engine.open(config)``; this constructor takes tiers already opened.

        ``tiers`` maps names (G1..G3, and G4 when it does not depend on the namespace) to
        tiers; ``g4_factory`` makes the G4 tier of a namespace on first use (Redis keys carry
        the namespace).
        """
        self.config = config
        self.engine_config: EngineConfig = config.engine
        self._tiers = dict(tiers)
        self._g4_factory = g4_factory
        self._g4: dict[bytes, Tier] = {}
        names = [n for n in TIER_NAMES if n in tiers or (n == "G4" and g4_factory is not None)]
        capacities = [(n, self._capacity(n)) for n in names]
        self.placement = Placement(config.placement, capacities)
        slot_bytes = {
            n: t.slot_bytes
            for n, t in tiers.items()
            if isinstance(t, PinnedMemoryTier | GpuMemoryTier)
        }
        self.index = BlockIndex(slot_bytes)
        self.events = EventLog(self.engine_config.event_log_size)
        self.counters = _Counters()
        self._queue: asyncio.Queue[_Move] = asyncio.Queue(self.engine_config.move_queue_blocks)
        self._promote_data_bytes = 0  # held by queued promotions (``_Move.data``)
        self._room_locks = {n: asyncio.Lock() for n in names}
        self._queue_room = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        # Copies between tiers in flight, per block, and how often each of those blocks was
        # removed by request (evict, flush) since the first of them started. A copy that sees
        # the count change under it lands nothing: a flushed block must not come back when a
        # write-through copy or a promotion that was reading it finishes (a tombstone that lives
        # exactly as long as the copies that could resurrect the block).
        self._copying: dict[BlockHash, int] = {}
        self._removals: dict[BlockHash, int] = {}
        # ...and the removal count at which such a block was put again: copies may land then.
        self._restored: dict[BlockHash, int] = {}
        # Set when the last running copy of a block ends: evict and flush wait for it, so that
        # when they return no copy of what they removed can still land anywhere.
        self._settled: dict[BlockHash, asyncio.Event] = {}
        # Tiers whose last copy failed because they are down, until when, and each tier's last
        # copy failure (what a durable put that could not reach it reports).
        self._down_until: dict[str, float] = {}
        self._last_failure: dict[str, TierError] = {}
        self._closed = False
        for tier in tiers.values():
            tier.on_corrupt = self._on_corrupt

    def _capacity(self, name: str) -> int:
        if name in self._tiers:
            return self._tiers[name].capacity_bytes
        assert self.config.g4 is not None
        return self.config.g4.capacity_bytes

    # -- life cycle ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, config: StoreConfig, *, progress: ProgressCallback | None = None) -> Engine:
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

    # -- tiers ---------------------------------------------------------------------------------

    def tier(self, name: str, namespace: bytes) -> Tier:
        if name == "G4":
            tier = self._g4.get(namespace)
            if tier is None:
                if self._g4_factory is None:
                    raise InvalidArgumentError("G4 is not configured")
                tier = self._g4_factory(namespace)
                tier.on_corrupt = self._on_corrupt
                self._g4[namespace] = tier
            return tier
        return self._tiers[name]

    @property
    def tier_names(self) -> list[str]:
        return list(self.placement.order)

    def _on_corrupt(self, tier: str, key: BlockHash, reason: str) -> None:
        entry = self.index.get(key)
        namespace = entry.namespace if entry is not None else b""
        self.index.remove(key, tier)
        self.counters.add("corrupt")
        self.events.append("corrupt", key, tier, namespace)
        log.warning("%s: corrupt block %s removed: %s", tier, key.hex(), reason)

    # -- lookup --------------------------------------------------------------------------------

    def hashes(
        self,
        spec: ModelSpec,
        tokens: Sequence[int] | Any,
        *,
        salt: bytes = b"",
        extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    ) -> list[BlockHash]:
        return block_hashes(spec, tokens, salt=salt, extra_keys=extra_keys)

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

    async def lookup_hashes(self, spec: ModelSpec, hashes: Sequence[BlockHash]) -> LookupResult:
        self.counters.add("lookups")
        tiers: list[str | None] = []
        probe: list[int] = []
        hottest = self.index.hottest
        # Blocks this node knows only in G4 are asked again, in the same round trip as the
        # unknown ones: G4 is shared, and a lost Redis Cluster shard, the TTL or another node's
        # eviction may have removed them since this node found them.
        for start in range(0, len(hashes), _LOOKUP_SLICE):
            if start:
                # A huge prompt's index work in slices: other requests run in between.
                await asyncio.sleep(0)
            part = [hottest(h) for h in hashes[start : start + _LOOKUP_SLICE]]
            probe += [start + i for i, t in enumerate(part) if t is None or t == "G4"]
            tiers += part
        if probe and self.engine_config.g4_probe and "G4" in self.placement.order:
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
        for start in range(0, len(hashes), _LOOKUP_SLICE):
            if start:
                await asyncio.sleep(0)
            end = start + _LOOKUP_SLICE
            self.index.touch(
                [h for h, t in zip(hashes[start:end], tiers[start:end], strict=True) if t]
            )
        return LookupResult(list(hashes), tiers, spec.block_tokens)

    # -- put -----------------------------------------------------------------------------------

    async def put(
        self,
        spec: ModelSpec,
        tokens: Sequence[int] | Any,
        kv: torch.Tensor,
        *,
        salt: bytes = b"",
        extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
        durable: bool = False,
        owner: str = "",
    ) -> PutResult:
        """Store the full blocks of a prompt's K/V ``[layers, 2, tokens, kv_heads, head_dim]``.

        With ``durable=True`` the call returns only once the write-through copies (G3, G4) are
        done, so the blocks survive a crash of this process.
        """
        hashes = self.hashes(spec, tokens, salt=salt, extra_keys=extra_keys)
        expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != expected:
            raise SpecMismatchError(
                f"K/V shape {list(kv.shape)} is not [layers={spec.num_layers}, 2, tokens, "
                f"kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}] of {spec.name}"
            )
        block = spec.block_tokens
        if kv.shape[2] < len(hashes) * block:
            raise InvalidArgumentError(
                f"K/V has {kv.shape[2]} tokens, fewer than the {len(hashes) * block} of "
                f"{len(hashes)} full blocks"
            )
        parents: list[bytes] = [root_hash(spec, salt), *hashes[:-1]]
        items = [
            (h, parents[i], kv[:, :, i * block : (i + 1) * block]) for i, h in enumerate(hashes)
        ]
        return await self.put_blocks(spec, items, durable=durable, owner=owner)

    async def put_blocks(
        self,
        spec: ModelSpec,
        items: Sequence[tuple[bytes, bytes | None, torch.Tensor]],
        *,
        durable: bool = False,
        owner: str = "",
    ) -> PutResult:
        """Store blocks given as ``(hash, parent hash or None, tensor)``, in chain order.

        Every tensor is checked against ``spec`` before anything is stored; each block is then
        encoded straight into its top-tier slot (``Tier.put_with``), not built and copied in.
        """
        checked: list[tuple[BlockHash, BlockHash | None, _Source]] = []
        for key, parent, tensor in items:
            if len(key) != DIGEST_BYTES:
                raise InvalidArgumentError(f"block hash must be {DIGEST_BYTES} bytes")
            check_block_tensor(spec, tensor)
            checked.append((BlockHash(bytes(key)), _parent_or_none(parent), tensor))
        return await self._admit(spec, checked, durable, owner)

    async def put_encoded(
        self,
        spec: ModelSpec,
        items: Sequence[tuple[bytes, bytes | None, bytes | bytearray | memoryview]],
        *,
        durable: bool = False,
        owner: str = "",
    ) -> PutResult:
        """Store already-encoded blocks; every one is verified against ``spec`` first, and a bad
        one fails the whole call before anything is stored."""
        checked: list[tuple[BlockHash, BlockHash | None, bytes | bytearray | memoryview]] = []
        for key, parent, data in items:
            if len(key) != DIGEST_BYTES:
                raise InvalidArgumentError(f"block hash must be {DIGEST_BYTES} bytes")
            try:
                header = verify_block(key, data)
            except CorruptBlockError as exc:
                raise InvalidArgumentError(f"block {bytes(key).hex()}: {exc}") from None
            if header.fingerprint != spec.fingerprint:
                raise SpecMismatchError(f"block {bytes(key).hex()} is not of namespace {spec.name}")
            if header.dtype != spec.dtype or header.shape != spec.block_shape:
                raise SpecMismatchError(
                    f"block {bytes(key).hex()} is {header.dtype}{list(header.shape)}, namespace "
                    f"{spec.name} wants {spec.dtype}{list(spec.block_shape)}"
                )
            checked.append((BlockHash(bytes(key)), _parent_or_none(parent), data))
        return await self._admit(spec, checked, durable, owner)

    async def _admit(
        self,
        spec: ModelSpec,
        items: Sequence[tuple[BlockHash, BlockHash | None, _Source]],
        durable: bool,
        owner: str,
    ) -> PutResult:
        namespace = spec.fingerprint
        block_nbytes = HEADER_BYTES + spec.block_nbytes
        top = self.placement.top
        hashes = [k for k, _, _ in items]
        self.counters.add("put_blocks", len(items))
        new = []
        seen: set[BlockHash] = set()
        for key, parent, data in items:
            if key in seen or self.index.in_tier(key, top):
                continue
            seen.add(key)
            new.append((key, parent, data))
        through = self.placement.write_through()
        if durable:
            self._refuse_if_down(through)
        if new and through:
            await self._wait_for_queue_room(len(new) * len(through))
        sizes = {k: _source_nbytes(d, block_nbytes) for k, _, d in new}
        charge = sum(self.index.charge(top, n) for n in sizes.values())
        reserved: list[BlockHash] = []
        async with self._room_locks[top]:
            await self._make_room(top, namespace, charge)
            for key, parent, _ in new:
                if self.index.begin_write(
                    key, top, namespace=namespace, parent=parent, nbytes=sizes[key], owner=owner
                ):
                    reserved.append(key)
        want = set(reserved)
        tier = self.tier(top, namespace)
        try:
            encoded = [(k, d) for k, _, d in new if k in want and not isinstance(d, torch.Tensor)]
            if encoded:
                await tier.put(encoded)
            for key, parent, data in new:
                if key in want and isinstance(data, torch.Tensor):
                    await tier.put_with(key, block_nbytes, _encoder(spec, key, data, parent))
        except BaseException:
            for key in reserved:
                self.index.abort_write(key, top)
            raise
        for key, parent, _ in new:
            if key in want:
                self.index.commit_write(key, top)
                self.events.append("stored", key, top, namespace, parent)
                if key in self._removals:
                    self._restored[key] = self._removals[key]
        self.index.touch(hashes)
        self.counters.add("stored", len(reserved))
        waits: list[asyncio.Future[bool]] = []
        loop = asyncio.get_running_loop()
        for key in reserved:
            for dst in through:
                done = loop.create_future() if durable else None
                await self._queue.put(_Move("copy", key, namespace, top, dst, done))
                if done is not None:
                    waits.append(done)
        if durable:
            # Blocks that were here already count too: a durable put is acknowledged only when
            # every write-through tier holds every block of it (a retry of a put whose copies
            # failed must not be acknowledged while the tier is still out of reach).
            want_keys = dict.fromkeys(hashes)
            for key in want_keys:
                if key in want:
                    continue
                src = self.index.hottest(key) or top
                for dst in through:
                    if dst != src and not self.index.in_tier(key, dst):
                        done = loop.create_future()
                        await self._queue.put(_Move("copy", key, namespace, src, dst, done))
                        waits.append(done)
            if waits:
                await asyncio.gather(*waits)
            for dst in through:
                if not all(self.index.in_tier(k, dst) for k in want_keys):
                    raise self._durable_failure(dst)
        return PutResult(hashes, len(reserved), len(items) - len(reserved))

    def _down_for(self, tier: str) -> float:
        """Seconds until a tier marked down is tried again (0: not down)."""
        return max(0.0, self._down_until.get(tier, 0.0) - time.monotonic())

    def _refuse_if_down(self, tiers: Sequence[str]) -> None:
        for name in tiers:
            if left := self._down_for(name):
                raise TierUnavailableError(
                    name,
                    f"a durable put needs it and it is down ({self._last_failure.get(name)}); "
                    f"the next try is in {left:.1f} s (engine.tier_retry_s); nothing of "
                    "this put is acknowledged",
                )

    def _durable_failure(self, tier: str) -> TierError:
        cause = self._last_failure.get(tier)
        if isinstance(cause, TierFullError):
            return TierFullError(
                tier,
                f"the durable copy of the put could not be stored there ({cause}); the put is "
                "not acknowledged: free room or retry later",
            )
        return TierUnavailableError(
            tier,
            f"the durable copy of the put could not be stored there ({cause or 'see the log'}); "
            "the put is not acknowledged: retry once the tier is back",
        )

    def _copy_failed(self, tier: str, exc: TierError) -> None:
        self._last_failure[tier] = exc
        if not isinstance(exc, TierFullError):
            self._down_until[tier] = time.monotonic() + self.engine_config.tier_retry_s

    async def _wait_for_queue_room(self, n: int) -> None:
        free = self._queue.maxsize - self._queue.qsize()
        if n <= free:
            return
        if n > self._queue.maxsize:
            raise InvalidArgumentError(
                f"a put of {n} background copies exceeds the move queue ({self._queue.maxsize}); "
                "split it into smaller puts"
            )
        timeout_s = self.engine_config.admit_timeout_ms / 1000
        try:
            async with self._queue_room:
                await asyncio.wait_for(
                    self._queue_room.wait_for(
                        lambda: self._queue.maxsize - self._queue.qsize() >= n
                    ),
                    timeout_s,
                )
        except TimeoutError:
            self.counters.add("overloaded")
            raise OverloadedError(
                f"{self._queue.qsize()} background copies are pending and no room for {n} more "
                f"came free within {timeout_s:g} s: the lower tiers are slower than the puts; "
                "retry later or add capacity"
            ) from None

    # -- room and eviction ---------------------------------------------------------------------

    async def _make_room(self, tier: str, namespace: bytes, incoming: int) -> None:
        """Evict (demoting where placement says) until ``incoming`` bytes fit under the
        watermarks; the caller holds ``self._room_locks[tier]``."""
        if tier == "G4":
            return  # shared by every node; Redis' maxmemory and the TTL bound it
        need = self.placement.bytes_to_free(tier, self.index.bytes_in(tier), incoming)
        if need:
            for key in self.index.victims(tier, need):
                await self._evict_one(key, tier)
        capacity = self.placement.capacity[tier]
        if self.index.bytes_in(tier) + incoming > capacity:
            raise TierFullError(
                tier,
                f"cannot admit {incoming} bytes: {self.index.bytes_in(tier)} of {capacity} "
                "bytes are leased, pinned or being written",
            )

    async def _evict_one(self, key: BlockHash, tier: str) -> bool:
        entry = self.index.get(key)
        if entry is None or not self.index.in_tier(key, tier) or self.index.is_protected(key):
            return False
        target = self.placement.demote_to(tier, entry.tiers())
        if target is not None:
            moved = await self._copy(key, entry.namespace, tier, target)
            if moved:
                self.counters.add("demotions")
            elif self.index.get(key) is not None and not self.index.in_tier(key, tier):
                return True  # it was corrupt, and is gone already
            else:
                self.counters.add("dropped")
        # Leased while the demotion copy ran: keep it.
        if self.index.is_protected(key) or not self.index.in_tier(key, tier):
            return False
        await self.tier(tier, entry.namespace).delete([key])
        self.index.remove(key, tier)
        self.counters.add("evictions")
        self.events.append("removed", key, tier, entry.namespace, entry.parent)
        return True

    async def _copy(
        self, key: BlockHash, namespace: bytes, src: str, dst: str, data: bytes | None = None
    ) -> bool:
        """Copy one block between tiers, verified; True if it is in ``dst`` afterwards.
        ``data``: the block's bytes, read from ``src`` and verified already."""
        if self.index.in_tier(key, dst):
            return True
        if not self.index.in_tier(key, src):
            return False
        if key not in self._copying:
            self._settled[key] = asyncio.Event()
        self._copying[key] = self._copying.get(key, 0) + 1
        try:
            return await self._copy_once(
                key, namespace, src, dst, self._removals.get(key, 0), data
            )
        finally:
            left = self._copying.pop(key) - 1
            if left:
                self._copying[key] = left
            else:
                self._removals.pop(key, None)
                self._restored.pop(key, None)
                self._settled.pop(key).set()

    def _removed_since(self, key: BlockHash, removals: int) -> bool:
        """Removed by request since a copy that saw ``removals`` started, and not put again."""
        now = self._removals.get(key, 0)
        return now != removals and self._restored.get(key) != now

    @property
    def moves_in_flight(self) -> int:
        """Copies between tiers running now (not counting those still queued)."""
        return sum(self._copying.values())

    @property
    def tombstones(self) -> int:
        """Blocks removed by request (evict, flush) while a copy of them still runs."""
        return sum(n != self._restored.get(k) for k, n in self._removals.items())

    async def _copy_once(
        self,
        key: BlockHash,
        namespace: bytes,
        src: str,
        dst: str,
        removals: int,
        known: bytes | None = None,
    ) -> bool:
        if self._down_for(dst):
            self.counters.add("copies_skipped_tier_down")
            return False
        data: BlockBytes | None = known
        if known is None:
            try:
                (data,) = await self.tier(src, namespace).get([key])
            except TierError as exc:
                log.warning("move %s %s -> %s: cannot read: %s", key.hex(), src, dst, exc)
                return False
            if self._removed_since(key, removals):
                return False  # flushed or evicted while it was being read
        if data is None:
            # Gone from the source (a corrupt read already reported it, or it vanished from G4).
            self.index.remove(key, src)
            return False
        if known is not None:
            header = read_header(data)  # verified when it was read
        else:
            try:
                header = verify_block(key, data)
            except CorruptBlockError as exc:
                await self.tier(src, namespace).delete([key])
                self._on_corrupt(src, key, str(exc))
                return False
        parent = _parent_or_none(header.parent_hash)
        if dst in ("G1", "G2") and header.codec is not Codec.RAW:
            # Memory tiers hold raw blocks: same-host readers and GPU consumers use them in place.
            data = transcode_block(data, Codec.RAW)
        async with self._room_locks[dst]:
            try:
                await self._make_room(dst, namespace, self.index.charge(dst, len(data)))
            except TierFullError as exc:
                log.warning("move %s -> %s: %s", src, dst, exc)
                self._copy_failed(dst, exc)
                return False
            if self._removed_since(key, removals):
                return False
            if not self.index.begin_write(
                key, dst, namespace=namespace, parent=parent, nbytes=len(data)
            ):
                return self.index.in_tier(key, dst)
        try:
            await self.tier(dst, namespace).put([(key, data)])
        except TierError as exc:
            self.index.abort_write(key, dst)
            self.counters.add("move_failures")
            self._copy_failed(dst, exc)
            log.warning("move %s %s -> %s failed: %s", key.hex(), src, dst, exc)
            return False
        except BaseException:
            self.index.abort_write(key, dst)
            raise
        if self._removed_since(key, removals):
            # Removed from every tier (evict, flush) while this copy was writing: take it out
            # again rather than bring back what the operator removed.
            try:
                await self.tier(dst, namespace).delete([key])
            finally:
                self.index.abort_write(key, dst)
            self.counters.add("copies_discarded")
            return False
        self._down_until.pop(dst, None)
        self.index.commit_write(key, dst)
        self.events.append("moved", key, dst, namespace, parent, from_tier=src)
        return True

    # -- background ----------------------------------------------------------------------------

    async def _mover(self) -> None:
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A library swallowed our cancellation (redis-py shields its commands): stop.
                return
            move = await self._queue.get()
            ok = False
            try:
                ok = await self._copy(move.key, move.namespace, move.src, move.dst, move.data)
                if ok:
                    self.counters.add("promotions" if move.kind == "promote" else "copies")
            except Exception:
                log.exception("background move of %s failed", move.key.hex())
            finally:
                if move.data is not None:
                    self._promote_data_bytes -= len(move.data)
                    move.data = None
                if move.done is not None and not move.done.done():
                    move.done.set_result(ok)
                self._queue.task_done()
                async with self._queue_room:
                    self._queue_room.notify_all()

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.engine_config.reaper_interval_s)
            leases, pins = self.index.expire(time.monotonic())
            if leases or pins:
                self.counters.add("expired_leases", leases)
                self.counters.add("expired_pins", pins)

    # -- reads ---------------------------------------------------------------------------------

    async def read(
        self, spec: ModelSpec, keys: Sequence[bytes], *, in_place: bool = False
    ) -> list[bytes | bytearray | memoryview | None]:
        """The verified encoded bytes of each block from its hottest tier, or None.

        A block that a tier fails to return (corrupt, vanished) is looked for in the next tier
        down before it is reported missing. Hits in lower tiers are promoted in the background.

        ``in_place=True`` returns G2 hits as views of their slots instead of copies (a fresh
        2 MiB ``bytes`` per block page-faults: G2 reads ran at 2 GB/s that way). A view is valid
        only while the block stays in G2: the caller must hold a lease on it until done.
        """
        hashes = [BlockHash(bytes(k)) for k in keys]
        out: list[bytes | bytearray | memoryview | None] = [None] * len(hashes)
        todo = list(range(len(hashes)))
        for tier in self.placement.order:
            want = [i for i in todo if self.index.in_tier(hashes[i], tier)]
            if not want:
                continue
            source = self.tier(tier, spec.fingerprint)
            try:
                values: Sequence[bytes | bytearray | memoryview | None]
                if in_place and isinstance(source, PinnedMemoryTier):
                    values = [source.view_of(hashes[i]) for i in want]
                else:
                    values = await source.get([hashes[i] for i in want])
            except TierError as exc:
                log.warning("read from %s failed, trying lower tiers: %s", tier, exc)
                continue
            for i, value in zip(want, values, strict=True):
                if value is None:
                    self.index.remove(hashes[i], tier)
                    continue
                if tier in ("G1", "G2"):
                    # Memory tiers do not verify on read; a block leaving kvstore is verified.
                    try:
                        verify_block(hashes[i], value)
                    except CorruptBlockError as exc:
                        await self.tier(tier, spec.fingerprint).delete([hashes[i]])
                        self._on_corrupt(tier, hashes[i], str(exc))
                        continue
                out[i] = value
                self._promote(
                    hashes[i], spec.fingerprint, tier, value if isinstance(value, bytes) else None
                )
            todo = [i for i in todo if out[i] is None]
        hits = [h for h, v in zip(hashes, out, strict=True) if v is not None]
        self.index.touch(hits, hit=True)
        self.counters.add("read_hits", len(hits))
        self.counters.add("read_misses", len(hashes) - len(hits))
        return out

    def _g2_payload(self, key: BlockHash, nbytes: int) -> tuple[memoryview, int] | None:
        """A raw G2 block's payload, as a view of its slot, and the checksum that a copy of it
        must match: the header's, or -1 (never matches) when the slot holds another block."""
        g2 = self._tiers.get("G2")
        if not isinstance(g2, PinnedMemoryTier) or not self.index.in_tier(key, "G2"):
            return None
        slot = g2.view_of(key)
        if slot is None or len(slot) != HEADER_BYTES + nbytes:
            return None
        try:
            header = read_header(slot)
        except CorruptBlockError:
            return None
        if header.codec is not Codec.RAW:
            return None
        return slot[HEADER_BYTES:], header.payload_xxh3 if header.block_hash == key else -1

    async def _drop_corrupt_g2(self, key: BlockHash) -> None:
        g2 = self._tiers.get("G2")
        assert g2 is not None
        await g2.delete([key])
        self._on_corrupt("G2", key, "payload checksum mismatch")

    async def _lower_payloads(self, spec: ModelSpec, keys: list[BlockHash]) -> list[memoryview]:
        """The raw payloads of the leading blocks of ``keys`` that are found, read in one call
        (one trip to each tier's reader threads, not one per block)."""
        out: list[memoryview] = []
        for key, data in zip(keys, await self.read(spec, keys, in_place=True), strict=True):
            if data is None:
                break
            if read_header(data).codec is not Codec.RAW:
                data = transcode_block(data, Codec.RAW)
            if len(data) != HEADER_BYTES + spec.block_nbytes:
                log.warning("block %s has an odd size; the hit ends there", key.hex())
                break
            out.append(memoryview(data)[HEADER_BYTES:])
        return out

    async def read_payloads_into(
        self, spec: ModelSpec, keys: Sequence[bytes], views: Sequence[memoryview]
    ) -> int:
        """Copy the raw payloads of the leading blocks of ``keys`` into ``views`` (one per key,
        ``spec.block_nbytes`` each), verified; returns how many leading blocks were copied.

        G2 hits are copied and checksummed in one pass (the sum is of the bytes that landed), so
        verifying costs no extra read of the block; a G2 copy that fails is dropped as corrupt
        and the block read from the tiers below, as ``read`` does. The caller holds a lease."""
        nbytes = spec.block_nbytes
        done = 0
        hits: list[BlockHash] = []
        for raw, view in zip(keys, views, strict=True):
            key = BlockHash(bytes(raw))
            g2 = self._g2_payload(key, nbytes)
            if g2 is not None:
                payload, expected = g2
                intact = copy_payload_and_checksum(payload, view) == expected
                if not intact:  # dropped only if G2's copy itself is bad (``settle_payloads``)
                    intact = not await self.settle_payloads([], [(key, payload, expected)])
                del payload, g2
                if intact:
                    hits.append(key)
                    done += 1
                    continue
            found = await self._lower_payloads(spec, [key])
            if not found:
                break
            view[:] = found[0]
            done += 1
        self._g2_hits(hits)
        return done

    def _g2_hits(self, hits: list[BlockHash]) -> None:
        if hits:
            self.index.touch(hits, hit=True)
            self.counters.add("read_hits", len(hits))

    async def payload_sources(
        self, spec: ModelSpec, keys: Sequence[bytes]
    ) -> list[tuple[BlockHash, memoryview, int | None]]:
        """The raw payloads of the leading blocks of ``keys``, for a caller that copies them
        itself (layer by layer): ``(key, payload, checksum)``. A G2 block is a view of its slot
        with the checksum that the caller's copy must match (``settle_payloads`` then); a block
        from a lower tier is read and verified here, checksum None. The caller holds a lease."""
        out: list[tuple[BlockHash, memoryview, int | None]] = []
        lower: list[BlockHash] = []  # a run of blocks not in G2, read in one call

        async def read_lower() -> bool:
            datas = await self._lower_payloads(spec, lower)
            out.extend((key, data, None) for key, data in zip(lower, datas, strict=False))
            whole = len(datas) == len(lower)
            lower.clear()
            return whole

        for raw in keys:
            key = BlockHash(bytes(raw))
            g2 = self._g2_payload(key, spec.block_nbytes)
            if g2 is None:
                lower.append(key)
                if len(lower) < _LOWER_BATCH or await read_lower():
                    continue
                return out
            if lower and not await read_lower():
                return out
            out.append((key, g2[0], g2[1]))
        if lower:
            await read_lower()
        return out

    async def settle_payloads(
        self, hits: list[BlockHash], mismatched: list[tuple[BlockHash, memoryview, int]]
    ) -> int:
        """After copies of G2 payloads (``payload_sources``): count the blocks whose copy matched
        their checksum as hits, and look again at each ``(key, payload, checksum)`` whose copy
        did not. A mismatch is G2's copy gone bad, or the destination written to during the copy
        (a client's own segment): only a G2 payload that fails its checksum itself is dropped as
        corrupt. Returns how many were dropped."""
        self._g2_hits(hits)
        dropped = 0
        for key, payload, expected in mismatched:
            if xxhash.xxh3_64_intdigest(payload) != expected:
                await self._drop_corrupt_g2(key)
                dropped += 1
        return dropped

    async def get(self, spec: ModelSpec, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Each block as a tensor ``[layers, 2, block_tokens, kv_heads, head_dim]``, or None."""
        out: list[torch.Tensor | None] = []
        for key, data in zip(keys, await self.read(spec, keys), strict=True):
            out.append(None if data is None else decode_block(spec, key, data))
        return out

    def _promote(
        self, key: BlockHash, namespace: bytes, hit_tier: str, data: bytes | None = None
    ) -> None:
        """Queue a copy of a block just read from ``hit_tier`` into the tier above it; with its
        (verified, immutable) bytes while they fit ``_PROMOTE_DATA_BYTES``."""
        dst = self.placement.promote_to(hit_tier)
        if dst is None or self.index.in_tier(key, dst):
            return
        if data is not None and self._promote_data_bytes + len(data) > _PROMOTE_DATA_BYTES:
            data = None
        try:
            self._queue.put_nowait(_Move("promote", key, namespace, hit_tier, dst, data=data))
        except asyncio.QueueFull:
            # Promotion is an optimisation: never make a read wait for it.
            self.counters.add("promotions_skipped")
            return
        if data is not None:
            self._promote_data_bytes += len(data)

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
                        removed += await self._evict_one(key, tier)
                continue
            held = entry.tiers()
            if key in self._copying:
                self._removals[key] = self._removals.get(key, 0) + 1
                settling.append(self._settled[key])
            for name in held:
                await self.tier(name, entry.namespace).delete([key])
                self.index.remove(key, name)
                self.events.append("removed", key, name, entry.namespace, entry.parent)
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

    # -- same host -----------------------------------------------------------------------------

    async def stage(self, spec: ModelSpec, keys: Sequence[bytes]) -> list[bool]:
        """Bring blocks into G2 now (not in the background), ahead of reads that should hit
        memory; returns which of them are in G2 afterwards."""
        out = []
        for raw in keys:
            key = BlockHash(bytes(raw))
            if not self.index.in_tier(key, "G2"):
                hottest = self.index.hottest(key)
                if hottest is not None:
                    await self._copy(key, spec.fingerprint, hottest, "G2")
            out.append(self.index.in_tier(key, "G2"))
        return out

    def usage_of(self, owner: str) -> int:
        """Bytes of the distinct blocks ``owner`` stored that are still held on this node."""
        return self.index.owner_bytes(owner)

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


_Source = bytes | bytearray | memoryview | torch.Tensor
"""A block to admit: encoded bytes, or a tensor to encode straight into the top tier."""


def _source_nbytes(source: _Source, block_nbytes: int) -> int:
    return block_nbytes if isinstance(source, torch.Tensor) else len(source)


def _encoder(
    spec: ModelSpec, key: BlockHash, tensor: torch.Tensor, parent: BlockHash | None
) -> Callable[[memoryview], int]:
    def fill(out: memoryview) -> int:
        return encode_block_into(spec, key, tensor, out, parent_hash=parent)

    return fill


def _parent_or_none(parent: bytes | None) -> BlockHash | None:
    if parent is None or bytes(parent) == NO_PARENT:
        return None
    if len(parent) != DIGEST_BYTES:
        raise InvalidArgumentError(f"parent hash must be {DIGEST_BYTES} bytes")
    return BlockHash(bytes(parent))
