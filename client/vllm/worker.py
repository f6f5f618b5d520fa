"""The worker-side half of ``KVStoreConnector``: loads into vLLM's paged cache, saves out of it.

In the order vLLM calls it: ``register_kv_caches`` (once: the layout of each layer's cache), then
every step ``start_load_kv`` (start each load's layer-by-layer fetch and return), per layer
``wait_for_layer_load`` and ``save_kv_layer`` (copy the saves' K/V of that layer out),
``wait_for_save`` (start the puts in the background), ``get_finished`` (async loads that are
done), ``get_block_ids_with_load_errors`` (blocks vLLM must recompute) and ``close``. What each
does is in ``client.vllm_connector``; the copies themselves are client/vllm/layout.py, and on a
CUDA cache they run on side streams through page-locked memory (client/vllm/gpu_copies.py).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from client.vllm.gpu_copies import GpuCopies
from client.vllm.layout import (
    BlockLayout,
    ViewLayout,
    cache_dtypes,
    layer_index,
    layout_for,
    torch_dtype_of,
)
from client.vllm.metadata import KVStoreConnectorMetadata, Transfer
from client.vllm.namespace import cache_geometry, kv_dtype, rank_heads, shard_spec, tp_rank
from client.vllm.store import Store
from kvstore.core.errors import ConfigError
from kvstore.core.keys import ModelSpec

__all__ = ["WorkerSide"]

# Under vLLM's logger (see client/vllm/scheduler.py).
log = logging.getLogger(f"vllm.{__name__}")


@dataclass(eq=False)
class _Loading:
    """One load of this step while its layers arrive."""

    load: Transfer
    started: float
    future: Future[int] | None = None  # the verified tokens fetched
    layers: int = 0  # layers [0, layers) are in the paged cache (on a GPU: their copies issued)
    tokens: int = 0  # tokens each of them holds
    ready: dict[int, torch.cuda.Event] = field(default_factory=dict)  # GPU: layer -> copied


class WorkerSide:
    """The connector in one of vLLM's worker processes (one per tensor-parallel rank)."""

    def __init__(self, store: Store, vllm_config: Any) -> None:
        self._store = store
        self._counters = store.counters
        self._vllm_config = vllm_config
        self._block_size = int(vllm_config.cache_config.block_size)
        parallel = vllm_config.parallel_config
        self._world = int(parallel.tensor_parallel_size)
        self._rank = tp_rank(parallel)
        self._spec: ModelSpec | None = None  # this rank's slice of the scheduler's namespace
        self._spec_of: dict[str, Any] | None = None  # the scheduler's spec of ``_spec``
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (index, layout view)
        self._caches: list[torch.Tensor] = []  # layer index -> layout view
        self.layout: BlockLayout | ViewLayout | None = None
        self._loading: list[_Loading] = []  # this step's loads, arriving layer by layer
        self._async: dict[str, _Loading] = {}  # req_id -> an async load, until get_finished
        self._finished_async: set[str] = set()  # async loads that ended without a fetch
        self._arrived = threading.Condition()
        self._injected: set[str] = set()  # layers vLLM waited for
        self._staged: list[tuple[Transfer, torch.Tensor, set[str]]] = []
        self._putting: list[tuple[Transfer, float, Future[Any]]] = []  # puts in flight
        # Reused from step to step: a fresh tensor per save page-faults on every byte (8 ms of
        # 24 MiB here), a warm one does not.
        self._save_arena = _Arena()
        self._load_errors: set[int] = set()
        self._gpu: GpuCopies | None = None  # caches on a CUDA device (else: None, CPU copies)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Learn where the attention backend keeps each K/V element (``BlockLayout.probe``)
        and keep each layer's cache as ``[blocks, elements of one block]``."""
        model_config = self._vllm_config.model_config
        parallel = self._vllm_config.parallel_config
        num_layers = int(model_config.get_num_layers(parallel))
        total_heads, head_dim = cache_geometry(model_config)
        lo, hi = rank_heads(total_heads, self._world, self._rank)
        heads = hi - lo  # this rank's
        dtypes = cache_dtypes(kv_dtype(self._vllm_config))
        modules = self._vllm_config.compilation_config.static_forward_context
        layers: dict[str, tuple[int, torch.Tensor]] = {}
        layout: BlockLayout | ViewLayout | None = None
        for name, cache in kv_caches.items():
            if layout is None or not layout.fits(cache):
                layout = layout_for(modules[name], cache, self._block_size, heads, head_dim, dtypes)
            layers[name] = (layer_index(name), layout.prepare(cache))
        indices = sorted(i for i, _ in layers.values())
        if layout is None or indices != list(range(num_layers)):
            raise ConfigError(
                f"KVStoreConnector: attention layers {indices} do not cover the model's "
                f"{num_layers} layers one by one"
            )
        self._layers = layers
        self._caches = [cache for _, cache in sorted(layers.values(), key=lambda e: e[0])]
        self.layout = layout
        devices = {cache.device for cache in kv_caches.values()}
        if len(devices) != 1:
            raise ConfigError(f"KVStoreConnector: the KV caches are on several devices {devices}")
        device = devices.pop()
        if device.type == "cuda":
            self._gpu = GpuCopies(device)
            self._save_arena = _Arena(pin=True)  # device -> host copies by DMA, not staged
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
            heads = rank_heads(base.num_kv_heads, self._world, self._rank)
            self._spec = self._store.spec = shard_spec(base, *heads)
            self._spec_of = meta.spec
        return self._spec

    def start_load_kv(self, meta: KVStoreConnectorMetadata | None) -> None:
        """Start fetching every load of this step, layer by layer; return at once.

        The fetches run on the client's thread: as each layer of a load arrives (the service
        copies the hit into this process's shared segment one layer at a time), it is copied
        into vLLM's paged cache there, while vLLM computes the layers before it.
        ``wait_for_layer_load`` waits for that layer only. An async load (its request is not
        in this step) lands the same way, and ``get_finished`` reports it once it is done."""
        self._loading = []
        self._injected = set()
        self.finish_puts(wait=False)
        if meta is None or not meta.loads:
            return
        spec = self._worker_spec(meta)
        if self.layout is None:
            # No caches registered (a model runner that does not call register_kv_caches):
            # nothing can be put in place, so every promised block is recomputed.
            for load in meta.loads:
                self._load_errors |= _blocks_of(
                    load.block_ids, load.start, load.end, self._block_size
                )
                if load.async_load:
                    self._finished_async.add(load.req_id)
            return
        kv = self._store.client()
        if self._gpu is not None:
            self._gpu.begin_loads()
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
        """One layer of one load is here (the client's thread): into the paged cache with it.

        On a CUDA cache the copies are only issued (on the loads' stream), vLLM is told (it
        waits for the layer's event on its own stream), and only then does this thread wait for
        the host -> device copy, after which ``kv`` may change (see gpu_copies.py)."""
        assert self.layout is not None
        load, started = loading.load, time.perf_counter()
        ready = copied = None
        try:
            if kv.shape[1] > load.start:
                cache = self._caches[layer]
                if self._gpu is None:
                    self.layout.scatter(cache, load.block_ids, kv, load.start)
                else:
                    ready, copied = self._gpu.load(
                        self.layout,
                        cache,
                        load.block_ids,
                        kv,
                        load.start,
                        self._store.open_segments(),
                    )
            with self._arrived:
                if ready is not None:
                    loading.ready[layer] = ready
                # A retried fetch hands layer 0 on again: never fewer layers than vLLM was told.
                loading.tokens = kv.shape[1] if layer == 0 else min(loading.tokens, kv.shape[1])
                loading.layers = max(loading.layers, layer + 1)
                self._arrived.notify_all()
        finally:
            if copied is not None:
                copied.synchronize()
            self._counters.inject_s += time.perf_counter() - started

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
            events = [x.ready[index] for x in self._loading if index in x.ready]
        if self._gpu is not None:
            for event in events:  # the forward's stream waits; this thread does not
                self._gpu.wait(event)
        self._injected.add(layer_name)
        self._counters.load_wait_s += time.perf_counter() - started

    def save_kv_layer(self, layer_name: str, meta: KVStoreConnectorMetadata | None) -> None:
        """Copy that layer's K/V of each save of this step out of the paged cache."""
        if meta is None or not meta.saves:
            return
        entry = self._layers.get(layer_name)
        if entry is None:
            return
        if not self._staged:
            self._stage(meta)
        started = time.perf_counter()
        self._save_layer(layer_name)
        self._counters.gather_s += time.perf_counter() - started

    def _save_layer(self, layer_name: str) -> None:
        """That layer's tokens of each staged save that lacks it into its staging: here, or on a
        CUDA cache on the saves' stream (staging is read only after ``GpuCopies.saved``)."""
        assert self.layout is not None
        index, cache = self._layers[layer_name]
        todo = [staged for staged in self._staged if layer_name not in staged[2]]
        if not todo:
            return
        outs = [(save.block_ids, staging[index]) for save, staging, _ in todo]
        if self._gpu is not None:
            self._gpu.save(self.layout, cache, outs)
        else:
            for block_ids, out in outs:
                self.layout.gather(cache, block_ids, out=out)
        for *_, done in todo:
            done.add(layer_name)

    def _stage(self, meta: KVStoreConnectorMetadata) -> None:
        """Staging tensors for this step's saves, in the reused save arena (once the puts of
        the steps before, which read from it, are done)."""
        self.finish_puts()
        spec = self._worker_spec(meta)
        shapes = [
            (spec.num_layers, 2, save.end, spec.num_kv_heads, spec.head_dim) for save in meta.saves
        ]
        views = self._save_arena.views(shapes, torch_dtype_of(spec.dtype))
        self._staged = [(save, view, set()) for save, view in zip(meta.saves, views, strict=True)]

    def wait_for_save(self, meta: KVStoreConnectorMetadata | None) -> None:
        """Put this step's saves (all layers copied by now) into kvstore, then check that every
        load reached every layer."""
        self._check_loads()
        if meta is None or not meta.saves or not self._layers:
            return
        if not self._staged:  # no save_kv_layer call at all (no attention this step)
            self._stage(meta)
        spec = self._worker_spec(meta)
        kv = self._store.client()
        # A layer vLLM ran without the save hook: its K/V is in the paged cache all the same, so
        # copy it from there.
        for name in self._layers:
            self._save_layer(name)
        # On a GPU the puts wait for the copies out of it, in a background thread.
        gpu = self._gpu
        after = None if gpu is None else functools.partial(gpu.put_after, gpu.saved())
        for save, staging, _ in self._staged:
            # In the background: the step (and the next request's) need not wait for the
            # service. The staging copy is ours until the put is done (see ``_stage``).
            start = functools.partial(
                kv.start_put, spec, save.tokens, staging, extra_keys=save.extra_keys
            )
            future: Future[Any] = start() if after is None else after(start)
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
                self._counters.save_errors += 1
                log.warning("KVStoreConnector: put for %s failed: %s", save.req_id, exc)
                continue
            self._counters.put_s += time.perf_counter() - started
            self._counters.saves += 1
            self._counters.saved_tokens += save.end - save.start
            self._counters.stored_blocks += result.stored
            self._counters.already_stored_blocks += result.already
        if putting:
            self._store.write_stats()

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
        self._store.write_stats()

    def _settle(self, loading: _Loading, *, missed: bool = False) -> None:
        """Count a load whose fetch is done, and report for recompute what did not arrive."""
        load = loading.load
        assert loading.future is not None
        try:
            got = loading.future.result()
        except Exception as exc:  # KVStoreError, or a scatter that failed
            log.warning("KVStoreConnector: fetch for %s failed: %s", load.req_id, exc)
            got = 0
        self._counters.fetch_s += time.perf_counter() - loading.started
        self._counters.loads += 1
        self._counters.async_loads += load.async_load
        if self._gpu is not None:
            # Before vLLM uses (or recomputes, or reassigns) a block: every copy issued is done.
            self._gpu.settle()
        got = min(got, loading.tokens if loading.layers == len(self._caches) else 0)
        if missed:
            got = 0  # the forward ran without some layer of it: all of it is recomputed
        bad = _blocks_of(load.block_ids, max(got, load.start), load.end, self._block_size)
        self._counters.loaded_tokens += max(0, got - load.start)
        if bad:
            # Evicted since the lookup, unreachable, or failed its checksum: vLLM recomputes
            # from the first block that did not arrive (all of that block).
            self._load_errors |= bad
            self._counters.load_error_blocks += len(bad)
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
            self._store.write_stats()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._check_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def close(self) -> None:
        """After the puts are done and the client is closed: let go of the page-locked memory."""
        if self._gpu is not None:
            self._gpu.close()


def _blocks_of(block_ids: list[int], start: int, end: int, block_size: int) -> set[int]:
    """The vLLM blocks holding tokens ``[start, end)``."""
    if end <= start:
        return set()
    return set(block_ids[start // block_size : (end - 1) // block_size + 1])


class _Arena:
    """One pre-faulted host buffer that a step's loads (or saves) are carved from; it grows to the
    largest step seen and is reused, so the copies of a hit write into warm pages."""

    def __init__(self, *, pin: bool = False) -> None:
        self._pin = pin  # page-locked (for copies out of a GPU)
        self._buf = torch.empty(0, dtype=torch.uint8)

    def views(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        sizes = [-(-math.prod(shape) * itemsize // 64) * 64 for shape in shapes]
        total = sum(sizes)
        if self._buf.numel() < total:
            # zeros, not empty: the pages are touched here, once.
            self._buf = torch.zeros(
                max(total, 2 * self._buf.numel()), dtype=torch.uint8, pin_memory=self._pin
            )
        out, offset = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            count = math.prod(shape) * itemsize
            out.append(self._buf[offset : offset + count].view(dtype).view(shape))
            offset += size
        return out
