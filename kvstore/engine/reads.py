"""The read path of the engine: reading verified blocks from the hottest tier that has them,
into tensors (new ones, or the caller's), the same-host payload sources and their settling,
promotions of what was read, staging."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xxhash

from kvstore.core.block_format import (
    HEADER_BYTES,
    Codec,
    check_block_tensor,
    decode_block,
    raw_payload_check,
    read_header,
    torch_dtype,
    transcode_block,
    verify_block,
)
from kvstore.core.copies import copy_payload_and_checksum
from kvstore.core.errors import (
    CorruptBlockError,
    InvalidArgumentError,
    SpecMismatchError,
    TierError,
)
from kvstore.core.keys import BlockHash, ModelSpec
from kvstore.engine.state import _Move, log
from kvstore.engine.writes import WritePath
from tiers.pinned_memory import PinnedMemoryTier

__all__ = ["ReadPath"]


# Blocks below G2 that ``payload_sources`` reads in one call.
_LOWER_BATCH = 32

# Bytes of the promotions queued with their data (``_Move.data``); the ones beyond it read their
# source again when their turn comes.
_PROMOTE_DATA_BYTES = 256 << 20

# G2 bytes that ``get_into`` and ``get`` copy between two yields to the event loop (~5 ms here):
# a long read must not stall every other request. No view of G2 is held across a yield.
_YIELD_BYTES = 64 << 20


def _per_yield(spec: ModelSpec) -> int:
    return max(1, _YIELD_BYTES // spec.block_nbytes)

Target = Any
"""Where one block's payload goes: a uint8 numpy view of a CPU tensor's bytes, shaped as the
payload's bytes are copied into it (``_byte_array``), or a block-shaped torch tensor elsewhere."""


def _byte_array(spec: ModelSpec, tensor: torch.Tensor) -> Target:
    """``tensor``'s memory as a target (a view: writing to it writes the tensor). On the CPU, its
    bytes as the matrix ``[layers * 2, tokens * row]`` (one row per (layer, K/V), as
    ``client.convert.BlockSink`` sees a prompt) where its strides allow that without a copy,
    else ``[layers, 2, tokens, kv_heads, head_dim * itemsize]``: numpy copies a block into
    either as one strided copy, the matrix ~5% faster for 64 KiB blocks (fewer dimensions)."""
    if tensor.device.type != "cpu":
        return tensor.detach()
    if tensor.stride(-1) != 1:
        raise InvalidArgumentError("out must have a contiguous last dimension (head_dim)")
    array = tensor.detach().view(torch.uint8).numpy()
    try:
        return np.reshape(array, (spec.num_layers * 2, -1), copy=False)
    except ValueError:  # the (layer, K/V) rows are not evenly spaced: the 5-D view then
        return array


def _targets(
    spec: ModelSpec, out: torch.Tensor | Sequence[torch.Tensor], num_blocks: int
) -> Callable[[int], Target]:
    """``target(i)``: where block ``i``'s payload goes in ``out``; ``out`` is checked here, before
    anything is read or written (``InvalidArgumentError``, ``SpecMismatchError``)."""
    if isinstance(out, torch.Tensor):
        layers, _, tokens, heads, dims = spec.block_shape
        if out.dtype != torch_dtype(spec.dtype):
            raise SpecMismatchError(f"out is {out.dtype}, namespace {spec.name} is {spec.dtype}")
        if (
            out.dim() != 5
            or (out.shape[0], out.shape[1], out.shape[3], out.shape[4]) != (layers, 2, heads, dims)
            or out.shape[2] < num_blocks * tokens
        ):
            raise SpecMismatchError(
                f"out is {list(out.shape)}; {num_blocks} blocks of {spec.name} need [layers="
                f"{layers}, 2, >= {num_blocks * tokens} tokens, kv_heads={heads}, head_dim={dims}]"
            )
        whole = _byte_array(spec, out)
        if whole.ndim == 2:
            row = spec.block_nbytes // (layers * 2)
            return [whole[:, i * row : (i + 1) * row] for i in range(num_blocks)].__getitem__
        return [whole[:, :, i * tokens : (i + 1) * tokens] for i in range(num_blocks)].__getitem__
    if not isinstance(out, Sequence) or not all(isinstance(t, torch.Tensor) for t in out):
        raise InvalidArgumentError("out must be a tensor or a list of one tensor per block")
    if len(out) != num_blocks:
        raise InvalidArgumentError(f"out has {len(out)} tensors for {num_blocks} blocks")
    for tensor in out:
        check_block_tensor(spec, tensor)
    arrays = [_byte_array(spec, t) for t in out]
    return arrays.__getitem__


def _write(payload: memoryview, target: Target) -> None:
    """Copy one block's payload into its target: one strided copy, one row per (layer, K/V)."""
    if isinstance(target, np.ndarray):
        # np.ndarray over the buffer: 0.2 us, np.frombuffer(...).reshape(...) took 0.7-1.5 us.
        np.copyto(target, np.ndarray(target.shape, np.uint8, payload))
        return
    with warnings.catch_warnings():
        # torch warns about a read-only source (bytes from a lower tier); it is only read.
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(payload, dtype=torch.uint8)
    target.copy_(src.view(target.dtype).view(target.shape))


class ReadPath(WritePath):
    # -- reads ---------------------------------------------------------------------------------

    async def read(
        self, spec: ModelSpec, keys: Sequence[bytes], *, in_place: bool = False
    ) -> list[bytes | bytearray | memoryview | None]:
        """The verified encoded bytes of each block from its hottest tier, or None.

        A block that a tier fails to return (corrupt, vanished) is looked for in the next tier
        down before it is reported missing. Hits in lower tiers are promoted in the background.

        ``in_place=True`` returns G2 hits as views of their slots instead of copies (a fresh
        2 MiB ``bytes`` per block page-faults: G2 reads ran at 2 GB/s that way). A view is valid
        only while the block stays in G2: the caller must hold a lease on it until done.
        """
        hashes = [BlockHash(bytes(k)) for k in keys]
        out: list[bytes | bytearray | memoryview | None] = [None] * len(hashes)
        todo = list(range(len(hashes)))
        for tier in self.placement.order:
            want = [i for i in todo if self.index.in_tier(hashes[i], tier)]
            if not want:
                continue
            source = self.tier(tier, spec.fingerprint)
            try:
                values: Sequence[bytes | bytearray | memoryview | None]
                if in_place and isinstance(source, PinnedMemoryTier):
                    values = [source.view_of(hashes[i]) for i in want]
                    found = sum(v is not None for v in values)
                    source.count_reads(found, len(values) - found)
                else:
                    values = await source.get([hashes[i] for i in want])
            except TierError as exc:
                log.warning("read from %s failed, trying lower tiers: %s", tier, exc)
                continue
            for i, value in zip(want, values, strict=True):
                if value is None:
                    self.index.remove(hashes[i], tier)
                    continue
                if tier in ("G1", "G2"):
                    # Memory tiers do not verify on read; a block leaving kvstore is verified.
                    try:
                        verify_block(hashes[i], value)
                    except CorruptBlockError as exc:
                        await self.tier(tier, spec.fingerprint).delete([hashes[i]])
                        self._on_corrupt(tier, hashes[i], str(exc))
                        continue
                out[i] = value
                self._promote(
                    hashes[i], spec.fingerprint, tier, value if isinstance(value, bytes) else None
                )
            todo = [i for i in todo if out[i] is None]
        hits = [h for h, v in zip(hashes, out, strict=True) if v is not None]
        self.index.touch(hits, hit=True)
        self.counters.add("read_hits", len(hits))
        self.counters.add("read_misses", len(hashes) - len(hits))
        return out

    def _g2_payload(self, key: BlockHash, nbytes: int) -> tuple[memoryview, int] | None:
        """A raw G2 block's payload, as a view of its slot, and the checksum that a copy of it
        must match: the header's, or -1 (never matches) when the slot holds another block."""
        g2 = self._tiers.get("G2")
        if not isinstance(g2, PinnedMemoryTier) or not self.index.in_tier(key, "G2"):
            return None
        slot = g2.view_of(key)
        if slot is None or len(slot) != HEADER_BYTES + nbytes:
            return None
        try:
            header = read_header(slot)
        except CorruptBlockError:
            return None
        if header.codec is not Codec.RAW:
            return None
        return slot[HEADER_BYTES:], header.payload_xxh3 if header.block_hash == key else -1

    async def _drop_corrupt_g2(self, key: BlockHash) -> None:
        g2 = self._tiers.get("G2")
        assert g2 is not None
        await g2.delete([key])
        self._on_corrupt("G2", key, "payload checksum mismatch")

    async def _lower_payloads(self, spec: ModelSpec, keys: list[BlockHash]) -> list[memoryview]:
        """The raw payloads of the leading blocks of ``keys`` that are found, read in one call
        (one trip to each tier's reader threads, not one per block)."""
        check = raw_payload_check(spec)
        out: list[memoryview] = []
        for key, data in zip(keys, await self.read(spec, keys, in_place=True), strict=True):
            if data is None:
                break
            if read_header(data).codec is not Codec.RAW:
                data = transcode_block(data, Codec.RAW)
            payload = check(key, memoryview(data))
            if payload is None:
                log.warning("block %s is not one of %s; the hit ends there", key.hex(), spec.name)
                break
            out.append(payload)
        return out

    async def read_payloads_into(
        self, spec: ModelSpec, keys: Sequence[bytes], views: Sequence[memoryview]
    ) -> int:
        """Copy the raw payloads of the leading blocks of ``keys`` into ``views`` (one per key,
        ``spec.block_nbytes`` each), verified; returns how many leading blocks were copied.

        G2 hits are copied and checksummed in one pass (the sum is of the bytes that landed), so
        verifying costs no extra read of the block; a G2 copy that fails is dropped as corrupt
        and the block read from the tiers below, as ``read`` does. The caller holds a lease."""
        nbytes = spec.block_nbytes
        done = 0
        hits: list[BlockHash] = []
        for raw, view in zip(keys, views, strict=True):
            key = BlockHash(bytes(raw))
            g2 = self._g2_payload(key, nbytes)
            if g2 is not None:
                payload, expected = g2
                intact = copy_payload_and_checksum(payload, view) == expected
                if not intact:  # dropped only if G2's copy itself is bad (``settle_payloads``)
                    intact = not await self.settle_payloads([], [(key, payload, expected)])
                del payload, g2
                if intact:
                    hits.append(key)
                    done += 1
                    continue
            found = await self._lower_payloads(spec, [key])
            if not found:
                break
            view[:] = found[0]
            done += 1
        self._g2_hits(hits)
        return done

    def _g2_hits(self, hits: list[BlockHash]) -> None:
        """Blocks copied out of G2 in place (``view_of``): their recency and the counters."""
        if hits:
            self.index.touch(hits, hit=True)
            self.counters.add("read_hits", len(hits))
            self._tiers["G2"].count_reads(len(hits))

    async def payload_sources(
        self, spec: ModelSpec, keys: Sequence[bytes]
    ) -> list[tuple[BlockHash, memoryview, int | None]]:
        """The raw payloads of the leading blocks of ``keys``, for a caller that copies them
        itself (layer by layer): ``(key, payload, checksum)``. A G2 block is a view of its slot
        with the checksum that the caller's copy must match (``settle_payloads`` then); a block
        from a lower tier is read and verified here, checksum None. The caller holds a lease."""
        out: list[tuple[BlockHash, memoryview, int | None]] = []
        lower: list[BlockHash] = []  # a run of blocks not in G2, read in one call

        async def read_lower() -> bool:
            datas = await self._lower_payloads(spec, lower)
            out.extend((key, data, None) for key, data in zip(lower, datas, strict=False))
            whole = len(datas) == len(lower)
            lower.clear()
            return whole

        for raw in keys:
            key = BlockHash(bytes(raw))
            g2 = self._g2_payload(key, spec.block_nbytes)
            if g2 is None:
                lower.append(key)
                if len(lower) < _LOWER_BATCH or await read_lower():
                    continue
                return out
            if lower and not await read_lower():
                return out
            out.append((key, g2[0], g2[1]))
        if lower:
            await read_lower()
        return out

    async def settle_payloads(
        self, hits: list[BlockHash], mismatched: list[tuple[BlockHash, memoryview, int]]
    ) -> int:
        """After copies of G2 payloads (``payload_sources``): count the blocks whose copy matched
        their checksum as hits, and look again at each ``(key, payload, checksum)`` whose copy
        did not. A mismatch is G2's copy gone bad, or the destination written to during the copy
        (a client's own segment): only a G2 payload that fails its checksum itself is dropped as
        corrupt. Returns how many were dropped."""
        self._g2_hits(hits)
        dropped = 0
        for key, payload, expected in mismatched:
            if xxhash.xxh3_64_intdigest(payload) != expected:
                await self._drop_corrupt_g2(key)
                dropped += 1
        return dropped

    def _copy_from_g2(
        self,
        spec: ModelSpec,
        hashes: Sequence[BlockHash],
        start: int,
        stop: int,
        target: Callable[[int], Target],
        check: Callable[[bytes, memoryview], memoryview | None],
        hits: list[BlockHash],
    ) -> int:
        """Copy the G2 payloads of ``hashes[start:stop]`` into ``target(i)``, in order, up to the
        first block that G2 does not hold as a raw block of the namespace (``check``); returns
        the index after the last block copied, and appends the blocks copied to ``hits``.

        No checksum: G2 holds only blocks checked on their way in (a put encodes the block, its
        checksum taken of the bytes written, or verifies it; moves verify it) and its memory
        does not rot as a disk can; what leaves kvstore as bytes (``read``) is still verified.
        Synchronous, from finding a block to the end of its copy: no other task runs meanwhile,
        so nothing can evict or overwrite it."""
        g2 = self._tiers.get("G2")
        if not isinstance(g2, PinnedMemoryTier):
            return start
        # The tier, not the index, says what a slot holds: the index may lag it by an await
        # (admission, eviction) either way, and a committed slot is whole.
        view_of, copyto, array = g2.view_of, np.copyto, np.ndarray
        i = start
        while i < stop:
            key = hashes[i]
            slot = view_of(key)
            payload = None if slot is None else check(key, slot)
            if payload is None:
                break
            dst = target(i)
            if isinstance(dst, array):  # _write, inlined: 64 KiB blocks copy in ~7 us
                copyto(dst, array(dst.shape, np.uint8, payload))
            else:
                _write(payload, dst)
            i += 1
        hits += hashes[start:i]
        if i > start and self.placement.promote_to("G2") is not None:
            for key in hashes[start:i]:
                self._promote(key, spec.fingerprint, "G2")
        return i

    async def get_into(
        self, spec: ModelSpec, keys: Sequence[bytes], out: torch.Tensor | Sequence[torch.Tensor]
    ) -> int:
        """Read the leading blocks of ``keys`` into tensors the caller owns; returns how many
        leading blocks landed. The hit ends at the first block that no tier has: ``out`` is left
        as it was from there on.

        ``out`` is one tensor ``[layers, 2, >= len(keys) * block_tokens, kv_heads, head_dim]``
        that the blocks fill in order along the tokens (a prompt's K/V, as ``put`` takes it; a
        slice of a larger one will do), or a list of one tensor ``[layers, 2, block_tokens,
        kv_heads, head_dim]`` per key; in the namespace's dtype, with a contiguous last
        dimension, on the CPU or a GPU. An ``out`` that does not fit raises
        ``InvalidArgumentError`` (``SpecMismatchError`` for a dtype or shape) before anything is
        read or written.

        A G2 hit is one copy, from its slot straight into ``out`` (``_copy_from_g2``: no
        checksum, no intermediate bytes); hits in lower tiers are verified as ``read`` verifies
        them, and promoted. Reused tensors are the fast path: fresh memory costs page faults
        (~10 ms per 32 MiB here). Between blocks other requests may run (every
        ``_YIELD_BYTES``): a block evicted from G2 meanwhile is read from the tier it went to,
        or ends the hit; hold a lease (``reserve``) to keep the blocks in place."""
        hashes = [BlockHash(bytes(k)) for k in keys]
        target = _targets(spec, out, len(hashes))
        check = raw_payload_check(spec)
        hits: list[BlockHash] = []
        done, per_yield = 0, _per_yield(spec)
        while done < len(hashes):
            stop = min(len(hashes), done + per_yield)
            copied = self._copy_from_g2(spec, hashes, done, stop, target, check, hits)
            if copied > done:
                if copied == stop < len(hashes):
                    await asyncio.sleep(0)
                done = copied
                continue
            # A run of blocks not in G2, read from the tiers below in one call.
            end = done + 1
            while (
                end < len(hashes)
                and end - done < _LOWER_BATCH
                and not self.index.in_tier(hashes[end], "G2")
            ):
                end += 1
            for payload in await self._lower_payloads(spec, hashes[done:end]):
                _write(payload, target(done))
                done += 1
            if done < end:
                break
        self._g2_hits(hits)
        return done

    async def get(self, spec: ModelSpec, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Each block as a new tensor ``[layers, 2, block_tokens, kv_heads, head_dim]``, or None.

        G2 hits are copied as ``get_into`` copies them, into memory from numpy's allocator (see
        ``block_format._fresh_bytes``); the other blocks are read (``read``) and decoded, verified.
        One allocation per block, not one per call: measured here, one buffer per call ran at
        0.6x the speed of per-block buffers once it passed glibc's 32 MiB mmap threshold (fresh
        pages on every call), and about as fast below it. New memory still costs page faults;
        ``get_into`` with reused tensors avoids them."""
        hashes = [BlockHash(bytes(k)) for k in keys]
        byte_shape = (*spec.block_shape[:-1], spec.head_dim * spec.itemsize)
        # Untouched until a block lands in it: a miss costs no page faults.
        blocks = [np.empty(byte_shape, dtype=np.uint8) for _ in hashes]
        check = raw_payload_check(spec)
        hits: list[BlockHash] = []
        rest: list[int] = []
        done, per_yield = 0, _per_yield(spec)
        while done < len(hashes):
            stop = min(len(hashes), done + per_yield)
            done = self._copy_from_g2(spec, hashes, done, stop, blocks.__getitem__, check, hits)
            if done < stop:  # not in G2
                rest.append(done)
                done += 1
            elif done < len(hashes):
                await asyncio.sleep(0)
        self._g2_hits(hits)
        dtype = torch_dtype(spec.dtype)
        out: list[torch.Tensor | None] = [torch.from_numpy(b).view(dtype) for b in blocks]
        if rest:
            found = await self.read(spec, [hashes[i] for i in rest])
            for i, data in zip(rest, found, strict=True):
                out[i] = None if data is None else decode_block(spec, hashes[i], data)
        return out

    def _promote(
        self, key: BlockHash, namespace: bytes, hit_tier: str, data: bytes | None = None
    ) -> None:
        """Queue a copy of a block just read from ``hit_tier`` into the tier above it; with its
        (verified, immutable) bytes while they fit ``_PROMOTE_DATA_BYTES``."""
        dst = self.placement.promote_to(hit_tier)
        if dst is None or self.index.in_tier(key, dst):
            return
        if data is not None and self._promote_data_bytes + len(data) > _PROMOTE_DATA_BYTES:
            data = None
        try:
            self._queue.put_nowait(_Move("promote", key, namespace, hit_tier, dst, data=data))
        except asyncio.QueueFull:
            # Promotion is an optimisation: never make a read wait for it.
            self.counters.add("promotions_skipped")
            return
        if data is not None:
            self._promote_data_bytes += len(data)

    # -- same host -----------------------------------------------------------------------------

    async def stage(self, spec: ModelSpec, keys: Sequence[bytes]) -> list[bool]:
        """Bring blocks into G2 now (not in the background), ahead of reads that should hit
        memory; returns which of them are in G2 afterwards."""
        out = []
        for raw in keys:
            key = BlockHash(bytes(raw))
            if not self.index.in_tier(key, "G2"):
                hottest = self.index.hottest(key)
                if hottest is not None:
                    await self._copy(key, spec.fingerprint, hottest, "G2")
            out.append(self.index.in_tier(key, "G2"))
        return out

    def usage_of(self, owner: str) -> int:
        """Bytes of the distinct blocks ``owner`` stored that are still held on this node."""
        return self.index.owner_bytes(owner)

