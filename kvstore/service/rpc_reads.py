"""The read RPCs: Lookup, Fetch (bytes, into a same-host segment, straight into a K/V tensor in
it, or into it layer by layer), and OpenSegment / CloseSegment, which hand out the segments Fetch
and Put use.

Fetch reads first and then sends: the header lists exactly the blocks that follow, so a block that
vanished between lookup and read ends the hit there. Whatever a Fetch sends or copies is held
under a lease until it has gone, so no block is evicted from under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import numpy as np
import xxhash

from kvstore.core.block_format import HEADER_BYTES, Codec, read_header, transcode_block
from kvstore.core.copies import copy_steps, copy_verified
from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import BlockHash, ModelSpec
from kvstore.service.calls import Call, stream_rpc, unary_rpc
from kvstore.service.fetch_wire import chunk_message
from kvstore.service.segments import Segment, kv_rows
from kvstore.service.servicer_base import ServicerBase
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.convert import lookup_reply

__all__ = ["ReadRpcs"]

log = logging.getLogger(__name__)

# Blocks whose payloads ``_fetch_into_tensor`` asks the engine for at a time: bounds the memory
# held for blocks read from lower tiers.
_SOURCE_BATCH = 32
# Bytes a Fetch copies into a segment between two yields to the event loop (~5 ms here), so that
# a huge fetch does not stall every other request. The lease keeps the blocks in place meanwhile.
_YIELD_BYTES = 64 << 20


def _raw_block(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """The block with a raw payload (G4 may hand back compressed blocks)."""
    if read_header(data).codec is Codec.RAW:
        return data
    return transcode_block(data, Codec.RAW)


class ReadRpcs(ServicerBase):
    @unary_rpc("Lookup")
    async def Lookup(self, request: Any, call: Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        spec = p.spec
        # The reply does not wait for the recency update of the blocks found (a sixth of the
        # server's time in a 512-block Lookup), and a prompt looked up again and again is
        # touched once per few milliseconds.
        found = await self.engine.lookup_hashes(spec, p.hashes, touch_later=True)
        hashes, tiers, block_tokens = found.hashes, found.tiers, spec.block_tokens
        if len(hashes) * block_tokens <= self.server_config.heavy_prompt_tokens:
            message = lookup_reply(hashes, tiers, block_tokens, packed=request.packed_reply)
        else:
            async with self._heavy:  # a reply of ~10 MiB: built off the event loop too
                message = await asyncio.to_thread(
                    lambda: lookup_reply(hashes, tiers, block_tokens, packed=request.packed_reply)
                )
        hit = message.hit_blocks
        # The leading hit, all present (no None); most often the whole prompt, not copied then.
        hit_tiers = cast("list[str]", tiers if hit == len(tiers) else tiers[:hit])
        self.metrics.lookup(hit_tiers, block_tokens)
        return message

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
        tensor = request.tensor if request.HasField("tensor") else None
        if tensor is not None and not request.segment_id:
            raise InvalidArgumentError("tensor needs segment_id (the segment that holds it)")
        if request.segment_id:
            segment = self._segment(request.segment_id, call.who)
            if request.by_layer:
                async for message in self._fetch_by_layer(
                    spec, hashes, segment, request.segment_offset, tensor
                ):
                    yield message
                return
            if tensor is not None:
                yield await self._fetch_into_tensor(spec, hashes, segment, tensor)
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

    async def _fetch_into_tensor(
        self, spec: ModelSpec, hashes: list[BlockHash], segment: Segment, tensor: Any
    ) -> Any:
        """Copy the payloads of the hit straight into their places in the caller's K/V tensor
        (``tensor``, a ``SegmentTensor`` of its segment), as many as it has tokens for: one copy
        per block, checksummed in the same pass (``copy_verified``). A G2 copy that fails is
        dropped as corrupt and the block read from the tiers below; a block found nowhere intact
        ends the hit, and the bytes it left are zeroed. The reply lists exactly the blocks
        written: the client uses no others."""
        rows = kv_rows(segment, spec, tensor)
        size = spec.block_nbytes
        row = size // (2 * spec.num_layers)
        steps = copy_steps(spec.num_layers, row)
        hashes = hashes[: tensor.num_tokens // spec.block_tokens]
        lease = self.engine.reserve(hashes) if hashes else None
        done = unyielded = 0
        hits: list[BlockHash] = []
        try:
            complete = True
            while complete and done < len(hashes):
                asked = hashes[done : done + _SOURCE_BATCH]
                sources = await self.engine.payload_sources(spec, asked)
                complete = len(sources) == len(asked)  # else the hit ends after the last found
                for key, payload, want in sources:
                    dst = rows[:, :, done * row : (done + 1) * row]
                    src = np.frombuffer(payload, dtype=np.uint8).reshape(dst.shape)
                    if want is None:  # read from a lower tier, verified there
                        np.copyto(dst, src)
                    elif copy_verified(src, dst, steps) == want:
                        hits.append(key)
                    elif not await self._copy_again(spec, key, payload, want, dst):
                        complete = False
                        break
                    done += 1
                    unyielded += size
                    if unyielded >= _YIELD_BYTES:
                        unyielded = 0
                        await asyncio.sleep(0)
                sources = []
        finally:
            sources = []
            if lease is not None:
                self.engine.release(lease.lease_id)
            await self.engine.settle_payloads(hits, [])
        self.metrics.bytes_out("shm", done * size)
        return pb.FetchResponse(
            header=pb.FetchHeader(
                block_hashes=hashes[:done], block_tokens=spec.block_tokens, block_bytes=size
            )
        )

    async def _copy_again(
        self,
        spec: ModelSpec,
        key: BlockHash,
        payload: memoryview,
        want: int,
        dst: np.ndarray[Any, np.dtype[np.uint8]],
    ) -> bool:
        """After G2's copy of ``key`` failed its checksum on its way into ``dst``: drop it, and
        copy the block from a lower tier instead; False if none has it (``dst`` is zeroed then:
        bytes that failed their checksum are not left to look valid)."""
        await self.engine.settle_payloads([], [(key, payload, want)])  # drops G2's copy
        again = await self.engine.payload_sources(spec, [key])
        if again and again[0][2] is None:
            np.copyto(dst, np.frombuffer(again[0][1], dtype=np.uint8).reshape(dst.shape))
            return True
        dst[...] = 0
        return False

    async def _fetch_by_layer(
        self,
        spec: ModelSpec,
        hashes: list[BlockHash],
        segment: Segment,
        offset: int,
        tensor: Any = None,
    ) -> AsyncIterator[Any]:
        """Copy the hit into the caller's segment layer by layer, as ``[layers, 2, tokens,
        kv_heads, head_dim]`` from ``offset`` on (or into the K/V tensor ``tensor`` of the
        segment, as many blocks as it has tokens for), with a ``FetchProgress`` after each
        layer: the client puts layer ``l`` in place while the server copies the next ones. Each
        G2 block's checksum is taken over the bytes that landed, in payload order as the layers
        go by; the last message says how many leading blocks passed (a block that did not is
        dropped from G2 as corrupt). Blocks from lower tiers were verified as they were read."""
        size = spec.block_nbytes
        piece = size // (2 * spec.num_layers)  # the K (or V) of one layer of one block
        if tensor is not None:
            rows = kv_rows(segment, spec, tensor)
            hashes = hashes[: tensor.num_tokens // spec.block_tokens]
        else:
            segment.check_range(offset, 0, "segment_offset")
            hashes = hashes[: (segment.size - offset) // size]
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
            if tensor is None:  # the default layout: [layers, 2, n * block_tokens, ...] at offset
                rows = segment.strided(
                    offset, (spec.num_layers, 2, n * piece), (2 * n * piece, n * piece, 1), "reply"
                )
            src = [np.frombuffer(payload, dtype=np.uint8) for _, payload, _ in sources]
            dst: np.ndarray[Any, np.dtype[np.uint8]] | None = None
            try:
                for layer in range(spec.num_layers):
                    for kv in (0, 1):
                        at = (2 * layer + kv) * piece
                        for i, hasher in enumerate(hashers):
                            dst = rows[layer, kv, i * piece : (i + 1) * piece]
                            dst[...] = src[i][at : at + piece]
                            if hasher is not None:
                                hasher.update(dst.data)
                    if layer + 1 < spec.num_layers:
                        yield pb.FetchResponse(progress=pb.FetchProgress(layers_done=layer + 1))
            finally:
                # Views of the segment must be gone before it can be unmapped; the generator
                # lives on to send the last message.
                del rows, src
                dst = None
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
