"""The Fetch stream, read: a prompt's leading hit into one tensor, or layer by layer.

``fetch_request`` builds the request that both ``get_prefix`` and ``get_prefix_by_layer`` send.
``fetch_shared`` runs it through a shared segment where the same-host path is on (the server
copies the blocks into the segment), else returns None and the caller receives bytes.
``fetch_blocks`` is one attempt of a whole-hit fetch (chunks, or slots of the segment, written
into their place), ``fetch_layers`` one attempt of a layer-by-layer fetch into the segment, each
layer handed over as soon as the server says it is there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from client.channel import Channel
from client.convert import BlockSink, ExtraKeys, Tokens, prompt_of
from client.same_host import Segment, SegmentBusy, Segments, SegmentUnusable, copy_slot, segment_kv
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError
from kvstore.core.keys import ModelSpec
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["fetch_blocks", "fetch_layers", "fetch_request", "fetch_shared"]

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
    fetch: Callable[[pb.FetchRequest, Segment], Awaitable[T]],
) -> T | None:
    """``fetch`` (one attempt of ``request`` into a segment, retried) through the client's
    shared segment, or None where the same-host path is not to be used: the caller then
    receives bytes."""
    # At most every full block of the prompt comes back: a segment that size holds any hit,
    # so one call suffices.
    most = len(request.prompt.tokens_u32le) // 4 // spec.block_tokens
    most = min(most, request.max_blocks) if request.max_blocks else most
    if not segments.for_fetch or not most:
        return None

    def attempt(segment: Segment) -> Awaitable[T]:
        shared = pb.FetchRequest()
        shared.CopyFrom(request)
        shared.segment_id = segment.segment_id
        return channel.retrying(lambda: fetch(shared, segment), raw=True)

    try:
        return await segments.use(most * spec.block_nbytes, attempt)
    except SegmentUnusable as exc:
        log.info("%s: same-host fetch unavailable, receiving bytes: %s", channel.target, exc)
        segments.for_fetch = False
    except SegmentBusy as exc:
        log.info("%s: no segment for this fetch, receiving bytes: %s", channel.target, exc)
    return None


async def fetch_blocks(
    channel: Channel,
    spec: ModelSpec,
    request: pb.FetchRequest,
    out: torch.Tensor | None,
    segment: Segment | None = None,
) -> torch.Tensor:
    """One attempt of a Fetch stream: every reply message written into its place (chunks,
    or the slots of ``segment`` that the server copied the blocks into)."""
    call = channel.call("Fetch", request)
    sink: BlockSink | None = None
    try:
        async for reply in call:
            kind = reply.WhichOneof("msg")
            if kind == "header":
                header = reply.header
                _check_block_bytes(spec, header)
                sink = BlockSink(spec, len(header.block_hashes), out)
                if header.slots and segment is None:
                    raise CorruptBlockError("the server sent slots for a fetch of bytes")
                for slot in header.slots:
                    assert segment is not None
                    copy_slot(sink, segment.mapping, slot)
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


async def fetch_layers(
    channel: Channel,
    spec: ModelSpec,
    request: pb.FetchRequest,
    segment: Segment,
    on_layer: OnLayer,
) -> int:
    """One attempt of a layer-by-layer Fetch into ``segment``; the verified tokens."""
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
                kv = segment_kv(spec, segment, len(header.block_hashes))
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
