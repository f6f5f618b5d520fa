"""``KVStoreConnector``: vLLM's KV connector (``KVConnectorBase_V1``) backed by a kvstore service.

vLLM loads it by name, with no patch of its own::

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model_dir, kv_transfer_config=KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="client.vllm_connector",
        kv_role="kv_both",                       # kv_producer: only save; kv_consumer: only load
        kv_load_failure_policy="recompute",      # a block that fails to load is recomputed
        kv_connector_extra_config={"server": "127.0.0.1:50051"},
    ))

The calls vLLM makes, in order, and what each does here:

scheduler side (once per request unless noted)
    ``on_new_request``              remember the prompt (and its extra keys) of a text request.
    ``get_num_new_matched_tokens``  lookup: the prompt's leading run of stored blocks beyond vLLM's
                                    own prefix-cache hit, never the last prompt token (vLLM must
                                    compute one); with ``repair_holes`` the service's model worker
                                    first recomputes holes (missing blocks with stored ones after),
                                    aside: the request answers "not yet" until that is done.
                                    A hit with a block below G2 loads asynchronously
                                    (``load_async``): the request waits aside for it.
    ``update_state_after_alloc``    the hit vLLM accepted: a lease on its blocks, so that they are
                                    not evicted before the worker reads them.
    ``build_connector_meta``        every step: the async loads just accepted and the loads of
                                    newly scheduled requests, and the
                                    saves of requests whose prompt's full blocks are all computed
                                    by the end of this step (with chunked prefill: the last chunk).
    ``update_connector_output``     every step: blocks the worker could not load are recomputed by
                                    vLLM, and their prompt is saved again once they are.
    ``request_finished``            forget the request, release its lease; blocks are freed at once
                                    (saves are copied out inside the step, see below).
worker side (every step)
    ``start_load_kv``               start each load's fetch and return: layer by layer (the
                                    service copies one layer at a time into this process's
                                    shared segment, ``get_prefix_by_layer``), each layer copied
                                    into vLLM's paged cache on the client's thread as it comes.
                                    An async load arrives the same way; no step waits for it.
    ``wait_for_layer_load``         wait for that layer alone: later layers arrive meanwhile.
    ``save_kv_layer``               copy that layer's K/V of each save out of the paged cache.
    ``wait_for_save``               start putting the saves' full blocks (all layers) into
                                    kvstore, in the background (the next step's saves wait).
    ``get_finished``                the async loads that are done (their errors are reported by
                                    the next call, in the same step).
    ``get_block_ids_with_load_errors``  vLLM blocks whose K/V could not be loaded (evicted between
                                    lookup and fetch, failed its checksum, found after the step
                                    on the layer-by-layer path, service down) or was
                                    fetched for a layer vLLM never asked for: vLLM recomputes them
                                    (with ``kv_load_failure_policy="recompute"``), never uses what
                                    the cache held.

Configuration (``kv_connector_extra_config``): ``server`` (``host:port``, default
``127.0.0.1:50051``), ``token``, ``tls_ca``, ``timeout_s``, ``repair_holes`` (default false),
``block_tokens`` (kvstore's tokens per block: vLLM's block size, the default, or a divisor of it),
``revision`` (names the weights; default: a digest of the model folder, see ``weights_revision``),
``model_spec`` (a ``kvstore worker --spec-out`` file whose namespace to use instead, so that a
model worker of the same weights repairs vLLM's holes), ``lease_ttl_s``, ``load_async``
(``"lower"``: hits with a block below G2 load aside, the default; ``"always"``; ``"never"``) and
``stats_path`` (a folder: each connector writes its counters there as ``<role>-<pid>.json``).

Layout. kvstore blocks are ``[layers, 2 (K,V), block_tokens, kv_heads, head_dim]``. Each layer's
attention backend decides how vLLM's paged cache holds them (``layout_for``). The GPU backends
read a logical view ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` (K, then V, in the last
axis) whose physical strides follow vLLM's ``KVCacheLayout``: ``ViewLayout`` copies through a
strided view of the same memory. vLLM's CPU attention backend has the same shape, but the
interior of its blocks depends on the kernel's instruction set: on x86 (the ``vec`` kernels) each
head holds its block's K transposed, ``[head_dim, block_size]``, then its V as ``[block_size,
head_dim]``. Rather than hard-coding that, the worker side asks the backend at start
(``BlockLayout.probe``: it writes a known pattern through the layer's own ``do_kv_cache_update``)
and copies by the offsets it finds. A cache the connector cannot map is refused at start rather
than misread. The tests compare what vLLM saves with the K/V transformers computes for the
same prompt, and feed vLLM blocks computed by transformers.

Tensor parallel: each rank stores and loads its own K/V heads, in a namespace named by them
(``shard_spec``); the scheduler looks up every rank's namespace and claims the shortest hit.

Limits: one KV cache group (a hybrid model is refused at start naming its groups), pipeline
parallel size 1, no multimodal prompts or prompt embeddings (their K/V depends on more
than the token ids), no fp8 KV cache, no MLA latent caches. LoRA and ``cache_salt`` requests
get their own chains (an extra key on block 0).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from client.errors import NoWorkerError
from client.results import Lookup
from client.sync import Client
from kvstore.errors import ConfigError, KVStoreError
from kvstore.keys import ExtraKey, ModelSpec

if TYPE_CHECKING:
    # What this module uses of vLLM's base classes; the real ones are imported at run time (vLLM
    # is not installed where mypy runs, and these few members are all the typing needs).

    class _ConnectorBase:
        _vllm_config: Any
        _kv_transfer_config: Any

        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None: ...

        @property
        def role(self) -> Any: ...

        def _get_connector_metadata(self) -> Any: ...

        def has_connector_metadata(self) -> bool: ...

    class _MetadataBase:
        pass

    _SCHEDULER: Any = None
else:
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorBase_V1 as _ConnectorBase,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorMetadata as _MetadataBase,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "client.vllm_connector needs vLLM (0.32: the KVConnectorBase_V1 API) installed next "
            "to kvstore; `import client` alone does not"
        ) from exc
    _SCHEDULER = KVConnectorRole.SCHEDULER

__all__ = [
    "BlockLayout",
    "ConnectorConfig",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "weights_revision",
]

# Under vLLM's logger, whose handler and format vLLM sets up in every process it starts (the
# engine core, the workers): a logger of our own would print nothing there below WARNING.
log = logging.getLogger(f"vllm.{__name__}")

# vLLM cache dtype -> kvstore dtype; "auto" follows the model's dtype.
_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
# Files whose bytes are the weights. Everything else in a model folder (tokenizer, README,
# generation defaults) leaves the K/V of a token sequence unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Config entries that say nothing about the K/V: who wrote the file and where from (as
# kvstore.worker leaves out of its revision).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "architectures")
# After a failed call, lookups are skipped for this long: a kvstore service that is down must
# not cost every new request the client's retries.
_DOWN_BACKOFF_S = 5.0


# -- configuration ---------------------------------------------------------------------------------


_LOAD_ASYNC = ("lower", "always", "never")
_MEMORY_TIERS = ("G1", "G2")


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """``kv_connector_extra_config``, checked once (see the module docstring)."""

    server: str = "127.0.0.1:50051"
    token: str | None = None
    tls_ca: str | None = None
    timeout_s: float = 30.0
    repair_holes: bool = False
    block_tokens: int = 0  # 0: vLLM's block size
    revision: str = ""
    model_spec: str = ""
    lease_ttl_s: float = 60.0
    stats_path: str = ""
    # Which hits load asynchronously (the request waits aside, the other requests' steps go
    # on): "lower" those with a block below G2 (G3, G4: slow reads), "always", "never".
    load_async: str = "lower"

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        """The settings vLLM passes on; unknown keys and wrong types are a ``ConfigError``."""
        values = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"KVStoreConnector: unknown kv_connector_extra_config keys {unknown}; "
                f"known: {sorted(known)}"
            )
        for name, value in values.items():
            default = known[name].default
            kinds: tuple[type, ...] = (type(default),) if default is not None else (str,)
            if isinstance(default, float):
                kinds = (int, float)
            if value is None and default is None:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and kinds != (bool,)):
                raise ConfigError(
                    f"KVStoreConnector: {name} must be {kinds[-1].__name__}, got {value!r}"
                )
        config = cls(**values)
        if not config.server:
            raise ConfigError("KVStoreConnector: server must not be empty")
        if config.timeout_s <= 0 or config.lease_ttl_s <= 0 or config.block_tokens < 0:
            raise ConfigError(
                "KVStoreConnector: timeout_s and lease_ttl_s must be > 0, block_tokens >= 0"
            )
        if config.load_async not in _LOAD_ASYNC:
            raise ConfigError(
                f"KVStoreConnector: load_async must be one of {list(_LOAD_ASYNC)}, "
                f"got {config.load_async!r}"
            )
        return config


# -- the namespace ---------------------------------------------------------------------------------


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


def _kv_dtype(vllm_config: Any) -> str:
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto":
        # fp8 caches are scaled per layer (k_scale, v_scale): the scales would have to be part
        # of the namespace and travel with the blocks.
        raise ConfigError(
            f"KVStoreConnector: kv cache dtype {cache_dtype!r} is not supported; use 'auto'"
        )
    dtype = vllm_config.model_config.dtype
    if dtype not in _TORCH_DTYPES:
        raise ConfigError(f"KVStoreConnector: model dtype {dtype} has no kvstore dtype")
    return _TORCH_DTYPES[dtype]


def _namespace(vllm_config: Any, config: ConnectorConfig) -> ModelSpec:
    """The kvstore namespace of this engine's KV cache; see the module docstring."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        # Each stage holds a slice of the layers; a block holds all of them.
        raise ConfigError(
            "KVStoreConnector needs pipeline parallel size 1, got "
            f"{parallel.pipeline_parallel_size}"
        )
    world = int(parallel.tensor_parallel_size)
    _shard(int(model_config.get_total_num_kv_heads()), world, 0)  # heads that split evenly
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
    dtype = _kv_dtype(vllm_config)
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
        spec = ModelSpec(
            model_id,
            num_layers=int(model_config.get_num_layers(parallel)),
            num_kv_heads=int(model_config.get_total_num_kv_heads()),
            head_dim=int(model_config.get_head_size()),
            dtype=dtype,
            block_tokens=block_tokens,
            revision=str(revision),
        )
    expected = (
        int(model_config.get_num_layers(parallel)),
        int(model_config.get_total_num_kv_heads()),
        int(model_config.get_head_size()),
        dtype,
    )
    got = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
    if got != expected or vllm_block % spec.block_tokens:
        raise ConfigError(
            f"KVStoreConnector: namespace {spec.name} is (layers, kv_heads, head_dim, dtype) = "
            f"{got} with {spec.block_tokens}-token blocks; the engine has {expected} with "
            f"{vllm_block}-token blocks"
        )
    return spec


def _tp_rank(parallel: Any) -> int:
    """This worker's tensor-parallel rank: vLLM's group once it is set up, else the config's."""
    if int(parallel.tensor_parallel_size) <= 1:
        return 0
    try:
        from vllm.distributed import parallel_state  # type: ignore[import-not-found]

        return int(parallel_state.get_tensor_model_parallel_rank())
    except (AssertionError, ImportError):  # no group (a worker built outside an engine)
        return int(getattr(parallel, "rank", 0)) % int(parallel.tensor_parallel_size)


def _shard(heads: int, world: int, rank: int) -> tuple[int, int]:
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


def _shard_specs(spec: ModelSpec, world: int) -> list[ModelSpec]:
    """The distinct namespaces of the ranks ``0 .. world - 1``, in rank order."""
    out: list[ModelSpec] = []
    for rank in range(max(1, world)):
        shard = shard_spec(spec, *_shard(spec.num_kv_heads, world, rank))
        if shard not in out:
            out.append(shard)
    return out


def _check_groups(kv_cache_config: Any) -> None:
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


def _extra_keys(request: Any, num_blocks: int) -> list[list[ExtraKey]] | None:
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


# -- scheduler -> worker metadata ------------------------------------------------------------------


@dataclass
class _Transfer:
    """One request's load or save: tokens ``[start, end)`` of ``tokens`` between kvstore and
    the vLLM blocks ``block_ids`` (the request's, in order: token ``t`` is in
    ``block_ids[t // block_size]``)."""

    req_id: str
    tokens: list[int]  # the prompt up to ``end``
    start: int
    end: int
    block_ids: list[int]
    extra_keys: list[list[ExtraKey]] | None = None
    # A load that vLLM does not wait for in a step: the request waits aside until
    # ``get_finished`` reports it.
    async_load: bool = False


@dataclass
class KVStoreConnectorMetadata(_MetadataBase):
    """What the scheduler-side connector tells the worker side for one step."""

    spec: dict[str, Any] | None = None  # ModelSpec.to_dict(); set when there is work
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


@dataclass
class _Request:
    """The scheduler side's view of one running request."""

    tokens: list[int]  # the prompt
    extra_keys: list[list[ExtraKey]] | None
    block_ids: list[int] = field(default_factory=list)
    stored_end: int = 0  # tokens known to be in kvstore (a loaded hit)
    saved: bool = False
    lease_ids: list[int] = field(default_factory=list)  # one per namespace (see ``_shards``)

    def transfer(self, req_id: str, start: int, end: int, *, async_load: bool = False) -> _Transfer:
        """Tokens ``[start, end)`` of this request's prompt, in its blocks as they are now."""
        return _Transfer(
            req_id,
            self.tokens[:end],
            start,
            end,
            list(self.block_ids),
            self.extra_keys,
            async_load=async_load,
        )


@dataclass
class _Counters:
    lookups: int = 0
    lookup_errors: int = 0
    lookup_hit_tokens: int = 0  # what kvstore had, before the last-token rule
    matched_tokens: int = 0  # what was claimed to vLLM
    repairs: int = 0
    repaired_blocks: int = 0
    loads: int = 0
    async_loads: int = 0  # of them, loads the request waited for aside (``load_async``)
    loaded_tokens: int = 0
    load_error_blocks: int = 0
    saves: int = 0
    saved_tokens: int = 0
    stored_blocks: int = 0
    already_stored_blocks: int = 0
    save_errors: int = 0
    # Seconds spent in each part of the hit and store paths, summed over calls.
    lookup_s: float = 0.0
    reserve_s: float = 0.0
    fetch_s: float = 0.0  # start of the fetch to the end of the step's loads
    inject_s: float = 0.0  # copies into vLLM's paged cache (on the client's thread)
    load_wait_s: float = 0.0  # vLLM's forward waiting for a layer to arrive
    gather_s: float = 0.0
    put_s: float = 0.0


@dataclass(eq=False)
class _Loading:
    """One load of this step while its layers arrive."""

    load: _Transfer
    started: float
    future: Future[int] | None = None  # the verified tokens fetched
    layers: int = 0  # layers [0, layers) are in the paged cache
    tokens: int = 0  # tokens each of them holds


# -- the connector ---------------------------------------------------------------------------------


class KVStoreConnector(_ConnectorBase):
    """vLLM's KV connector over a kvstore service; see the module docstring."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _check_groups(kv_cache_config)
        transfer = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        self._is_scheduler = role == _SCHEDULER
        self._block_size = int(vllm_config.cache_config.block_size)
        self._load_enabled = bool(transfer.is_kv_consumer)
        self._save_enabled = bool(transfer.is_kv_producer)
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._down_until = 0.0
        self.counters = _Counters()
        # The scheduler side derives the namespace (hashing the weights) and ships it to the
        # worker side in the metadata, so that the workers need not hash them again.
        self._spec: ModelSpec | None = None
        parallel = vllm_config.parallel_config
        self._world = int(parallel.tensor_parallel_size)
        self._rank = 0 if self._is_scheduler else _tp_rank(parallel)
        self._shards: list[ModelSpec] = []  # the ranks' namespaces (scheduler side)
        self._spec_of: dict[str, Any] | None = None  # the scheduler's spec of the worker's
        if self._is_scheduler:
            self._spec = _namespace(vllm_config, self.config)
            self._shards = _shard_specs(self._spec, self._world)
            log.info(
                "KVStoreConnector: kvstore %s, namespace %s%s",
                self.config.server,
                self._spec,
                f", one per tensor-parallel head slice: {[s.model_id for s in self._shards]}"
                if len(self._shards) > 1
                else "",
            )
            if self._load_enabled and transfer.kv_load_failure_policy != "recompute":
                log.warning(
                    "KVStoreConnector: kv_load_failure_policy=%r fails a request whose blocks "
                    "vanish between lookup and load; 'recompute' recomputes them instead",
                    transfer.kv_load_failure_policy,
                )
        # scheduler side
        self._requests: dict[str, _Request] = {}
        # req_id -> (local computed, hit end, load asynchronously)
        self._matched: dict[str, tuple[int, int, bool]] = {}
        self._pending_loads: dict[str, tuple[int, int, bool]] = {}  # req_id -> (start, end, async)
        self._repairs: dict[str, Future[int]] = {}  # req_id -> the hit once holes are filled
        self._repairer: ThreadPoolExecutor | None = None
        # worker side
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (index, layout view)
        self._caches: list[torch.Tensor] = []  # layer index -> layout view
        self._layout: BlockLayout | ViewLayout | None = None
        self._loading: list[_Loading] = []  # this step's loads, arriving layer by layer
        self._async: dict[str, _Loading] = {}  # req_id -> an async load, until get_finished
        self._finished_async: set[str] = set()  # async loads that ended without a fetch
        self._arrived = threading.Condition()
        self._injected: set[str] = set()  # layers vLLM waited for
        self._staged: list[tuple[_Transfer, torch.Tensor, set[str]]] = []
        self._putting: list[tuple[_Transfer, float, Future[Any]]] = []  # puts in flight
        # Reused from step to step: a fresh tensor per save page-faults on every byte (8 ms of
        # 24 MiB here), a warm one does not.
        self._save_arena = _Arena()
        self._load_errors: set[int] = set()
        self._write_stats()

    # -- shared --------------------------------------------------------------------------------

    def _kv(self) -> Client:
        # Made on first use, in the process and thread that uses it: vLLM may build the
        # connector in one process and fork or spawn the engine core or workers from it.
        with self._client_lock:
            if self._client is None:
                self._client = Client(
                    self.config.server,
                    token=self.config.token,
                    tls_ca=self.config.tls_ca,
                    timeout_s=self.config.timeout_s,
                )
            return self._client

    def _write_stats(self) -> None:
        if not self.config.stats_path:
            return
        role = "scheduler" if self._is_scheduler else "worker"
        folder = Path(self.config.stats_path)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{role}-{os.getpid()}.json"
        tmp = target.with_suffix(".tmp")
        state: dict[str, Any] = {"role": role, "pid": os.getpid(), **vars(self.counters)}
        if self._spec is not None:
            state["namespace"] = self._spec.to_dict()
        tmp.write_text(json.dumps(state))
        tmp.replace(target)  # a reader never sees half a file

    def shutdown(self) -> None:
        self.finish_puts()
        self._write_stats()
        if self._repairer is not None:
            self._repairer.shutdown(wait=False, cancel_futures=True)
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own hit) that kvstore can supply."""
        self._matched.pop(request.request_id, None)
        spec = self._spec
        tokens = request.prompt_token_ids
        if (
            spec is None
            or not self._load_enabled
            or tokens is None
            or getattr(request, "mm_features", None)
            or time.monotonic() < self._down_until
        ):
            return 0, False
        # Never the last prompt token: vLLM computes at least one token to sample from.
        limit = (len(tokens) - 1) // spec.block_tokens * spec.block_tokens
        if limit <= num_computed_tokens:
            return 0, False
        # The lookup covers every full block, the last one too: when kvstore has them all, the
        # request's save after its prefill is skipped (it would store nothing new).
        full = len(tokens) // spec.block_tokens * spec.block_tokens
        prompt = list(tokens[:full])
        extra_keys = _extra_keys(request, full // spec.block_tokens)
        repair = self._repairs.get(request.request_id)
        founds: list[Lookup] = []  # one per rank's namespace (none after a repair)
        if repair is not None:
            if not repair.done():
                return None, False  # vLLM asks again at its next step
            del self._repairs[request.request_id]
            hit = repair.result()
        else:
            self.counters.lookups += 1
            started = time.perf_counter()
            try:
                # Every rank's heads must be there: the hit is the shortest of them.
                founds = [self._kv().lookup(s, prompt, extra_keys=extra_keys) for s in self._shards]
                found = min(founds, key=lambda f: f.hit_tokens)
            except KVStoreError as exc:
                self.counters.lookup_errors += 1
                self._down_until = time.monotonic() + _DOWN_BACKOFF_S
                log.warning(
                    "KVStoreConnector: lookup failed, no hits for %.0f s: %s", _DOWN_BACKOFF_S, exc
                )
                self._write_stats()
                return 0, False
            hit = found.hit_tokens
            self.counters.lookup_s += time.perf_counter() - started
            if self.config.repair_holes and found.holes:
                # The model worker's time must not stall the scheduler (every running request
                # waits on it): the repair runs aside, and this request waits for it alone.
                self._repairs[request.request_id] = self._repair_pool().submit(
                    self._repair, spec, prompt, extra_keys, hit
                )
                return None, False
        self.counters.lookup_hit_tokens += hit
        state = self._requests.get(request.request_id)
        if state is not None:
            state.stored_end = max(state.stored_end, hit)
        hit = min(hit, limit)
        if hit <= num_computed_tokens:
            self._write_stats()
            return 0, False
        mode = self.config.load_async
        first, last = num_computed_tokens // spec.block_tokens, hit // spec.block_tokens
        slow = any(t not in _MEMORY_TIERS for f in founds for t in f.tiers[first:last])
        load_async = mode == "always" or (mode == "lower" and slow)
        self._matched[request.request_id] = (num_computed_tokens, hit, load_async)
        self.counters.matched_tokens += hit - num_computed_tokens
        self._write_stats()
        return hit - num_computed_tokens, load_async

    def _repair(
        self,
        spec: ModelSpec,
        prompt: list[int],
        extra_keys: list[list[ExtraKey]] | None,
        hit: int,
    ) -> int:
        """Have the service's model worker fill the holes; the new leading hit in tokens, or
        ``hit`` (the one before the holes) when the repair fails."""
        try:
            result = self._kv().repair(spec, prompt, extra_keys=extra_keys)
        except NoWorkerError as exc:
            log.warning("KVStoreConnector: holes not repaired (no model worker): %s", exc)
            return hit
        except KVStoreError as exc:
            log.warning("KVStoreConnector: repair failed: %s", exc)
            return hit
        self.counters.repairs += 1
        self.counters.repaired_blocks += len(result.repaired)
        return result.hit_blocks * spec.block_tokens

    def _repair_pool(self) -> ThreadPoolExecutor:
        if self._repairer is None:
            self._repairer = ThreadPoolExecutor(2, thread_name_prefix="kvstore-repair")
        return self._repairer

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        req_id = request.request_id
        matched = self._matched.pop(req_id, None)
        if num_external_tokens <= 0 or matched is None or self._spec is None:
            return
        _, end, load_async = matched
        start = end - num_external_tokens
        state = self._requests.get(req_id)
        if state is None:
            return
        if load_async:
            # The request is not scheduled until the load is done: its blocks are known now.
            state.block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads[req_id] = (start, end, load_async)
        state.stored_end = max(state.stored_end, end)
        # Hold the blocks until the worker has read them (or the TTL passes): an eviction in
        # between would turn the hit into a recompute.
        started = time.perf_counter()
        for lease_id in state.lease_ids:
            self._release(lease_id)
        state.lease_ids = []
        for shard in self._shards:
            with contextlib.suppress(KVStoreError):
                lease = self._kv().reserve(
                    shard,
                    state.tokens[:end],
                    num_blocks=end // shard.block_tokens,
                    ttl_s=self.config.lease_ttl_s,
                    extra_keys=state.extra_keys,
                )
                state.lease_ids.append(lease.lease_id)
        self.counters.reserve_s += time.perf_counter() - started

    def on_new_request(self, request: Any) -> None:
        """Track a request whose K/V depends on its token ids alone (and on the extra keys)."""
        tokens = request.prompt_token_ids
        if self._spec is None or tokens is None or getattr(request, "mm_features", None):
            return
        num_blocks = len(tokens) // self._spec.block_tokens
        self._requests[request.request_id] = _Request(
            list(tokens), _extra_keys(request, num_blocks)
        )

    def _release(self, lease_id: int) -> None:
        with contextlib.suppress(KVStoreError):
            self._kv().release(lease_id)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        spec = self._spec
        if spec is None:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        steps: list[tuple[str, int]] = []  # (req_id, tokens computed by the end of this step)
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids is None:
                continue
            state = self._requests.get(new.req_id)
            if state is None:
                continue  # not one of ours (see on_new_request)
            state.block_ids = list(new.block_ids[0])
            steps.append((new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Preempted and back: its blocks were freed, these replace them; the prompt is
                # computed again, so its blocks are saved again (repeats are free in kvstore).
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
                state.saved = False
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            steps.append((req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0)))
        # Async loads first: their requests wait aside, so none of them is in ``steps``.
        for req_id, (start, end, load_async) in list(self._pending_loads.items()):
            state = self._requests.get(req_id)
            if load_async and state is not None:
                del self._pending_loads[req_id]
                meta.loads.append(state.transfer(req_id, start, end, async_load=True))
        for req_id, computed in steps:
            state = self._requests[req_id]
            load = self._pending_loads.pop(req_id, None)
            if load is not None:
                start, end, _ = load
                meta.loads.append(state.transfer(req_id, start, end))
            if not self._save_enabled or state.saved:
                continue
            full = len(state.tokens) // spec.block_tokens * spec.block_tokens
            if computed < full:
                continue  # chunked prefill: save once, at the chunk that completes the prompt
            state.saved = True
            if full > state.stored_end:
                meta.saves.append(state.transfer(req_id, state.stored_end, full))
        # Loads whose request was not scheduled after all (allocation raced): nothing to do.
        self._pending_loads.clear()
        if meta.loads or meta.saves:
            meta.spec = spec.to_dict()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        """Blocks that failed to load are recomputed by vLLM: save the prompt again once they
        are (the service dropped what it could not serve, so it lacks them now)."""
        invalid = connector_output.invalid_block_ids
        if not invalid:
            return
        for state in self._requests.values():
            for i, block in enumerate(state.block_ids):
                if block in invalid:
                    state.stored_end = min(state.stored_end, i * self._block_size)
                    state.saved = False
                    break

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        state = self._requests.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._repairs.pop(request.request_id, None)  # a repair still running stores all the same
        for lease_id in state.lease_ids if state is not None else ():
            self._release(lease_id)
        return False, None

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Learn where the attention backend keeps each K/V element (``BlockLayout.probe``)
        and keep each layer's cache as ``[blocks, elements of one block]``."""
        model_config = self._vllm_config.model_config
        parallel = self._vllm_config.parallel_config
        num_layers = int(model_config.get_num_layers(parallel))
        lo, hi = _shard(int(model_config.get_total_num_kv_heads()), self._world, self._rank)
        heads = hi - lo  # this rank's
        head_dim = int(model_config.get_head_size())
        modules = self._vllm_config.compilation_config.static_forward_context
        layers: dict[str, tuple[int, torch.Tensor]] = {}
        layout: BlockLayout | ViewLayout | None = None
        for name, cache in kv_caches.items():
            if layout is None or not layout.fits(cache):
                layout = layout_for(modules[name], cache, self._block_size, heads, head_dim)
            layers[name] = (_layer_index(name), layout.prepare(cache))
        indices = sorted(i for i, _ in layers.values())
        if layout is None or indices != list(range(num_layers)):
            raise ConfigError(
                f"KVStoreConnector: attention layers {indices} do not cover the model's "
                f"{num_layers} layers one by one"
            )
        self._layers = layers
        self._caches = [cache for _, cache in sorted(layers.values(), key=lambda e: e[0])]
        self._layout = layout
        log.info(
            "KVStoreConnector: %d layers, paged cache %s per layer; %s",
            len(layers),
            list(next(iter(kv_caches.values())).shape),
            layout.describe(),
        )

    def _worker_spec(self, meta: KVStoreConnectorMetadata) -> ModelSpec:
        """This rank's namespace: the scheduler's, or its slice of the heads (``shard_spec``)."""
        assert meta.spec is not None
        if self._spec is None or self._spec_of != meta.spec:
            base = ModelSpec.from_dict(meta.spec)
            self._spec = shard_spec(base, *_shard(base.num_kv_heads, self._world, self._rank))
            self._spec_of = meta.spec
        return self._spec

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start fetching every load of this step, layer by layer; return at once.

        The fetches run on the client's thread: as each layer of a load arrives (the service
        copies the hit into this process's shared segment one layer at a time), it is copied
        into vLLM's paged cache there, while vLLM computes the layers before it.
        ``wait_for_layer_load`` waits for that layer only. An async load (its request is not
        in this step) lands the same way, and ``get_finished`` reports it once it is done."""
        self._loading = []
        self._injected = set()
        self.finish_puts(wait=False)
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
            return
        spec = self._worker_spec(meta)
        if self._layout is None:
            # No caches registered (a model runner that does not call register_kv_caches):
            # nothing can be put in place, so every promised block is recomputed.
            for load in meta.loads:
                self._load_errors |= _blocks_of(
                    load.block_ids, load.start, load.end, self._block_size
                )
                if load.async_load:
                    self._finished_async.add(load.req_id)
            return
        kv = self._kv()
        for load in meta.loads:
            loading = _Loading(load, time.perf_counter())
            if load.async_load:
                self._async[load.req_id] = loading
            else:
                self._loading.append(loading)
            loading.future = kv.start_get_prefix_by_layer(
                spec,
                load.tokens,
                functools.partial(self._arrive, loading),
                extra_keys=load.extra_keys,
            )
            loading.future.add_done_callback(lambda _: self._notify())

    def _arrive(self, loading: _Loading, layer: int, kv: torch.Tensor) -> None:
        """One layer of one load is here (the client's thread): into the paged cache with it."""
        assert self._layout is not None
        load, started = loading.load, time.perf_counter()
        if kv.shape[1] > load.start:
            self._layout.scatter(self._caches[layer], load.block_ids, kv, load.start)
        self.counters.inject_s += time.perf_counter() - started
        with self._arrived:
            # A retried fetch hands layer 0 on again: never fewer layers than vLLM was told.
            loading.tokens = kv.shape[1] if layer == 0 else min(loading.tokens, kv.shape[1])
            loading.layers = max(loading.layers, layer + 1)
            self._arrived.notify_all()

    def _notify(self) -> None:
        with self._arrived:
            self._arrived.notify_all()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Wait until that layer of every load of this step is in the paged cache (or its fetch
        has ended: what did not arrive is reported by ``get_block_ids_with_load_errors``)."""
        if not self._loading or layer_name in self._injected:
            return
        entry = self._layers.get(layer_name)
        if entry is None:
            return
        index = entry[0]
        started = time.perf_counter()
        with self._arrived:
            self._arrived.wait_for(
                lambda: all(
                    x.layers > index or (x.future is not None and x.future.done())
                    for x in self._loading
                )
            )
        self._injected.add(layer_name)
        self.counters.load_wait_s += time.perf_counter() - started

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            return
        entry = self._layers.get(layer_name)
        if entry is None:
            return
        if not self._staged:
            self._stage(meta)
        index, cache = entry
        started = time.perf_counter()
        for save, staging, done in self._staged:
            if layer_name not in done:
                assert self._layout is not None
                self._layout.gather(cache, save.block_ids, out=staging[index])
                done.add(layer_name)
        self.counters.gather_s += time.perf_counter() - started

    def _stage(self, meta: KVStoreConnectorMetadata) -> None:
        """Staging tensors for this step's saves, in the reused save arena (once the puts of
        the steps before, which read from it, are done)."""
        self.finish_puts()
        spec = self._worker_spec(meta)
        shapes = [
            (spec.num_layers, 2, save.end, spec.num_kv_heads, spec.head_dim) for save in meta.saves
        ]
        views = self._save_arena.views(shapes, _torch_dtype(spec.dtype))
        self._staged = [(save, view, set()) for save, view in zip(meta.saves, views, strict=True)]

    def wait_for_save(self) -> None:
        """Put this step's saves (all layers copied by now) into kvstore, then check that every
        load reached every layer."""
        self._check_loads()
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves or not self._layers:
            return
        if not self._staged:  # no save_kv_layer call at all (no attention this step)
            self._stage(meta)
        spec = self._worker_spec(meta)
        kv = self._kv()
        for save, staging, done in self._staged:
            missing = [name for name in self._layers if name not in done]
            if missing:
                # A layer vLLM ran without the save hook: its K/V is in the paged cache all
                # the same, so copy it from there.
                assert self._layout is not None
                for name in missing:
                    index, cache = self._layers[name]
                    self._layout.gather(cache, save.block_ids, out=staging[index])
            # In the background: the step (and the next request's) need not wait for the
            # service. The staging copy is ours until the put is done (see ``_stage``).
            future = kv.start_put(spec, save.tokens, staging, extra_keys=save.extra_keys)
            self._putting.append((save, time.perf_counter(), future))
        self._staged = []

    def finish_puts(self, *, wait: bool = True) -> None:
        """Count the background puts that are done; with ``wait``, wait for all of them first
        (the next step's saves and ``shutdown`` do)."""
        if wait:
            putting, self._putting = self._putting, []
        else:
            putting = [p for p in self._putting if p[2].done()]
            self._putting = [p for p in self._putting if not p[2].done()]
        for save, started, future in putting:
            try:
                result = future.result()
            except Exception as exc:  # KVStoreError, or a client closed under it
                # A lost save is a future miss, not an error of this request.
                self.counters.save_errors += 1
                log.warning("KVStoreConnector: put for %s failed: %s", save.req_id, exc)
                continue
            self.counters.put_s += time.perf_counter() - started
            self.counters.saves += 1
            self.counters.saved_tokens += save.end - save.start
            self.counters.stored_blocks += result.stored
            self.counters.already_stored_blocks += result.already
        if putting:
            self._write_stats()

    def _check_loads(self) -> None:
        """End this step's loads: wait for their fetches (nothing may write into the paged cache
        after the step), and report for recompute the blocks that did not arrive whole and
        verified, and every block of a load of a layer vLLM never waited for (the forward ran
        on what the cache held then)."""
        if not self._loading:
            return
        missed = [name for name in self._layers if name not in self._injected]
        if missed:
            log.warning("KVStoreConnector: layers %s were not loaded; recomputing", missed)
        for loading in self._loading:
            self._settle(loading, missed=bool(missed))
        self._loading = []
        self._write_stats()

    def _settle(self, loading: _Loading, *, missed: bool = False) -> None:
        """Count a load whose fetch is done, and report for recompute what did not arrive."""
        load = loading.load
        assert loading.future is not None
        try:
            got = loading.future.result()
        except Exception as exc:  # KVStoreError, or a scatter that failed
            log.warning("KVStoreConnector: fetch for %s failed: %s", load.req_id, exc)
            got = 0
        self.counters.fetch_s += time.perf_counter() - loading.started
        self.counters.loads += 1
        self.counters.async_loads += load.async_load
        got = min(got, loading.tokens if loading.layers == len(self._caches) else 0)
        if missed:
            got = 0  # the forward ran without some layer of it: all of it is recomputed
        bad = _blocks_of(load.block_ids, max(got, load.start), load.end, self._block_size)
        self.counters.loaded_tokens += max(0, got - load.start)
        if bad:
            # Evicted since the lookup, unreachable, or failed its checksum: vLLM recomputes
            # from the first block that did not arrive (all of that block).
            self._load_errors |= bad
            self.counters.load_error_blocks += len(bad)
            log.warning(
                "KVStoreConnector: %s: %d of %d tokens arrived; %d blocks to recompute",
                load.req_id,
                got,
                load.end,
                len(bad),
            )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The async loads that are done (their blocks are in the paged cache, or reported by
        ``get_block_ids_with_load_errors``, which vLLM asks next): (sending, receiving).

        A request that finished meanwhile (aborted while it waited) is reported all the same:
        vLLM frees its blocks then, and not before, so the fetch never writes into blocks
        that another request has been given."""
        done = {r for r, x in self._async.items() if x.future is not None and x.future.done()}
        for req_id in done:
            self._settle(self._async.pop(req_id))
        done |= self._finished_async
        self._finished_async = set()
        if done:
            self._write_stats()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._check_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_loaded_kv_cache_group_ids(self, request: Any) -> tuple[int, ...]:
        return (0,)  # one KV cache group (see ``_check_groups``)


# -- layout ----------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"torch has no dtype {name!r}")
    return dtype


def _blocks_of(block_ids: list[int], start: int, end: int, block_size: int) -> set[int]:
    """The vLLM blocks holding tokens ``[start, end)``."""
    if end <= start:
        return set()
    return set(block_ids[start // block_size : (end - 1) // block_size + 1])


def _layer_index(name: str) -> int:
    """``model.layers.3.self_attn.attn`` -> 3 (the one integer in vLLM's layer names)."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ConfigError(f"KVStoreConnector: cannot tell the layer index of {name!r}")
    return numbers[0]


class _Arena:
    """One pre-faulted host buffer that a step's loads (or saves) are carved from; it grows to the
    largest step seen and is reused, so the copies of a hit write into warm pages."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def views(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        sizes = [-(-math.prod(shape) * itemsize // 64) * 64 for shape in shapes]
        total = sum(sizes)
        if self._buf.numel() < total:
            # zeros, not empty: the pages are touched here, once.
            self._buf = torch.zeros(max(total, 2 * self._buf.numel()), dtype=torch.uint8)
        out, offset = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            count = math.prod(shape) * itemsize
            out.append(self._buf[offset : offset + count].view(dtype).view(shape))
            offset += size
        return out


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
        dims_ok = cache.dim() >= 2 and cache[0].is_contiguous() and cache.stride(0) == per_block
        if not dims_ok or per_block != size or cache.dtype not in _TORCH_DTYPES:
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
        index = torch.tensor(block_ids[:num_blocks], dtype=torch.long, device=cache.device)
        if self._affine:
            for kv, view in enumerate(self._views(cache)):
                got = view.index_select(0, index)  # [n_blocks, B, H, D]
                out[kv].copy_(got.reshape(num_blocks * b, *out.shape[2:])[:n])
            return
        blocks = cache.index_select(0, index)[:, self._flat]  # [n_blocks, 2 * B * H * D]
        blocks = blocks.view(num_blocks, *self.positions.shape).transpose(0, 1)
        out.copy_(blocks.reshape(2, num_blocks * b, *out.shape[2:])[:, :n])

    def scatter(
        self, cache: torch.Tensor, block_ids: list[int], kv: torch.Tensor, start: int
    ) -> None:
        """Tokens ``[start, end)`` of one layer's ``kv`` ``[2, end, kv_heads, head_dim]`` into
        their slots, and nothing else: vLLM wrote this step's new tokens into the same blocks
        before asking for the load, and the tokens before ``start`` are its own hit."""
        end, b = kv.shape[1], self.block_size
        first_full, last_full = -(-start // b), end // b  # blocks entirely inside [start, end)
        if first_full < last_full:
            ids = torch.tensor(block_ids[first_full:last_full], dtype=torch.long)
            count = last_full - first_full
            src = kv[:, first_full * b : last_full * b].reshape(2, count, b, *kv.shape[2:])
            if self._affine:
                ids = ids.to(cache.device)
                for which, view in enumerate(self._views(cache)):
                    view.index_copy_(0, ids, src[which].to(cache.device))
            else:
                rows = src.transpose(0, 1).reshape(count, -1)
                cache.index_copy_(0, ids.to(cache.device), rows.index_select(1, self._inverse))
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
    layer: Any, cache: torch.Tensor, block_size: int, heads: int, head_dim: int
) -> BlockLayout | ViewLayout:
    """The layout of one layer's paged cache, from the layer's attention backend: probed where
    the backend's block interior is opaque, read from the logical view everywhere else."""
    backend = getattr(layer, "attn_backend", None)
    name = ""
    if backend is not None:
        with contextlib.suppress(Exception):
            name = str(backend.get_name())
    if name in _PROBED_BACKENDS or (not name and cache.device.type == "cpu"):
        return BlockLayout.probe(layer, cache, block_size, heads, head_dim)
    return ViewLayout.of(cache, block_size, heads, head_dim, name or type(layer).__name__)


class ViewLayout:
    """A paged cache read through vLLM's logical per-layer view ``[blocks, kv_heads,
    block_size, 2 * head_dim]`` (K: ``[..., :head_dim]``, V: ``[..., head_dim:]``), with any
    physical strides: layer-compact or block-outermost, head-major or token-major (vLLM's
    ``KVCacheLayout`` LBHNC, LBNHC, LHBNC, BLHNC, BLNHC, BHLNC). Blocks are gathered and
    scattered through a strided ``[blocks, 2, block_size, kv_heads, head_dim]`` view of the
    same memory: one ``index_select`` / ``index_copy_`` per layer, no element index."""

    def __init__(self, shape: tuple[int, ...], strides: tuple[int, ...], backend: str) -> None:
        self.shape = shape[1:]
        self.strides = strides
        self.backend = backend
        self.block_size = int(shape[2])

    @classmethod
    def of(
        cls, cache: torch.Tensor, block_size: int, heads: int, head_dim: int, backend: str
    ) -> ViewLayout:
        want = (heads, block_size, 2 * head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != want or cache.dtype not in _TORCH_DTYPES:
            raise ConfigError(
                f"KVStoreConnector: attention backend {backend} keeps a KV cache of shape "
                f"{list(cache.shape)}, {cache.dtype}; only [blocks, {heads} KV heads, "
                f"{block_size} tokens, 2 x {head_dim}] caches of K and V in "
                f"{sorted(str(d).removeprefix('torch.') for d in _TORCH_DTYPES)} are mapped "
                "(MLA's latent caches and quantized caches are not)"
            )
        return cls(tuple(cache.shape), tuple(cache.stride()), backend)

    def fits(self, cache: torch.Tensor) -> bool:
        return tuple(cache.shape[1:]) == self.shape and tuple(cache.stride()) == self.strides

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
        index = torch.tensor(block_ids[:num_blocks], dtype=torch.long, device=blocks.device)
        got = blocks.index_select(0, index)  # [n_blocks, 2, B, H, D], contiguous
        out.copy_(got.transpose(0, 1).reshape(2, num_blocks * b, *out.shape[2:])[:, :n])

    def scatter(
        self, blocks: torch.Tensor, block_ids: list[int], kv: torch.Tensor, start: int
    ) -> None:
        """Tokens ``[start, end)`` of one layer's ``kv`` ``[2, end, kv_heads, head_dim]`` into
        their slots, and nothing else (see ``BlockLayout.scatter``)."""
        end, b = kv.shape[1], self.block_size
        first_full, last_full = -(-start // b), end // b
        if first_full < last_full:
            count = last_full - first_full
            ids = torch.tensor(block_ids[first_full:last_full], dtype=torch.long)
            src = kv[:, first_full * b : last_full * b].reshape(2, count, b, *kv.shape[2:])
            blocks.index_copy_(0, ids.to(blocks.device), src.transpose(0, 1).to(blocks.device))
        edges = {start // b, (end - 1) // b} - set(range(first_full, last_full))
        for block in sorted(edges):
            lo, hi = max(start, block * b), min(end, (block + 1) * b)
            if lo < hi:
                base = block * b
                blocks[block_ids[block], :, lo - base : hi - base] = kv[:, lo:hi].to(blocks.device)
