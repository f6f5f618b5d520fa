"""Real K/V for benchmarks: the cache a small, randomly initialised Llama writes for a prompt.

Compression depends on the bits of the data, so codecs are measured on keys and values that a
transformer actually produced (after its projections, norms and rotary embedding), not on noise.
``real_kv_blocks`` builds a seeded ``LlamaForCausalLM`` whose cache has the requested number of
layers, KV heads and head size, runs one prompt with ``use_cache=True`` and cuts the returned
cache into kvstore blocks ``[layers, 2 (K,V), block_tokens, kv_heads, head_dim]``. Nothing is
downloaded: the model is built from a config and the hub is switched off. The weights are random,
so the values are not those of a trained model (no outlier channels); treat the ratios measured
on them as indicative.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from kvstore.core.block_format import torch_dtype
from kvstore.core.keys import ModelSpec

__all__ = ["real_kv_blocks", "real_kv_blocks_for"]

_HIDDEN_SIZE = 512
_INTERMEDIATE_SIZE = 1024
_VOCAB_SIZE = 32000
# Two query heads per KV head: grouped-query attention, as in most current models.
_QUERY_HEADS_PER_KV_HEAD = 2


def real_kv_blocks(
    *,
    num_layers: int = 8,
    num_kv_heads: int = 4,
    head_dim: int = 64,
    block_tokens: int = 256,
    num_tokens: int = 1024,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> torch.Tensor:
    """K/V of a prompt as ``[num_blocks, layers, 2, block_tokens, kv_heads, head_dim]`` blocks.

    ``num_blocks = num_tokens // block_tokens``; a trailing partial block is dropped, as kvstore
    does. The model runs in float32 and the cache is rounded to ``dtype`` once, which is what a
    serving engine that keeps its cache in ``dtype`` stores. The same arguments give the same
    bits on every run.
    """
    if num_tokens < block_tokens:
        raise ValueError(f"num_tokens ({num_tokens}) is less than one block ({block_tokens})")
    cache = _float32_cache(num_layers, num_kv_heads, head_dim, num_tokens, seed)
    num_blocks = num_tokens // block_tokens
    used = cache[:, :, : num_blocks * block_tokens]
    blocks = used.reshape(num_layers, 2, num_blocks, block_tokens, num_kv_heads, head_dim)
    # copy=True: the float32 cache is memoised, so a float32 request must not hand it out.
    return blocks.permute(2, 0, 1, 3, 4, 5).to(dtype, copy=True).contiguous()


def real_kv_blocks_for(spec: ModelSpec, *, num_blocks: int = 1, seed: int = 0) -> torch.Tensor:
    """``real_kv_blocks`` with the cache geometry and dtype of ``spec``: ``num_blocks`` blocks."""
    return real_kv_blocks(
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        block_tokens=spec.block_tokens,
        num_tokens=num_blocks * spec.block_tokens,
        dtype=torch_dtype(spec.dtype),
        seed=seed,
    )


# The forward pass is the slow part (seconds for 32 layers), and benchmarks ask for several
# dtypes of the same cache, so the float32 cache is kept for the few geometries in use.
@functools.lru_cache(maxsize=4)
def _float32_cache(
    num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int, seed: int
) -> torch.Tensor:
    """``[layers, 2, tokens, kv_heads, head_dim]`` in float32."""
    # Set before the import: huggingface_hub reads it once, when it is first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # untyped upstream
    config = LlamaConfig(
        hidden_size=_HIDDEN_SIZE,
        intermediate_size=_INTERMEDIATE_SIZE,
        num_hidden_layers=num_layers,
        num_attention_heads=num_kv_heads * _QUERY_HEADS_PER_KV_HEAD,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=_VOCAB_SIZE,
        max_position_embeddings=max(num_tokens, 2048),
    )
    # fork_rng: seeding the global generator here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]  # untyped upstream
        prompt = torch.randint(0, _VOCAB_SIZE, (1, num_tokens))
        with torch.inference_mode():
            output = model(input_ids=prompt, use_cache=True)
    layers = _cache_layers(output.past_key_values)
    if len(layers) != num_layers:
        raise RuntimeError(f"the model returned {len(layers)} cache layers, expected {num_layers}")
    # Each is [batch=1, kv_heads, tokens, head_dim]; kvstore keeps tokens before heads.
    per_layer = [torch.stack((k[0], v[0])).transpose(1, 2) for k, v in layers]
    return torch.stack(per_layer).float().contiguous()


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from any cache form transformers has returned."""
    if hasattr(cache, "layers"):  # DynamicCache since transformers 4.56: one object per layer
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # older DynamicCache: two parallel lists
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    if isinstance(cache, tuple | list):  # legacy tuple of (key, value) per layer
        return [(k, v) for k, v, *_ in cache]
    raise TypeError(f"unrecognised cache type {type(cache).__name__}")
