"""The write RPC: Put, a client stream of a ``PutHeader`` and then the blocks, as ``BlockChunk``
messages or as ``SlotRef`` messages into a same-host segment (assembled by ``PutAssembler``); on
the same host the header may also carry every slot itself, or name a K/V tensor in the segment
(``TensorBlocks``), and then the whole Put is one message.

Blocks are stored in batches as they complete. A stream that fails or breaks off removes the
blocks its earlier batches stored new (``_roll_back``), so a refused Put stores nothing, except
blocks another Put stored too meanwhile (``_claim``: those are no longer this Put's to undo).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import torch

from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import BlockHash, root_hash
from kvstore.service.calls import Call, unary_rpc
from kvstore.service.put_assembly import PutAssembler, TensorBlocks
from kvstore.service.servicer_base import ServicerBase
from kvstore.v1 import kvstore_pb2 as pb

__all__ = ["WriteRpcs"]

MiB = 1 << 20
# Put streams hand complete blocks to the engine in batches of about this many bytes: large
# enough that a batch is one tier write, small enough that a stream holds little memory.
_PUT_BATCH_BYTES = 16 * MiB


class WriteRpcs(ServicerBase):
    @unary_rpc("Put")
    async def Put(self, requests: AsyncIterator[Any], call: Call) -> Any:
        stream = aiter(requests)
        first = await anext(stream, None)
        kind = None if first is None else first.WhichOneof("msg")
        if kind != "header":
            got = (
                "an empty stream"
                if first is None
                else "an empty message"
                if kind is None
                else f"a {kind} message"
            )
            raise InvalidArgumentError(f"a Put stream starts with a PutHeader; got {got}")
        assert first is not None
        header = first.header
        tenant = call.who
        p = await self._prompt(header.prompt, tenant, "header.prompt")
        n = self._num_blocks(header.num_blocks, p, "header.num_blocks")
        spec = p.spec
        self._check_block_fits(spec)
        torch_dtype(spec.dtype)  # a dtype this torch build lacks is refused before any data
        hashes = p.hashes[:n]
        parents: list[bytes] = [root_hash(spec, p.salt), *hashes[:-1]]
        self._check_quota(tenant, spec, hashes)
        segment = self._segment(header.segment_id, tenant) if header.segment_id else None
        path = "stream" if segment is None else "shm"
        assembler = PutAssembler(spec, n, segment)
        from_tensor = None
        if header.HasField("tensor"):
            if segment is None or header.slots:
                raise InvalidArgumentError(
                    "header.tensor needs header.segment_id (the segment that holds it) and no "
                    "header.slots"
                )
            from_tensor = TensorBlocks(spec, n, segment, header.tensor)
        batch: list[tuple[BlockHash, bytes | None, torch.Tensor]] = []
        stored = already = 0
        mine: set[BlockHash] = set()  # what this put stored new: removed again if it fails
        tensor: torch.Tensor | None = None

        async def store() -> None:
            nonlocal stored, already
            if not batch:
                return
            keys = [h for h, _, _ in batch]
            self._check_quota(tenant, spec, keys)
            self._claim(keys, mine)
            result = await self.engine.put_blocks(
                spec, batch, durable=header.durable, owner=tenant.name
            )
            self.metrics.bytes_in(path, len(batch) * spec.block_nbytes)
            stored += result.stored
            already += result.already
            batch.clear()

        try:
            if from_tensor is not None:
                if await anext(stream, None) is not None:
                    raise InvalidArgumentError(
                        "a Put whose header names a tensor carries no messages after the header"
                    )
                start = 0
                for tensors in from_tensor.batches():
                    batch.extend(
                        (hashes[i], parents[i], t) for i, t in enumerate(tensors, start)
                    )
                    start += len(tensors)
                    await store()
            else:
                for slot in header.slots:
                    tensor = assembler.slot(slot)
                    i = assembler.next_block - 1
                    batch.append((hashes[i], parents[i], tensor))
                    if len(batch) * spec.block_nbytes >= _PUT_BATCH_BYTES:
                        await store()
                async for message in stream:
                    kind = message.WhichOneof("msg")
                    if kind == "chunk":
                        tensor = assembler.chunk(message.chunk)
                    elif kind == "slot":
                        tensor = assembler.slot(message.slot)
                    else:
                        raise InvalidArgumentError(
                            f"after the header a Put stream carries chunk or slot messages; got "
                            f"{kind or 'an empty message'}"
                        )
                    if tensor is None:
                        continue
                    i = assembler.next_block - 1
                    batch.append((hashes[i], parents[i], tensor))
                    if len(batch) * spec.block_nbytes >= _PUT_BATCH_BYTES:
                        await store()
                assembler.finish()
            await store()
        except BaseException:
            # A refused or broken-off Put stores nothing: the batches it stored go again.
            batch.clear()
            tensor = None
            await self._roll_back(mine)
            raise
        finally:
            # Tensors over the segment must be gone before it can be unmapped.
            batch.clear()
            tensor = None
            if from_tensor is not None:
                from_tensor.close()
            self._unclaim(mine)
        return pb.PutResponse(block_hashes=hashes, stored=stored, already=already)

    def _claim(self, keys: list[BlockHash], mine: set[BlockHash]) -> None:
        """Note which of a Put batch's blocks it stores new (``mine``, undone if the Put fails).
        A block that another running Put stored new and this one stores too is no longer that
        Put's to undo: this one may be acknowledged with it."""
        for key in keys:
            owner = self._new_by_put.get(key)
            if owner is not None and owner is not mine:
                owner.discard(key)
                del self._new_by_put[key]
            elif owner is None and key not in self.engine.index:
                mine.add(key)
                self._new_by_put[key] = mine

    def _unclaim(self, mine: set[BlockHash]) -> None:
        for key in mine:
            if self._new_by_put.get(key) is mine:
                del self._new_by_put[key]

    async def _roll_back(self, mine: set[BlockHash]) -> None:
        if not mine:
            return
        keys = list(mine)
        self._unclaim(mine)
        mine.clear()
        # Shielded: a Put cancelled by its client still removes what it stored.
        undo = asyncio.ensure_future(self.engine.evict(keys))
        with contextlib.suppress(asyncio.CancelledError):
            removed = await asyncio.shield(undo)
            self.engine.counters.add("put_rollbacks")
            self.engine.counters.add("put_rollback_blocks", removed)
