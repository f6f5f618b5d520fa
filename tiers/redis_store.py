"""``RedisTier`` (G4): encoded blocks in a Redis server or Redis Cluster that every node shares.

Operations, in the order a caller uses them (the contract is ``tiers.base.Tier``):

1. ``RedisTier(RedisTierConfig(url=..., capacity_bytes=...))`` — no connection yet; the first
   operation connects (and, in cluster mode, discovers the slot map).
2. ``put`` — skip blocks whose head already exists, write the chunks of large blocks, then the
   heads with ``SET NX``; an ``OOM`` reply undoes the batch and raises ``TierFullError``.
3. ``exists`` / ``get`` / ``get_into`` — one pipelined round trip for the heads, one more for
   the chunks of chunked blocks (``get_into`` copies them straight into the caller's buffer);
   the base class verifies every block returned.
4. ``delete`` / ``iter_keys`` / ``stats`` / ``close``.

Key layout (``<hash>`` is the 32 hex digits of the block hash; the braces are literal)::

    <key_prefix>:<namespace>:{<hash>}       head: the encoded block (magic b"KVBK"), or for a
                                            block larger than chunk_bytes a 16-byte manifest:
                                            b"KVCM", u32 number of chunks, u64 total bytes (LE)
    <key_prefix>:<namespace>:{<hash>}:<i>   chunk i (0-based) of a chunked block

The braces around the hash are a Redis Cluster hash tag: a block's head and chunks share one slot
(one shard, one pipeline per shard), while the blocks of a chain hash to different slots and
spread over the shards. Every Redis round trip is bounded by ``timeout_ms``; a server that is
down, stopped or overloaded raises ``TierUnavailableError`` and never hangs the caller.

Lost shards (cluster mode): a round trip goes to every shard it touches at once, one pipeline per
shard. A shard that refuses or drops connections (twice: the second try is on a fresh connection)
is *lost*: ``get``, ``get_into`` and ``exists`` report its blocks missing while the other shards'
blocks come back, counted in ``stats().num_unreachable``, with one warning when a shard is lost
and one when it answers again. Writes and deletes that touch a lost shard raise
``TierUnavailableError`` and ``put`` writes nothing of such a batch. A shard that is connected but
does not answer within ``timeout_ms`` (hung, or a failover under way) still fails the whole call:
its blocks are probably still there. After a loss the slot map is read again (at most once a
second), so a replica promoted in its place is followed, and a shard that comes back on the same
address is used again, without recreating the tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvstore.core.block_format import HEADER_BYTES, Codec, transcode_block
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError, TierFullError
from kvstore.core.keys import BlockHash
from tiers.base import BlockBytes, Buffer, CorruptionCallback, Read, Tier, TierStats, check_fits
from tiers.redis_config import (
    _MANIFEST,
    _ROUND_TRIP_BYTES,
    _SMALL_COMMANDS_PER_TRIP,
    _TRANSCODE_INLINE_BYTES,
    _WRITE_ROUND_TRIP_BYTES,
    MANIFEST_MAGIC,
    TIER_NAME,
    RedisTierConfig,
    parse_manifest,
)
from tiers.redis_links import RedisLinks, _groups, _LostShard

__all__ = ["MANIFEST_MAGIC", "RedisTier", "RedisTierConfig", "RedisTierStats", "parse_manifest"]

log = logging.getLogger("tiers.redis_store")

def _byte_view(value: Buffer) -> memoryview:
    view = memoryview(value)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass(frozen=True, slots=True)
class RedisTierStats(TierStats):
    num_unreachable: int = 0
    """Blocks that ``get``/``get_into``/``exists`` reported missing because their cluster shard
    could not be reached (they may still be stored there); always 0 for a standalone server."""


class RedisTier(RedisLinks, Tier):

    verify_reads = True

    def __init__(
        self, config: RedisTierConfig, on_corrupt: CorruptionCallback | None = None
    ) -> None:
        Tier.__init__(self, TIER_NAME, config.capacity_bytes, on_corrupt)
        RedisLinks.__init__(self, config)

    # -- the contract -------------------------------------------------------------------------

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        out, manifests = await self._read_heads(keys)
        if manifests:
            parts: dict[int, list[bytes]] = {i: [] for i, _, _ in manifests}
            missing = await self._read_chunks(
                keys, manifests, lambda i, chunk: parts[i].append(chunk)
            )
            for i, _, _ in manifests:
                if i not in missing:
                    # One allocation and one copy of each chunk, as filling a preallocated
                    # bytearray would cost; the chunks themselves are freed right after.
                    out[i] = b"".join(parts.pop(i))
        return out

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        # Chunks go straight into the caller's buffer: no joined copy of the block in between.
        heads, manifests = await self._read_heads(keys)
        reads: list[Read | None] = [None] * len(keys)
        for i, value in enumerate(heads):
            if value is not None:
                check_fits(keys[i], len(value), views[i])
                views[i][: len(value)] = value
                reads[i] = Read(len(value))
        if not manifests:
            return reads
        filled = {i: 0 for i, _, _ in manifests}
        totals = {i: total for i, _, total in manifests}
        for i, _, total in manifests:
            check_fits(keys[i], total, views[i])

        def take(i: int, chunk: bytes) -> None:
            start, end = filled[i], filled[i] + len(chunk)
            if end <= totals[i]:
                views[i][start:end] = chunk
            filled[i] = end

        missing = await self._read_chunks(keys, manifests, take)
        garbled: list[BlockHash] = []
        for i, _, total in manifests:
            if i in missing:
                continue
            if filled[i] == total:
                reads[i] = Read(total)
            else:
                # get() hands the joined bytes to the base class, whose length check catches
                # this; here the buffer would hide it, so it is reported the same way here.
                garbled.append(keys[i])
                self._report_corrupt(
                    keys[i], f"chunks add up to {filled[i]} bytes, the manifest says {total}"
                )
        if garbled:
            await self._delete(garbled)
        return reads

    async def _read_heads(
        self, keys: list[BlockHash]
    ) -> tuple[list[BlockBytes | None], list[tuple[int, int, int]]]:
        """The values of small blocks, and ``(position, num_chunks, total)`` of chunked ones."""
        out: list[BlockBytes | None] = [None] * len(keys)
        manifests: list[tuple[int, int, int]] = []
        # A head holds at most chunk_bytes (more only if another node wrote it with a larger
        # setting, which then merely stretches the round-trip budget).
        per_trip = max(1, _ROUND_TRIP_BYTES // self.config.chunk_bytes)
        for start in range(0, len(keys), per_trip):
            positions = range(start, min(start + per_trip, len(keys)))
            replies = await self._pipeline(
                [("GET", self.head_key(keys[i])) for i in positions],
                "reading block heads",
                lost_ok=True,
            )
            self._count_unreachable(replies)
            for i, value in zip(positions, replies, strict=True):
                if value is None or isinstance(value, _LostShard):
                    continue
                manifest = parse_manifest(value)
                if manifest is None:
                    # A block, or a garbled manifest that the base class then reports as corrupt.
                    out[i] = value
                else:
                    manifests.append((i, *manifest))
        return out, manifests

    async def _read_chunks(
        self,
        keys: list[BlockHash],
        manifests: list[tuple[int, int, int]],
        take: Callable[[int, bytes], None],
    ) -> set[int]:
        """Hand every chunk to ``take(position, chunk)`` in order; the positions whose block
        lost a chunk (those blocks are removed) or whose shard was lost since its head was read
        (those are only missing)."""
        # (position, chunk index, approximate size): the size only splits the round trips.
        wanted = [(i, c, -(-total // num)) for i, num, total in manifests for c in range(num)]
        missing: set[int] = set()
        unreachable: set[int] = set()
        for group in _groups(wanted, lambda w: w[2], _ROUND_TRIP_BYTES):
            replies = await self._pipeline(
                [("GET", self.chunk_key(keys[i], c)) for i, c, _ in group],
                "reading block chunks",
                lost_ok=True,
            )
            for (i, _, _), value in zip(group, replies, strict=True):
                if isinstance(value, _LostShard):
                    unreachable.add(i)
                elif value is None:
                    missing.add(i)
                elif i not in missing and i not in unreachable:
                    take(i, value)
        # A block's chunks share its head's shard, so a block is either lost or unreachable.
        missing -= unreachable
        self._num_unreachable += len(unreachable)
        if missing:
            # A chunk expired or was evicted (allkeys-* maxmemory policies evict chunks one by
            # one): the block is gone, so drop its head and the chunks left behind.
            lost = [m for m in manifests if m[0] in missing]
            log.info("%s: %d chunked block(s) lost a chunk; removing them", self.name, len(lost))
            await self._unlink([k for i, num, _ in lost for k in self._block_keys(keys[i], num)])
        return missing | unreachable

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        # A lost shard fails the batch here, before anything is written: the contract is all or
        # nothing, and the engine writes G4 one block per put, so only that shard's blocks fail.
        present = await self._heads_exist([key for key, _ in items], lost_ok=False)
        new = [item for item, there in zip(items, present, strict=True) if not there]
        if not new:
            return 0
        values = await self._encode([value for _, value in new])
        chunks: list[tuple[str, Buffer]] = []
        heads: list[tuple[str, Buffer]] = []
        cb = self.config.chunk_bytes
        for (key, _), value in zip(new, values, strict=True):
            view = _byte_view(value)
            # The header does not count: a block whose payload fits chunk_bytes stays whole
            # (a 2 MiB block would otherwise be a 2 MiB chunk, a 128-byte chunk and a manifest:
            # three round trips' worth of keys for one block).
            if len(view) <= cb + HEADER_BYTES:
                heads.append((self.head_key(key), view))
                continue
            # Equal parts, each at most chunk_bytes; slices of a memoryview, which redis-py
            # writes to the socket without copying.
            num = -(-len(view) // cb)
            size = -(-len(view) // num)
            chunks.extend(
                (self.chunk_key(key, c), view[c * size : (c + 1) * size]) for c in range(num)
            )
            heads.append((self.head_key(key), _MANIFEST.pack(MANIFEST_MAGIC, num, len(view))))
        written: list[str] = []
        try:
            # Every chunk of the batch lands before any head that points at it, so a reader
            # never follows a manifest to a chunk that is still on its way.
            await self._write(chunks, nx=False, written=written)
            # NX keeps puts idempotent when another node stores the same block concurrently;
            # only the heads this call created count as newly stored.
            return await self._write(heads, nx=True, written=written)
        except TierFullError:
            # All-or-nothing: undo what this batch wrote. Redis accepts deletes when it is out
            # of memory.
            await self._unlink_best_effort(written)
            raise

    async def _encode(self, values: list[Buffer]) -> list[Buffer]:
        codec, level = self.config.codec, self.config.zstd_level
        if codec is Codec.RAW:
            return values

        def one(value: Buffer) -> bytes:
            try:
                return transcode_block(value, codec, level=level)
            except CorruptBlockError as exc:
                raise InvalidArgumentError(f"value is not an intact block: {exc}") from None

        if sum(len(_byte_view(v)) for v in values) < _TRANSCODE_INLINE_BYTES:
            return [one(v) for v in values]
        # zstd releases the GIL, so blocks compress in parallel threads and the event loop
        # keeps serving other requests meanwhile.
        return list(await asyncio.gather(*(asyncio.to_thread(one, v) for v in values)))

    async def _write(self, pairs: list[tuple[str, Buffer]], *, nx: bool, written: list[str]) -> int:
        """SET every pair (``NX`` if asked) with the TTL; the names set go into ``written``."""
        options: tuple[str | int, ...] = ("NX",) if nx else ()
        if self._ttl_ms is not None:
            options += ("PX", self._ttl_ms)
        num_set = 0
        for group in _groups(pairs, lambda p: len(p[1]), _WRITE_ROUND_TRIP_BYTES):
            replies = await self._pipeline(
                [("SET", name, value, *options) for name, value in group],
                "writing blocks",
                check=False,
            )
            # Record what landed before raising for what did not, so it can be undone.
            for (name, _), reply in zip(group, replies, strict=True):
                if reply is True:
                    written.append(name)
                    num_set += 1
            await self._check(replies, "writing blocks")
        return num_set

    async def _delete(self, keys: list[BlockHash]) -> int:
        removed = 0
        for start in range(0, len(keys), _SMALL_COMMANDS_PER_TRIP):
            group = keys[start : start + _SMALL_COMMANDS_PER_TRIP]
            # The head says whether chunks go with it; GETRANGE reads 16 bytes of it, whatever
            # the size of the block.
            prefixes = await self._pipeline(
                [("GETRANGE", self.head_key(k), 0, _MANIFEST.size - 1) for k in group],
                "reading block heads to delete",
            )
            names: list[str] = []
            for key, prefix in zip(group, prefixes, strict=True):
                manifest = parse_manifest(prefix) if prefix else None
                # The head goes first: once it is gone no reader looks for the chunks.
                names.extend(self._block_keys(key, manifest[0] if manifest else 0))
            replies = await self._unlink(names)
            heads = {self.head_key(key) for key in group}
            removed += sum(1 for name, n in zip(names, replies, strict=True) if n and name in heads)
        return removed

    async def _exists(self, keys: list[BlockHash]) -> list[bool]:
        return await self._heads_exist(keys, lost_ok=True)

    async def _heads_exist(self, keys: list[BlockHash], *, lost_ok: bool) -> list[bool]:
        """Whether each block's head is stored; with ``lost_ok`` a lost shard's are False."""
        out: list[bool] = []
        for start in range(0, len(keys), _SMALL_COMMANDS_PER_TRIP):
            group = keys[start : start + _SMALL_COMMANDS_PER_TRIP]
            replies = await self._pipeline(
                [("EXISTS", self.head_key(key)) for key in group],
                "checking block heads",
                lost_ok=lost_ok,
            )
            self._count_unreachable(replies)
            out.extend(not isinstance(n, _LostShard) and bool(n) for n in replies)
        return out

    def _keys(self) -> AsyncIterator[BlockHash]:
        return self._scanned_keys(lost_ok=False)

    async def _scanned_keys(self, *, lost_ok: bool) -> AsyncIterator[BlockHash]:
        # SCAN may return a key more than once; the set keeps each block once.
        seen: set[BlockHash] = set()
        async for page in self._scan_heads(lost_ok=lost_ok):
            for name in page:
                key = self._key_of_head(name)
                if key is not None and key not in seen:
                    seen.add(key)
                    yield key

    async def _usage(self) -> tuple[int, int]:
        # Stats count what the reachable shards hold: a lost shard must not hide the others'
        # numbers, nor num_unreachable, which says why they are lower.
        heads = [self.head_key(key) async for key in self._scanned_keys(lost_ok=True)]
        used = num = 0
        for start in range(0, len(heads), _SMALL_COMMANDS_PER_TRIP):
            group = heads[start : start + _SMALL_COMMANDS_PER_TRIP]
            replies = await self._pipeline(
                [
                    cmd
                    for name in group
                    for cmd in (("STRLEN", name), ("GETRANGE", name, 0, _MANIFEST.size - 1))
                ],
                "measuring blocks",
                lost_ok=True,
            )
            for length, prefix in zip(replies[0::2], replies[1::2], strict=True):
                if not length or isinstance(length, _LostShard) or isinstance(prefix, _LostShard):
                    continue  # expired or deleted since the scan, or its shard was lost since
                manifest = parse_manifest(prefix)
                used += manifest[1] if manifest else length
                num += 1
        return used, num

    async def stats(self) -> RedisTierStats:
        base = await super().stats()
        fields = {name: getattr(base, name) for name in TierStats.__dataclass_fields__}
        return RedisTierStats(**fields, num_unreachable=self._num_unreachable)

    async def close(self) -> None:
        await self._client.aclose()
