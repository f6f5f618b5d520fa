"""Fixed-size slot bookkeeping shared by the slab tiers (G1 GPU memory, G2 shared memory).

Bookkeeping only: which slot holds which block and how many of its bytes are used. The tiers own
the memory and do the copies. A slab of equal slots never fragments, and a free list makes
allocation O(1); the price is that a block larger than a slot cannot be stored at all (refused with
``BlockTooLargeError``) and a small block wastes the rest of its slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

from kvstore.core.errors import BlockTooLargeError, ConfigError, TierFullError
from kvstore.core.keys import BlockHash
from tiers.base import Tier

__all__ = ["SlotTable", "SlotTier"]


class SlotTable:
    def __init__(self, tier: str, capacity_bytes: int, slot_bytes: int) -> None:
        if not isinstance(slot_bytes, int) or slot_bytes <= 0:
            raise ConfigError(f"{tier}.slot_bytes must be a positive integer, got {slot_bytes!r}")
        if capacity_bytes < slot_bytes:
            raise ConfigError(
                f"{tier}.capacity_bytes ({capacity_bytes}) is smaller than one slot ({slot_bytes})"
            )
        self.tier = tier
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        # Reversed so that slot 0 is handed out first: easier to read in dumps, no other reason.
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._where: dict[BlockHash, tuple[int, int]] = {}
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[BlockHash]:
        return iter(list(self._where))

    def lookup(self, key: BlockHash) -> tuple[int, int] | None:
        """``(slot, nbytes)`` of a stored block."""
        return self._where.get(key)

    def allocate(self, sizes: Sequence[tuple[BlockHash, int]]) -> list[int]:
        """Slots for all of ``sizes`` or none: refuses oversize blocks, raises when full.

        The caller copies the bytes in, then calls ``commit`` for each; until then the key is not
        visible to ``lookup``, so a block being written is never read.
        """
        for key, n in sizes:
            if n > self.slot_bytes:
                raise BlockTooLargeError(
                    f"{self.tier}: block {key.hex()} is {n} bytes, larger than a slot "
                    f"({self.slot_bytes} bytes); raise slot_bytes"
                )
        if len(sizes) > len(self._free):
            raise TierFullError(
                self.tier, f"needs {len(sizes)} slots, {len(self._free)} of {self.num_slots} free"
            )
        return [self._free.pop() for _ in sizes]

    def commit(self, key: BlockHash, slot: int, nbytes: int) -> None:
        self._where[key] = (slot, nbytes)
        self.used_bytes += nbytes

    def release(self, slots: Sequence[int]) -> None:
        """Give back slots that were allocated but never committed (a failed copy)."""
        self._free.extend(slots)

    def remove(self, key: BlockHash) -> bool:
        where = self._where.pop(key, None)
        if where is None:
            return False
        self._free.append(where[0])
        self.used_bytes -= where[1]
        return True


class SlotTier(Tier):
    """A tier whose blocks a ``SlotTable`` tracks (G1, G2): membership and listing come from it."""

    _slots: SlotTable

    async def _exists(self, keys: list[BlockHash]) -> list[bool]:
        return [k in self._slots for k in keys]

    async def _keys(self) -> AsyncIterator[BlockHash]:
        for key in self._slots:
            yield key
