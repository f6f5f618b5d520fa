"""The same-GPU hand-off: HandOffG1 gives an engine process on the server's own GPU the G1 blocks
of a prompt as places in G1's slab, under a lease, with a CUDA IPC handle of the slab.

The peer opens the handle once (``client/g1_ipc.py``) and copies each block device-to-device into
its own cache: a G1 hit then costs one copy on the GPU, and no byte of it crosses the host. The
blocks are held by the lease (no eviction, no demotion) until the peer releases it or its TTL
ends; the peer must not read a block after that.

Who may have a handle. A CUDA IPC handle maps the whole allocation it was taken of — here, all of
G1 — so the handle is only ever a same-host, same-GPU, one-tenant thing:

- same host: the request names a same-host segment of the tenant whose descriptor was handed over
  through the server's abstract unix socket (``Segment.handed_over``), which only a process of
  this host (and network namespace) can reach;
- same GPU: the caller's device UUID must be G1's (a handle opens on no other device);
- one tenant: on a server with more than one tenant, every handle would expose the blocks of the
  others (``PermissionDeniedError``); per-tenant isolation stays with Fetch, which copies only
  the caller's blocks.
"""

from __future__ import annotations

from typing import Any

from kvstore.core.cuda import DEVICE_UUID_BYTES
from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import BlockHash
from kvstore.service.calls import Call, unary_rpc
from kvstore.service.errors import HandOffUnavailableError, PermissionDeniedError
from kvstore.service.rpc_holds import HoldRpcs, seconds
from kvstore.v1 import kvstore_pb2 as pb
from tiers.gpu_memory import GpuMemoryTier

__all__ = ["G1Rpcs"]


class G1Rpcs(HoldRpcs):
    @unary_rpc("HandOffG1")
    async def HandOffG1(self, request: Any, call: Call) -> Any:
        tenant = call.who
        p = await self._prompt(request.prompt, tenant, "prompt")
        n = self._num_blocks(request.num_blocks, p, "num_blocks")
        ttl = seconds(request.ttl_s, "ttl_s", "the server default")
        if len(request.device_uuid) != DEVICE_UUID_BYTES:
            raise InvalidArgumentError(
                f"device_uuid must be the {DEVICE_UUID_BYTES} bytes of the caller's CUDA device "
                f"UUID, got {len(request.device_uuid)} bytes"
            )
        if len(self.tenants.all()) > 1:
            raise PermissionDeniedError(
                "G1 hand-off needs a server with one tenant: a CUDA IPC handle maps all of G1, "
                f"which holds the blocks of {len(self.tenants.all())} tenants here; use Fetch"
            )
        segment = self._segment(request.segment_id, tenant)
        if not segment.handed_over:
            raise HandOffUnavailableError(
                f"segment {request.segment_id} was never handed over on this host (its ticket "
                "was not redeemed on the server's socket): G1 hand-off is for processes on the "
                "server's host; use Fetch"
            )
        g1 = self._g1()
        handle = g1.ipc_handle()
        if handle is None:
            raise HandOffUnavailableError(
                f"G1 is on {g1.device}, not in a CUDA allocation with an IPC handle (G1 on a "
                "CUDA device and cupy installed on the server): use Fetch"
            )
        uuid = g1.device_uuid()
        if uuid != request.device_uuid:
            raise HandOffUnavailableError(
                f"G1 is on GPU {_uuid_text(uuid)}, the caller is on GPU "
                f"{_uuid_text(request.device_uuid)}: a handle opens on G1's GPU only; use Fetch"
            )
        # The leading run of blocks in G1, as raw payloads of this namespace's shape.
        nbytes = p.spec.block_nbytes
        leading: list[BlockHash] = []
        extents: list[tuple[int, int, int]] = []
        for key in p.hashes[:n]:
            where = g1.extent_of(key) if self.engine.index.in_tier(key, "G1") else None
            if where is None or where[1] != nbytes:
                break
            leading.append(key)
            extents.append(where)
        reply = pb.G1HandOffResponse(
            ipc_handle=handle, slab_bytes=g1.slab_bytes, device_uuid=uuid, num_blocks=n
        )
        if not leading:
            return reply
        # No await between the scan above and the lease: nothing can evict a block in between.
        lease = self._hold(leading, ttl, tenant)
        reply.lease_id = lease.lease_id
        reply.ttl_s = self.engine.engine_config.default_lease_ttl_s if ttl is None else ttl
        reply.block_hashes.extend(leading)
        reply.extents.extend(
            pb.G1Extent(offset=o, nbytes=size, payload_xxh3=xxh) for o, size, xxh in extents
        )
        self.engine.index.touch(leading, hit=True)
        self.engine.counters.add("read_hits", len(leading))
        g1.count_reads(len(leading))
        return reply

    def _g1(self) -> GpuMemoryTier:
        if "G1" in self.engine.placement.order:
            tier = self.engine.tier("G1", b"")
            if isinstance(tier, GpuMemoryTier):
                return tier
        raise HandOffUnavailableError("G1 is off on this server (g1 in the config): use Fetch")


def _uuid_text(raw: bytes | None) -> str:
    if not raw:
        return "(none)"
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
