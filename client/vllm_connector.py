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
    ``wait_for_layer_load``         wait for that layer alone: later layers arrive meanwhile
                                    (on a CUDA cache the forward's stream waits for the
                                    layer's copy event; the host does not wait for the copy).
    ``save_kv_layer``               copy that layer's K/V of each save out of the paged cache
                                    (on a CUDA cache: on a side stream, after the forward's
                                    event, into page-locked staging).
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

Where the code is (client/vllm/): ``config.py`` (``ConnectorConfig``), ``namespace.py`` (the
namespace and its tensor-parallel slices), ``metadata.py`` (what the scheduler side tells the
worker side; the only import of vLLM), ``store.py`` (the client, counters and stats file both
sides share), ``scheduler.py`` and ``worker.py`` (the two halves, one per role, as vLLM's own
connectors split them) and ``layout.py`` (the paged-cache layouts and their copies). This
module is the class vLLM loads; each of its calls goes to the half of its role.
"""

from __future__ import annotations

from typing import Any

import torch

from client.vllm.config import ConnectorConfig
from client.vllm.layout import BlockLayout, ViewLayout, layout_for
from client.vllm.metadata import SCHEDULER, ConnectorBase, KVStoreConnectorMetadata
from client.vllm.namespace import check_groups, shard_spec, weights_revision
from client.vllm.scheduler import SchedulerSide
from client.vllm.store import Counters, Store
from client.vllm.worker import WorkerSide

__all__ = [
    "BlockLayout",
    "ConnectorConfig",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "ViewLayout",
    "layout_for",
    "shard_spec",
    "weights_revision",
]


class KVStoreConnector(ConnectorBase):
    """vLLM's KV connector over a kvstore service; see the module docstring.

    One instance per process and role: the scheduler's has a ``SchedulerSide``, each worker's a
    ``WorkerSide``; a call of the other role's is a bug of the caller (an assertion)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_groups(kv_cache_config)
        transfer = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        is_scheduler = role == SCHEDULER
        self._store = Store(self.config, "scheduler" if is_scheduler else "worker")
        self.counters: Counters = self._store.counters
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if is_scheduler:
            self._scheduler = SchedulerSide(self._store, vllm_config, transfer)
        else:
            self._worker = WorkerSide(self._store, vllm_config)
        self._store.write_stats()

    @property
    def _layout(self) -> BlockLayout | ViewLayout | None:
        """The worker side's paged-cache layout (None before ``register_kv_caches``)."""
        return self._worker_side().layout

    def _scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side call on a worker's connector"
        return self._scheduler

    def _worker_side(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side call on the scheduler's connector"
        return self._worker

    def _metadata(self) -> KVStoreConnectorMetadata | None:
        """This step's metadata, if the scheduler side sent ours."""
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, KVStoreConnectorMetadata) else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.finish_puts()
        self._store.write_stats()
        if self._scheduler is not None:
            self._scheduler.close()
        self._store.close()
        if self._worker is not None:
            self._worker.close()  # after the client: no fetch copies from a segment any more

    # -- scheduler side (client/vllm/scheduler.py) ---------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own hit) that kvstore can supply."""
        return self._scheduler_side().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler_side().update_state_after_alloc(request, blocks, num_external_tokens)

    def on_new_request(self, request: Any) -> None:
        self._scheduler_side().on_new_request(request)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        return self._scheduler_side().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler_side().update_connector_output(connector_output)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler_side().request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: Any) -> tuple[int, ...]:
        return (0,)  # one KV cache group (see ``check_groups``)

    # -- worker side (client/vllm/worker.py) ---------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker_side().start_load_kv(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker_side().wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        self._worker_side().save_kv_layer(layer_name, self._metadata())

    def wait_for_save(self) -> None:
        self._worker_side().wait_for_save(self._metadata())

    def finish_puts(self, *, wait: bool = True) -> None:
        self._worker_side().finish_puts(wait=wait)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker_side().get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().get_block_ids_with_load_errors()
