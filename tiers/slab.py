"""Variable-size allocation inside one preallocated slab, shared by the memory tiers (G1 GPU
memory, G2 shared memory).

Bookkeeping only: which extent of the slab holds which block (the allocator itself,
``kvstore.core.extents.Extents``, is shared with the same-host clients' segments). The tiers own
the memory and do the copies.

What a fixed-slot slab could not do, this does: blocks of any size up to the tier's capacity share
one slab, and a tier is full when its bytes run out, not its slots. The price is external
fragmentation — free bytes split into extents too small for the next block — which ``stats()``
measures (``1 - largest free extent / free bytes``) and which placement answers by evicting more
(``fits`` says whether a batch fits before anything is written).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

from kvstore.core.errors import BlockTooLargeError, ConfigError, TierFullError
from kvstore.core.extents import GRANULARITY, Extents, SlabStats
from kvstore.core.keys import BlockHash
from tiers.base import Tier

__all__ = ["GRANULARITY", "Extents", "SlabStats", "SlabTable", "SlabTier"]


class SlabTable:
    """Which extent of a slab holds which block: ``key -> (offset, nbytes)``."""

    def __init__(self, tier: str, capacity_bytes: int, granularity: int = GRANULARITY) -> None:
        if capacity_bytes < granularity:
            raise ConfigError(
                f"{tier}.capacity_bytes ({capacity_bytes}) is smaller than the allocation "
                f"granularity ({granularity} bytes)"
            )
        self.tier = tier
        self._extents = Extents(capacity_bytes, granularity)
        self.capacity = self._extents.capacity
        self._where: dict[BlockHash, tuple[int, int]] = {}
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[BlockHash]:
        return iter(list(self._where))

    def cost(self, nbytes: int) -> int:
        return self._extents.cost(nbytes)

    def lookup(self, key: BlockHash) -> tuple[int, int] | None:
        """``(offset, nbytes)`` of a stored block."""
        return self._where.get(key)

    def fits(self, sizes: Sequence[int]) -> bool:
        return self._extents.fits(sizes)

    def allocate(self, sizes: Sequence[tuple[BlockHash, int]]) -> list[int]:
        """Offsets for all of ``sizes`` or none: refuses a block larger than the tier, raises
        ``TierFullError`` when the free extents cannot take them all.

        The caller copies the bytes in, then calls ``commit`` for each (or ``release`` for a failed
        copy); until then the key is not visible to ``lookup``, so a block being written is never
        read.
        """
        cost = self._extents.cost
        costs = [cost(n) for _, n in sizes]
        for (key, n), c in zip(sizes, costs, strict=True):
            if c > self.capacity:
                raise BlockTooLargeError(
                    f"{self.tier}: block {key.hex()} is {n} bytes, larger than the whole tier "
                    f"({self.capacity} bytes); raise {self.tier.lower()}.capacity_bytes"
                )
        if len(sizes) > 1:
            # One extent for the whole batch when there is one: one best-fit search instead of
            # one per block, and the blocks of a prompt side by side. Each block is freed on its
            # own later; the allocator merges whatever is freed next to each other.
            start = self._extents.allocate(sum(costs))
            if start is not None:
                offsets = [start]
                for c in costs[:-1]:
                    offsets.append(offsets[-1] + c)
                return offsets
        offsets = []
        for key, n in sizes:
            offset = self._extents.allocate(n)
            if offset is None:
                self.release([(o, m) for o, (_, m) in zip(offsets, sizes, strict=False)])
                stats = self._extents.stats()
                raise TierFullError(
                    self.tier,
                    f"no free extent of {self.cost(n)} bytes for block {key.hex()}: "
                    f"{stats.free_bytes} of {self.capacity} bytes free, the largest extent "
                    f"{stats.largest_free_bytes} bytes",
                )
            offsets.append(offset)
        return offsets

    def commit(self, key: BlockHash, offset: int, nbytes: int) -> None:
        self._where[key] = (offset, nbytes)
        self.used_bytes += nbytes

    def release(self, extents: Sequence[tuple[int, int]]) -> None:
        """Give back ``(offset, nbytes)`` extents allocated but never committed (a failed copy)."""
        for offset, n in extents:
            self._extents.free(offset, n)

    def shrink(self, offset: int, allocated: int, nbytes: int) -> None:
        """Keep only the first ``nbytes`` of an uncommitted allocation of ``allocated`` bytes (a
        fill wrote less than it was given): the rest goes back to the free extents."""
        keep = self.cost(nbytes)
        if keep < self.cost(allocated):
            self._extents.free(offset + keep, self.cost(allocated) - keep)

    def remove(self, key: BlockHash) -> bool:
        where = self._where.pop(key, None)
        if where is None:
            return False
        self._extents.free(*where)
        self.used_bytes -= where[1]
        return True

    def stats(self) -> SlabStats:
        return self._extents.stats()


class SlabTier(Tier):
    """A tier whose blocks a ``SlabTable`` tracks (G1, G2): membership, listing, the cost of a
    block and whether a batch fits come from it."""

    _slab: SlabTable

    def cost(self, nbytes: int) -> int:
        """Slab bytes a block of ``nbytes`` (header included) takes in this tier."""
        return self._slab.cost(self._stored_nbytes(nbytes))

    def fits(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of ``sizes`` (header included) would all be stored now."""
        return self._slab.fits([self._stored_nbytes(n) for n in sizes])

    def slab_stats(self) -> SlabStats:
        return self._slab.stats()

    def _slab_stats(self) -> SlabStats:
        return self.slab_stats()

    def check_size(self, nbytes: int) -> None:
        """Refuse (``BlockTooLargeError``) a block that could not fit even in the empty tier."""
        if self.cost(nbytes) > self._slab.capacity:
            raise BlockTooLargeError(
                f"{self.name}: a block of {nbytes} bytes is larger than the whole tier "
                f"({self._slab.capacity} bytes); raise {self.name.lower()}.capacity_bytes"
            )

    def _stored_nbytes(self, nbytes: int) -> int:
        """The bytes of a block of ``nbytes`` that live in the slab (G1 keeps headers aside)."""
        return nbytes

    async def _exists(self, keys: list[BlockHash]) -> list[bool]:
        return [k in self._slab for k in keys]

    async def _keys(self) -> AsyncIterator[BlockHash]:
        for key in self._slab:
            yield key
