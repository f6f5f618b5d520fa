"""The read RPCs: Lookup, Fetch (bytes, into a same-host segment, or into it layer by layer),
and OpenSegment / CloseSegment, which hand out the segments Fetch and Put use.

Fetch reads first and then sends: the header lists exactly the blocks that follow, so a block that
vanished between lookup and read ends the hit there. Whatever a Fetch sends or copies is held
under a lease until it has gone, so no block is evicted from under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
import xxhash

from kvstore.core.block_format import HEADER_BYTES, Codec, read_header, transcode_block
from kvstore.core.keys import BlockHash, ModelSpec
from kvstore.service.calls import Call, stream_rpc, unary_rpc
from kvstore.service.fetch_wire import chunk_message
from kvstore.service.segments import Segment
from kvstore.service.servicer_base import ServicerBase
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.convert import TIER_VALUE

__all__ = ["ReadRpcs"]

log = logging.getLogger(__name__)


def _raw_block(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """The block with a raw payload (G4 may hand back compressed blocks)."""
    if read_header(data).codec is Codec.RAW:
        return data
    return transcode_block(data, Codec.RAW)


class ReadRpcs(ServicerBase):
    @unary_rpc("Lookup")
    async def Lookup(self, request: Any, call: Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        found = await self.engine.lookup_hashes(p.spec, p.hashes)
        hit = found.hit_blocks
        self.metrics.lookup([t for t in found.tiers[:hit] if t], p.spec.block_tokens)

        def reply() -> Any:
            return pb.LookupResponse(
                block_hashes=found.hashes,
                tiers=[TIER_VALUE[t] if t else pb.TIER_UNSPECIFIED for t in found.tiers],
                hit_blocks=hit,
                hit_tokens=found.hit_tokens,
                holes=found.holes,
                block_tokens=p.spec.block_tokens,
            )

        if len(found.hashes) * p.spec.block_tokens <= self.server_config.heavy_prompt_tokens:
            return reply()
        async with self._heavy:  # a reply of ~10 MiB: built off the event loop too
            return await asyncio.to_thread(reply)

    @stream_rpc("Fetch")
    async def Fetch(self, request: Any, call: Call) -> AsyncGenerator[Any, None]:
        p = await self._prompt(request.prompt, call.who, "prompt")
        chunk_bytes = self._chunk_bytes(request.max_chunk_bytes)
        if request.repair_holes:
            await self._repair(request.prompt, p, call.who, exact=False)
        spec = p.spec
        found = await self.engine.lookup_hashes(spec, p.hashes)
        hit = found.hit_blocks
        if request.max_blocks:
            hit = min(hit, request.max_blocks)
        self.metrics.lookup([t for t in found.tiers[:hit] if t], spec.block_tokens)
        hashes = p.hashes[:hit]
        if request.segment_id:
            segment = self._segment(request.segment_id, call.who)
            if request.by_layer:
                async for message in self._fetch_by_layer(
                    spec, hashes, segment, request.segment_offset
                ):
                    yield message
                return
            yield await self._fetch_into(spec, hashes, segment, request.segment_offset)
            return
        # Read first, then send: the header lists exactly the blocks that follow, so a block
        # that vanished between lookup and read ends the hit there. G2 blocks are sent from
        # their slots (no copy), under a lease that lasts until the last chunk has gone.
        lease = self.engine.reserve(hashes) if hashes else None
        try:
            async for message in self._fetch_bytes(spec, hashes, chunk_bytes):
                yield message
        finally:
            if lease is not None:
                self.engine.release(lease.lease_id)

    async def _fetch_bytes(
        self, spec: ModelSpec, hashes: list[BlockHash], chunk_bytes: int
    ) -> AsyncIterator[Any]:
        blocks: list[bytes | bytearray | memoryview] = []
        for data in await self.engine.read(spec, hashes, in_place=True) if hashes else []:
            if data is None:
                break
            raw = _raw_block(data)
            if len(raw) != HEADER_BYTES + spec.block_nbytes:
                log.warning("block %s has an unexpected size; hit ends there", hashes[len(blocks)])
                break
            blocks.append(raw)
        yield pb.FetchResponse(
            header=pb.FetchHeader(
                block_hashes=hashes[: len(blocks)],
                block_tokens=spec.block_tokens,
                block_bytes=spec.block_nbytes,
            )
        )
        for i, block in enumerate(blocks):
            payload = memoryview(block)[HEADER_BYTES:]
            for offset in range(0, len(payload), chunk_bytes):
                # Encoded by hand: one copy of the payload slice into the message gRPC sends.
                yield chunk_message(i, offset, payload[offset : offset + chunk_bytes])
            self.metrics.bytes_out("stream", len(payload))

    async def _fetch_into(
        self, spec: ModelSpec, hashes: list[BlockHash], segment: Segment, offset: int
    ) -> Any:
        """Copy the verified payloads of the hit into the caller's segment, from ``offset`` on,
        as many as fit; the reply lists their slots. Nothing of another tenant's, nor any
        memory of the server's, is handed out: the client reads only its own segment."""
        size = spec.block_nbytes
        segment.check_range(offset, 0, "segment_offset")
        hashes = hashes[: (segment.size - offset) // size]
        # Held while copied: no block can be evicted from under the copy.
        lease = self.engine.reserve(hashes) if hashes else None
        try:
            with memoryview(segment.mapping) as whole:
                views = [
                    whole[offset + i * size : offset + (i + 1) * size] for i in range(len(hashes))
                ]
                try:
                    n = await self.engine.read_payloads_into(spec, hashes, views) if hashes else 0
                finally:
                    for view in views:
                        view.release()
        finally:
            if lease is not None:
                self.engine.release(lease.lease_id)
        slots = [pb.SlotRef(block_index=i, offset=offset + i * size, length=size) for i in range(n)]
        self.metrics.bytes_out("shm", len(slots) * size)
        return pb.FetchResponse(
            header=pb.FetchHeader(
                block_hashes=hashes[: len(slots)],
                block_tokens=spec.block_tokens,
                block_bytes=size,
                slots=slots,
            )
        )

    async def _fetch_by_layer(
        self, spec: ModelSpec, hashes: list[BlockHash], segment: Segment, offset: int
    ) -> AsyncIterator[Any]:
        """Copy the hit into the caller's segment layer by layer, as ``[layers, 2, tokens,
        kv_heads, head_dim]`` from ``offset`` on, with a ``FetchProgress`` after each layer: the
        client puts layer ``l`` in place while the server copies the next ones. Each G2 block's
        checksum is taken over the bytes that landed, in payload order as the layers go by; the
        last message says how many leading blocks passed (a block that did not is dropped from
        G2 as corrupt). Blocks from lower tiers were verified as they were read."""
        size = spec.block_nbytes
        segment.check_range(offset, 0, "segment_offset")
        hashes = hashes[: (segment.size - offset) // size]
        piece = size // (2 * spec.num_layers)  # the K (or V) of one layer of one block
        lease = self.engine.reserve(hashes) if hashes else None
        sources: list[tuple[BlockHash, memoryview, int | None]] = []
        try:
            sources = await self.engine.payload_sources(spec, hashes) if hashes else []
            n = len(sources)
            yield pb.FetchResponse(
                header=pb.FetchHeader(
                    block_hashes=[key for key, _, _ in sources],
                    block_tokens=spec.block_tokens,
                    block_bytes=size,
                    by_layer=True,
                )
            )
            hashers = [None if want is None else xxhash.xxh3_64() for _, _, want in sources]
            with memoryview(segment.mapping) as whole:
                dst = np.frombuffer(
                    whole, dtype=np.uint8, count=2 * spec.num_layers * n * piece, offset=offset
                ).reshape(2 * spec.num_layers, n, piece)
                src = [np.frombuffer(payload, dtype=np.uint8) for _, payload, _ in sources]
                try:
                    for layer in range(spec.num_layers):
                        for row in (2 * layer, 2 * layer + 1):
                            at = row * piece
                            for i, hasher in enumerate(hashers):
                                dst[row, i] = src[i][at : at + piece]
                                if hasher is not None:
                                    hasher.update(dst[row, i])
                        if layer + 1 < spec.num_layers:
                            yield pb.FetchResponse(progress=pb.FetchProgress(layers_done=layer + 1))
                finally:
                    del dst, src
            verified = n
            hits: list[BlockHash] = []
            mismatched: list[tuple[BlockHash, memoryview, int]] = []
            for i, ((key, payload, want), hasher) in enumerate(zip(sources, hashers, strict=True)):
                if hasher is None or want is None:
                    continue
                if hasher.intdigest() == want:
                    hits.append(key)
                else:
                    verified = min(verified, i)
                    mismatched.append((key, payload, want))
            sources = []
            await self.engine.settle_payloads(hits, mismatched)
            mismatched = []
            self.metrics.bytes_out("shm", verified * size)
            yield pb.FetchResponse(
                progress=pb.FetchProgress(
                    layers_done=spec.num_layers, done=True, verified_blocks=verified
                )
            )
        finally:
            sources = []
            if lease is not None:
                self.engine.release(lease.lease_id)

    # -- same-host segments --------------------------------------------------------------------

    @unary_rpc("OpenSegment")
    async def OpenSegment(self, request: Any, call: Call) -> Any:
        segment = self.segments.open(call.who.name, request.size_bytes)
        return pb.OpenSegmentResponse(
            segment_id=segment.segment_id,
            size_bytes=segment.size,
            socket=self.segments.socket_name,
            ticket=segment.ticket,
            idle_s=self.segments.idle_s,
        )

    @unary_rpc("CloseSegment")
    async def CloseSegment(self, request: Any, call: Call) -> Any:
        return pb.CloseSegmentResponse(
            closed=self.segments.close(request.segment_id, call.who.name)
        )
