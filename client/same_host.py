"""The same-host path of a client: shared-memory segments instead of bytes over gRPC.

The client asks the server for a segment (``OpenSegment``: a sealed memfd the server creates and
owns, handed over by file descriptor on a unix socket with a one-time ticket, see
kvstore/wire/segments.py) and maps it. A put writes its blocks into the segment and sends slot
references (``put_into``); a fetch has the server copy the verified blocks into it, and the client
copies them from there into the result (``copy_slot``) or hands out views of it (``segment_kv``).
``Segments`` keeps one client's segments for reuse, one per call in flight; ``Segments.use`` runs
one call on one and replaces a segment the server closed for idleness. Where no segment can be
had (``SegmentUnusable``: another host or container, segments off) the client falls back to bytes
for good; when the tenant's segment bytes are used up (``SegmentBusy``), for that call.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import mmap
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from client.channel import Channel, MiB
from client.convert import BlockSink, BlockSource, put_result_of
from client.errors import error_from_rpc
from client.results import PutResult
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import CorruptBlockError, KVStoreError
from kvstore.core.keys import ModelSpec
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.segments import receive_segment_fd

if TYPE_CHECKING:
    import torch

__all__ = [
    "Segment",
    "SegmentBusy",
    "SegmentUnusable",
    "Segments",
    "copy_slot",
    "is_local",
    "put_into",
    "segment_kv",
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


class Segments:
    """The server-issued segments of one client, reused from one same-host call to the next.

    One segment per call in flight (so concurrent calls do not share bytes); when no free segment
    is large enough, the largest free one is closed and one at least twice its size is opened.
    ``for_put`` and ``for_fetch`` say whether each kind of call still tries the same-host path.
    """

    def __init__(self, channel: Channel, *, enabled: bool) -> None:
        self._channel = channel
        self._free: list[Segment] = []
        self._all: set[Segment] = set()
        self.for_put = enabled
        self.for_fetch = enabled

    async def use(self, nbytes: int, call: Callable[[Segment], Awaitable[T]]) -> T:
        """Run one same-host call on a segment of at least ``nbytes``; a segment the server
        closed meanwhile (idle) is replaced once. Other failures are typed."""
        for attempt in range(2):
            segment = await self.acquire(nbytes)
            try:
                return await call(segment)
            except grpc.aio.AioRpcError as exc:
                if not _segment_gone(exc):
                    raise error_from_rpc(exc, self._channel.target) from None
                await self.discard(segment)
                if attempt:
                    raise SegmentUnusable(exc.details()) from None
            finally:
                self.release(segment)  # a no-op for a discarded one
        raise AssertionError("unreachable")

    async def acquire(self, nbytes: int) -> Segment:
        for i, segment in enumerate(self._free):
            if segment.size >= nbytes:
                return self._free.pop(i)
        size = 1 * MiB
        if self._free:
            biggest = max(self._free, key=lambda s: s.size)
            self._free.remove(biggest)
            size = 2 * biggest.size
            await self._close(biggest)
        need = -(-nbytes // MiB) * MiB
        try:
            return await self._open(max(size, need))
        except SegmentBusy:
            if size <= need:
                raise
            return await self._open(need)  # the doubled size passed the bound; the need may not

    def release(self, segment: Segment) -> None:
        if segment in self._all:
            self._free.append(segment)

    async def discard(self, segment: Segment) -> None:
        """Forget a segment the server no longer knows (it was closed for idleness)."""
        self._all.discard(segment)
        _unmap(segment)

    async def close(self) -> None:
        self._free.clear()
        for segment in list(self._all):
            await self._close(segment)

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
        self._all.add(segment)
        return segment

    async def _close(self, segment: Segment) -> None:
        self._all.discard(segment)
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
    channel: Channel, header: pb.PutHeader, source: BlockSource, segment: Segment
) -> PutResult:
    """One attempt of a put through ``segment``: the blocks written into it, slots sent."""
    n, size = header.num_blocks, source.block_nbytes
    with memoryview(segment.mapping) as view:
        source.copy_into(n, view)
    shared = pb.PutHeader()
    shared.CopyFrom(header)
    shared.segment_id = segment.segment_id

    def requests() -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(header=shared)
        for i in range(n):
            yield pb.PutRequest(slot=pb.SlotRef(block_index=i, offset=i * size, length=size))

    return put_result_of(await channel.retrying(lambda: channel.call("Put", requests()), raw=True))


def _unmap(segment: Segment) -> None:
    with contextlib.suppress(BufferError):  # a tensor over it is still referenced
        segment.mapping.close()


def _segment_gone(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a same-host call failed because the server closed the segment it named."""
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "is not open for this tenant" in (
        exc.details() or ""
    )


def segment_kv(spec: ModelSpec, segment: Segment, num_blocks: int) -> torch.Tensor:
    """The leading bytes of ``segment`` as ``[layers, 2, tokens, kv_heads, head_dim]``."""
    import torch  # here, not at the top: see the package docstring

    tokens = num_blocks * spec.block_tokens
    shape = (spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim)
    if num_blocks * spec.block_nbytes > segment.size:
        raise CorruptBlockError(
            f"{num_blocks} blocks of {spec.block_nbytes} bytes do not fit the {segment.size}-byte "
            "shared segment"
        )
    dtype = torch_dtype(spec.dtype)
    if not num_blocks:
        return torch.empty(shape, dtype=dtype)
    count = num_blocks * spec.block_nbytes // dtype.itemsize
    return torch.frombuffer(segment.mapping, dtype=dtype, count=count).view(shape)


def copy_slot(sink: BlockSink, segment: mmap.mmap, slot: Any) -> None:
    """Copy one block out of this client's segment into its place in the result."""
    if slot.offset + slot.length > len(segment):
        raise CorruptBlockError(
            f"slot [{slot.offset}, +{slot.length}) is outside the shared segment"
        )
    with memoryview(segment) as view:
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
