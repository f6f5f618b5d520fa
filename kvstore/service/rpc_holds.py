"""The RPCs that hold blocks against eviction: Reserve / Release (leases) and Pin / Unpin.

What a tenant that is not an admin holds is bounded, as counts and as bytes
(``server.max_leased_blocks_per_tenant`` / ``lease_share``, ``server.max_pinned_blocks_per_tenant``
/ ``pin_share``), so that no tenant can hold all of G2 away from the others; a request past the
bound changes nothing (``_check_bound``). Leases belong to the tenant that took them: another
tenant's lease id reads as unknown.
"""

from __future__ import annotations

import math
from typing import Any

from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import BlockHash
from kvstore.engine.index import Lease
from kvstore.service.auth import Tenant
from kvstore.service.calls import Call, unary_rpc
from kvstore.service.errors import NotFoundError, QuotaExceededError
from kvstore.service.servicer_base import ServicerBase
from kvstore.v1 import kvstore_pb2 as pb

__all__ = ["HoldRpcs", "seconds"]


def seconds(value: float, where: str, zero_means: str) -> float | None:
    """A TTL field: None for 0, else a positive finite number of seconds."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(
            f"{where} must be a finite number of seconds >= 0 (0: {zero_means}), got {value}"
        )
    return None if value == 0 else float(value)


class HoldRpcs(ServicerBase):
    @unary_rpc("Reserve")
    async def Reserve(self, request: Any, call: Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        n = self._num_blocks(request.num_blocks, p, "num_blocks")
        ttl = seconds(request.ttl_s, "ttl_s", "the server default")
        found = await self.engine.lookup_hashes(p.spec, p.hashes[:n])
        present = [h for h, t in zip(found.hashes, found.tiers, strict=True) if t is not None]
        lease = self._hold(present, ttl, call.who)
        return pb.ReserveResponse(
            lease_id=lease.lease_id,
            block_hashes=list(lease.keys),
            ttl_s=self.engine.engine_config.default_lease_ttl_s if ttl is None else ttl,
        )

    def _hold(self, keys: list[BlockHash], ttl: float | None, tenant: Tenant) -> Lease:
        """A lease on ``keys`` for ``tenant``, within its bound (nothing held past it)."""
        if not tenant.admin:
            index = self.engine.index
            blocks, nbytes = self._leases_of(tenant.name)
            held = list(dict.fromkeys(keys))
            self._check_bound(
                "lease",
                tenant,
                blocks + len(held),
                nbytes + sum(e.nbytes for k in held if (e := index.get(k)) is not None),
                self.server_config.max_leased_blocks_per_tenant,
                self._max_leased_bytes,
                "server.max_leased_blocks_per_tenant / server.lease_share",
            )
        lease = self.engine.reserve(keys, ttl)
        self._own_lease(lease.lease_id, tenant)
        return lease

    @unary_rpc("Release")
    async def Release(self, request: Any, call: Call) -> Any:
        lease_id = request.lease_id
        if self._lease_owner.get(lease_id) != call.who.name:
            raise NotFoundError(
                f"lease {lease_id} is not held: it was released, it expired, or this tenant "
                "never took it"
            )
        del self._lease_owner[lease_id]
        if not self.engine.release(lease_id):
            raise NotFoundError(f"lease {lease_id} is not held: it expired")
        return pb.ReleaseResponse(released=True)

    @unary_rpc("Pin")
    async def Pin(self, request: Any, call: Call) -> Any:
        ttl = seconds(request.ttl_s, "ttl_s", "pinned until Unpin")
        tenant = call.who
        keys = self._own_blocks(request, tenant)
        if not tenant.admin:
            index = self.engine.index
            entries = [index.get(k) for k in dict.fromkeys(keys)]
            new = [e for e in entries if e is not None and not e.pins]
            blocks, nbytes = self._pins_of(tenant.name)
            self._check_bound(
                "pin",
                tenant,
                blocks + len(new),
                nbytes + sum(e.nbytes for e in new),
                self.server_config.max_pinned_blocks_per_tenant,
                self._max_pinned_bytes,
                "server.max_pinned_blocks_per_tenant / server.pin_share",
            )
            self._pinned_by.setdefault(tenant.name, set()).update(keys)
        return pb.CountResponse(count=self.engine.pin(keys, ttl))

    @staticmethod
    def _check_bound(
        what: str,
        tenant: Tenant,
        blocks: int,
        nbytes: int,
        max_blocks: int,
        max_bytes: int,
        settings: str,
    ) -> None:
        if blocks > max_blocks or nbytes > max_bytes:
            advice = "unpin blocks first" if what == "pin" else "release leases first"
            raise QuotaExceededError(
                f"tenant {tenant.name!r} would {what} {blocks} blocks ({nbytes} bytes), past its "
                f"bound of {max_blocks} blocks and {max_bytes} bytes ({settings}); nothing "
                f"changed: {advice}"
            )

    @unary_rpc("Unpin")
    async def Unpin(self, request: Any, call: Call) -> Any:
        keys = self._own_blocks(request, call.who)
        return pb.CountResponse(count=self.engine.unpin(keys))
