"""The read path of the engine: reading verified blocks from the hottest tier that has them,
the same-host payload sources and their settling, promotions of what was read, staging."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch
import xxhash

from kvstore.core.block_format import (
    HEADER_BYTES,
    Codec,
    copy_payload_and_checksum,
    decode_block,
    read_header,
    transcode_block,
    verify_block,
)
from kvstore.core.errors import CorruptBlockError, TierError
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
        out: list[memoryview] = []
        for key, data in zip(keys, await self.read(spec, keys, in_place=True), strict=True):
            if data is None:
                break
            if read_header(data).codec is not Codec.RAW:
                data = transcode_block(data, Codec.RAW)
            if len(data) != HEADER_BYTES + spec.block_nbytes:
                log.warning("block %s has an odd size; the hit ends there", key.hex())
                break
            out.append(memoryview(data)[HEADER_BYTES:])
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
        if hits:
            self.index.touch(hits, hit=True)
            self.counters.add("read_hits", len(hits))

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

    async def get(self, spec: ModelSpec, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Each block as a tensor ``[layers, 2, block_tokens, kv_heads, head_dim]``, or None."""
        out: list[torch.Tensor | None] = []
        for key, data in zip(keys, await self.read(spec, keys), strict=True):
            out.append(None if data is None else decode_block(spec, key, data))
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

