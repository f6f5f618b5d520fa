"""The event log: what happened to blocks (stored, removed, moved between tiers, corrupt), in
order, with sequence numbers, for watchers (the Watch RPC, KV-aware routers).

A bounded ring: a watcher that falls further behind than the log holds is told so (``since``
returns None) and must start again from a snapshot instead of silently missing events.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from kvstore.core.keys import BlockHash

__all__ = ["Event", "EventKind", "EventLog"]

EventKind = Literal["stored", "removed", "moved", "corrupt"]


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    kind: EventKind
    key: BlockHash
    tier: str  # where the block is now (stored, moved) or was (removed, corrupt)
    namespace: bytes
    parent: BlockHash | None = None
    from_tier: str | None = None  # for "moved": where the copy came from
    time_s: float = 0.0
    # For "removed": why. "capacity": the tier passed its high watermark; "fragmentation": its
    # free bytes were split into extents too small for the incoming blocks; "request": Evict or
    # Flush.
    reason: str | None = None


class EventLog:
    def __init__(self, capacity: int = 65536) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._next_seq = 1
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest event (0 when none yet)."""
        return self._next_seq - 1

    def append(
        self,
        kind: EventKind,
        key: BlockHash,
        tier: str,
        namespace: bytes,
        parent: BlockHash | None = None,
        from_tier: str | None = None,
        reason: str | None = None,
    ) -> Event:
        event = Event(
            self._next_seq, kind, key, tier, namespace, parent, from_tier, time.time(), reason
        )
        self._next_seq += 1
        self._events.append(event)
        # Wake every waiter once, then arm a fresh Event for the next round.
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    def since(self, seq: int) -> list[Event] | None:
        """Events after ``seq``; None if some of them were already dropped from the ring."""
        if seq >= self.last_seq:
            return []
        oldest = self._events[0].seq if self._events else self._next_seq
        if seq + 1 < oldest:
            return None
        start = seq + 1 - oldest
        return [self._events[i] for i in range(start, len(self._events))]

    async def wait(self, seq: int, timeout_s: float | None = None) -> None:
        """Return once an event newer than ``seq`` exists (or the timeout passes)."""
        if self.last_seq > seq:
            return
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout_s)
        except TimeoutError:
            return
