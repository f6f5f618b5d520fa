"""The write path of the engine: admitting puts into the top tier, making room (eviction and
demotion), and the background moves (write-through copies, promotions) that keep the lower tiers
filled. Mixed into ``Engine``; the reads build on it (a promotion is a copy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvstore.core.block_format import (
    HEADER_BYTES,
    Codec,
    check_block_tensor,
    copy_and_checksum,
    read_header,
    transcode_block,
    verify_block,
)
from kvstore.core.errors import (
    CorruptBlockError,
    InvalidArgumentError,
    OverloadedError,
    SpecMismatchError,
    TierError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.core.keys import DIGEST_BYTES, BlockHash, ExtraKey, ModelSpec, root_hash
from kvstore.engine.state import (
    EngineState,
    PutResult,
    _encoder,
    _Move,
    _parent_or_none,
    _Source,
    _source_nbytes,
    log,
)
from tiers.base import Buffer
from tiers.pinned_memory import PinnedMemoryTier
from tiers.slab import SlabTier

__all__ = ["WritePath"]


class WritePath(EngineState):
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
            await self._make_room(top, namespace, charge, list(sizes.values()))
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

    async def _make_room(
        self, tier: str, namespace: bytes, incoming: int, sizes: Sequence[int] = ()
    ) -> None:
        """Evict (demoting where placement says) until ``incoming`` bytes fit under the
        watermarks and, in a memory tier, until blocks of ``sizes`` (their bytes, header
        included) find free extents; the caller holds ``self._room_locks[tier]``.

        Eviction by bytes comes first and stops at the low watermark; only if the free bytes are
        then split into extents too small for ``sizes`` does it go on, in the same order (least
        recently used, leaf-first), one victim at a time, with the reason "fragmentation".
        """
        if tier == "G4":
            return  # shared by every node; Redis' maxmemory and the TTL bound it
        slab = self._tiers.get(tier)
        if sizes and isinstance(slab, SlabTier):
            slab.check_size(max(sizes))  # before evicting anything for it
        need = self.placement.bytes_to_free(tier, self.index.bytes_in(tier), incoming)
        if need:
            for key in self.index.victims(tier, need):
                await self._evict_one(key, tier, "capacity")
        capacity = self.placement.capacity[tier]
        if self.index.bytes_in(tier) + incoming > capacity:
            raise TierFullError(
                tier,
                f"cannot admit {incoming} bytes: {self.index.bytes_in(tier)} of {capacity} "
                "bytes are leased, pinned or being written",
            )
        if not sizes or not isinstance(slab, SlabTier):
            return
        while not slab.fits(sizes):
            victims = self.index.victims(tier, 1)
            if not victims or not await self._evict_one(victims[0], tier, "fragmentation"):
                largest = slab.slab_stats().largest_free_bytes
                raise TierFullError(
                    tier,
                    f"cannot admit blocks of up to {max(sizes)} bytes: the largest free extent is "
                    f"{largest} bytes and the blocks next to the free space are leased, pinned or "
                    "being written",
                )
            self.counters.add("evictions_for_fragmentation")

    async def _evict_one(self, key: BlockHash, tier: str, reason: str) -> bool:
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
        self.events.append("removed", key, tier, entry.namespace, entry.parent, reason=reason)
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
        g2 = self._tiers.get("G2") if known is None and src == "G2" else None
        view = g2.view_of(key) if isinstance(g2, PinnedMemoryTier) else None
        if view is None:
            return await self._copy_data(key, namespace, src, dst, removals, known)
        # Out of G2 (a write-through copy, a demotion): into a reused buffer, checksummed in the
        # same pass, on this thread before anything else can free the extent. A fresh ``bytes``
        # per block page-faults (~0.5 ms per 2 MiB here) on the event loop that serves requests.
        staging = self._staging.take(len(view))
        try:
            out = memoryview(staging)[: len(view)]
            payload_xxh3 = copy_and_checksum(view, out)
            del view
            return await self._copy_data(
                key, namespace, src, dst, removals, None, (out, payload_xxh3)
            )
        finally:
            self._staging.give(staging)

    async def _copy_data(
        self,
        key: BlockHash,
        namespace: bytes,
        src: str,
        dst: str,
        removals: int,
        known: bytes | None,
        read: tuple[memoryview, int] | None = None,
    ) -> bool:
        """``_copy_once`` once the source is read: ``known`` (verified already), ``read`` (bytes
        read with their payload checksum, to verify), or neither (read from ``src`` here)."""
        data: Buffer | None = known if read is None else read[0]
        if known is None and read is None:
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
                header = verify_block(key, data, payload_xxh3=None if read is None else read[1])
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
                await self._make_room(
                    dst, namespace, self.index.charge(dst, len(data)), [len(data)]
                )
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

