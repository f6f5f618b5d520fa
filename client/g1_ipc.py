"""The client's side of the same-GPU hand-off (``HandOffG1``, kvstore/service/rpc_g1.py): a G1
hit copied device-to-device from the server's slab into the caller's CUDA tensor.

The server answers with a CUDA IPC handle of G1's slab and the place of each leading block in
it, under a lease. ``G1Peer`` opens each slab's handle once (``cudaIpcOpenMemHandle``, through
cupy) and keeps it open for the client's life, since opening costs far more than a copy; the
blocks are copied on the caller's current CUDA stream, which is synchronized before the lease is
released, so that no byte is read after the server may reuse it.

What the copy trusts. The payloads were verified against their checksum on their way into G1 and
sit in device memory that only the server writes; checking them again here would mean reading
them back to the host, which is what the hand-off exists to avoid.

cupy (``cupy-cuda12x`` or ``cupy-cuda13x``, the ``cuda`` extra) is imported only when a hand-off
is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import grpc
import torch

from client.channel import Channel
from client.convert import check_out
from client.errors import HandOffUnavailableError, NotFoundError, error_from_rpc
from client.same_host import Segments, SegmentUnusable
from kvstore.core.block_format import torch_dtype
from kvstore.core.cuda import device_uuid
from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import ModelSpec
from kvstore.v1 import kvstore_pb2 as pb

__all__ = ["G1Peer", "copy_blocks", "hand_off"]


class G1Peer:
    """The G1 slabs of one server opened in this process, one CUDA mapping per handle."""

    def __init__(self) -> None:
        self._opened: dict[bytes, tuple[int, torch.Tensor]] = {}

    def slab(self, handle: bytes, nbytes: int, device: torch.device) -> torch.Tensor:
        """The server's slab as a uint8 tensor on ``device`` (no copy)."""
        found = self._opened.get(handle)
        if found is not None:
            return found[1]
        try:
            import cupy
        except ImportError:
            raise HandOffUnavailableError(
                "G1 hand-off needs cupy in the client (pip install 'kvstore[cuda]')"
            ) from None
        with cupy.cuda.Device(device.index if device.index is not None else 0):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(
                handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess
            )
            memory = cupy.cuda.UnownedMemory(ptr, nbytes, self)
            array = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))
            tensor = torch.as_tensor(array, device=device)
        self._opened[handle] = (ptr, tensor)
        return tensor

    def close(self) -> None:
        """Close every mapping (after the last copy out of it has finished)."""
        if not self._opened:
            return
        import cupy

        for ptr, _ in self._opened.values():
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
        self._opened.clear()


async def hand_off(
    channel: Channel,
    segments: Segments,
    peer: G1Peer,
    spec: ModelSpec,
    prompt: pb.Prompt,
    out: torch.Tensor,
    max_blocks: int,
) -> int:
    """Copy the leading G1 blocks of ``prompt`` into ``out``'s leading tokens; returns how many
    tokens were copied (0: no block of the prompt is in G1)."""
    if out.device.type != "cuda":
        raise InvalidArgumentError(f"out must be a CUDA tensor for a G1 hand-off, not {out.device}")
    room = check_out(spec, out)
    want = room if max_blocks == 0 else min(room, max_blocks)
    if want == 0:
        return 0
    try:
        region = await segments.acquire(4096)
    except SegmentUnusable as exc:
        raise HandOffUnavailableError(
            f"G1 hand-off needs a same-host segment (proof of the host), and none could be had: "
            f"{exc}"
        ) from None
    try:
        request = pb.G1HandOffRequest(
            prompt=prompt,
            num_blocks=want,
            segment_id=region.segment.segment_id,
            device_uuid=device_uuid(out.device),
        )
        try:
            reply = await channel.unary("HandOffG1", request, raw=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                raise HandOffUnavailableError(exc.details() or "", exc.code().name) from None
            raise error_from_rpc(exc, channel.target) from None
    finally:
        segments.release(region)
    if not reply.lease_id:
        return 0
    try:
        slab = peer.slab(reply.ipc_handle, reply.slab_bytes, out.device)
        copied = copy_blocks(spec, slab, reply.extents, out)
        torch.cuda.current_stream(out.device).synchronize()
    finally:
        with contextlib.suppress(NotFoundError):  # expired meanwhile: nothing left to let go
            await channel.unary("Release", pb.ReleaseRequest(lease_id=reply.lease_id))
    return copied * spec.block_tokens


def copy_blocks(
    spec: ModelSpec, slab: torch.Tensor, extents: Sequence[Any], out: torch.Tensor
) -> int:
    """Copy each extent of ``slab`` (a raw payload) into its block's tokens of ``out``."""
    layers, _, tokens, heads, dims = spec.block_shape
    dtype = torch_dtype(spec.dtype)
    nbytes = spec.block_nbytes
    for i, extent in enumerate(extents):
        if extent.nbytes != nbytes or extent.offset + nbytes > slab.numel():
            raise InvalidArgumentError(
                f"the server's G1 extent {i} ({extent.offset}, {extent.nbytes}) is not a block "
                f"of {spec.name} inside its slab"
            )
        block = slab[extent.offset : extent.offset + nbytes].view(dtype)
        out[:, :, i * tokens : (i + 1) * tokens].copy_(
            block.view(layers, 2, tokens, heads, dims), non_blocking=True
        )
    return len(extents)
