"""``DictTier``: an in-memory tier on a plain dict, for tests about policy alone.

It passes the same contract as the real tiers; nothing in production uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvstore.core.errors import TierFullError
from kvstore.core.keys import BlockHash
from tiers.base import BlockBytes, Buffer, CorruptionCallback, Tier

__all__ = ["DictTier", "DictTierConfig"]


@dataclass(frozen=True, slots=True)
class DictTierConfig:
    capacity_bytes: int
    name: str = "dict"


class DictTier(Tier):
    def __init__(
        self, config: DictTierConfig, on_corrupt: CorruptionCallback | None = None
    ) -> None:
        super().__init__(config.name, config.capacity_bytes, on_corrupt)
        self._blocks: dict[BlockHash, bytes] = {}
        self._used_bytes = 0

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        return [self._blocks.get(k) for k in keys]

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        new = [(k, v) for k, v in items if k not in self._blocks]
        need = sum(len(v) for _, v in new)
        if self._used_bytes + need > self.capacity_bytes:
            raise TierFullError(
                self.name, f"needs {need} bytes, {self.capacity_bytes - self._used_bytes} free"
            )
        for k, v in new:
            self._blocks[k] = bytes(v)
        self._used_bytes += need
        return len(new)

    async def _delete(self, keys: list[BlockHash]) -> int:
        removed = 0
        for k in keys:
            v = self._blocks.pop(k, None)
            if v is not None:
                self._used_bytes -= len(v)
                removed += 1
        return removed

    async def _exists(self, keys: list[BlockHash]) -> list[bool]:
        return [k in self._blocks for k in keys]

    async def _keys(self) -> AsyncIterator[BlockHash]:
        for k in list(self._blocks):
            yield k

    async def _usage(self) -> tuple[int, int]:
        return self._used_bytes, len(self._blocks)

    async def close(self) -> None:
        self._blocks.clear()
        self._used_bytes = 0
