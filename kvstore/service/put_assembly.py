"""Put assembly: a Put stream's ``BlockChunk`` / ``SlotRef`` messages turned into whole block
tensors, in order, with every rule of the stream checked as the messages come.

Used by the Put RPC (kvstore/service/rpc_writes.py) and for the answers of model workers
attached through the Work stream (kvstore/service/remote_worker.py), which come as chunks too.
Per stream: ``PutAssembler(spec, num_blocks, segment)``, then ``chunk(message)`` or
``slot(message)`` for each message (a tensor once a block is complete), then ``finish()``
(the stream must end on a block boundary, after every announced block). A ``SlotRef`` tensor is
a view of the segment: it must be dropped before the segment can be unmapped.

A Put whose header names a K/V tensor in the segment (``header.tensor``, a client's
``kv_buffer``) has no messages after the header: ``TensorBlocks`` hands its blocks, a few at a
time, to the engine as views of the segment, which it encodes straight into G2.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import ModelSpec
from kvstore.service.segments import Segment, kv_rows

__all__ = ["PutAssembler", "TensorBlocks"]

# Blocks per engine call of ``TensorBlocks`` (at least one): the event loop is free between calls.
_BATCH_BYTES = 16 << 20


class PutAssembler:
    """Turns a Put stream's BlockChunk / SlotRef messages into whole block tensors, in order."""

    def __init__(self, spec: ModelSpec, num_blocks: int, segment: Segment | None) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.segment = segment
        self.next_block = 0
        self.nbytes = spec.block_nbytes
        self._dtype = torch_dtype(spec.dtype)
        self._buf: bytearray | None = None
        self._filled = 0

    def _expect_block(self, index: int, what: str) -> int:
        i = self.next_block
        if i >= self.num_blocks:
            raise InvalidArgumentError(
                f"{what} of block {index} after all {self.num_blocks} blocks the header "
                "announced (header.num_blocks, 0: every full block of the prompt)"
            )
        return i

    def _tensor(self, buffer: bytearray | memoryview) -> torch.Tensor:
        return torch.frombuffer(buffer, dtype=self._dtype).view(self.spec.block_shape)

    def chunk(self, chunk: Any) -> torch.Tensor | None:
        if self.segment is not None:
            raise InvalidArgumentError(
                "this stream named header.segment_id, so blocks come as SlotRef messages, "
                "not BlockChunk"
            )
        i = self._expect_block(chunk.block_index, "a chunk")
        if chunk.block_index != i or chunk.offset != self._filled:
            raise InvalidArgumentError(
                f"expected a chunk of block {i} at offset {self._filled}, got block "
                f"{chunk.block_index} at offset {chunk.offset}: blocks come in order, each as "
                "chunks with contiguous offsets from 0"
            )
        size = len(chunk.data)
        if size == 0:
            raise InvalidArgumentError(f"chunk of block {i} at offset {chunk.offset} has no data")
        end = self._filled + size
        if end > self.nbytes:
            raise InvalidArgumentError(
                f"chunk of block {i} at offset {chunk.offset} with {size} bytes ends at {end}, "
                f"past the block payload of {self.nbytes} bytes ({self.spec.dtype} "
                f"{list(self.spec.block_shape)} of namespace {self.spec.name})"
            )
        if self._buf is None:
            self._buf = bytearray(self.nbytes)
        self._buf[self._filled : end] = chunk.data
        self._filled = end
        if end < self.nbytes:
            return None
        tensor = self._tensor(self._buf)
        self._buf, self._filled = None, 0
        self.next_block += 1
        return tensor

    def slot(self, slot: Any) -> torch.Tensor:
        if self.segment is None:
            raise InvalidArgumentError(
                "SlotRef messages need header.segment_id (a segment this tenant opened with "
                "OpenSegment); without it, send BlockChunk messages"
            )
        i = self._expect_block(slot.block_index, "a SlotRef")
        if slot.block_index != i:
            raise InvalidArgumentError(
                f"expected the SlotRef of block {i}, got block {slot.block_index}: blocks come "
                "in order"
            )
        if slot.length != self.nbytes:
            raise InvalidArgumentError(
                f"SlotRef of block {i} has length {slot.length}; a block payload of namespace "
                f"{self.spec.name} is {self.nbytes} bytes"
            )
        self.segment.check_range(slot.offset, slot.length, f"SlotRef of block {i}")
        self.next_block += 1
        return self._tensor(self.segment.view(slot.offset, slot.length))

    def finish(self) -> None:
        if self._filled:
            raise InvalidArgumentError(
                f"the stream ended inside block {self.next_block} ({self._filled} of "
                f"{self.nbytes} bytes); that block is not stored"
            )
        if self.next_block < self.num_blocks:
            raise InvalidArgumentError(
                f"the stream ended after {self.next_block} of the {self.num_blocks} blocks "
                "the header announced"
            )


class TensorBlocks:
    """The blocks of a Put that names a K/V tensor in its segment (``header.tensor``).

    The tensor is checked against the segment here, before anything is read or stored
    (``kv_rows``: every byte inside the segment, offsets and strides in whole items), and must
    hold the ``num_blocks`` blocks. ``batches()`` hands them out a few at a time as block tensors
    over the server's own mapping of the segment: a block of a K/V tensor is ``layers * 2`` rows
    apart in memory, and the encoder gathers those rows straight into G2 while checksumming them
    (``encode_block_into``, ``kvstore.core.copies.copy_verified``): one copy in all. What the G2
    checksum covers is what G2 holds, whatever the client writes into its segment meanwhile.
    ``close()`` drops every view of the segment.
    """

    def __init__(self, spec: ModelSpec, num_blocks: int, segment: Segment, tensor: Any) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        if tensor.num_tokens < num_blocks * spec.block_tokens:
            raise InvalidArgumentError(
                f"header.tensor has {tensor.num_tokens} tokens, fewer than the "
                f"{num_blocks * spec.block_tokens} of the {num_blocks} blocks to store"
            )
        self._rows: np.ndarray[Any, np.dtype[np.uint8]] | None = kv_rows(
            segment, spec, tensor, "header.tensor"
        )
        self._row_bytes = spec.block_nbytes // (2 * spec.num_layers)
        self.per_batch = max(1, _BATCH_BYTES // spec.block_nbytes)

    def batches(self) -> Iterator[list[torch.Tensor]]:
        """Each batch of blocks, in order, as a list of block tensors (views of the segment)."""
        assert self._rows is not None, "closed"
        spec, rows, row = self.spec, self._rows, self._row_bytes
        dtype = torch_dtype(spec.dtype)
        for start in range(0, self.num_blocks, self.per_batch):
            end = min(self.num_blocks, start + self.per_batch)
            views = [rows[:, :, i * row : (i + 1) * row] for i in range(start, end)]
            yield [torch.from_numpy(v).view(dtype).view(spec.block_shape) for v in views]

    def close(self) -> None:
        self._rows = None
