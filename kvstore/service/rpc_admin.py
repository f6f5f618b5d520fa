"""The admin and inspection RPCs: Stats (every tenant; server-wide numbers for admins only),
Evict (a tenant's own blocks), and for admin tenants Flush, ListBlocks, Inspect and Watch.

Watch streams the engine's event log from a sequence number on; a client whose number is not in
the log (it fell off the ring, or it comes from an earlier run of the server) first gets a
snapshot: one ``stored`` event per block and tier, marked ``snapshot``.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from kvstore.core.block_format import read_header
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError, TierUnavailableError
from kvstore.engine.events import Event
from kvstore.engine.index import BlockEntry
from kvstore.service.auth import Tenant
from kvstore.service.calls import Call, stream_rpc, unary_rpc
from kvstore.service.errors import NotFoundError
from kvstore.service.servicer_base import ServicerBase
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.convert import (
    EVENT_KIND_VALUE,
    TIER_VALUE,
    check_hash,
    namespace_of,
    same_fields,
    tier_of,
)

__all__ = ["AdminRpcs"]

log = logging.getLogger(__name__)

_LIST_DEFAULT = 1000
_LIST_MAX = 10000
# Watch streams look at the server's stop flag this often while no event arrives.
_WATCH_POLL_S = 0.25


def _block_info(entry: BlockEntry) -> Any:
    return pb.BlockInfo(
        block_hash=entry.key,
        parent_hash=entry.parent or b"",
        namespace_fingerprint=entry.namespace,
        tiers=[TIER_VALUE[t] for t in entry.tiers()],
        nbytes=entry.nbytes,
        hits=entry.hits,
        pinned=entry.pins > 0,
        leases=entry.leases,
    )


def _event_message(event: Event) -> Any:
    return pb.WatchEvent(
        seq=event.seq,
        kind=EVENT_KIND_VALUE[event.kind],
        block_hash=event.key,
        tier=TIER_VALUE.get(event.tier, pb.TIER_UNSPECIFIED),
        from_tier=TIER_VALUE.get(event.from_tier or "", pb.TIER_UNSPECIFIED),
        parent_hash=event.parent or b"",
        namespace_fingerprint=event.namespace,
        time_s=event.time_s,
        reason=event.reason or "",
    )


class AdminRpcs(ServicerBase):
    @unary_rpc("Evict")
    async def Evict(self, request: Any, call: Call) -> Any:
        tier = tier_of(request.tier, "tier")
        keys = self._own_blocks(request, call.who)
        return pb.CountResponse(count=await self.engine.evict(keys, tier))

    @unary_rpc("Flush", admin=True)
    async def Flush(self, request: Any, call: Call) -> Any:
        tier = tier_of(request.tier, "tier")
        return pb.CountResponse(count=await self.engine.flush(tier))

    def _usage(self, tenant: Tenant) -> Any:
        segments, segment_bytes = self.segments.usage().get(tenant.name, (0, 0))
        pinned, pinned_bytes = self._pins_of(tenant.name)
        leased, leased_bytes = self._leases_of(tenant.name)
        bounded = not tenant.admin
        cfg = self.server_config
        return pb.TenantUsage(
            name=tenant.name,
            stored_bytes=self.engine.usage_of(tenant.name),
            quota_bytes=tenant.quota_bytes,
            segments=segments,
            segment_bytes=segment_bytes,
            max_segment_bytes=self.segments.max_bytes_per_tenant,
            pinned_blocks=pinned,
            pinned_bytes=pinned_bytes,
            max_pinned_blocks=cfg.max_pinned_blocks_per_tenant if bounded else 0,
            max_pinned_bytes=self._max_pinned_bytes if bounded else 0,
            leased_blocks=leased,
            leased_bytes=leased_bytes,
            max_leased_blocks=cfg.max_leased_blocks_per_tenant if bounded else 0,
            max_leased_bytes=self._max_leased_bytes if bounded else 0,
        )

    # -- inspection ----------------------------------------------------------------------------

    @unary_rpc("Stats")
    async def Stats(self, request: Any, call: Call) -> Any:
        tenant = call.who
        self.segments.expire()
        if not tenant.admin:
            # Server-wide numbers are for admins; a tenant sees its own.
            mine = [e for e in self.engine.index.entries() if e.owner == tenant.name]
            leases = [i for i, who in self._lease_owner.items() if who == tenant.name]
            return pb.StatsResponse(
                num_blocks=len(mine),
                num_leases=sum(self.engine.index.lease(i) is not None for i in leases),
                counters={
                    "usage_bytes": self.engine.usage_of(tenant.name),
                    "quota_bytes": tenant.quota_bytes,
                },
                tenant=self._usage(tenant),
            )
        stats = await self.engine.stats()
        return pb.StatsResponse(
            tenant=self._usage(tenant),
            tenants=[self._usage(t) for t in self.tenants.all()],
            tiers=[
                pb.TierStats(
                    tier=TIER_VALUE.get(name.split("/")[0], pb.TIER_UNSPECIFIED),
                    name=name,
                    **same_fields(t, pb.TierStats, skip=("tier", "name")),
                )
                for name, t in stats.tiers.items()
            ],
            num_blocks=stats.num_blocks,
            num_leases=stats.num_leases,
            queue_depth=stats.queue_depth,
            counters={k: v for k, v in stats.counters.items() if v >= 0},
            workers=[
                pb.WorkerInfo(
                    namespace=namespace_of(w.spec),
                    **same_fields(w, pb.WorkerInfo, skip=("namespace",)),
                )
                for w in self.pool.workers()
            ],
        )

    @unary_rpc("ListBlocks", admin=True)
    async def ListBlocks(self, request: Any, call: Call) -> Any:
        tier = tier_of(request.tier, "tier")
        if tier is not None and tier not in self.engine.tier_names:
            raise InvalidArgumentError(
                f"tier {tier} is not configured on this server ({self.engine.tier_names})"
            )
        after = check_hash(request.after, "after") if request.after else None
        limit = min(request.limit or _LIST_DEFAULT, _LIST_MAX)
        candidates = (
            e
            for e in self.engine.index.entries()
            if e.resident
            and (after is None or e.key > after)
            and (tier is None or tier in e.tiers())
        )
        # One more than the page: whether another page follows, without sorting everything.
        page = heapq.nsmallest(limit + 1, candidates, key=lambda e: e.key)
        more = len(page) > limit
        page = page[:limit]
        return pb.ListBlocksResponse(
            blocks=[_block_info(e) for e in page],
            next_after=page[-1].key if more else b"",
        )

    @unary_rpc("Inspect", admin=True)
    async def Inspect(self, request: Any, call: Call) -> Any:
        key = check_hash(request.block_hash, "block_hash")
        entry = self.engine.index.get(key)
        for tier in entry.tiers() if entry is not None else []:
            assert entry is not None
            try:
                (data,) = await self.engine.tier(tier, entry.namespace).get([key])
                header = read_header(data) if data is not None else None
            except (CorruptBlockError, TierUnavailableError) as exc:
                log.warning("inspect %s: %s unreadable: %s", key.hex(), tier, exc)
                continue
            if header is None:
                continue
            return pb.InspectResponse(
                block=_block_info(entry),
                dtype=header.dtype,
                shape=list(header.shape),
                codec=header.codec.name,
                raw_xxh3=header.raw_xxh3,
                payload_xxh3=header.payload_xxh3,
            )
        raise NotFoundError(f"block {key.hex()} is not stored on this node")

    @stream_rpc("Watch", admin=True)
    async def Watch(self, request: Any, call: Call) -> AsyncGenerator[Any, None]:
        events = self.engine.events
        cursor = request.after_seq
        # A seq from the future (a client of an earlier run of this server: seqs restart at 1)
        # is as unknown as one that fell off the ring: start from a snapshot.
        pending = None if cursor == 0 or cursor > events.last_seq else events.since(cursor)
        while True:
            if pending is None:
                cursor = events.last_seq
                for message in self._snapshot(cursor):
                    yield message
                pending = []
            for event in pending:
                yield _event_message(event)
                cursor = event.seq
            if self.stopping:
                return
            await events.wait(cursor, _WATCH_POLL_S)
            pending = events.since(cursor)

    def _snapshot(self, seq: int) -> Iterator[Any]:
        now = time.time()
        for entry in self.engine.index.entries():
            for tier in entry.tiers():
                yield pb.WatchEvent(
                    seq=seq,
                    kind=pb.EVENT_KIND_STORED,
                    block_hash=entry.key,
                    tier=TIER_VALUE[tier],
                    parent_hash=entry.parent or b"",
                    namespace_fingerprint=entry.namespace,
                    time_s=now,
                    snapshot=True,
                )
