"""The Fetch stream, read: a prompt's leading hit into one tensor, or layer by layer.

``fetch_request`` builds the request that both ``get_prefix`` and ``get_prefix_by_layer`` send.
``fetch_shared`` runs it through a shared segment where the same-host path is on (the server
copies the blocks into the segment), else returns None and the caller receives bytes.
``fetch_blocks`` is one attempt of a whole-hit fetch of chunks, written into their place;
``fetch_into_segment`` one attempt of a whole-hit fetch into the segment, laid out as the
result's tensor so that one copy puts it in place; ``fetch_into_buffer`` one attempt of a fetch
straight into a K/V buffer (no copy here at all); ``fetch_layers`` one attempt of a
layer-by-layer fetch into the segment, each layer handed over as soon as the server says it is
there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from client.channel import Channel
from client.convert import BlockSink, ExtraKeys, Tokens, check_out, prompt_of
from client.same_host import (
    Region,
    Segment,
    SegmentBusy,
    Segments,
    SegmentUnusable,
    copy_kv,
    copy_slots,
    segment_kv,
    segment_layout,
)
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError
from kvstore.core.keys import ModelSpec
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "fetch_blocks",
    "fetch_into_buffer",
    "fetch_into_segment",
    "fetch_layers",
    "fetch_request",
    "fetch_shared",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
# Quoted: torch is imported only where a tensor is made (a CLI call that never fetches skips it).
OnLayer: TypeAlias = "Callable[[int, torch.Tensor], None]"


def fetch_request(
    spec: ModelSpec,
    tokens: Tokens,
    extra_keys: ExtraKeys,
    max_blocks: int,
    max_chunk_bytes: int,
    *,
    repair_holes: bool = False,
    by_layer: bool = False,
) -> pb.FetchRequest:
    if max_blocks < 0:
        raise InvalidArgumentError(f"max_blocks must be >= 0, got {max_blocks}")
    return pb.FetchRequest(
        prompt=prompt_of(spec, tokens, extra_keys),
        max_blocks=max_blocks,
        max_chunk_bytes=max_chunk_bytes,
        repair_holes=repair_holes,
        by_layer=by_layer,
    )


async def fetch_shared(
    channel: Channel,
    segments: Segments,
    spec: ModelSpec,
    request: pb.FetchRequest,
    fetch: Callable[[pb.FetchRequest, Region], Awaitable[T]],
) -> T | None:
    """``fetch`` (one attempt of ``request`` into a region of a segment, retried) through the
    client's shared segments, or None where the same-host path is not to be used: the caller
    then receives bytes. The request names the region's segment and offset."""
    most = _most_blocks(spec, request)
    if not segments.for_fetch or not most:
        return None

    def attempt(region: Region) -> Awaitable[T]:
        shared = pb.FetchRequest()
        shared.CopyFrom(request)
        shared.segment_id = region.segment.segment_id
        shared.segment_offset = region.offset
        return channel.retrying(lambda: fetch(shared, region), raw=True)

    try:
        return await segments.use(most * spec.block_nbytes, attempt)
    except SegmentUnusable as exc:
        log.info("%s: same-host fetch unavailable, receiving bytes: %s", channel.target, exc)
        segments.for_fetch = False
    except SegmentBusy as exc:
        log.info("%s: no segment for this fetch, receiving bytes: %s", channel.target, exc)
    return None


def _most_blocks(spec: ModelSpec, request: pb.FetchRequest) -> int:
    """The most blocks a reply to ``request`` can have: every full block of the prompt, or
    ``max_blocks``. A segment that size holds any hit, so one call suffices."""
    most = len(request.prompt.tokens_u32le) // 4 // spec.block_tokens
    return min(most, request.max_blocks) if request.max_blocks else most


async def fetch_blocks(
    channel: Channel, spec: ModelSpec, request: pb.FetchRequest, out: torch.Tensor | None
) -> torch.Tensor:
    """One attempt of a Fetch stream of bytes: every chunk written into its place."""
    call = channel.call("Fetch", request)
    sink: BlockSink | None = None
    try:
        async for reply in call:
            kind = reply.WhichOneof("msg")
            if kind == "header":
                header = reply.header
                _check_block_bytes(spec, header)
                if header.slots:
                    raise CorruptBlockError("the server sent slots for a fetch of bytes")
                sink = BlockSink(spec, len(header.block_hashes), out)
            elif sink is None:
                raise CorruptBlockError("the server's reply did not start with a header")
            elif kind == "chunk":
                sink.write(reply.chunk.block_index, reply.chunk.offset, reply.chunk.data)
            else:
                raise CorruptBlockError(f"unexpected {kind} message in a Fetch reply")
        if sink is None:
            raise CorruptBlockError("the server's reply had no header")
        return sink.result()
    finally:
        call.cancel()  # a no-op once the stream is done; else stops the server sending


async def fetch_into_segment(
    channel: Channel,
    spec: ModelSpec,
    request: pb.FetchRequest,
    region: Region,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """One attempt of a whole-hit fetch into ``region``: the server writes the verified blocks
    into it as a K/V tensor with room for the whole request (``segment_layout`` at the region's
    offset), and one copy (``copy_kv``) puts the hit into ``out`` or a new tensor."""
    import torch  # here, not at the top: see the package docstring

    most = _most_blocks(spec, request)
    request.tensor.CopyFrom(segment_layout(spec, most * spec.block_tokens, region.offset))
    header = await _only_header(channel, spec, request)
    n = len(header.block_hashes)
    if header.slots:  # a server that does not know FetchRequest.tensor
        sink = BlockSink(spec, n, out)
        copy_slots(sink, region, header.slots)
        return sink.result()
    if n > most:
        raise CorruptBlockError(f"the server sent {n} blocks for a fetch of at most {most}")
    tokens = n * spec.block_tokens
    if out is None:
        shape = (spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim)
        target = torch.empty(shape, dtype=torch_dtype(spec.dtype))
    else:
        check_out(spec, out, n)
        target = out[:, :, :tokens]
    copy_kv(segment_kv(spec, region, n, most * spec.block_tokens), target)
    return target


async def fetch_into_buffer(
    channel: Channel,
    spec: ModelSpec,
    request: pb.FetchRequest,
    segment: Segment,
    layout: pb.SegmentTensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """One attempt of a fetch straight into a K/V buffer (``out``, which lies in ``segment`` at
    ``layout``): the server writes each verified block into its place; the result is the view of
    ``out`` that the reply vouches for, and no other byte of it is to be trusted."""
    shared = pb.FetchRequest()
    shared.CopyFrom(request)
    shared.segment_id = segment.segment_id
    shared.tensor.CopyFrom(layout)
    header = await _only_header(channel, spec, shared)
    tokens = len(header.block_hashes) * spec.block_tokens
    if header.slots or tokens > out.shape[2]:
        raise CorruptBlockError(
            f"the server answered a fetch into a {out.shape[2]}-token buffer with "
            f"{tokens} tokens{' as slots' if header.slots else ''}"
        )
    return out[:, :, :tokens]


async def _only_header(
    channel: Channel, spec: ModelSpec, request: pb.FetchRequest
) -> pb.FetchHeader:
    """The reply to a fetch into a segment: one header, nothing after it."""
    header = None
    call = channel.call("Fetch", request)
    try:
        async for reply in call:
            if reply.WhichOneof("msg") != "header" or header is not None:
                raise CorruptBlockError("a fetch into a segment is answered with one header")
            header = reply.header
    finally:
        call.cancel()
    if header is None:
        raise CorruptBlockError("the server's reply had no header")
    _check_block_bytes(spec, header)
    return header


async def fetch_layers(
    channel: Channel,
    spec: ModelSpec,
    request: pb.FetchRequest,
    region: Region,
    on_layer: OnLayer,
) -> int:
    """One attempt of a layer-by-layer Fetch into ``region`` (the server lays the hit out from
    the request's ``segment_offset``, the region's); the verified tokens."""
    call = channel.call("Fetch", request)
    kv: torch.Tensor | None = None
    done, layers = 0, spec.num_layers
    try:
        async for reply in call:
            kind = reply.WhichOneof("msg")
            if kind == "header":
                header = reply.header
                if kv is not None or not header.by_layer:
                    raise CorruptBlockError("the server did not answer layer by layer")
                _check_block_bytes(spec, header)
                kv = segment_kv(spec, region, len(header.block_hashes))
                continue
            if kind != "progress" or kv is None:
                raise CorruptBlockError(f"unexpected {kind} message in a layer-by-layer Fetch")
            progress = reply.progress
            upto = min(progress.layers_done, layers)
            for layer in range(done, upto):
                on_layer(layer, kv[layer])
            done = max(done, upto)
            if progress.done:
                if done != layers:
                    raise CorruptBlockError(f"the Fetch ended after {done} of {layers} layers")
                blocks = kv.shape[2] // spec.block_tokens
                return int(min(progress.verified_blocks, blocks)) * spec.block_tokens
        raise CorruptBlockError("the layer-by-layer Fetch ended before its last message")
    finally:
        del kv  # the segment can be closed only when no view of it is left
        call.cancel()


def _check_block_bytes(spec: ModelSpec, header: pb.FetchHeader) -> None:
    if header.block_bytes and header.block_bytes != spec.block_nbytes:
        raise CorruptBlockError(
            f"the server sends blocks of {header.block_bytes} bytes, namespace {spec.name} has "
            f"{spec.block_nbytes}"
        )
