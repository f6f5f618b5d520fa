"""Every attention backend's KV cache layout (issue G, item 3), without an engine.

vLLM gives each attention layer a logical view ``[blocks, kv_heads, block_size, 2 * head_dim]`` of
its paged cache, whose physical strides follow the resolved ``KVCacheLayout`` (layer-compact or
block-outermost, head-major or token-major). The GPU backends read K and V out of it as
FlashAttention does (``kv_cache.transpose(1, 2).split(head_size, dim=-1)``); the CPU backend's
block interior is its kernel's own and is probed (tests in test_worker_side.py).

Here the views are built as vLLM builds them (``compute_layout_strides`` over one flat buffer per
group of layers), for every layout vLLM defines; K/V is written and read through the backends'
own expression, and the connector's layout must gather exactly that and scatter only the tokens
it is asked to: bit-exact, through a real kvstore service, and from one layout into another (a
prefill node with one backend, a decode node with another).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from processes import Service
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    MLAAttentionSpec,
    compute_layer_kv_cache_shape_bytes,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from client import Client
from client.vllm.layout import cache_dtypes
from client.vllm.namespace import cache_geometry, kv_dtype
from client.vllm_connector import ViewLayout, layout_for
from kvstore import ModelSpec
from kvstore.core.errors import ConfigError

LAYERS, HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 3, 2, 16, 16, 10
LAYOUTS = list(KVCacheLayout)
# The attention backends vLLM ships that read the logical view (class, module); those whose
# module cannot be imported here (FlashInfer needs its own package) are named in the skip.
BACKENDS = [
    ("FlashAttentionBackend", "flash_attn"),
    ("TritonAttentionBackend", "triton_attn"),
    ("FlexAttentionBackend", "flex_attention"),
    ("RocmAttentionBackend", "rocm_attn"),
    ("FlashInferBackend", "flashinfer"),
]


def layer_views(layout: KVCacheLayout, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """One group's per-layer caches, laid out as vLLM lays them out (``create_kv_cache_views``:
    one flat byte buffer, strides from ``compute_layout_strides``)."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=dtype)
    shape = (LAYERS, *compute_layer_kv_cache_shape_bytes(spec, NUM_BLOCKS))
    strides = compute_layout_strides(spec, NUM_BLOCKS, LAYERS, layout)
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    raw = torch.full((size,), 17, dtype=torch.int8)  # a finite value in every dtype
    view = torch.as_strided(raw, size=shape, stride=strides)
    return [view[i].view(dtype) for i in range(LAYERS)]


def backend_write(cache: torch.Tensor, kv: torch.Tensor, block_ids: list[int]) -> None:
    """What a GPU backend's cache update does, on the CPU: token ``t`` of ``kv`` ``[2, n, heads,
    head_dim]`` goes to slot ``t % BLOCK`` of block ``block_ids[t // BLOCK]``."""
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    for t in range(kv.shape[1]):
        b, slot = block_ids[t // BLOCK], t % BLOCK
        key_cache[b, slot] = kv[0, t]
        value_cache[b, slot] = kv[1, t]


def backend_read(cache: torch.Tensor, block_ids: list[int], n: int) -> torch.Tensor:
    """The K/V of tokens ``[0, n)`` as the backend's kernels see it, ``[2, n, heads, head_dim]``."""
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    out = torch.empty(2, n, HEADS, HEAD_DIM, dtype=cache.dtype)
    for t in range(n):
        b, slot = block_ids[t // BLOCK], t % BLOCK
        out[0, t], out[1, t] = key_cache[b, slot], value_cache[b, slot]
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_every_layout_gathers_what_the_backend_wrote_and_scatters_only_its_tokens(
    layout: KVCacheLayout,
) -> None:
    caches = layer_views(layout)
    mapping = ViewLayout.of(caches[0], BLOCK, HEADS, HEAD_DIM, "test")
    assert all(mapping.fits(c) for c in caches)
    block_ids = [7, 2, 9]
    n = 3 * BLOCK - 5
    kv = torch.randn(LAYERS, 2, n, HEADS, HEAD_DIM).to(torch.bfloat16)
    for layer, cache in enumerate(caches):
        backend_write(cache, kv[layer], block_ids)
    for layer, cache in enumerate(caches):
        out = torch.empty(2, n, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        mapping.gather(mapping.prepare(cache), block_ids, out=out)
        assert torch.equal(out, kv[layer])

    # Into a fresh group of the same layout: tokens [start, n) only (vLLM's own hit and this
    # step's tokens are in the blocks already), nothing of any other block or layer.
    fresh = layer_views(layout)
    before = [c.clone() for c in fresh]
    start = BLOCK + 3
    targets = [4, 0, 8]
    mapping.scatter(mapping.prepare(fresh[1]), targets, kv[1], start)
    got = backend_read(fresh[1], targets, n)
    assert torch.equal(got[:, start:], kv[1][:, start:])
    assert torch.equal(got[:, :start], backend_read(before[1], targets, n)[:, :start])
    untouched = [b for b in range(NUM_BLOCKS) if b not in targets]
    assert torch.equal(fresh[1][untouched], before[1][untouched])
    for other in (0, 2):
        assert torch.equal(fresh[other], before[other])


@pytest.mark.parametrize("src", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_kv_saved_in_one_layout_loads_into_every_other_through_kvstore(
    src: KVCacheLayout, service: Service
) -> None:
    spec = ModelSpec(
        f"test/layouts-{src.name}",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        dtype="bfloat16",
        block_tokens=BLOCK,
    )
    tokens = list(range(1000, 1000 + 4 * BLOCK))
    n = len(tokens)
    kv = torch.randn(LAYERS, 2, n, HEADS, HEAD_DIM).to(torch.bfloat16)
    prefill = layer_views(src)
    saved_ids = [1, 6, 3, 8]
    for layer, cache in enumerate(prefill):
        backend_write(cache, kv[layer], saved_ids)
    # The prefill node saves what its cache holds ...
    mapping = ViewLayout.of(prefill[0], BLOCK, HEADS, HEAD_DIM, "prefill")
    staging = torch.empty(LAYERS, 2, n, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    for layer, cache in enumerate(prefill):
        mapping.gather(mapping.prepare(cache), saved_ids, out=staging[layer])
    with Client(service.target) as client:
        assert client.put(spec, tokens, staging).stored == 4
        fetched, got = client.get_prefix(spec, tokens)
    assert got == n
    # ... and decode nodes with every other layout load it: what their kernels read is the K/V.
    for dst in LAYOUTS:
        decode = layer_views(dst)
        into = ViewLayout.of(decode[0], BLOCK, HEADS, HEAD_DIM, "decode")
        loaded_ids = [9, 0, 5, 2]
        for layer, cache in enumerate(decode):
            into.scatter(into.prepare(cache), loaded_ids, fetched[layer], 0)
            assert torch.equal(backend_read(cache, loaded_ids, n), kv[layer]), dst.name


@pytest.mark.parametrize(("name", "module"), BACKENDS, ids=[b[0] for b in BACKENDS])
def test_every_backend_class_gets_the_view_layout_for_each_layout_it_declares(
    name: str, module: str
) -> None:
    try:
        backend = getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name)
    except ImportError as exc:
        pytest.skip(f"{name} cannot be imported here: {exc}")
    declared = backend.supported_kv_cache_layouts() or tuple(LAYOUTS)  # None: any layout
    layer = SimpleNamespace(attn_backend=backend)
    for layout in declared:
        cache = layer_views(layout)[0]
        mapping = layout_for(layer, cache, BLOCK, HEADS, HEAD_DIM)
        assert isinstance(mapping, ViewLayout), (name, layout.name)
        assert backend.get_name() in mapping.describe()
        kv = torch.randn(2, 2 * BLOCK, HEADS, HEAD_DIM).to(torch.bfloat16)
        backend_write(cache, kv, [3, 5])
        out = torch.empty_like(kv)
        mapping.gather(mapping.prepare(cache), [3, 5], out=out)
        assert torch.equal(out, kv), (name, layout.name)


def test_the_cpu_backend_is_probed() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    # What layout_for does for it is test_worker_side.py's (probe through the kernel); here only
    # that it is not read as a logical view.
    layer: Any = SimpleNamespace(attn_backend=CPUAttentionBackend)
    with pytest.raises((AttributeError, ConfigError)):  # the stand-in has no kernel to probe
        layout_for(layer, layer_views(KVCacheLayout.LBHNC)[0], BLOCK, HEADS, HEAD_DIM)


@pytest.mark.parametrize(
    ("shape", "what"),
    [
        ((NUM_BLOCKS, 1, BLOCK, 576), "MLA latent cache in a K/V namespace"),
        ((NUM_BLOCKS, HEADS, BLOCK, HEAD_DIM), "K only"),
        ((2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM), "five dims"),
    ],
)
def test_caches_that_are_not_k_and_v_are_refused_at_start(
    shape: tuple[int, ...], what: str
) -> None:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    layer = SimpleNamespace(attn_backend=FlashAttentionBackend)
    cache = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="FLASH_ATTN"):
        layout_for(layer, cache, BLOCK, HEADS, HEAD_DIM)


def test_views_are_what_vllm_builds() -> None:
    # The strides above are vLLM's: block-outermost layouts interleave the layers' pages.
    lbhnc, blhnc = layer_views(KVCacheLayout.LBHNC)[0], layer_views(KVCacheLayout.BLHNC)[0]
    page = HEADS * BLOCK * 2 * HEAD_DIM
    assert lbhnc.stride(0) == page
    assert blhnc.stride(0) == LAYERS * page
    assert not layer_views(KVCacheLayout.LBNHC)[0][0].is_contiguous()


# fp8 caches: vLLM keeps them as bytes (torch.uint8), its kernels read them as float8.
FP8 = ["float8_e4m3fn", "float8_e5m2"]


def _fp8_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random finite float8 K/V: every byte but the NaN/inf patterns (0x7F/0xFF in e4m3fn,
    0x7C-0x7F/0xFC-0xFF in e5m2), so that equal bytes are equal values and the reverse."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 0x7C, shape, generator=g, dtype=torch.uint8)
    raw |= torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7
    return raw.view(dtype)


@pytest.mark.parametrize("stored", FP8)
@pytest.mark.parametrize("src", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_fp8_caches_round_trip_bit_exact_through_kvstore_in_every_layout(
    src: KVCacheLayout, stored: str, service: Service
) -> None:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    dtype = getattr(torch, stored)
    spec = ModelSpec(
        f"test/fp8-{src.name}",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        dtype=stored,
        block_tokens=BLOCK,
    )
    tokens = list(range(2000, 2000 + 3 * BLOCK))
    n = len(tokens)
    kv = _fp8_kv((LAYERS, 2, n, HEADS, HEAD_DIM), dtype, seed=len(src.name))
    layer = SimpleNamespace(attn_backend=FlashAttentionBackend)
    prefill = layer_views(src, torch.uint8)
    mapping = layout_for(layer, prefill[0], BLOCK, HEADS, HEAD_DIM, cache_dtypes(stored))
    # A model-dtype namespace never maps an fp8 cache's bytes.
    with pytest.raises(ConfigError, match="uint8"):
        layout_for(layer, prefill[0], BLOCK, HEADS, HEAD_DIM)
    saved_ids = [5, 1, 7]
    for i, cache in enumerate(prefill):
        backend_write(cache, kv[i].view(torch.uint8), saved_ids)
    staging = torch.empty(LAYERS, 2, n, HEADS, HEAD_DIM, dtype=dtype)
    for i, cache in enumerate(prefill):
        mapping.gather(mapping.prepare(cache), saved_ids, out=staging[i])
    assert torch.equal(staging.view(torch.uint8), kv.view(torch.uint8))
    with Client(service.target) as client:
        assert client.put(spec, tokens, staging).stored == 3
        fetched, got = client.get_prefix(spec, tokens)
    assert got == n
    assert fetched.dtype == dtype
    dst = LAYOUTS[(LAYOUTS.index(src) + 1) % len(LAYOUTS)]
    decode = layer_views(dst, torch.uint8)
    into = layout_for(layer, decode[0], BLOCK, HEADS, HEAD_DIM, cache_dtypes(stored))
    for i, cache in enumerate(decode):
        into.scatter(into.prepare(cache), [0, 9, 4], fetched[i], 0)
        assert torch.equal(backend_read(cache, [0, 9, 4], n), kv[i].view(torch.uint8)), dst.name


# MLA: one latent per token (kv_lora_rank + rope dims), [blocks, 1, block_size, latent].
MLA_LORA, MLA_ROPE, MLA_BLOCK = 512, 64, 16
MLA_BACKENDS = [
    ("CPUMLABackend", "mla.cpu_mla"),
    ("TritonMLABackend", "mla.triton_mla"),
    ("FlashMLABackend", "mla.flashmla"),
    ("FlashInferMLABackend", "mla.flashinfer_mla"),
    ("CutlassMLABackend", "mla.cutlass_mla"),
    ("FlashAttnMLABackend", "mla.flashattn_mla"),
    ("AiterTritonMLABackend", "mla.aiter_triton_mla"),
    ("AiterMLABackend", "mla.rocm_aiter_mla"),
]


class MLAModel:
    """vLLM's ``ModelConfig`` of an MLA model, as far as ``cache_geometry`` reads it."""

    use_mla = True

    def get_head_size(self) -> int:
        return MLA_LORA + MLA_ROPE

    def get_total_num_kv_heads(self) -> int:
        raise AssertionError("an MLA latent has no KV heads")


def mla_views(layout: KVCacheLayout) -> list[torch.Tensor]:
    """One group's MLA latent caches as vLLM lays them out (``MLAAttentionSpec``)."""
    spec = MLAAttentionSpec(
        block_size=MLA_BLOCK, num_kv_heads=1, head_size=MLA_LORA + MLA_ROPE, dtype=torch.bfloat16
    )
    shape = (LAYERS, *compute_layer_kv_cache_shape_bytes(spec, NUM_BLOCKS))
    strides = compute_layout_strides(spec, NUM_BLOCKS, LAYERS, layout)
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    raw = torch.full((size,), 17, dtype=torch.int8)
    view = torch.as_strided(raw, size=shape, stride=strides)
    return [view[i].view(torch.bfloat16) for i in range(LAYERS)]


def mla_write(cache: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, ids: list[int]) -> None:
    """vLLM's CPU MLA cache update (``CPUMLAImpl.do_kv_cache_update``), its own code."""
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

    slots = torch.tensor(
        [ids[t // MLA_BLOCK] * MLA_BLOCK + t % MLA_BLOCK for t in range(len(kv_c))]
    )
    flat = cache.contiguous()
    CPUMLAImpl.do_kv_cache_update(None, kv_c, k_pe.unsqueeze(1), flat, slots, "auto", None)  # type: ignore[arg-type]
    cache.copy_(flat)


def mla_read(cache: torch.Tensor, ids: list[int], n: int) -> torch.Tensor:
    """The latents of tokens ``[0, n)`` as MLA kernels read them, ``[n, latent]``."""
    return torch.stack([cache[ids[t // MLA_BLOCK], 0, t % MLA_BLOCK] for t in range(n)])


@pytest.mark.parametrize(("name", "module"), MLA_BACKENDS, ids=[b[0] for b in MLA_BACKENDS])
def test_mla_latents_round_trip_through_kvstore_into_every_mla_backend(
    name: str, module: str, service: Service
) -> None:
    try:
        backend = getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name)
    except (ImportError, AssertionError) as exc:  # CUDA-only modules, FlashInfer
        pytest.skip(f"{name} cannot be imported here: {exc}")
    heads, head_dim = cache_geometry(MLAModel())  # what the connector maps the latent as
    spec = ModelSpec(
        f"test/mla+mla-{name}",
        num_layers=LAYERS,
        num_kv_heads=heads,
        head_dim=head_dim,
        dtype="bfloat16",
        block_tokens=MLA_BLOCK,
    )
    n = 3 * MLA_BLOCK - 2
    tokens = list(range(3000, 3000 + n))
    g = torch.Generator().manual_seed(len(name))
    kv_c = torch.randn(LAYERS, n, MLA_LORA, generator=g).to(torch.bfloat16)
    k_pe = torch.randn(LAYERS, n, MLA_ROPE, generator=g).to(torch.bfloat16)
    latent = torch.cat([kv_c, k_pe], dim=-1)
    layer = SimpleNamespace(attn_backend=backend)
    declared = backend.supported_kv_cache_layouts() or tuple(LAYOUTS)
    prefill = mla_views(declared[0])
    mapping = layout_for(layer, prefill[0], MLA_BLOCK, heads, head_dim)
    assert isinstance(mapping, ViewLayout)
    assert backend.get_name() in mapping.describe()
    saved_ids = [2, 8, 5]
    staging = torch.empty(LAYERS, 2, n, heads, head_dim, dtype=torch.bfloat16)
    for i, cache in enumerate(prefill):
        mla_write(cache, kv_c[i], k_pe[i], saved_ids)
        mapping.gather(mapping.prepare(cache), saved_ids, out=staging[i])
    # The two halves of each latent, as "K" and "V" of one head: the same bytes.
    assert torch.equal(staging[:, 0, :, 0], latent[..., :head_dim])
    assert torch.equal(staging[:, 1, :, 0], latent[..., head_dim:])
    with Client(service.target) as client:
        client.put(spec, tokens, staging)
        fetched, got = client.get_prefix(spec, tokens)
    assert got == 2 * MLA_BLOCK  # full blocks only
    for layout in declared:  # a decode node with this backend, in each layout it declares
        decode = mla_views(layout)
        into = layout_for(layer, decode[0], MLA_BLOCK, heads, head_dim)
        before = [c.clone() for c in decode]
        for i, cache in enumerate(decode):
            into.scatter(into.prepare(cache), [7, 0, 3], fetched[i], 0)
            assert torch.equal(mla_read(cache, [7, 0], got), latent[i, :got]), layout.name
            assert torch.equal(cache[3], before[i][3])  # the partial block: never written


def _config(**cache: Any) -> Any:
    model = SimpleNamespace(dtype=torch.bfloat16, use_mla=False)
    return SimpleNamespace(
        cache_config=SimpleNamespace(**{"cache_dtype": "auto", **cache}), model_config=model
    )


def test_the_namespace_dtype_of_each_cache_dtype() -> None:
    assert kv_dtype(_config()) == "bfloat16"
    assert kv_dtype(_config(cache_dtype="fp8")) == "float8_e4m3fn"
    assert kv_dtype(_config(cache_dtype="fp8_e4m3")) == "float8_e4m3fn"
    assert kv_dtype(_config(cache_dtype="fp8_e5m2")) == "float8_e5m2"
    with pytest.raises(ConfigError, match="calculate_kv_scales"):
        kv_dtype(_config(cache_dtype="fp8", calculate_kv_scales=True))
    for other in ("int8", "fp8_inc", "fp8_ds_mla", "fp8_per_token_head"):
        with pytest.raises(ConfigError, match=f"kv cache dtype '{other}' is not supported"):
            kv_dtype(_config(cache_dtype=other))
    assert cache_dtypes("float8_e5m2") == (torch.float8_e5m2, torch.uint8)
    assert cache_dtypes("bfloat16") == (torch.bfloat16,)


def test_an_mla_model_is_one_head_of_half_its_latent() -> None:
    assert cache_geometry(MLAModel()) == (1, 288)
    plain = SimpleNamespace(
        use_mla=False, get_head_size=lambda: 64, get_total_num_kv_heads=lambda: 4
    )
    assert cache_geometry(plain) == (4, 64)


def test_an_fp8_cache_on_the_cpu_backend_is_refused_at_start() -> None:
    from client.vllm.layout import BlockLayout

    cache = torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="fp8 KV cache on vLLM's CPU backend is not mapped"):
        BlockLayout.probe(None, cache, BLOCK, HEADS, HEAD_DIM)
