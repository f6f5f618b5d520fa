"""What the client calls return: small frozen dataclasses, free of generated protobuf types.

Tiers are named ``"G1"`` .. ``"G4"``; a missing block is ``None``. Hashes are the 16-byte
``BlockHash`` values the server computed with the tenant's secret salt: use them with ``pin``,
``unpin``, ``evict`` and ``inspect``, never to guess another tenant's blocks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from kvstore.core.errors import KVStoreError
from kvstore.core.keys import BlockHash, ModelSpec

__all__ = [
    "BlockInfo",
    "Event",
    "Lease",
    "Lookup",
    "PutResult",
    "Repair",
    "Stats",
    "TierUsage",
    "WorkerInfo",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where each full block of a prompt is; nothing is held (take a lease to load safely)."""

    hashes: list[BlockHash]
    tiers: list[str | None]  # per full block: "G1".."G4", or None when missing
    hit_blocks: int  # the leading run of present blocks: the usable prefix
    hit_tokens: int
    holes: list[int]  # missing blocks with a present block after them
    block_tokens: int


@dataclass(frozen=True, slots=True)
class PutResult:
    hashes: list[BlockHash]  # of the blocks sent, in prompt order
    stored: int  # newly stored
    already: int  # were stored before (puts are idempotent: blocks are content-addressed)


@dataclass(frozen=True, slots=True, eq=False)
class Lease:
    """Blocks held against eviction and demotion until released or ``ttl_s`` has passed.

    A context manager that releases on exit: ``async with`` for the ``AsyncClient`` (whose
    ``reserve`` also works directly as ``async with client.reserve(...) as lease``), ``with`` for
    the ``Client``. Releasing twice is harmless; a release that fails on exit is logged, not
    raised (the lease lapses at its TTL).
    """

    lease_id: int
    hashes: list[BlockHash]  # the blocks actually held: present on the server when reserved
    ttl_s: float
    _release_async: Callable[[int], Awaitable[bool]] | None = field(default=None, repr=False)
    _release_sync: Callable[[int], bool] | None = field(default=None, repr=False)

    async def __aenter__(self) -> Lease:
        if self._release_async is None:
            raise TypeError("this lease belongs to a sync Client: use `with`, not `async with`")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._release_async is not None
        with _failure_logged(self.lease_id):
            await self._release_async(self.lease_id)

    def __enter__(self) -> Lease:
        if self._release_sync is None:
            raise TypeError("this lease belongs to an AsyncClient: use `async with`")
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._release_sync is not None
        with _failure_logged(self.lease_id):
            self._release_sync(self.lease_id)


@contextlib.contextmanager
def _failure_logged(lease_id: int) -> Iterator[None]:
    """A failed release, logged. Not worth an exception out of a ``with`` block (it could hide
    the block's own): the lease lapses at its TTL anyway, and the next call meets the same
    trouble."""
    try:
        yield
    except KVStoreError as error:
        log.warning("lease %d was not released (it lapses at its TTL): %s", lease_id, error)


@dataclass(frozen=True, slots=True)
class TierUsage:
    tier: str  # "G1".."G4"
    name: str  # the server's name for it ("G2", "G4/<namespace>", ...)
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    num_hits: int
    num_misses: int
    num_corrupt: int
    # Memory tiers (G1, G2), which allocate extents of one slab; 0 for the others.
    allocated_bytes: int = 0  # blocks rounded up to the allocator's granularity
    largest_free_bytes: int = 0  # the largest block that fits without an eviction
    fragmentation: float = 0.0  # 1 - largest free extent / free bytes
    free_extents: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A model worker attached to the server (admins see them in ``stats``)."""

    worker_id: int
    name: str
    spec: ModelSpec  # the namespace whose holes it repairs
    address: str  # its peer address, or "in-process"
    tasks_done: int
    blocks_computed: int
    busy: bool


@dataclass(frozen=True, slots=True)
class Stats:
    tiers: list[TierUsage]
    num_blocks: int
    num_leases: int
    queue_depth: int  # background copies waiting
    counters: dict[str, int]
    workers: list[WorkerInfo] = field(default_factory=list)
    # What the calling tenant holds against its bounds (names as in the proto's TenantUsage:
    # stored_bytes, quota_bytes, segments, segment_bytes, max_segment_bytes, pinned_blocks,
    # pinned_bytes, max_pinned_blocks, ..., leased_bytes, max_leased_bytes; 0 in a max_: none).
    tenant: dict[str, int | str] = field(default_factory=dict)
    tenants: list[dict[str, int | str]] = field(default_factory=list)  # admins: every tenant's


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``repair`` did to a prompt's stored prefix."""

    repaired: list[int]  # blocks computed and stored, in prompt order
    hit_blocks: int  # the leading hit after the repair
    hit_blocks_before: int
    kept: list[int]  # exact=True: blocks leased or pinned by others, left as they were
    worker: str  # the worker that computed them ("" when nothing needed computing)


@dataclass(frozen=True, slots=True)
class BlockInfo:
    block_hash: BlockHash
    parent_hash: BlockHash | None  # None: the first block of a chain, or not recorded
    namespace_fingerprint: bytes
    tiers: list[str]
    nbytes: int
    hits: int
    pinned: bool
    leases: int
    # Filled by ``inspect`` only (read from the block's header):
    dtype: str = ""
    shape: tuple[int, ...] = ()
    codec: str = ""
    raw_xxh3: int = 0
    payload_xxh3: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change in the store, from ``watch``; resume a watch with ``after_seq=event.seq``."""

    seq: int
    kind: str  # "stored", "removed", "moved", "corrupt"
    block_hash: BlockHash
    tier: str | None
    from_tier: str | None  # moves only
    parent_hash: BlockHash | None
    namespace_fingerprint: bytes
    time_s: float
    snapshot: bool  # part of the snapshot of what is stored, sent first; not a change
    # Removals only: "capacity" (the tier passed its high watermark), "fragmentation" (free bytes
    # too split for the incoming blocks), "request" (Evict, Flush).
    reason: str | None = None
