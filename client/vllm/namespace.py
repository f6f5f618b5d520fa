"""The kvstore namespace of a vLLM engine's KV cache, and its slices under tensor parallel.

``engine_namespace`` derives the ``ModelSpec`` from vLLM's config (the weights named by
``weights_revision``, or a ``model_spec`` file) and refuses what one namespace cannot hold
(pipeline parallel, fp8 caches with computed scales, heads that do not split);
``cache_geometry`` is a block's heads and head_dim (an MLA latent: one head of two halves);
``check_groups`` refuses a hybrid model. Under tensor parallel each rank holds the K/V heads
``rank_heads`` gives it, in the namespace ``shard_spec`` names by them; ``shard_specs`` lists
every rank's, which the scheduler looks up. ``request_extra_keys`` are the keys that set a
request's chain apart (LoRA, ``cache_salt``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import xxhash

from client.vllm.config import ConnectorConfig
from client.vllm.layout import TORCH_DTYPES
from kvstore.core.errors import ConfigError
from kvstore.core.keys import ExtraKey, ModelSpec

__all__ = [
    "cache_geometry",
    "check_groups",
    "engine_namespace",
    "kv_dtype",
    "rank_heads",
    "request_extra_keys",
    "shard_spec",
    "shard_specs",
    "tp_rank",
    "weights_revision",
]

# Files whose bytes are the weights. Everything else in a model folder (tokenizer, README,
# generation defaults) leaves the K/V of a token sequence unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Config entries that say nothing about the K/V: who wrote the file and where from (as
# kvstore.worker.model leaves out of its revision).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "architectures")


def weights_revision(model_dir: Path) -> str:
    """A digest naming the weights in ``model_dir``: xxh3-128 over config.json (without the
    entries above) and the name, size and full bytes of every weight file.

    Rejected cheaper designs: the folder's name (a fine-tune saved under the same name would hit
    the base model's blocks), the safetensors headers and file sizes (identical for every
    fine-tune of one architecture), sampled bytes (a merged LoRA changes a few projections that
    a sample can miss). A shared namespace with other weights means wrong K/V served as hits, so
    every byte counts; xxh3 hashes at memory speed and vLLM has just read the same files, so
    this is mostly page-cache reads (set ``revision`` to skip it, e.g. to a commit id).
    A Hugging Face cache snapshot (``.../snapshots/<commit>``) is named by its commit instead.
    """
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.name
    h = xxhash.xxh3_128()
    config_file = model_dir / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in _VOLATILE_CONFIG_KEYS:
            config.pop(key, None)
        h.update(json.dumps(config, sort_keys=True).encode())
    files = sorted(
        p for p in model_dir.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    if not files:
        raise ConfigError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {model_dir}")
    for path in files:
        h.update(f"\x00{path.relative_to(model_dir)}:{path.stat().st_size}\x00".encode())
        with path.open("rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def _model_id(model: str) -> str:
    """The folder's name, ``org/name`` for a Hugging Face cache snapshot, or the hub id itself
    (the rule of ``kvstore worker``, so that both name a model alike)."""
    path = Path(model)
    if not path.is_dir():
        return model
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


# vLLM cache dtypes kvstore stores as float8 (vLLM keeps them as bytes, torch.uint8; its kernels
# read them as these formats). "fp8" is e4m3, as vLLM's CUDA kernels read it (fnuz on ROCm).
_FP8_CACHE_DTYPES = {
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def kv_dtype(vllm_config: Any) -> str:
    """The kvstore dtype of the engine's paged cache: the model's, or a float8 format.

    An fp8 cache holds K/V divided by per-layer scales (``k_scale``, ``v_scale``). Scales read
    from the checkpoint are part of its weight files, so ``weights_revision`` names them; scales
    computed from the first batch (``calculate_kv_scales``) differ from engine to engine, so a
    block of one would be wrong K/V in another: refused."""
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype in _FP8_CACHE_DTYPES:
        if getattr(vllm_config.cache_config, "calculate_kv_scales", False):
            raise ConfigError(
                f"KVStoreConnector: kv cache dtype {cache_dtype!r} with calculate_kv_scales: "
                "scales computed from the first batch differ between engines; use the "
                "checkpoint's scales"
            )
        name = _FP8_CACHE_DTYPES[cache_dtype]
        with contextlib.suppress(ImportError, AttributeError):  # ROCm's "fp8" is e4m3fnuz
            from vllm.platforms import current_platform  # type: ignore[import-not-found]

            if current_platform.is_rocm() and name == "float8_e4m3fn":
                name = str(current_platform.fp8_dtype()).removeprefix("torch.")
        return name
    if cache_dtype != "auto":
        raise ConfigError(
            f"KVStoreConnector: kv cache dtype {cache_dtype!r} is not supported; use 'auto' or "
            f"one of {sorted(_FP8_CACHE_DTYPES)}"
        )
    dtype = vllm_config.model_config.dtype
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"KVStoreConnector: model dtype {dtype} has no kvstore dtype")
    return TORCH_DTYPES[dtype]


def cache_geometry(model_config: Any) -> tuple[int, int]:
    """(KV heads, head_dim) of a kvstore block of this model, over all ranks.

    An MLA model keeps one latent vector per token (``kv_lora_rank + qk_rope_head_dim``, 576 in
    DeepSeek V2/V3), not a K and a V per head. A kvstore block is ``[layers, 2, tokens, heads,
    head_dim]``; the latent is stored as one head whose "K" is its first half and "V" its second
    (``ViewLayout`` reads it so): the same bytes, no padding, and the block format unchanged. The
    namespace says ``+mla`` so that no reader takes the halves for K and V."""
    head_size = int(model_config.get_head_size())
    if not getattr(model_config, "use_mla", False):
        return int(model_config.get_total_num_kv_heads()), head_size
    if head_size % 2:
        raise ConfigError(f"KVStoreConnector: an MLA latent of {head_size} dims does not halve")
    return 1, head_size // 2


def engine_namespace(vllm_config: Any, config: ConnectorConfig) -> ModelSpec:
    """The kvstore namespace of this engine's KV cache (see the docstring of this module and of
    ``client.vllm_connector``)."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        # Each stage holds a slice of the layers; a block holds all of them.
        raise ConfigError(
            "KVStoreConnector needs pipeline parallel size 1, got "
            f"{parallel.pipeline_parallel_size}"
        )
    world = int(parallel.tensor_parallel_size)
    heads, head_dim = cache_geometry(model_config)
    rank_heads(heads, world, 0)  # heads that split evenly
    if world > 1 and config.repair_holes:
        raise ConfigError(
            "KVStoreConnector: repair_holes needs tensor parallel size 1 (the model worker "
            "stores blocks of all heads; each rank here stores its own heads)"
        )
    vllm_block = int(vllm_config.cache_config.block_size)
    block_tokens = config.block_tokens or vllm_block
    if block_tokens < 1 or vllm_block % block_tokens:
        raise ConfigError(
            f"KVStoreConnector: block_tokens {block_tokens} must divide vLLM's block size "
            f"{vllm_block}"
        )
    dtype = kv_dtype(vllm_config)
    mla = bool(getattr(model_config, "use_mla", False))
    if config.repair_holes and (mla or dtype.startswith("float8")):
        raise ConfigError(
            "KVStoreConnector: repair_holes needs a cache of K and V in the model's dtype (the "
            "model worker computes those); this engine's is "
            + ("an MLA latent" if mla else f"{dtype}")
        )
    if config.model_spec:
        spec = ModelSpec.from_dict(json.loads(Path(config.model_spec).read_text()))
    else:
        model = str(model_config.model)
        revision = config.revision
        if not revision:
            if Path(model).is_dir():
                revision = weights_revision(Path(model).resolve())
            elif model_config.revision:
                revision = str(model_config.revision)
            else:
                raise ConfigError(
                    f"KVStoreConnector: {model} is not a local folder and has no revision; set "
                    "`revision` (e.g. a commit id) so that other weights never share its blocks"
                )
        model_id = _model_id(model)
        if model_config.quantization:  # weights quantized at load: other K/V
            model_id = f"{model_id}+{model_config.quantization}"
        if mla:
            model_id = f"{model_id}+mla"
        spec = ModelSpec(
            model_id,
            num_layers=int(model_config.get_num_layers(parallel)),
            num_kv_heads=heads,
            head_dim=head_dim,
            dtype=dtype,
            block_tokens=block_tokens,
            revision=str(revision),
        )
    expected = (int(model_config.get_num_layers(parallel)), heads, head_dim, dtype)
    got = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
    if got != expected or vllm_block % spec.block_tokens:
        raise ConfigError(
            f"KVStoreConnector: namespace {spec.name} is (layers, kv_heads, head_dim, dtype) = "
            f"{got} with {spec.block_tokens}-token blocks; the engine has {expected} with "
            f"{vllm_block}-token blocks"
        )
    return spec


def tp_rank(parallel: Any) -> int:
    """This worker's tensor-parallel rank: vLLM's group once it is set up, else the config's."""
    if int(parallel.tensor_parallel_size) <= 1:
        return 0
    try:
        from vllm.distributed import parallel_state  # type: ignore[import-not-found]

        return int(parallel_state.get_tensor_model_parallel_rank())
    except (AssertionError, ImportError):  # no group (a worker built outside an engine)
        return int(getattr(parallel, "rank", 0)) % int(parallel.tensor_parallel_size)


def rank_heads(heads: int, world: int, rank: int) -> tuple[int, int]:
    """The K/V heads ``[lo, hi)`` that tensor-parallel rank ``rank`` of ``world`` holds, split as
    vLLM's ``QKVParallelLinear`` splits them: ``heads / world`` each, or, with fewer heads than
    ranks, one head on each ``world / heads`` ranks in turn."""
    if world <= 1:
        return 0, heads
    if heads >= world:
        if heads % world:
            raise ConfigError(
                f"KVStoreConnector: {heads} KV heads do not split over tensor parallel size {world}"
            )
        per = heads // world
        return rank * per, (rank + 1) * per
    if world % heads:
        raise ConfigError(
            f"KVStoreConnector: tensor parallel size {world} is not a multiple of {heads} KV heads"
        )
    head = rank // (world // heads)
    return head, head + 1


def shard_spec(spec: ModelSpec, lo: int, hi: int) -> ModelSpec:
    """The namespace of K/V heads ``[lo, hi)`` of ``spec``: what one tensor-parallel rank stores
    and loads. Named by the heads, not the rank, so that ranks holding the same heads (replicas)
    share blocks, and so that other splits never do. All heads: ``spec`` itself."""
    if (lo, hi) == (0, spec.num_kv_heads):
        return spec
    return replace(
        spec,
        model_id=f"{spec.model_id}#kv-heads-{lo}-{hi}-of-{spec.num_kv_heads}",
        num_kv_heads=hi - lo,
    )


def shard_specs(spec: ModelSpec, world: int) -> list[ModelSpec]:
    """The distinct namespaces of the ranks ``0 .. world - 1``, in rank order."""
    out: list[ModelSpec] = []
    for rank in range(max(1, world)):
        shard = shard_spec(spec, *rank_heads(spec.num_kv_heads, world, rank))
        if shard not in out:
            out.append(shard)
    return out


def check_groups(kv_cache_config: Any) -> None:
    """One KV cache group, or a refusal that names the model's groups: a hybrid model (sliding
    window beside full attention, Mamba beside attention) keeps each group in blocks of its
    own, and a kvstore chain holds the K/V of every layer of one group."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) <= 1:
        return
    named = "; ".join(
        f"group {i}: {type(g.kv_cache_spec).__name__} over {len(g.layer_names)} layers "
        f"({', '.join(g.layer_names[:2])}{', ...' if len(g.layer_names) > 2 else ''})"
        for i, g in enumerate(groups)
    )
    raise ConfigError(
        f"KVStoreConnector: the model has {len(groups)} KV cache groups ({named}); kvstore "
        "stores one group (models whose layers all use one kind of attention)"
    )


def request_extra_keys(request: Any, num_blocks: int) -> list[list[ExtraKey]] | None:
    """Keys that make the chain differ where the same tokens give other K/V: a LoRA adapter,
    a ``cache_salt``. On block 0 only: every later hash chains from it."""
    first: list[ExtraKey] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        first.append(f"lora:{lora.lora_name}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        first.append(f"salt:{salt}")
    if not first or num_blocks == 0:
        return None
    return [first] + [[] for _ in range(num_blocks - 1)]
