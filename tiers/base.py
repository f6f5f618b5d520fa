"""The Tier contract: a dumb, batched, async store of block hash -> encoded block bytes.

Operations, in the order a caller uses them:

1. ``put([(key, block_bytes), ...])`` — all-or-nothing per batch: either every new block fits or
   ``TierFullError`` is raised and nothing is stored. Keys already present are skipped (puts are
   idempotent); the return value counts the blocks newly stored.
2. ``exists(keys)`` / ``get(keys)`` — one answer per key, in order. A miss is ``None``. Tiers whose
   bytes can rot or be changed under us (``verify_reads``: G3 LMDB, G4 Redis) verify every block
   they return; a corrupt one is deleted, counted in ``stats().num_corrupt``, reported to the
   ``on_corrupt`` callback, and returned as ``None``.
   ``get_into(keys, buffers)`` is the same read into buffers the caller owns (Mooncake's
   ``get_into``): no allocation per block, so a caller that reuses pre-faulted buffers reads at
   copy speed. It returns the number of bytes written per key, ``None`` for a miss.
3. ``delete(keys)`` — the number of blocks actually removed.
4. ``iter_keys()`` — every stored key, for rebuilding an index at start.
5. ``stats()`` / ``close()``.

A tier never evicts by itself: placement (a later layer) decides what goes. Values are whole
encoded blocks (``kvstore.core.block_format``); a tier checks the header of what it is given against
the key, so a block can never be stored under another block's name.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

from kvstore.core.block_format import header_block_hash, verify_block
from kvstore.core.errors import ConfigError, CorruptBlockError, InvalidArgumentError
from kvstore.core.keys import DIGEST_BYTES, BlockHash

__all__ = [
    "BlockBytes",
    "Buffer",
    "CorruptionCallback",
    "Read",
    "Tier",
    "TierStats",
    "check_capacity",
    "check_fits",
    "check_header",
]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
BlockBytes = bytes | bytearray
"""What ``get`` returns for a hit: bytes the caller owns (never a view into tier memory)."""
CorruptionCallback = Callable[[str, BlockHash, str], None]
"""Called as ``on_corrupt(tier_name, key, reason)`` when a tier drops a corrupt block."""


@dataclass(frozen=True, slots=True)
class Read:
    """One hit of ``_get_into``: bytes written, and the payload checksum if the tier computed it
    while copying (so verification need not read the block again)."""

    nbytes: int
    payload_xxh3: int | None = None


@dataclass(frozen=True, slots=True)
class TierStats:
    tier: str
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    num_gets: int
    num_hits: int
    num_misses: int
    num_puts: int
    num_deletes: int
    num_corrupt: int
    # Memory tiers (G1, G2) allocate extents of one slab (tiers/slab.py); zero elsewhere.
    allocated_bytes: int = 0  # blocks rounded up to the allocator's granularity
    largest_free_bytes: int = 0  # the largest block that fits without an eviction
    free_extents: int = 0
    fragmentation: float = 0.0  # 1 - largest free extent / free bytes


def check_capacity(component: str, capacity_bytes: int) -> None:
    if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
        raise ConfigError(
            f"{component}.capacity_bytes must be a positive integer, got {capacity_bytes!r}"
        )


class Tier(ABC):
    """Base of every tier. Subclasses implement the underscored methods; this class validates
    arguments, verifies reads where the tier asks for it, and keeps the counters."""

    name: str
    verify_reads: bool = False

    def __init__(
        self, name: str, capacity_bytes: int, on_corrupt: CorruptionCallback | None
    ) -> None:
        check_capacity(name, capacity_bytes)
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.on_corrupt = on_corrupt  # who hears about dropped corrupt blocks; settable
        self._num_gets = self._num_hits = self._num_misses = 0
        self._num_puts = self._num_deletes = self._num_corrupt = 0

    # -- the contract -------------------------------------------------------------------------

    async def get(self, keys: Sequence[bytes]) -> list[BlockBytes | None]:
        keys = _check_keys(keys)
        values = await self._get(keys) if keys else []
        found = [None if v is None else (v, None) for v in values]
        ok = await self._verified(keys, found)
        return [v if good else None for v, good in zip(values, ok, strict=True)]

    async def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        """Read each block into the writable buffer at the same position; ``None`` for a miss.

        A buffer too small for its block raises ``InvalidArgumentError``; buffers before it may
        already have been written.
        """
        keys = _check_keys(keys)
        if len(buffers) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [_writable(b) for b in buffers]
        reads = await self._get_into(keys, views) if keys else []
        if not self.verify_reads:
            hits = sum(r is not None for r in reads)
            self.count_reads(hits, len(keys) - hits)
            return [None if r is None else r.nbytes for r in reads]
        found = [
            None if r is None else (views[i][: r.nbytes], r.payload_xxh3)
            for i, r in enumerate(reads)
        ]
        ok = await self._verified(keys, found)
        return [
            r.nbytes if r is not None and good else None for r, good in zip(reads, ok, strict=True)
        ]

    async def _verified(
        self, keys: list[BlockHash], found: Sequence[tuple[Buffer, int | None] | None]
    ) -> list[bool]:
        """Which reads are hits that pass verification (where the tier asks for it), with the
        counters kept; a corrupt block is reported and deleted. ``found`` holds, per key, the
        bytes read and their payload checksum if the tier computed it while copying."""
        ok = [f is not None for f in found]
        if self.verify_reads:
            corrupt: list[BlockHash] = []
            for i, (key, item) in enumerate(zip(keys, found, strict=True)):
                if item is None:
                    continue
                try:
                    verify_block(key, item[0], payload_xxh3=item[1])
                except CorruptBlockError as exc:
                    ok[i] = False
                    corrupt.append(key)
                    self._report_corrupt(key, str(exc))
            if corrupt:
                await self._delete(corrupt)
        hits = sum(ok)
        self.count_reads(hits, len(keys) - hits)
        return ok

    def count_reads(self, hits: int, misses: int = 0) -> None:
        """Count reads: ``get`` and ``get_into`` do, and so must a caller that copies a memory
        tier's block in place (``PinnedMemoryTier.view_of``), so that the hit figures stay
        whole."""
        self._num_gets += hits + misses
        self._num_hits += hits
        self._num_misses += misses

    async def put(self, items: Sequence[tuple[bytes, Buffer]]) -> int:
        checked: list[tuple[BlockHash, Buffer]] = []
        seen: set[bytes] = set()
        for key, value in items:
            key = _check_key(key)
            check_header(key, value)
            if key not in seen:
                seen.add(key)
                checked.append((key, value))
        stored = await self._put(checked) if checked else 0
        self._num_puts += stored
        return stored

    async def put_with(self, key: bytes, nbytes: int, fill: Callable[[memoryview], int]) -> bool:
        """Store one block that ``fill`` writes into a buffer of ``nbytes`` (Mooncake's
        ``put_from``, the other way round): tiers with their own memory hand out the final
        destination, so the block is written once instead of built and then copied in.

        ``fill`` returns the bytes it wrote. The block becomes visible only after ``fill`` has
        returned and its header checks out against ``key``; False if it was already stored.
        """
        (key,) = _check_keys([key])
        stored = await self._put_with(key, nbytes, fill)
        self._num_puts += stored
        return stored

    async def _put_with(
        self, key: BlockHash, nbytes: int, fill: Callable[[memoryview], int]
    ) -> bool:
        """Default: fill a fresh buffer, then ``put`` it."""
        buf = bytearray(nbytes)
        written = fill(memoryview(buf))
        check_header(key, memoryview(buf)[:written])
        return await self._put([(key, memoryview(buf)[:written])]) == 1

    async def delete(self, keys: Sequence[bytes]) -> int:
        keys = _check_keys(keys)
        removed = await self._delete(keys) if keys else 0
        self._num_deletes += removed
        return removed

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        keys = _check_keys(keys)
        return await self._exists(keys) if keys else []

    def iter_keys(self) -> AsyncIterator[BlockHash]:
        return self._keys()

    async def stats(self) -> TierStats:
        used_bytes, num_blocks = await self._usage()
        extra: dict[str, Any] = {}
        slab = self._slab_stats()
        if slab is not None:
            extra = {
                "allocated_bytes": slab.allocated_bytes,
                "largest_free_bytes": slab.largest_free_bytes,
                "free_extents": slab.free_extents,
                "fragmentation": slab.fragmentation,
            }
        return TierStats(
            tier=self.name,
            capacity_bytes=self.capacity_bytes,
            used_bytes=used_bytes,
            num_blocks=num_blocks,
            num_gets=self._num_gets,
            num_hits=self._num_hits,
            num_misses=self._num_misses,
            num_puts=self._num_puts,
            num_deletes=self._num_deletes,
            num_corrupt=self._num_corrupt,
            **extra,
        )

    def _slab_stats(self) -> Any:
        """The allocator's figures of a memory tier (``tiers.slab.SlabStats``), else None."""
        return None

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- for subclasses -----------------------------------------------------------------------

    def _report_corrupt(self, key: BlockHash, reason: str) -> None:
        self._num_corrupt += 1
        log.warning("%s: dropped corrupt block %s: %s", self.name, key.hex(), reason)
        if self.on_corrupt is not None:
            self.on_corrupt(self.name, key, reason)

    @abstractmethod
    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]: ...

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        """Default: through ``_get`` and one more copy. Tiers that can copy straight from their own
        memory into the caller's buffer override this."""
        out: list[Read | None] = []
        for key, view, value in zip(keys, views, await self._get(keys), strict=True):
            if value is None:
                out.append(None)
                continue
            check_fits(key, len(value), view)
            view[: len(value)] = value
            out.append(Read(len(value)))
        return out

    @abstractmethod
    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        """Store the blocks not yet present, all or none; raise TierFullError if they do not fit."""

    @abstractmethod
    async def _delete(self, keys: list[BlockHash]) -> int: ...

    @abstractmethod
    async def _exists(self, keys: list[BlockHash]) -> list[bool]: ...

    @abstractmethod
    def _keys(self) -> AsyncIterator[BlockHash]: ...

    @abstractmethod
    async def _usage(self) -> tuple[int, int]:
        """``(used_bytes, num_blocks)``."""


def check_header(key: BlockHash, value: Buffer) -> None:
    """Refuse (InvalidArgumentError) a value that is not a block stored under ``key``."""
    try:
        named = header_block_hash(value)
    except CorruptBlockError as exc:
        raise InvalidArgumentError(f"value for block {key.hex()} is not a block: {exc}") from None
    if named != key:
        raise InvalidArgumentError(f"value for block {key.hex()} is block {named.hex()}")


def check_fits(key: bytes, nbytes: int, view: memoryview) -> None:
    if nbytes > len(view):
        raise InvalidArgumentError(
            f"buffer of {len(view)} bytes is too small for block {key.hex()} of {nbytes} bytes"
        )


def _writable(buffer: Any) -> memoryview:
    if hasattr(buffer, "numpy") and hasattr(buffer, "is_contiguous"):  # a CPU torch tensor
        buffer = buffer.numpy()
    try:
        view = memoryview(buffer)
    except TypeError:
        raise InvalidArgumentError(f"{type(buffer).__name__} is not a buffer") from None
    if view.readonly:
        raise InvalidArgumentError("get_into needs writable buffers (bytearray, numpy, tensor)")
    if not view.c_contiguous:
        raise InvalidArgumentError("get_into needs contiguous buffers")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_keys(keys: Sequence[bytes]) -> list[BlockHash]:
    if isinstance(keys, bytes | bytearray | memoryview):
        raise InvalidArgumentError("keys must be a list of block hashes, not one bytes object")
    return [_check_key(key) for key in keys]


def _check_key(key: Any) -> BlockHash:
    if type(key) is bytes and len(key) == DIGEST_BYTES:  # the common case, no copy
        return BlockHash(key)
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != DIGEST_BYTES:
        raise InvalidArgumentError(
            f"a block hash is {DIGEST_BYTES} bytes; got {type(key).__name__} "
            f"of length {len(key) if hasattr(key, '__len__') else '?'}"
        )
    return BlockHash(bytes(key))
