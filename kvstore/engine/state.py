"""What the parts of the engine share: its results, the queued move, the counters, and
``EngineState``, the state every part reads (tiers, index, placement, queue, events) with the
helpers all of them use. ``WritePath`` (writes.py) and ``ReadPath`` (reads.py) build on it in that
order, and ``Engine`` (engine.py) on them; the module docstring of engine.py has the call order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kvstore.core.block_format import NO_PARENT, encode_block_into
from kvstore.core.errors import InvalidArgumentError, TierError
from kvstore.core.keys import DIGEST_BYTES, BlockHash, ExtraKey, ModelSpec, block_hashes
from kvstore.engine.config import EngineConfig, StoreLayout
from kvstore.engine.events import EventLog
from kvstore.engine.index import TIER_NAMES, BlockIndex
from kvstore.engine.placement import Placement
from tiers.base import Tier, TierStats
from tiers.slab import SlabTier

__all__ = ["EngineState", "EngineStats", "LookupResult", "ProgressCallback", "PutResult"]

log = logging.getLogger("kvstore.engine.engine")
ProgressCallback = Callable[[int, int], None]


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



@dataclass(slots=True)
class _Counters:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n



class _Buffers:
    """Reused buffers for copies between tiers (the event loop's only: no lock). Fresh memory
    page-faults on first touch (~10 ms per 32 MiB here); a few buffers of at most ``max_bytes``
    are kept for the next copy."""

    def __init__(self, keep: int = 4, max_bytes: int = 64 << 20) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._max_bytes = max_bytes

    def take(self, nbytes: int) -> bytearray:
        for i, buf in enumerate(self._free):
            if len(buf) >= nbytes:
                return self._free.pop(i)
        return bytearray(nbytes)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self._keep and len(buf) <= self._max_bytes:
            self._free.append(buf)


class EngineState:
    def __init__(
        self,
        config: StoreLayout,
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
        self.index = BlockIndex({n: t.cost for n, t in tiers.items() if isinstance(t, SlabTier)})
        self.events = EventLog(self.engine_config.event_log_size)
        self.counters = _Counters()
        self._queue: asyncio.Queue[_Move] = asyncio.Queue(self.engine_config.move_queue_blocks)
        self._promote_data_bytes = 0  # held by queued promotions (``_Move.data``)
        self._staging = _Buffers()  # copies out of G2 (``WritePath._copy_once``)
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


    def hashes(
        self,
        spec: ModelSpec,
        tokens: Sequence[int] | Any,
        *,
        salt: bytes = b"",
        extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    ) -> list[BlockHash]:
        return block_hashes(spec, tokens, salt=salt, extra_keys=extra_keys)


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

