"""Best-fit allocation of byte extents inside one preallocated region: the offset allocator that the
memory tiers (tiers/slab.py: G1, G2) and a same-host client's segments (client/same_host.py) share.

The free space is a set of extents, kept sorted by size for a best fit and keyed by their start and
their end, so that a freed extent merges with its free neighbours at once (the design of
Mooncake's and of Sebastian Aaltonen's OffsetAllocator, in its simplest form). Every allocation is
rounded up to ``granularity`` bytes: 256 by default, so that payloads stay aligned for every dtype
and for DMA, and a 64 KiB block wastes 128 bytes of it. Its cost is external fragmentation — free
bytes split into extents too small for the next request — which ``stats()`` measures as
``1 - largest free extent / free bytes``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["GRANULARITY", "Extents", "SlabStats"]

GRANULARITY = 256


@dataclass(frozen=True, slots=True)
class SlabStats:
    allocated_bytes: int  # handed out, blocks rounded up to the granularity
    free_bytes: int
    largest_free_bytes: int
    free_extents: int

    @property
    def fragmentation(self) -> float:
        """External fragmentation: 0 when the free bytes are one extent, towards 1 as they split."""
        if not self.free_bytes:
            return 0.0
        return 1.0 - self.largest_free_bytes / self.free_bytes


class Extents:
    """Best-fit allocation of byte extents in ``[0, capacity)``, coalesced on free."""

    def __init__(self, capacity: int, granularity: int = GRANULARITY) -> None:
        self.granularity = granularity
        self.capacity = capacity // granularity * granularity
        self._by_start: dict[int, int] = {}  # start -> size of a free extent
        self._by_end: dict[int, int] = {}  # end -> start of a free extent
        self._sizes: list[tuple[int, int]] = []  # (size, start) of the free extents, sorted
        self.allocated = 0
        if self.capacity:
            self._add(0, self.capacity)

    def cost(self, nbytes: int) -> int:
        """What an allocation of ``nbytes`` takes: rounded up to the granularity."""
        g = self.granularity
        return -(-max(nbytes, 1) // g) * g

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.allocated

    @property
    def largest_free(self) -> int:
        return self._sizes[-1][0] if self._sizes else 0

    def allocate(self, nbytes: int) -> int | None:
        """The start of a free extent of ``cost(nbytes)`` bytes (the smallest that fits, lowest
        start among equals), or None when no free extent is large enough."""
        size = self.cost(nbytes)
        i = bisect.bisect_left(self._sizes, (size, -1))
        if i == len(self._sizes):
            return None
        free_size, start = self._sizes[i]
        self._remove(start, free_size, i)
        if free_size > size:
            self._add(start + size, free_size - size)
        self.allocated += size
        return start

    def free(self, start: int, nbytes: int) -> None:
        """Give back an extent that ``allocate(nbytes)`` returned, merged with free neighbours."""
        size = self.cost(nbytes)
        self.allocated -= size
        end = start + size
        before = self._by_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            start = before
        after = self._by_start.get(end)
        if after is not None:
            self._remove(end, after)
            end += after
        self._add(start, end - start)

    def fits(self, sizes: Sequence[int]) -> bool:
        """Whether ``allocate`` would succeed for every one of ``sizes`` in turn (nothing is
        allocated): best fit, largest first, against a copy of the free extents."""
        need = sorted((self.cost(n) for n in sizes), reverse=True)
        if sum(need) > self.free_bytes:
            return False
        if not need or (len(need) == 1 and need[0] <= self.largest_free):
            return True
        free = [size for size, _ in self._sizes]
        for size in need:
            i = bisect.bisect_left(free, size)
            if i == len(free):
                return False
            rest = free.pop(i) - size
            if rest:
                bisect.insort(free, rest)
        return True

    def stats(self) -> SlabStats:
        return SlabStats(self.allocated, self.free_bytes, self.largest_free, len(self._sizes))

    def _add(self, start: int, size: int) -> None:
        self._by_start[start] = size
        self._by_end[start + size] = start
        bisect.insort(self._sizes, (size, start))

    def _remove(self, start: int, size: int, index: int | None = None) -> None:
        del self._by_start[start]
        del self._by_end[start + size]
        if index is None:
            index = bisect.bisect_left(self._sizes, (size, start))
        del self._sizes[index]
