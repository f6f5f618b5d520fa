"""Where vLLM's paged cache keeps each K/V element of a layer, and the copies in and out of it.

kvstore blocks are ``[layers, 2 (K,V), block_tokens, kv_heads, head_dim]``. Each layer's attention
backend decides how vLLM's paged cache holds them (``layout_for``). The GPU backends read a
logical view ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` (K, then V, in the last axis)
whose physical strides follow vLLM's ``KVCacheLayout``: ``ViewLayout`` copies through a strided
view of the same memory. vLLM's CPU attention backend keeps the interior of its blocks as its
kernel's instruction set wants: ``BlockLayout.probe`` asks the backend (it writes a known
pattern through the layer's own ``do_kv_cache_update``) and copies by the offsets it finds.
Both layouts have the same operations, in the order the worker side uses them: ``fits`` (does
another layer's cache share this layout), ``prepare`` (the layer's cache as the layout indexes
it), ``describe`` (for the log), ``scatter`` (a load, into the cache) and ``gather`` (a save,
out of it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from kvstore.core.errors import ConfigError

__all__ = [
    "TORCH_DTYPES",
    "BlockLayout",
    "ViewLayout",
    "cache_dtypes",
    "layer_index",
    "layout_for",
    "torch_dtype_of",
]

# vLLM cache dtype -> kvstore dtype (the cache dtypes a layout is mapped for).
TORCH_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def torch_dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"torch has no dtype {name!r}")
    return dtype


def cache_dtypes(stored: str) -> tuple[torch.dtype, ...]:
    """The dtypes a paged cache of kvstore dtype ``stored`` may have: that dtype, and for a
    float8 format also the bytes vLLM keeps fp8 caches in (``torch.uint8``)."""
    dtype = torch_dtype_of(stored)
    return (dtype, torch.uint8) if dtype.itemsize == 1 and dtype.is_floating_point else (dtype,)


def _bits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype`` of the same size, bit for bit (float8 K/V <-> an fp8 cache's bytes):
    copies between the two must never convert values."""
    return t if t.dtype == dtype else t.view(dtype)


def _index(block_ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as an index tensor on ``device``. To a GPU through page-locked memory without a
    wait: a plain ``.to(device)`` waits for the current stream (the worker's side stream, behind
    the forward's work). Likewise the copies out of a GPU cache are ``non_blocking``: their
    caller waits for the stream's event before reading (client/vllm/gpu_copies.py)."""
    ids = torch.tensor(block_ids, dtype=torch.long)
    if device.type != "cuda":
        return ids.to(device)  # a no-op on the CPU
    return ids.pin_memory().to(device, non_blocking=True)


def layer_index(name: str) -> int:
    """``model.layers.3.self_attn.attn`` -> 3 (the one integer in vLLM's layer names)."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ConfigError(f"KVStoreConnector: cannot tell the layer index of {name!r}")
    return numbers[0]


class BlockLayout:
    """Where each K/V element of one vLLM block lives inside the layer's paged-cache tensor.

    ``positions[kv, t, h, d]`` is the offset, within the flattened block ``cache[b]``, of
    token ``t``'s K (``kv=0``) or V (``kv=1``) element ``d`` of KV head ``h``. ``probe`` finds
    it by having the layer's attention backend write a known pattern into a scratch block, so
    the mapping is what vLLM's own kernel does (it differs by backend and CPU instruction set:
    on x86 with AVX-512 the CPU backend keeps each head's K transposed, ``[head_dim,
    block_size]``, then its V ``[block_size, head_dim]``), rather than a reading of its
    documentation. Rejected: indexing the documented shape ``[blocks, kv_heads, block_size,
    2 * head_dim]`` directly; it round-trips through kvstore unnoticed while every K is
    transposed, and only blocks computed elsewhere (a model worker, another instruction set)
    show it.
    """

    def __init__(self, positions: torch.Tensor, block_shape: tuple[int, ...]) -> None:
        self.positions = positions  # [2, block_size, kv_heads, head_dim], int64
        self.block_shape = block_shape  # of cache[b]
        self.block_size = int(positions.shape[1])
        self._flat = positions.reshape(-1)
        # Where each element of a cache block comes from in kvstore's order: full blocks are
        # written as one gather of the source and one row copy per block (index_copy_), 3x
        # faster here than an element-wise index_put over [blocks, elements].
        self._inverse = torch.argsort(self._flat)
        # Where K and V are each an affine map of (token, head, dim) inside the block, as in
        # every layout the CPU backend has used, a block is read and written through one
        # strided view per kind: two index_copy_ calls per layer, no element index (1.9 ms
        # against 4.0-6.3 ms per layer of 255 blocks in a micro-benchmark).
        k, v = _affine(positions[0]), _affine(positions[1])
        self._affine = [k, v] if k is not None and v is not None else []

    @classmethod
    def probe(
        cls, layer: Any, cache: torch.Tensor, block_size: int, heads: int, head_dim: int
    ) -> BlockLayout:
        """Ask ``layer.impl.do_kv_cache_update`` where it puts each element (see the class
        docstring); ``ConfigError`` if the cache is not blocks of exactly the K/V of
        ``block_size`` tokens (then nothing could be mapped safely)."""
        block_shape = tuple(int(n) for n in cache.shape[1:])
        size = 2 * block_size * heads * head_dim
        per_block = 1
        for n in block_shape:
            per_block *= n
        if cache.dtype == torch.uint8:
            raise ConfigError(
                "KVStoreConnector: an fp8 KV cache on vLLM's CPU backend is not mapped (its "
                "kernel quantizes what the layout probe writes); fp8 caches are mapped on the "
                "GPU backends; use kv_cache_dtype 'auto' here"
            )
        dims_ok = cache.dim() >= 2 and cache[0].is_contiguous() and cache.stride(0) == per_block
        if not dims_ok or per_block != size or cache.dtype not in TORCH_DTYPES:
            raise ConfigError(
                f"KVStoreConnector: a KV cache of shape {list(cache.shape)}, {cache.dtype}, is "
                f"not blocks of {block_size} tokens x {heads} KV heads x {head_dim} dims of K "
                "and V at dim 0; only such layouts (vLLM's CPU backend) are mapped"
            )
        # Two scratch blocks, the second one a canary: a kernel that fills blocks of another
        # size would write into it.
        scratch = torch.empty((2, *block_shape), dtype=cache.dtype, device=cache.device)
        codes = torch.arange(size, dtype=torch.int64).view(2, block_size, heads, head_dim)
        slots = torch.arange(block_size, dtype=torch.int64, device=cache.device)
        found = torch.zeros(size, dtype=torch.int64)
        # Element codes go in base-256 digits: 0..255 are exact in every cache dtype.
        shift = 0
        while shift == 0 or (size - 1) >> shift:
            scratch.fill_(-1)
            digits = ((codes >> shift) & 255).to(cache.dtype).to(cache.device)
            layer.impl.do_kv_cache_update(
                layer, digits[0].contiguous(), digits[1].contiguous(), scratch, slots
            )
            written = scratch.reshape(2, -1).to("cpu", torch.float64)
            if bool((written[1] != -1).any()) or bool((written[0] < 0).any()):
                raise ConfigError(
                    "KVStoreConnector: the attention backend does not fill one block with the "
                    f"K/V of {block_size} tokens; its layout cannot be mapped"
                )
            found |= written[0].to(torch.int64) << shift
            shift += 8
        positions = torch.full((size,), -1, dtype=torch.int64)
        positions[found] = torch.arange(size, dtype=torch.int64)
        if bool((positions < 0).any()):
            raise ConfigError("KVStoreConnector: the backend's block layout is not a permutation")
        return cls(positions.view(2, block_size, heads, head_dim).to(cache.device), block_shape)

    def fits(self, cache: torch.Tensor) -> bool:
        """Whether ``cache`` has the block shape this layout was probed on."""
        return tuple(cache.shape[1:]) == self.block_shape

    @staticmethod
    def prepare(cache: torch.Tensor) -> torch.Tensor:
        """The layer's cache as ``[blocks, elements of one block]``, what gather/scatter use."""
        return cache.view(cache.shape[0], -1)

    def describe(self) -> str:
        k = self.positions[0]
        if self.block_size > 1 and int(k[1, 0, 0] - k[0, 0, 0]) == 1:
            kind = "K token-minor ([head_dim, block_size] per head)"
        else:
            kind = "K token-major ([block_size, head_dim] per head)"
        return f"block layout probed from the backend: {kind}"

    def _views(self, cache: torch.Tensor) -> list[torch.Tensor]:
        """K and V of every block as ``[blocks, block_size, kv_heads, head_dim]`` strided
        views of ``cache`` (``[blocks, elements]``); only for affine layouts."""
        _, b, h, d = self.positions.shape
        return [
            cache.as_strided(
                (cache.shape[0], b, h, d),
                (cache.stride(0), *strides),
                cache.storage_offset() + base,
            )
            for base, strides in self._affine
        ]

    def gather(self, cache: torch.Tensor, block_ids: list[int], *, out: torch.Tensor) -> None:
        """Tokens ``[0, n)`` of one layer into ``out`` ``[2, n, kv_heads, head_dim]``, from
        the paged cache as ``[blocks, elements]`` (token ``t`` is in ``block_ids[t // B]``)."""
        n, b = out.shape[1], self.block_size
        num_blocks = -(-n // b)
        index = _index(block_ids[:num_blocks], cache.device)
        aside = out.device != cache.device  # device -> host: see ``_index``
        if self._affine:
            for kv, view in enumerate(self._views(cache)):
                got = view.index_select(0, index)  # [n_blocks, B, H, D]
                out[kv].copy_(got.reshape(num_blocks * b, *out.shape[2:])[:n], non_blocking=aside)
            return
        blocks = cache.index_select(0, index)[:, self._flat]  # [n_blocks, 2 * B * H * D]
        blocks = blocks.view(num_blocks, *self.positions.shape).transpose(0, 1)
        out.copy_(blocks.reshape(2, num_blocks * b, *out.shape[2:])[:, :n], non_blocking=aside)

    def scatter(
        self, cache: torch.Tensor, block_ids: list[int], kv: torch.Tensor, start: int
    ) -> None:
        """Tokens ``[start, end)`` of one layer's ``kv`` ``[2, end, kv_heads, head_dim]`` into
        their slots, and nothing else: vLLM wrote this step's new tokens into the same blocks
        before asking for the load, and the tokens before ``start`` are its own hit."""
        end, b = kv.shape[1], self.block_size
        first_full, last_full = -(-start // b), end // b  # blocks entirely inside [start, end)
        if first_full < last_full:
            ids = _index(block_ids[first_full:last_full], cache.device)
            count = last_full - first_full
            src = kv[:, first_full * b : last_full * b].reshape(2, count, b, *kv.shape[2:])
            if self._affine:
                for which, view in enumerate(self._views(cache)):
                    view.index_copy_(0, ids, src[which].to(cache.device))
            else:
                rows = src.transpose(0, 1).reshape(count, -1)
                cache.index_copy_(0, ids, rows.index_select(1, self._inverse))
        edges = {start // b, (end - 1) // b} - set(range(first_full, last_full))
        for block in sorted(edges):
            lo, hi = max(start, block * b), min(end, (block + 1) * b)
            if lo >= hi:
                continue
            where = self.positions[:, lo - block * b : hi - block * b].reshape(-1)
            cache[block_ids[block], where] = kv[:, lo:hi].reshape(-1)


def _affine(positions: torch.Tensor) -> tuple[int, tuple[int, int, int]] | None:
    """``(base, (token, head, dim) strides)`` if ``positions`` ``[B, H, D]`` is
    ``base + t * st + h * sh + d * sd`` for every element, else None."""
    b, h, d = positions.shape
    p = positions.to("cpu", torch.int64)
    base = int(p[0, 0, 0])
    strides = tuple(
        int(p[tuple(1 if i == axis else 0 for i in range(3))]) - base if n > 1 else 0
        for axis, n in enumerate((b, h, d))
    )
    st, sh, sd = strides
    t_idx = torch.arange(b).view(b, 1, 1)
    h_idx = torch.arange(h).view(1, h, 1)
    d_idx = torch.arange(d).view(1, 1, d)
    if min(strides) < 0 or not torch.equal(p, base + t_idx * st + h_idx * sh + d_idx * sd):
        return None
    return base, (st, sh, sd)


# The backends whose block interior is opaque (the kernel decides where each element goes):
# their layout is probed. Every other backend reads its layer cache through the logical view
# ``[blocks, kv_heads, block_size, 2 * head_dim]`` with K in the first ``head_dim`` of the last
# axis and V in the second (``kv_cache.transpose(1, 2).split(head_size, -1)`` in FlashAttention,
# Triton, FlexAttention, ROCm), whatever the physical strides (vLLM's ``KVCacheLayout``).
_PROBED_BACKENDS = frozenset({"CPU_ATTN"})


def layout_for(
    layer: Any,
    cache: torch.Tensor,
    block_size: int,
    heads: int,
    head_dim: int,
    dtypes: tuple[torch.dtype, ...] = tuple(TORCH_DTYPES),
) -> BlockLayout | ViewLayout:
    """The layout of one layer's paged cache, from the layer's attention backend: probed where
    the backend's block interior is opaque, read from the logical view everywhere else.
    ``dtypes``: what the cache's dtype may be (``cache_dtypes`` of the namespace's)."""
    backend = getattr(layer, "attn_backend", None)
    name = ""
    if backend is not None:
        with contextlib.suppress(Exception):
            name = str(backend.get_name())
    if name in _PROBED_BACKENDS or (not name and cache.device.type == "cpu"):
        return BlockLayout.probe(layer, cache, block_size, heads, head_dim)
    return ViewLayout.of(
        cache, block_size, heads, head_dim, name or type(layer).__name__, dtypes=dtypes
    )


class ViewLayout:
    """A paged cache read through vLLM's logical per-layer view ``[blocks, kv_heads,
    block_size, 2 * head_dim]`` (K: ``[..., :head_dim]``, V: ``[..., head_dim:]``), with any
    physical strides: layer-compact or block-outermost, head-major or token-major (vLLM's
    ``KVCacheLayout`` LBHNC, LBNHC, LHBNC, BLHNC, BLNHC, BHLNC). Blocks are gathered and
    scattered through a strided ``[blocks, 2, block_size, kv_heads, head_dim]`` view of the
    same memory: one ``index_select`` / ``index_copy_`` per layer, no element index."""

    def __init__(
        self,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        backend: str,
        dtype: torch.dtype,
    ) -> None:
        self.shape = shape[1:]
        self.strides = strides
        self.backend = backend
        self.dtype = dtype
        self.block_size = int(shape[2])

    @classmethod
    def of(
        cls,
        cache: torch.Tensor,
        block_size: int,
        heads: int,
        head_dim: int,
        backend: str,
        *,
        dtypes: tuple[torch.dtype, ...] = tuple(TORCH_DTYPES),
    ) -> ViewLayout:
        """An MLA latent cache ``[blocks, 1, block_size, latent]`` is this view with one head
        and ``head_dim = latent / 2`` (see ``client.vllm.namespace.cache_geometry``)."""
        want = (heads, block_size, 2 * head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != want or cache.dtype not in dtypes:
            raise ConfigError(
                f"KVStoreConnector: attention backend {backend} keeps a KV cache of shape "
                f"{list(cache.shape)}, {cache.dtype}; this engine's namespace maps [blocks, "
                f"{heads} KV heads, {block_size} tokens, 2 x {head_dim}] caches in "
                f"{sorted(str(d).removeprefix('torch.') for d in dtypes)} (or an MLA latent of "
                f"{2 * head_dim} as one head); per-token-head quantized caches are not mapped"
            )
        return cls(tuple(cache.shape), tuple(cache.stride()), backend, cache.dtype)

    def fits(self, cache: torch.Tensor) -> bool:
        return (
            tuple(cache.shape[1:]) == self.shape
            and tuple(cache.stride()) == self.strides
            and cache.dtype == self.dtype
        )

    @staticmethod
    def prepare(cache: torch.Tensor) -> torch.Tensor:
        """``[blocks, 2, block_size, kv_heads, head_dim]``, a view of the same memory."""
        blocks, heads, tokens, content = cache.shape
        split = cache.view(blocks, heads, tokens, 2, content // 2)
        return split.permute(0, 3, 2, 1, 4)

    def describe(self) -> str:
        return f"block layout from backend {self.backend}: logical view, strides {self.strides}"

    def gather(self, blocks: torch.Tensor, block_ids: list[int], *, out: torch.Tensor) -> None:
        """Tokens ``[0, n)`` of one layer into ``out`` ``[2, n, kv_heads, head_dim]``."""
        n, b = out.shape[1], self.block_size
        num_blocks = -(-n // b)
        out = _bits(out, blocks.dtype)
        got = blocks.index_select(0, _index(block_ids[:num_blocks], blocks.device))
        # got: [n_blocks, 2, B, H, D], contiguous; device -> host without a wait: see ``_index``
        out.copy_(
            got.transpose(0, 1).reshape(2, num_blocks * b, *out.shape[2:])[:, :n],
            non_blocking=out.device != blocks.device,
        )

    def scatter(
        self, blocks: torch.Tensor, block_ids: list[int], kv: torch.Tensor, start: int
    ) -> None:
        """Tokens ``[start, end)`` of one layer's ``kv`` ``[2, end, kv_heads, head_dim]`` into
        their slots, and nothing else (see ``BlockLayout.scatter``)."""
        kv = _bits(kv, blocks.dtype)
        end, b = kv.shape[1], self.block_size
        first_full, last_full = -(-start // b), end // b
        if first_full < last_full:
            count = last_full - first_full
            ids = _index(block_ids[first_full:last_full], blocks.device)
            src = kv[:, first_full * b : last_full * b].reshape(2, count, b, *kv.shape[2:])
            blocks.index_copy_(0, ids, src.transpose(0, 1).to(blocks.device))
        edges = {start // b, (end - 1) // b} - set(range(first_full, last_full))
        for block in sorted(edges):
            lo, hi = max(start, block * b), min(end, (block + 1) * b)
            if lo < hi:
                base = block * b
                blocks[block_ids[block], :, lo - base : hi - base] = kv[:, lo:hi].to(blocks.device)
