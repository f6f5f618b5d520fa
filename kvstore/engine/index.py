"""The block index: where every block is, and what may not be moved. Pure bookkeeping, no I/O.

Operations, in the order the engine uses them:

1. ``begin_write(key, tier, ...)`` -> ``commit_write`` / ``abort_write`` — a block being written
   into a tier is neither readable there nor evictable (two-phase, as vLLM's offload manager).
2. ``hottest(key)`` / ``tiers_of(key)`` — residency for lookups and reads.
3. ``touch(keys)`` — recency; a prompt's blocks are touched last-to-first so that a parent is
   always more recent than its descendants (see ``victims``).
4. ``add_lease`` / ``release_lease`` / ``expire`` and ``pin`` / ``unpin`` — protection.
5. ``victims(tier, nbytes)`` — the blocks to evict from a tier: LRU, leaf-first along hash chains,
   skipping pinned, leased and in-flight blocks.
6. ``remove(key, tier)`` — the block left that tier.

Every operation is O(1) in the number of blocks, except ``expire`` (O(log n) per expired lease or
pin, through a heap) and ``victims`` (O(number skipped + number chosen)).

Leaf-first without a scan: a block is evictable from tier T only while none of its children is
resident in T (``children[T] == 0``), so eviction never punches a hole into a chain held in T.
Because every touch covers a whole prefix from its last block back to its first, a parent is
never less recent than its children, and the least-recently-used end of a tier's LRU list is
made of leaves; ``victims`` walks from that end and skips the few blocks that are not (a block
promoted into a tier after its child, a leased block, a pinned one).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import BlockHash

__all__ = ["TIER_NAMES", "BlockEntry", "BlockIndex", "Lease"]

TIER_NAMES = ("G1", "G2", "G3", "G4")
_NUM_TIERS = len(TIER_NAMES)
_LEVEL = {name: i for i, name in enumerate(TIER_NAMES)}
# ``BlockEntry.resident`` (bit i: readable in TIER_NAMES[i]) -> the hottest of those tiers, and
# -> the one level it holds when it is a single bit (else -1: none or several).
_HOTTEST: tuple[str | None, ...] = (
    None,
    *(TIER_NAMES[(bits & -bits).bit_length() - 1] for bits in range(1, 1 << _NUM_TIERS)),
)
_SOLE_LEVEL: tuple[int, ...] = tuple(
    bits.bit_length() - 1 if bits and not bits & (bits - 1) else -1
    for bits in range(1 << _NUM_TIERS)
)


@dataclass(slots=True)
class BlockEntry:
    key: BlockHash
    namespace: bytes
    parent: BlockHash | None
    nbytes: int
    # Bit i set: readable in tier TIER_NAMES[i] / being written there.
    resident: int = 0
    writing: int = 0
    children: list[int] = field(default_factory=lambda: [0] * _NUM_TIERS)
    last_access: int = 0
    hits: int = 0
    leases: int = 0
    pins: int = 0
    pin_until: float | None = None
    owner: str = ""  # the tenant that stored it first; charged for it in owner_bytes

    def tiers(self) -> list[str]:
        return [name for i, name in enumerate(TIER_NAMES) if self.resident >> i & 1]


class _Absent:
    """What ``hottest_many`` reads for a key the index does not hold: readable nowhere."""

    __slots__ = ()
    resident = 0


_ABSENT = _Absent()


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: int
    keys: tuple[BlockHash, ...]
    expires_at: float


class BlockIndex:
    def __init__(self, costs: dict[str, Callable[[int], int]] | None = None) -> None:
        """``costs``: for tiers whose blocks take more room than their bytes (G1, G2 round each
        block up to their allocator's granularity, G1 keeps the header aside), what a block of
        ``nbytes`` costs there; the byte counts of those tiers are in that cost."""
        self._cost = [(costs or {}).get(name) for name in TIER_NAMES]
        self._entries: dict[BlockHash, BlockEntry] = {}
        self._lru: list[OrderedDict[BlockHash, None]] = [OrderedDict() for _ in TIER_NAMES]
        self._bytes = [0] * _NUM_TIERS
        self._clock = 0  # the last ``BlockEntry.last_access`` given out
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, Lease] = {}
        self._lease_heap: list[tuple[float, int]] = []
        self._pin_heap: list[tuple[float, BlockHash]] = []
        self._owner_bytes: dict[str, int] = {}

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: BlockHash) -> BlockEntry | None:
        return self._entries.get(key)

    def hottest(self, key: BlockHash) -> str | None:
        """The hottest tier where ``key`` is readable, or None."""
        entry = self._entries.get(key)
        return None if entry is None else _HOTTEST[entry.resident]

    def hottest_many(self, keys: Sequence[BlockHash]) -> list[str | None]:
        """``hottest`` of each of ``keys``, in one call: what a lookup asks of every block."""
        # The dict read directly, a missing key read as an entry held nowhere, the tier from a
        # table: a ``hottest`` call per block took twice as long as this whole walk.
        get = self._entries.get
        absent = _ABSENT
        resident = [get(key, absent).resident for key in keys]
        hottest = _HOTTEST
        # Most prompts are held in one tier throughout: counted in C, one list made in C.
        if resident and resident.count(resident[0]) == len(resident):
            return [hottest[resident[0]]] * len(resident)
        return [hottest[bits] for bits in resident]

    def tiers_of(self, key: BlockHash) -> list[str]:
        entry = self._entries.get(key)
        return [] if entry is None else entry.tiers()

    def in_tier(self, key: BlockHash, tier: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and bool(entry.resident >> _LEVEL[tier] & 1)

    def _charge(self, entry: BlockEntry, level: int) -> int:
        cost = self._cost[level]
        return entry.nbytes if cost is None else cost(entry.nbytes)

    def charge(self, tier: str, nbytes: int) -> int:
        """What a block of ``nbytes`` costs in ``tier``."""
        cost = self._cost[_LEVEL[tier]]
        return nbytes if cost is None else cost(nbytes)

    def bytes_in(self, tier: str) -> int:
        """Bytes readable or being written in ``tier``, by the index's own count."""
        return self._bytes[_LEVEL[tier]]

    def num_in(self, tier: str) -> int:
        return len(self._lru[_LEVEL[tier]])

    def keys_in(self, tier: str) -> Iterator[BlockHash]:
        """Readable keys of a tier, least recently used first."""
        return iter(list(self._lru[_LEVEL[tier]]))

    def entries(self) -> Iterator[BlockEntry]:
        return iter(list(self._entries.values()))

    def is_protected(self, key: BlockHash) -> bool:
        """Leased or pinned: must not be evicted or demoted."""
        entry = self._entries.get(key)
        return entry is not None and (entry.leases > 0 or entry.pins > 0)

    # -- writes into tiers ---------------------------------------------------------------------

    def owner_bytes(self, owner: str) -> int:
        """Bytes of the distinct blocks ``owner`` stored that are still held somewhere here."""
        return self._owner_bytes.get(owner, 0)

    def _entry(
        self,
        key: BlockHash,
        namespace: bytes,
        parent: BlockHash | None,
        nbytes: int,
        owner: str = "",
    ) -> BlockEntry:
        entry = self._entries.get(key)
        if entry is None:
            self._clock += 1
            entry = BlockEntry(key, namespace, parent, nbytes, last_access=self._clock, owner=owner)
            self._entries[key] = entry
            self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + nbytes
        elif entry.parent is None and parent is not None:
            entry.parent = parent  # learned later (a G4 probe does not know it)
        return entry

    def begin_write(
        self,
        key: BlockHash,
        tier: str,
        *,
        namespace: bytes,
        parent: BlockHash | None,
        nbytes: int,
        owner: str = "",
    ) -> bool:
        """Reserve ``key`` in ``tier``; False if it is already there or on its way."""
        entry = self._entry(key, namespace, parent, nbytes, owner)
        bit = 1 << _LEVEL[tier]
        if (entry.resident | entry.writing) & bit:
            return False
        entry.writing |= bit
        self._bytes[_LEVEL[tier]] += self._charge(entry, _LEVEL[tier])
        return True

    def commit_write(self, key: BlockHash, tier: str) -> None:
        entry = self._entries[key]
        level = _LEVEL[tier]
        bit = 1 << level
        entry.writing &= ~bit
        entry.resident |= bit
        self._lru[level][key] = None
        if entry.parent is not None:
            parent = self._entries.get(entry.parent)
            if parent is not None:
                parent.children[level] += 1

    def abort_write(self, key: BlockHash, tier: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        level = _LEVEL[tier]
        if entry.writing >> level & 1:
            entry.writing &= ~(1 << level)
            self._bytes[level] -= self._charge(entry, level)
        self._drop_if_gone(entry)

    def add_resident(
        self, key: BlockHash, tier: str, *, namespace: bytes, parent: BlockHash | None, nbytes: int
    ) -> None:
        """Record a block found already stored in ``tier`` (restart, G4 probe)."""
        if self.begin_write(key, tier, namespace=namespace, parent=parent, nbytes=nbytes):
            self.commit_write(key, tier)
            # Found, not used: the oldest position in the tier's LRU.
            self._lru[_LEVEL[tier]].move_to_end(key, last=False)

    def remove(self, key: BlockHash, tier: str) -> bool:
        """``key`` is no longer in ``tier``; False if the index did not have it there."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        level = _LEVEL[tier]
        bit = 1 << level
        if not entry.resident & bit:
            return False
        entry.resident &= ~bit
        self._bytes[level] -= self._charge(entry, level)
        del self._lru[level][key]
        if entry.parent is not None:
            parent = self._entries.get(entry.parent)
            if parent is not None:
                parent.children[level] -= 1
        self._drop_if_gone(entry)
        return True

    def _drop_if_gone(self, entry: BlockEntry) -> None:
        if entry.resident or entry.writing or entry.leases or entry.pins:
            return
        del self._entries[entry.key]
        self._owner_bytes[entry.owner] -= entry.nbytes

    # -- recency -------------------------------------------------------------------------------

    def touch(self, keys: Sequence[BlockHash], *, hit: bool = False) -> None:
        """Mark a prefix as used, last block first, so parents stay more recent than children.

        Every tier a block is readable in moves it to its most recent end; ``hit`` counts a hit
        on each block."""
        # Every lookup and read pays this per block: the names bound here, the clock a local
        # int, and a block readable in one tier (most are) moved without a walk over its bits.
        # Half the time of the plain loop.
        get = self._entries.get
        moves = [lru.move_to_end for lru in self._lru]
        sole = _SOLE_LEVEL
        clock = self._clock
        try:
            for key in reversed(keys):
                entry = get(key)
                if entry is None:
                    continue
                clock += 1
                entry.last_access = clock
                if hit:
                    entry.hits += 1
                level = sole[entry.resident]
                if level >= 0:
                    moves[level](key)
                    continue
                resident = entry.resident
                level = 0
                while resident:
                    if resident & 1:
                        moves[level](key)
                    resident >>= 1
                    level += 1
        finally:
            self._clock = clock

    # -- leases and pins -----------------------------------------------------------------------

    def add_lease(self, keys: Iterable[BlockHash], ttl_s: float, now: float) -> Lease:
        if not ttl_s > 0:
            raise InvalidArgumentError(f"a lease needs a positive ttl, got {ttl_s}")
        held = tuple(dict.fromkeys(k for k in keys if k in self._entries))
        lease = Lease(next(self._lease_ids), held, now + ttl_s)
        for key in held:
            self._entries[key].leases += 1
        self._leases[lease.lease_id] = lease
        heapq.heappush(self._lease_heap, (lease.expires_at, lease.lease_id))
        return lease

    def release_lease(self, lease_id: int) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        for key in lease.keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases -= 1
                self._drop_if_gone(entry)
        return True

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    def lease(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def pin(self, keys: Iterable[BlockHash], ttl_s: float | None, now: float) -> int:
        """Pin the keys the index knows; returns how many. A TTL pin unpins itself on expiry."""
        count = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.pins = 1
            if ttl_s is None:
                entry.pin_until = None
            else:
                entry.pin_until = now + ttl_s
                heapq.heappush(self._pin_heap, (entry.pin_until, key))
            count += 1
        return count

    def unpin(self, keys: Iterable[BlockHash]) -> int:
        count = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry.pins:
                entry.pins = 0
                entry.pin_until = None
                count += 1
                self._drop_if_gone(entry)
        return count

    def expire(self, now: float) -> tuple[int, int]:
        """Reclaim leases and pins whose time is up; returns ``(leases, pins)`` reclaimed."""
        leases = pins = 0
        while self._lease_heap and self._lease_heap[0][0] <= now:
            _, lease_id = heapq.heappop(self._lease_heap)
            leases += self.release_lease(lease_id)
        while self._pin_heap and self._pin_heap[0][0] <= now:
            until, key = heapq.heappop(self._pin_heap)
            entry = self._entries.get(key)
            # A later pin or unpin replaced this one: only the pin with this deadline expires.
            if entry is not None and entry.pins and entry.pin_until == until:
                pins += self.unpin([key])
        return leases, pins

    # -- eviction ------------------------------------------------------------------------------

    def victims(self, tier: str, nbytes: int) -> list[BlockHash]:
        """Up to ``nbytes`` worth of blocks to evict from ``tier``, least recently used first.

        Walking in LRU order reaches a block's children (less recent) before the block itself, so
        choosing the last child of a block makes that block a leaf by the time the walk gets to
        it: one call can take a cold chain whole, from its tail inwards.
        """
        level = _LEVEL[tier]
        chosen: list[BlockHash] = []
        freed = 0
        released: dict[BlockHash, int] = {}  # children chosen in this pass, per parent
        for key in list(self._lru[level]):
            if freed >= nbytes:
                break
            entry = self._entries[key]
            if entry.leases or entry.pins or entry.writing >> level & 1:
                continue
            if entry.children[level] - released.get(key, 0) > 0:
                continue
            chosen.append(key)
            freed += self._charge(entry, level)
            if entry.parent is not None:
                released[entry.parent] = released.get(entry.parent, 0) + 1
        return chosen
