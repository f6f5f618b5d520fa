"""Conversions between the user's objects and the wire: the one module both clients use.

What the server needs too (namespaces, prompts, extra keys, tier and event enums) is in
``kvstore.wire.convert``, one copy for both sides; this module re-exports the names clients use
(``namespace_of``, ``spec_of``, ``prompt_of``, ``tier_name``, ``tier_value``, ``Tokens``,
``ExtraKeys``) and keeps what only a client does. In the order a put and a fetch use them:

1. ``prompt_of(spec, tokens, extra_keys)`` — the ``Prompt`` message: the namespace
   (``namespace_of``), tokens as u32 little-endian bytes (validated by ``kvstore.core.keys``), and
   the extra keys of each block.
2. ``BlockSource(spec, kv)`` — a prompt's K/V ``[layers, 2, tokens, kv_heads, head_dim]``, checked
   against the namespace (``SpecMismatchError``), read out block by block as the wire wants it:
   ``chunks()`` for the byte stream, ``copy_into()`` for a shared-memory segment.
3. ``BlockSink(spec, num_blocks, out)`` — the reverse: block payloads arriving in chunks or as
   shared-memory slots are written straight into their place in one tensor
   ``[layers, 2, num_blocks * block_tokens, kv_heads, head_dim]``.
4. ``lookup_request`` — a prompt's ``LookupRequest``.
5. ``lookup_of``, ``put_result_of``, ``stats_of``, ``block_info_of``, ``event_of`` — replies to the
   dataclasses of ``client.results``.
6. ``from_dynamic_cache`` / ``to_dynamic_cache`` — a transformers ``DynamicCache`` (batch size 1)
   and the K/V tensor the store takes.

Why block payloads are addressed as a byte matrix: a block's payload is ``[layers, 2,
block_tokens, kv_heads, head_dim]`` in C order, so inside a prompt tensor it is ``layers * 2``
rows of ``block_tokens * kv_heads * head_dim`` elements, one row per (layer, K/V), with the
prompt's other blocks between them. Viewing the prompt as bytes ``[layers * 2, tokens * row]``
lets every payload byte be read or written with plain slice copies: no per-block ``contiguous()``
copy on the way out, no staging tensor on the way in, and nothing that depends on the dtype
(bfloat16 and float8 included).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from client.results import (
    BlockInfo,
    Event,
    Lookup,
    PutResult,
    Repair,
    Stats,
    TierUsage,
    WorkerInfo,
)
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError, SpecMismatchError
from kvstore.core.keys import DIGEST_BYTES, BlockHash, ModelSpec
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.convert import (
    EVENT_KIND_NAME,
    ExtraKeys,
    Tokens,
    namespace_of,
    prompt_of,
    same_fields,
    spec_of,
    tier_name,
    tier_value,
    unpack_hashes,
    unpack_tiers,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "BlockSink",
    "BlockSource",
    "ExtraKeys",
    "Tokens",
    "block_info_of",
    "check_out",
    "event_of",
    "from_dynamic_cache",
    "lookup_of",
    "lookup_request",
    "namespace_of",
    "prompt_of",
    "put_result_of",
    "spec_of",
    "stats_of",
    "tier_name",
    "tier_value",
    "to_dynamic_cache",
]

_NO_PARENT = bytes(16)

U8Matrix = np.ndarray[Any, np.dtype[np.uint8]]


# -- K/V tensors <-> block payloads ----------------------------------------------------------------


def _check_kv(spec: ModelSpec, kv: torch.Tensor, what: str) -> None:
    import torch  # here, not at the top: see the package docstring

    if not isinstance(kv, torch.Tensor):
        raise InvalidArgumentError(f"{what} must be a torch.Tensor, not {type(kv).__name__}")
    want = torch_dtype(spec.dtype)
    if kv.dtype != want:
        raise SpecMismatchError(
            f"{what} dtype is {str(kv.dtype).removeprefix('torch.')}, but namespace {spec.name} "
            f"stores {spec.dtype}"
        )
    expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != expected:
        raise SpecMismatchError(
            f"{what} shape is {list(kv.shape)}, not [layers={spec.num_layers}, 2, tokens, "
            f"kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}] of {spec.name}"
        )


def _row_bytes(spec: ModelSpec) -> int:
    """Bytes of one (layer, K/V) row of one block."""
    return spec.block_tokens * spec.num_kv_heads * spec.head_dim * spec.itemsize


def _byte_matrix(spec: ModelSpec, kv: torch.Tensor) -> U8Matrix:
    """A contiguous CPU ``[layers, 2, tokens, ...]`` tensor as bytes ``[layers * 2, tokens * ..]``
    (a view: writing to it writes the tensor)."""
    import torch

    rows = spec.num_layers * 2
    if kv.numel() == 0:
        return np.zeros((rows, 0), dtype=np.uint8)
    assert kv.is_contiguous(), "a byte matrix needs a contiguous tensor"
    assert kv.device.type == "cpu", "a byte matrix needs a CPU tensor"
    return kv.detach().reshape(rows, -1).view(torch.uint8).numpy()


class BlockSource:
    """The full blocks of a prompt's K/V, read out as block payloads for a put.

    Checked against the namespace when made. For ``chunks`` a CPU tensor that is already
    contiguous is read in place, anything else is copied to one once (on first use: a put of a
    K/V buffer never reads it here); ``copy_into`` reads any CPU tensor whose last dimension is
    contiguous in place.
    """

    def __init__(self, spec: ModelSpec, kv: torch.Tensor) -> None:
        _check_kv(spec, kv, "K/V")
        self.spec = spec
        self.num_blocks = kv.shape[2] // spec.block_tokens
        self.block_nbytes = spec.block_nbytes
        self._row = _row_bytes(spec)
        self._given = kv.detach()
        self._kv: torch.Tensor | None = None
        self._matrix: U8Matrix | None = None

    @property
    def _rows(self) -> U8Matrix:
        if self._matrix is None:
            # Keep the tensor: the byte matrix borrows its memory.
            self._kv = self._given.to("cpu").contiguous()
            self._matrix = _byte_matrix(self.spec, self._kv)
        return self._matrix

    def payload(self, index: int, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of block ``index``'s payload, in one copy."""
        if length is None:
            length = self.block_nbytes - offset
        pieces = []
        col = index * self._row
        row, at = divmod(offset, self._row)
        while length > 0:
            take = min(self._row - at, length)
            pieces.append(self._rows[row, col + at : col + at + take].data)
            length -= take
            row, at = row + 1, 0
        return b"".join(pieces)

    def chunks(self, num_blocks: int, max_chunk_bytes: int) -> Iterator[pb.BlockChunk]:
        """``BlockChunk`` messages for blocks ``0 .. num_blocks - 1``, each at most
        ``max_chunk_bytes`` of one block."""
        for index in range(num_blocks):
            for offset in range(0, self.block_nbytes, max_chunk_bytes):
                length = min(max_chunk_bytes, self.block_nbytes - offset)
                yield pb.BlockChunk(
                    block_index=index, offset=offset, data=self.payload(index, offset, length)
                )

    def copy_into(self, num_blocks: int, buffer: memoryview) -> None:
        """Write the payloads of blocks ``0 .. num_blocks - 1`` back to back at the start of
        ``buffer`` (a shared-memory segment), in one strided copy."""
        import torch

        spec, kv = self.spec, self._given
        dst = np.frombuffer(buffer, dtype=np.uint8, count=num_blocks * self.block_nbytes)
        if kv.device.type == "cpu" and kv.stride(-1) == 1:
            # [layers, 2, tokens, heads, dim bytes] as [layers, 2, blocks, block_tokens, ...]:
            # splitting the tokens axis is a view whatever its stride, so no contiguous copy.
            src = kv.view(torch.uint8).numpy()[:, :, : num_blocks * spec.block_tokens]
            src = src.reshape(*src.shape[:2], num_blocks, spec.block_tokens, *src.shape[3:])
            to = dst.reshape(num_blocks, *src.shape[:2], *src.shape[3:])
            np.copyto(to, src.transpose(2, 0, 1, 3, 4, 5))
            return
        rows = spec.num_layers * 2
        matrix = self._rows[:, : num_blocks * self._row].reshape(rows, num_blocks, self._row)
        np.copyto(dst.reshape(num_blocks, rows, self._row), matrix.transpose(1, 0, 2))


class BlockSink:
    """Assembles fetched block payloads into ``[layers, 2, num_blocks * block_tokens, ...]``.

    With ``out`` (a tensor of the namespace's dtype with room for at least ``num_blocks`` blocks
    along dim 2), the payloads are written into its leading tokens and the result is a view of
    it; otherwise into a new tensor. Chunks are copied straight from the received message into
    their place: the only copy on the way in. An ``out`` that is not a contiguous CPU tensor is
    filled through one CPU staging tensor.
    """

    def __init__(self, spec: ModelSpec, num_blocks: int, out: torch.Tensor | None = None) -> None:
        import torch

        self.spec = spec
        self.num_blocks = num_blocks
        self.block_nbytes = spec.block_nbytes
        self._row = _row_bytes(spec)
        tokens = num_blocks * spec.block_tokens
        shape = (spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim)
        if out is None:
            out = torch.empty(shape, dtype=torch_dtype(spec.dtype))
        else:
            check_out(spec, out, num_blocks)
        self._out = out
        direct = out.device.type == "cpu" and out.is_contiguous()
        self._target = out if direct else torch.empty(shape, dtype=out.dtype)
        self._rows = _byte_matrix(spec, self._target)
        self._received = [0] * num_blocks

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Put ``data`` at byte ``offset`` of block ``index``'s payload."""
        src = np.frombuffer(data, dtype=np.uint8)
        n = src.size
        if not 0 <= index < self.num_blocks or offset + n > self.block_nbytes:
            raise CorruptBlockError(
                f"the server sent bytes [{offset}, {offset + n}) of block {index}; the reply "
                f"has {self.num_blocks} blocks of {self.block_nbytes} bytes"
            )
        col = index * self._row
        row, at = divmod(offset, self._row)
        done = 0
        if at:
            take = min(self._row - at, n)
            self._rows[row, col + at : col + at + take] = src[:take]
            done, row = take, row + 1
        full = (n - done) // self._row
        if full:
            self._rows[row : row + full, col : col + self._row] = src[
                done : done + full * self._row
            ].reshape(full, self._row)
            done, row = done + full * self._row, row + full
        if done < n:
            self._rows[row, col : col + n - done] = src[done:]
        self._received[index] += n

    def result(self) -> torch.Tensor:
        """The assembled tensor; ``CorruptBlockError`` if a block did not arrive whole."""
        for index, got in enumerate(self._received):
            if got != self.block_nbytes:
                raise CorruptBlockError(
                    f"block {index} arrived with {got} of its {self.block_nbytes} bytes"
                )
        tokens = self.num_blocks * self.spec.block_tokens
        if self._target is not self._out:
            self._out[:, :, :tokens].copy_(self._target)
        return self._out[:, :, :tokens]


def check_out(spec: ModelSpec, out: torch.Tensor, num_blocks: int | None = None) -> int:
    """Check a caller's ``out`` tensor; returns how many blocks fit in it."""
    _check_kv(spec, out, "out")
    room = out.shape[2] // spec.block_tokens
    if num_blocks is not None and room < num_blocks:
        raise InvalidArgumentError(
            f"out has room for {out.shape[2]} tokens, the reply has {num_blocks} blocks of "
            f"{spec.block_tokens}"
        )
    return room


# -- replies ---------------------------------------------------------------------------------------


def _hash_or_none(value: bytes) -> BlockHash | None:
    return None if not value or value == _NO_PARENT else BlockHash(value)


def lookup_request(
    spec: ModelSpec, tokens: Tokens, extra_keys: ExtraKeys = None
) -> pb.LookupRequest:
    """The ``LookupRequest`` of a prompt, asking for the packed reply (``lookup_of`` reads both)."""
    return pb.LookupRequest(prompt=prompt_of(spec, tokens, extra_keys), packed_reply=True)


def lookup_of(reply: pb.LookupResponse) -> Lookup:
    """The ``Lookup`` of a reply in either form: the packed fields (what ``packed_reply`` asks
    for) or the repeated ones (a server that predates them)."""
    # Each read of a bytes field makes a new bytes object: each is read once.
    packed, codes = reply.packed_hashes, reply.packed_tiers
    if packed or codes:
        if len(packed) != DIGEST_BYTES * len(codes):
            raise CorruptBlockError(
                f"the server's Lookup reply has {len(packed)} bytes of hashes for "
                f"{len(codes)} blocks; hashes are {DIGEST_BYTES} bytes"
            )
        hashes = unpack_hashes(packed)
        tiers = unpack_tiers(codes)
    else:
        hashes = cast(list[BlockHash], list(reply.block_hashes))
        tiers = [tier_name(t) for t in reply.tiers]
    holes = reply.holes  # most often none: ``list()`` of an empty field costs 3x the test
    return Lookup(
        hashes=hashes,
        tiers=tiers,
        hit_blocks=reply.hit_blocks,
        hit_tokens=reply.hit_tokens,
        holes=list(holes) if holes else [],
        block_tokens=reply.block_tokens,
    )


def put_result_of(reply: pb.PutResponse) -> PutResult:
    return PutResult(
        hashes=[BlockHash(h) for h in reply.block_hashes],
        stored=reply.stored,
        already=reply.already,
    )


def _usage_of(usage: pb.TenantUsage) -> dict[str, int | str]:
    return same_fields(usage, pb.TenantUsage)


def stats_of(reply: pb.StatsResponse) -> Stats:
    return Stats(
        tiers=[
            TierUsage(tier=tier_name(t.tier) or "", **same_fields(t, pb.TierStats, skip=("tier",)))
            for t in reply.tiers
        ],
        num_blocks=reply.num_blocks,
        num_leases=reply.num_leases,
        queue_depth=reply.queue_depth,
        counters=dict(reply.counters),
        workers=[
            WorkerInfo(
                spec=spec_of(w.namespace),
                **same_fields(w, pb.WorkerInfo, skip=("namespace",)),
            )
            for w in reply.workers
        ],
        tenant=_usage_of(reply.tenant) if reply.HasField("tenant") else {},
        tenants=[_usage_of(t) for t in reply.tenants],
    )


def repair_of(reply: pb.RepairResponse) -> Repair:
    return Repair(
        repaired=list(reply.repaired),
        hit_blocks=reply.hit_blocks,
        hit_blocks_before=reply.hit_blocks_before,
        kept=list(reply.kept),
        worker=reply.worker,
    )


def block_info_of(info: pb.BlockInfo, detail: pb.InspectResponse | None = None) -> BlockInfo:
    extra: dict[str, Any] = {}
    if detail is not None:
        extra = {
            "dtype": detail.dtype,
            "shape": tuple(detail.shape),
            "codec": detail.codec,
            "raw_xxh3": detail.raw_xxh3,
            "payload_xxh3": detail.payload_xxh3,
        }
    return BlockInfo(
        block_hash=BlockHash(info.block_hash),
        parent_hash=_hash_or_none(info.parent_hash),
        namespace_fingerprint=info.namespace_fingerprint,
        tiers=[name for name in map(tier_name, info.tiers) if name is not None],
        nbytes=info.nbytes,
        hits=info.hits,
        pinned=info.pinned,
        leases=info.leases,
        **extra,
    )


def event_of(event: pb.WatchEvent) -> Event:
    return Event(
        seq=event.seq,
        kind=EVENT_KIND_NAME.get(event.kind, "unknown"),
        block_hash=BlockHash(event.block_hash),
        tier=tier_name(event.tier),
        from_tier=tier_name(event.from_tier),
        parent_hash=_hash_or_none(event.parent_hash),
        namespace_fingerprint=event.namespace_fingerprint,
        time_s=event.time_s,
        snapshot=event.snapshot,
        reason=event.reason or None,
    )


# -- transformers --------------------------------------------------------------------------------


def _layer_pairs(cache: Any, *, whole: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: one object per layer
        pairs = [(layer.keys, layer.values) for layer in layers]
        for i, layer in enumerate(layers):
            seen = getattr(layer, "cumulative_length", 0)
            if whole and layer.keys is not None and seen > layer.keys.shape[-2]:
                # A sliding-window layer keeps only the last tokens: its K/V no longer lines up
                # with the prompt's tokens, and a block of it would be stored under a wrong name.
                raise InvalidArgumentError(
                    f"layer {i} is a sliding-window layer holding the last "
                    f"{layer.keys.shape[-2]} of {seen} tokens; only caches that keep every "
                    "token can be stored"
                )
    elif hasattr(cache, "key_cache"):  # older DynamicCache: two lists
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:  # the legacy tuple of (keys, values) per layer
        pairs = [(kv[0], kv[1]) for kv in cache]
    if not pairs or any(k is None or v is None for k, v in pairs):
        raise InvalidArgumentError("the cache is empty or has layers without keys and values")
    return pairs


def from_dynamic_cache(
    cache: Any, *, out: torch.Tensor | None = None, last: int | None = None
) -> torch.Tensor:
    """A transformers cache of batch size 1 as one K/V tensor ``[layers, 2, seq, kv_heads,
    head_dim]`` (one copy, into ``out`` if given), ready for ``put``; with ``last``, only the
    last tokens (those a forward pass just added: sliding-window layers are allowed then).

    ``cache`` is a ``DynamicCache`` (``cache.layers[i].keys`` / ``.values``, each ``[1, kv_heads,
    seq, head_dim]``), an older ``DynamicCache`` with ``key_cache`` / ``value_cache``, or the
    legacy tuple of ``(keys, values)`` per layer.
    """
    import torch

    pairs = _layer_pairs(cache, whole=last is None)
    first = pairs[0][0]
    if first.dim() != 4 or first.shape[0] != 1:
        raise InvalidArgumentError(
            f"keys must be [batch=1, kv_heads, seq, head_dim], got {list(first.shape)}; split a "
            "batch into one cache per sequence"
        )
    _, heads, seq, dim = first.shape
    n = seq if last is None else last
    if n > seq:
        raise InvalidArgumentError(f"the cache holds {seq} tokens, fewer than the {n} asked for")
    shape = (len(pairs), 2, n, heads, dim)
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape:
        raise InvalidArgumentError(f"out is {list(out.shape)}, the cache needs {list(shape)}")
    for layer, (keys, values) in enumerate(pairs):
        if keys.shape != first.shape or values.shape != first.shape:
            raise InvalidArgumentError(
                f"layer {layer} has keys {list(keys.shape)} and values {list(values.shape)}, "
                f"layer 0 has {list(first.shape)}: only uniform caches convert"
            )
        out[layer, 0].copy_(keys[0, :, seq - n :].transpose(0, 1))
        out[layer, 1].copy_(values[0, :, seq - n :].transpose(0, 1))
    return out


def to_dynamic_cache(kv: torch.Tensor, *, config: Any = None) -> Any:
    """A transformers ``DynamicCache`` holding ``kv`` ``[layers, 2, seq, kv_heads, head_dim]``
    as batch size 1, for ``model(..., past_key_values=cache)`` or ``generate``.

    ``config`` (the model's config) lets transformers pick each layer's cache type (sliding
    window layers, for example); without it every layer is a plain ``DynamicLayer``. The cache
    copies the tensors it is given, so ``kv`` can be reused afterwards.
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise InvalidArgumentError(
            f"K/V must be [layers, 2, seq, kv_heads, head_dim], got {list(kv.shape)}"
        )
    # Imported by name: transformers is optional, slow to import, and ships inline types that
    # would make mypy analyse all of it (about 25 s) for the two calls made here.
    transformers = importlib.import_module("transformers")
    cache = (
        transformers.DynamicCache() if config is None else transformers.DynamicCache(config=config)
    )
    # ``update`` is the one way to fill a cache that every DynamicCache since 4.36 has
    # (``from_legacy_cache`` is gone in transformers 5).
    for layer in range(kv.shape[0]):
        keys = kv[layer, 0].transpose(0, 1).unsqueeze(0)
        values = kv[layer, 1].transpose(0, 1).unsqueeze(0)
        cache.update(keys, values, layer)
    return cache
