"""The same-host path of a client: shared-memory segments instead of bytes over gRPC.

The client asks the server for a segment (``OpenSegment``: a sealed memfd the server creates and
owns, handed over by file descriptor on a unix socket with a one-time ticket, see
kvstore/wire/segments.py) and maps it. A put writes its blocks into the segment and sends their
slots in its header (``put_into``); a fetch has the server copy the verified blocks into it as a
K/V tensor, and the client copies that into the result (``copy_kv``) or hands out views of it
(``segment_kv``). ``Segments`` keeps one client's few segments for reuse, each carved into
regions (``Region``) by the allocator of the memory tiers (kvstore/core/extents.py): each call in
flight has a region of its own, concurrent calls disjoint regions of one segment;
``Segments.use`` runs one call in one and replaces a segment the server closed for idleness.
Where no segment can be had (``SegmentUnusable``: another host or container, segments off) the
client falls back to bytes for good; when the tenant's segment bytes are used up
(``SegmentBusy``), for that call.

A K/V buffer (``Segments.kv_buffer``) is a caller's tensor that lives in a region of its own
(until the client closes, or ``free_kv_buffer``): a put of it sends no bytes at all, only where
the tensor is (``tensor_of``: a ``SegmentTensor``), and the server reads the blocks out of it; a
fetch into it has the server write the blocks straight into their places. Each way that is one
copy instead of two. The server reads and writes only the segment it issued to this tenant,
bounds-checked; the buffer is only memory of this client's own, which the server never sees
beyond.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from client.channel import Channel, MiB
from client.convert import BlockSink, BlockSource, put_result_of
from client.errors import error_from_rpc
from client.results import PutResult
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import CorruptBlockError, KVStoreError
from kvstore.core.extents import Extents
from kvstore.core.keys import ModelSpec
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.segments import receive_segment_fd

if TYPE_CHECKING:
    import torch

__all__ = [
    "Region",
    "Segment",
    "SegmentBusy",
    "SegmentUnusable",
    "Segments",
    "copy_kv",
    "copy_slots",
    "is_local",
    "put_from_buffer",
    "put_into",
    "segment_gone",
    "segment_kv",
    "segment_layout",
]

T = TypeVar("T")


class SegmentUnusable(Exception):
    """Shared memory cannot be used with this server (segments off, handing over failed)."""


class SegmentBusy(Exception):
    """No segment for this call (the tenant's segment bytes are used up): send bytes."""


@dataclass(slots=True, eq=False)
class Segment:
    segment_id: int
    size: int
    mapping: mmap.mmap


@dataclass(frozen=True, slots=True, eq=False)
class Region:
    """Bytes ``[offset, offset + size)`` of ``segment``, allocated to one call or K/V buffer."""

    segment: Segment
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    def view(self) -> memoryview:
        """The region's bytes (release it, or use it in a ``with``, before the segment closes)."""
        return memoryview(self.segment.mapping)[self.offset : self.end]


@dataclass(slots=True, eq=False)
class _Buffer:
    """The region that holds one K/V buffer: ``base`` is the address of its first byte here."""

    region: Region
    base: int


class Segments:
    """The server-issued segments of one client, reused from one same-host call to the next.

    Each segment is carved into regions by an ``Extents`` (best fit, coalesced on free): a call
    in flight has a region of its own (so concurrent calls do not share bytes, and share a
    segment where it has room), and so has each K/V buffer (``kv_buffer``, until ``close`` or
    ``free_kv_buffer``; ``locate`` tells whether a tensor lies in one). When no segment has a
    free extent large enough, one of ``max(2 x the largest, the need)`` is opened, and the
    segments with nothing allocated in them are closed first: the segments a client holds stay
    few, and within the tenant's bound (``server.tenant_segment_bytes``) where they can.
    ``for_put`` and ``for_fetch`` say whether each kind of call still tries the same-host path.
    """

    def __init__(self, channel: Channel, *, enabled: bool) -> None:
        self._channel = channel
        self._extents: dict[Segment, Extents] = {}  # the open segments, smallest first
        self._buffers: list[_Buffer] = []
        self._opening = asyncio.Lock()  # concurrent calls that find no room open one segment
        self.enabled = enabled
        self.for_put = enabled
        self.for_fetch = enabled

    @property
    def segments(self) -> list[Segment]:
        """The open segments."""
        return list(self._extents)

    async def use(self, nbytes: int, call: Callable[[Region], Awaitable[T]]) -> T:
        """Run one same-host call in a region of at least ``nbytes``, freed when it ends; a
        segment the server closed meanwhile (idle) is replaced once. Other failures are typed."""
        for attempt in range(2):
            region = await self.acquire(nbytes)
            try:
                return await call(region)
            except grpc.aio.AioRpcError as exc:
                if not segment_gone(exc):
                    raise error_from_rpc(exc, self._channel.target) from None
                self.forget(region.segment)
                if attempt:
                    raise SegmentUnusable(exc.details()) from None
            finally:
                self.release(region)  # a no-op for a region of a discarded segment
        raise AssertionError("unreachable")

    async def acquire(self, nbytes: int) -> Region:
        """A region of ``nbytes``: in an open segment where one has room, else in a new one."""
        region = self._allocate(nbytes)
        if region is not None:
            return region
        async with self._opening:
            region = self._allocate(nbytes)  # another call may have opened one meanwhile
            if region is not None:
                return region
            size = 2 * max((s.size for s in self._extents), default=MiB // 2)
            need = -(-max(nbytes, 1) // MiB) * MiB
            # Segments with nothing in them are replaced by the bigger one: taken out before
            # the first await, so that no call allocates in them meanwhile.
            empty = [s for s, extents in self._extents.items() if not extents.allocated]
            for segment in empty:
                del self._extents[segment]
            for segment in empty:
                await self._close(segment)
            try:
                segment = await self._open(max(size, need))
            except SegmentBusy:
                if size <= need:
                    raise
                segment = await self._open(need)  # the doubled size passed the bound
            region = self._allocate(nbytes, segment)
            assert region is not None  # a new segment of at least the need
            return region

    def _allocate(self, nbytes: int, only: Segment | None = None) -> Region | None:
        for segment in (only,) if only is not None else self._extents:
            offset = self._extents[segment].allocate(nbytes)
            if offset is not None:
                return Region(segment, offset, nbytes)
        return None

    def release(self, region: Region) -> None:
        """Free a region (a no-op where its segment is gone)."""
        extents = self._extents.get(region.segment)
        if extents is not None:
            extents.free(region.offset, region.size)

    def forget(self, segment: Segment) -> None:
        """Stop using a segment the server closed (idle): every region of it is gone, and its
        K/V buffers stay valid, as memory of this client's alone, going by the ordinary path
        from now on."""
        self._extents.pop(segment, None)
        self._buffers = [b for b in self._buffers if b.region.segment is not segment]
        _unmap(segment)  # a no-op while a K/V buffer (or any view) of it lives

    async def close(self) -> None:
        self._buffers.clear()
        segments = list(self._extents)
        self._extents.clear()
        for segment in segments:
            await self._close(segment)

    async def kv_buffer(self, spec: ModelSpec, num_tokens: int) -> torch.Tensor | None:
        """A tensor ``[layers, 2, num_tokens, kv_heads, head_dim]`` of ``spec``'s dtype in a
        region of its own (zeroed), or None where no segment can be had."""
        if not self.enabled:
            return None
        shape = (spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim)
        nbytes = num_tokens * spec.block_nbytes // spec.block_tokens
        region = await self.acquire(nbytes)
        whole = _tensor_over(region.segment.mapping)
        kv = whole[region.offset : region.offset + nbytes]
        kv.zero_()  # a region may have held an earlier call's bytes
        self._buffers.append(_Buffer(region, kv.data_ptr()))
        return kv.view(torch_dtype(spec.dtype)).view(shape)

    def free_kv_buffer(self, kv: torch.Tensor) -> bool:
        """Give back the region of the K/V buffer ``kv`` (the tensor ``kv_buffer`` returned);
        False when it is not one of this client's."""
        at = kv.data_ptr() if kv.device.type == "cpu" else None
        for i, buffer in enumerate(self._buffers):
            if at == buffer.base:
                del self._buffers[i]
                self.release(buffer.region)
                return True
        return False

    def locate(self, spec: ModelSpec, kv: torch.Tensor) -> tuple[Region, pb.SegmentTensor] | None:
        """The K/V buffer region that ``kv`` (a checked K/V tensor of ``spec``) lies in, and
        where in its segment; None for any other tensor."""
        if not self._buffers or kv.device.type != "cpu":
            return None
        at = kv.data_ptr()
        for buffer in self._buffers:
            region = buffer.region
            if buffer.base <= at < buffer.base + region.size:
                layout = tensor_of(spec, kv, region.offset + at - buffer.base, region.end)
                return None if layout is None else (region, layout)
        return None

    async def _open(self, size: int) -> Segment:
        request = pb.OpenSegmentRequest(size_bytes=size)
        try:
            reply = await self._channel.unary("OpenSegment", request, raw=True)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise SegmentBusy(exc.details()) from None
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise SegmentUnusable(exc.details()) from None
            raise error_from_rpc(exc, self._channel.target) from None
        try:
            fd = await asyncio.to_thread(receive_segment_fd, reply.socket, reply.ticket)
        except OSError as exc:
            # Another host or network namespace: the socket is not reachable from here.
            await self._close_remote(reply.segment_id)
            raise SegmentUnusable(f"cannot receive the segment: {exc}") from None
        try:
            mapping = mmap.mmap(fd, reply.size_bytes)
        except (OSError, ValueError) as exc:
            await self._close_remote(reply.segment_id)
            raise SegmentUnusable(f"cannot map the segment: {exc}") from None
        finally:
            os.close(fd)
        segment = Segment(reply.segment_id, reply.size_bytes, mapping)
        self._extents[segment] = Extents(reply.size_bytes)
        return segment

    async def _close(self, segment: Segment) -> None:
        self._extents.pop(segment, None)
        _unmap(segment)
        await self._close_remote(segment.segment_id)

    async def _close_remote(self, segment_id: int) -> None:
        # Best effort: a segment the server never hears about is closed when idle.
        stub = self._channel.connected_stub()
        if stub is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, KVStoreError):
            await stub.CloseSegment(
                pb.CloseSegmentRequest(segment_id=segment_id),
                timeout=self._channel.timeout_s,
                metadata=self._channel.metadata,
            )


async def put_into(
    channel: Channel, header: pb.PutHeader, source: BlockSource, region: Region
) -> PutResult:
    """One attempt of a put through ``region``: the blocks written into it, back to back, and
    their slots (offsets in the segment) sent in the header (one message: a SlotRef message per
    block cost the server a gRPC read each, and let other work in between the blocks)."""
    n, size = header.num_blocks, source.block_nbytes
    with region.view() as view:
        source.copy_into(n, view)
    shared = pb.PutHeader()
    shared.CopyFrom(header)
    shared.segment_id = region.segment.segment_id
    shared.slots.extend(
        pb.SlotRef(block_index=i, offset=region.offset + i * size, length=size) for i in range(n)
    )
    return await _put_one(channel, shared)


async def put_from_buffer(
    channel: Channel, header: pb.PutHeader, segment: Segment, layout: pb.SegmentTensor
) -> PutResult:
    """One attempt of a put of a K/V buffer: only where the tensor is goes to the server, which
    reads the blocks out of the segment itself."""
    shared = pb.PutHeader()
    shared.CopyFrom(header)
    shared.segment_id = segment.segment_id
    shared.tensor.CopyFrom(layout)
    return await _put_one(channel, shared)


async def _put_one(channel: Channel, header: pb.PutHeader) -> PutResult:
    """A Put of one message, retried; failures left as ``AioRpcError`` (``Segments.use``)."""
    request = pb.PutRequest(header=header)
    reply = await channel.retrying(lambda: channel.call("Put", iter((request,))), raw=True)
    return put_result_of(reply)


def tensor_of(spec: ModelSpec, kv: torch.Tensor, offset: int, end: int) -> pb.SegmentTensor | None:
    """Where a K/V tensor that starts at byte ``offset`` of a segment lies in it, as the server
    reads it; None unless each token's heads are contiguous and the whole tensor is before byte
    ``end`` (the end of its K/V buffer's region)."""
    item = kv.element_size()
    heads, dim = spec.num_kv_heads, spec.head_dim
    layer_stride, kv_stride, *inner = kv.stride()
    wanted = (heads * dim, dim, 1)
    if any(n > 1 and st != want for n, st, want in zip(kv.shape[2:], inner, wanted, strict=True)):
        return None
    layout = pb.SegmentTensor(
        offset=offset,
        layer_stride=layer_stride * item,
        kv_stride=kv_stride * item,
        num_tokens=kv.shape[2],
    )
    last = offset + (spec.num_layers - 1) * layout.layer_stride + layout.kv_stride
    if layer_stride < 0 or kv_stride < 0 or last + kv.shape[2] * heads * dim * item > end:
        return None
    return layout


def segment_layout(spec: ModelSpec, num_tokens: int, offset: int = 0) -> pb.SegmentTensor:
    """The layout ``segment_kv`` reads: ``[layers, 2, num_tokens, ...]`` from byte ``offset`` of
    the segment (a region's), contiguous."""
    row = num_tokens * spec.block_nbytes // spec.block_tokens // (2 * spec.num_layers)
    return pb.SegmentTensor(
        offset=offset, layer_stride=2 * row, kv_stride=row, num_tokens=num_tokens
    )


def _unmap(segment: Segment) -> None:
    with contextlib.suppress(BufferError):  # a tensor over it is still referenced
        segment.mapping.close()


def segment_gone(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a same-host call failed because the server closed the segment it named."""
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "is not open for this tenant" in (
        exc.details() or ""
    )


def segment_kv(
    spec: ModelSpec, region: Region, num_blocks: int, num_tokens: int = 0
) -> torch.Tensor:
    """The leading bytes of ``region`` as ``[layers, 2, tokens, kv_heads, head_dim]``: tokens of
    ``num_blocks`` blocks, in a tensor laid out for ``num_tokens`` (``segment_layout``; 0: just
    those)."""
    import torch  # here, not at the top: see the package docstring

    tokens = num_blocks * spec.block_tokens
    room = max(num_tokens, tokens)
    shape = (spec.num_layers, 2, room, spec.num_kv_heads, spec.head_dim)
    nbytes = room * spec.block_nbytes // spec.block_tokens
    if nbytes > region.size:
        raise CorruptBlockError(
            f"{num_blocks} blocks of {spec.block_nbytes} bytes do not fit the {region.size}-byte "
            "shared region"
        )
    dtype = torch_dtype(spec.dtype)
    if not tokens:
        return torch.empty((*shape[:2], 0, *shape[3:]), dtype=dtype)
    whole = _tensor_over(region.segment.mapping)
    kv = whole[region.offset : region.offset + nbytes].view(dtype).view(shape)
    return kv[:, :, :tokens]


def _tensor_over(mapping: mmap.mmap) -> torch.Tensor:
    """A uint8 tensor over a whole mapping that keeps it mapped while the tensor lives.

    Through numpy: ``torch.frombuffer`` keeps the mmap object but not an export of its buffer,
    so ``mmap.close()`` would unmap the memory under a live tensor (a segfault on the next
    read); numpy's export makes ``close`` raise ``BufferError`` instead (``_unmap``)."""
    import torch

    return torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8))


def copy_kv(kv: torch.Tensor, out: torch.Tensor) -> None:
    """Copy a K/V tensor of the segment into ``out`` (the same shape): one strided copy of
    numpy's in this thread where ``out`` is in CPU memory (torch's CPU copies run on its
    intra-op threads, which on a busy 2-core host ran at 0.25 GB/s here), torch's otherwise (to
    a GPU: one host-to-device copy)."""
    import torch

    out = out.detach()
    if out.device.type != "cpu" or out.stride(-1) != 1:
        out.copy_(kv)
        return
    np.copyto(out.view(torch.uint8).numpy(), kv.view(torch.uint8).numpy())


def copy_slots(sink: BlockSink, region: Region, slots: Any) -> None:
    """Copy blocks out of this client's region into their places in the result: a server
    that answers a fetch into a segment with slots (it ignores the request's tensor). The slots'
    offsets are in the segment; none outside the region (another call's bytes) is read."""
    with memoryview(region.segment.mapping) as view:
        for slot in slots:
            if slot.offset < region.offset or slot.offset + slot.length > region.end:
                raise CorruptBlockError(
                    f"slot [{slot.offset}, +{slot.length}) is outside the shared region "
                    f"[{region.offset}, {region.end})"
                )
            sink.write(slot.block_index, 0, view[slot.offset : slot.offset + slot.length])


def is_local(target: str) -> bool:
    """Whether a gRPC target is this host: localhost, a loopback address or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host = target[1 : target.find("]")]
    else:
        host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
