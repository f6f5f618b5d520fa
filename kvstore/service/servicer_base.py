"""The state and the request checks that every RPC group of the servicer shares.

``ServicerBase`` holds what the servicer works on (the engine, the config, tenants, metrics, the
worker pool, the same-host segments, which tenant holds which lease and pin, which blocks a
running Put stored new) and the steps the RPC groups have in common: the ``CallHooks`` of
kvstore/service/calls.py (``_begin``, ``_authorize``, ``_end``), turning a ``Prompt`` into its
block hashes (``_prompt``: checked by ``kvstore.wire.convert.read_prompt``, salted per tenant,
hashed off the event loop when huge), the checks of counts, chunk sizes, block sizes and
quotas, a tenant's own blocks, segments, leases and pins, and the repair that Fetch and Repair
both run. The RPC groups (kvstore/service/rpc_*.py) subclass it; kvstore/service/servicer.py
puts them together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

import numpy as np

from kvstore.core.block_format import HEADER_BYTES
from kvstore.core.errors import BlockTooLargeError, InvalidArgumentError
from kvstore.core.keys import BlockHash, ModelSpec, root_hash
from kvstore.engine.engine import Engine
from kvstore.engine.repair import RepairResult, WorkerPool, repair_prompt
from kvstore.service.auth import ANONYMOUS, Tenant, Tenants
from kvstore.service.calls import Call, bearer, request_id
from kvstore.service.config import ServerConfig, ServiceLayout
from kvstore.service.errors import PermissionDeniedError, QuotaExceededError, UnauthenticatedError
from kvstore.service.metrics import ServerMetrics
from kvstore.service.remote_worker import RemoteWorker
from kvstore.service.segments import Segment, SegmentRegistry
from kvstore.wire.convert import check_hash, read_prompt, spec_of

__all__ = ["HashedPrompt", "ServicerBase"]

log = logging.getLogger(__name__)


class HashedPrompt(NamedTuple):
    # A tuple, not a frozen dataclass: made once per request, and a frozen dataclass's
    # ``__init__`` (an ``object.__setattr__`` per field) costs nearly twice as long.
    spec: ModelSpec
    salt: bytes
    hashes: list[BlockHash]


class ServicerBase:
    def __init__(
        self,
        engine: Engine,
        config: ServiceLayout,
        tenants: Tenants,
        metrics: ServerMetrics,
        pool: WorkerPool,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self._remote_workers: dict[int, RemoteWorker] = {}
        self.config = config
        self.server_config: ServerConfig = config.server
        self.tenants = tenants
        self.metrics = metrics
        self.stopping = False
        self._lease_owner: dict[int, str] = {}
        cfg = config.server
        self._pinned_by: dict[str, set[BlockHash]] = {}
        self._new_by_put: dict[BlockHash, set[BlockHash]] = {}
        self._heavy = asyncio.Semaphore(cfg.max_heavy_requests)
        self._max_pinned_bytes = int(cfg.pin_share * config.g2.capacity_bytes)
        self._max_leased_bytes = int(cfg.lease_share * config.g2.capacity_bytes)
        self.segments = SegmentRegistry(
            enabled=cfg.same_host,
            max_bytes_per_tenant=cfg.tenant_segment_bytes,
            idle_s=cfg.segment_idle_s,
        )
        # Puts land in the top memory tier (G1 when it is on, else G2), which takes blocks of any
        # size up to its capacity.
        top = config.g1 if config.g1 is not None else config.g2
        self._max_block_bytes = top.capacity_bytes
        self._top_tier = "g1" if config.g1 is not None else "g2"

    # -- the CallHooks of the RPC wrappers ------------------------------------------------------

    def _begin(self, method: str, context: Any) -> Call:
        metadata = context.invocation_metadata()
        call = Call(method, request_id(metadata), metadata, context)
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        self.metrics.rpc_started(method)
        return call

    def _authorize(self, context: Any, call: Call, admin: bool) -> Tenant:
        if not self.tenants.enabled:
            return ANONYMOUS
        token = bearer(call.metadata)
        if token is None:
            raise UnauthenticatedError(
                "missing `authorization: Bearer <token>` metadata; this server has tenants"
            )
        if not token:
            raise UnauthenticatedError("the authorization metadata must read `Bearer <token>`")
        tenant = self.tenants.authenticate(token)
        if tenant is None:
            raise UnauthenticatedError("the bearer token belongs to no tenant of this server")
        if admin and not tenant.admin:
            raise PermissionDeniedError(
                f"{call.method} needs an admin tenant; tenant {tenant.name!r} is not one"
            )
        return tenant

    def _end(self, call: Call, code: str) -> None:
        seconds = time.perf_counter() - call.started
        self.metrics.rpc_finished(call.method, code, seconds)
        # INFO is most often off: this test alone costs a third of log.info with its arguments.
        if log.isEnabledFor(logging.INFO):
            log.info(
                "rpc method=%s status=%s tenant=%s request_id=%s duration_ms=%.2f",
                call.method,
                code,
                call.tenant.name if call.tenant is not None else "-",
                call.request_id,
                seconds * 1000,
            )

    # -- parsing and checks ----------------------------------------------------------------------

    async def _prompt(self, prompt: Any, tenant: Tenant, where: str) -> HashedPrompt:
        parts = read_prompt(prompt, where, max_tokens=self.server_config.max_prompt_tokens)
        spec, tokens, extra = parts.spec, parts.tokens, parts.extra_keys
        salt = self.tenants.salt_for(tenant, spec)
        if len(tokens) <= self.server_config.heavy_prompt_tokens:
            hashes = self.engine.hashes(spec, tokens, salt=salt, extra_keys=extra)
            return HashedPrompt(spec, salt, hashes)
        # A huge prompt is hashed on a thread, a bounded number at a time, so that the event loop
        # keeps serving small requests meanwhile (a 2M-token prompt hashes for ~0.25 s here).
        async with self._heavy:
            hashes = await asyncio.to_thread(
                self.engine.hashes, spec, tokens, salt=salt, extra_keys=extra
            )
        return HashedPrompt(spec, salt, hashes)

    @staticmethod
    def _num_blocks(value: int, prompt: HashedPrompt, where: str) -> int:
        full = len(prompt.hashes)
        if value > full:
            raise InvalidArgumentError(
                f"{where} is {value}, but the prompt has {full} full blocks of "
                f"{prompt.spec.block_tokens} tokens (0: all of them)"
            )
        return value or full

    def _chunk_bytes(self, value: int) -> int:
        if value == 0:
            return self.server_config.max_chunk_bytes
        top = self.server_config.max_message_bytes // 2
        if not 4096 <= value <= top:
            raise InvalidArgumentError(
                f"max_chunk_bytes is {value}; use 0 (server default, "
                f"{self.server_config.max_chunk_bytes}) or a value in [4096, {top}]"
            )
        return value

    def _check_block_fits(self, spec: ModelSpec) -> None:
        total = HEADER_BYTES + spec.block_nbytes
        if total > self._max_block_bytes:
            raise BlockTooLargeError(
                f"a block of namespace {spec.name} ({spec.dtype} {list(spec.block_shape)}) is "
                f"{total} bytes with its header, more than the whole {self._max_block_bytes}-byte "
                f"{self._top_tier.upper()} of this server ({self._top_tier}.capacity_bytes): use "
                "fewer tokens per block"
            )

    def _check_quota(self, tenant: Tenant, spec: ModelSpec, hashes: list[BlockHash]) -> None:
        if not tenant.quota_bytes:
            return
        new = sum(1 for h in dict.fromkeys(hashes) if h not in self.engine.index)
        incoming = new * (HEADER_BYTES + spec.block_nbytes)
        used = self.engine.usage_of(tenant.name)
        if used + incoming > tenant.quota_bytes:
            raise QuotaExceededError(
                f"tenant {tenant.name!r} holds {used} bytes; {new} new blocks ({incoming} bytes) "
                f"would pass its quota of {tenant.quota_bytes} bytes"
            )

    def _own_blocks(self, request: Any, tenant: Tenant) -> list[BlockHash]:
        """The requested blocks this tenant may act on: of the namespace if one is given; for
        tenants that are not admins, only blocks they stored."""
        fingerprint = (
            spec_of(request.namespace, "namespace").fingerprint
            if request.HasField("namespace")
            else None
        )
        keys = [check_hash(h, f"block_hashes[{i}]") for i, h in enumerate(request.block_hashes)]
        out = []
        for key in keys:
            entry = self.engine.index.get(key)
            if entry is None:
                continue
            if fingerprint is not None and entry.namespace != fingerprint:
                continue
            if not tenant.admin and entry.owner != tenant.name:
                continue
            out.append(key)
        return out

    def _segment(self, segment_id: int, tenant: Tenant) -> Segment:
        self.segments.unmap_pending()
        return self.segments.get(segment_id, tenant.name)

    def _own_lease(self, lease_id: int, tenant: Tenant) -> None:
        self._lease_owner[lease_id] = tenant.name
        if len(self._lease_owner) > 2 * self.engine.index.num_leases + 1024:
            # Expired leases vanish from the engine without a Release: forget them here too.
            index = self.engine.index
            self._lease_owner = {
                i: owner for i, owner in self._lease_owner.items() if index.lease(i) is not None
            }

    # -- accounting and repair ---------------------------------------------------------------

    def _pins_of(self, name: str) -> tuple[int, int]:
        """``(blocks, bytes)`` that tenant ``name`` holds pinned (pins expire in the engine, so
        the set is pruned as it is counted)."""
        mine = self._pinned_by.get(name)
        if not mine:
            return 0, 0
        index = self.engine.index
        live = {e.key: e for k in mine if (e := index.get(k)) is not None and e.pins}
        self._pinned_by[name] = set(live)
        return len(live), sum(e.nbytes for e in live.values())

    def _leases_of(self, name: str) -> tuple[int, int]:
        """``(blocks, bytes)`` under the live Reserve leases of tenant ``name``."""
        index = self.engine.index
        blocks = nbytes = 0
        for lease_id, owner in self._lease_owner.items():
            lease = index.lease(lease_id) if owner == name else None
            if lease is not None:
                blocks += len(lease.keys)
                nbytes += sum(e.nbytes for k in lease.keys if (e := index.get(k)) is not None)
        return blocks, nbytes

    async def _repair(
        self, prompt: Any, p: HashedPrompt, tenant: Tenant, *, exact: bool
    ) -> RepairResult:
        self._check_block_fits(p.spec)
        tokens = np.frombuffer(prompt.tokens_u32le, dtype="<u4")
        result = await repair_prompt(
            self.engine,
            self.pool.fill,
            p.spec,
            p.hashes,
            tokens,
            root=BlockHash(root_hash(p.spec, p.salt)),
            exact=exact,
            owner=tenant.name,
        )
        if result.repaired:
            self.engine.counters.add("repairs")
            self.engine.counters.add("repaired_blocks", len(result.repaired))
        return result
