"""The connector's worker side with vLLM's paged cache on a CUDA device (issue 13 item 4, issue 17):
loads and saves on side streams, through page-locked host memory, ordered by events.

- K/V saved from a CUDA cache and loaded into a fresh one is bit-exact, for every layout vLLM
  lays GPU caches out in (FlashAttention's and FlashInfer's logical view, ``compute_layout_strides``
  as in test_layouts.py), through the same-host shared segment (registered with CUDA once) and
  through bytes (a remote service: staged in page-locked memory);
- a load copied on the side stream is ordered before the forward's use of the layer: the compute
  stream waits for its event (``wait_event``), while the host does not wait for the copy;
- a save waits for what the compute stream wrote into the cache before it copies it out, and the
  forward does not wait for the copy.

Every test is marked ``cuda`` and skips (reported by ``pytest -ra``) without a CUDA device.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from processes import Service
from test_worker_side import _run_step
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    compute_layer_kv_cache_shape_bytes,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from client import Client
from client.vllm.gpu_copies import GpuCopies
from client.vllm.metadata import Transfer
from client.vllm_connector import KVStoreConnector, KVStoreConnectorMetadata, ViewLayout
from kvstore import ModelSpec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.cuda, needs_cuda]

LAYERS, HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 3, 2, 64, 16, 24
DTYPE = torch.bfloat16
FILL = 17  # the byte every cache starts as (a finite value in every dtype)
LAYOUTS = list(KVCacheLayout)
# The GPU backends whose layouts are checked here (class, module under
# vllm.v1.attention.backends); one that cannot be imported is named in the skip.
BACKENDS = [("FlashAttentionBackend", "flash_attn"), ("FlashInferBackend", "flashinfer")]
# About 0.5-1 s of a GPU's clock: a stream kept busy that long shows what waits for it.
SLEEP_CYCLES = 1_000_000_000
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _backend(name: str, module: str) -> Any:
    try:
        return getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name)
    except ImportError as exc:
        pytest.skip(f"{name} cannot be imported here: {exc}")


def _layouts(backend: Any) -> list[KVCacheLayout]:
    return list(backend.supported_kv_cache_layouts() or LAYOUTS)  # None: any layout


def cuda_views(layout: KVCacheLayout) -> list[torch.Tensor]:
    """One group's per-layer caches on the GPU, laid out as vLLM lays them out (one flat byte
    buffer, strides from ``compute_layout_strides``), every byte ``FILL``."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=DTYPE)
    shape = (LAYERS, *compute_layer_kv_cache_shape_bytes(spec, NUM_BLOCKS))
    strides = compute_layout_strides(spec, NUM_BLOCKS, LAYERS, layout)
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    raw = torch.full((size,), FILL, dtype=torch.int8, device="cuda")
    view = torch.as_strided(raw, size=shape, stride=strides)
    return [view[i].view(DTYPE) for i in range(LAYERS)]


def backend_write(cache: torch.Tensor, kv: torch.Tensor, block_ids: list[int]) -> None:
    """A GPU backend's cache update, on the current stream: token ``t`` of ``kv`` ``[2, n,
    heads, head_dim]`` (on the GPU) into slot ``t % BLOCK`` of block ``block_ids[t // BLOCK]``."""
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    for t in range(kv.shape[1]):
        b, slot = block_ids[t // BLOCK], t % BLOCK
        key_cache[b, slot] = kv[0, t]
        value_cache[b, slot] = kv[1, t]


def backend_read(cache: torch.Tensor, block_ids: list[int], n: int) -> torch.Tensor:
    """The K/V of tokens ``[0, n)`` as the backend's kernels see it, ``[2, n, heads, head_dim]``
    on the host (read on the current stream)."""
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    ids = torch.tensor([block_ids[t // BLOCK] for t in range(n)], device=cache.device)
    slots = torch.tensor([t % BLOCK for t in range(n)], device=cache.device)
    return torch.stack([key_cache[ids, slots], value_cache[ids, slots]]).cpu()


def _spec(name: str) -> ModelSpec:
    return ModelSpec(
        f"test/cuda-{name}",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        dtype="bfloat16",
        block_tokens=BLOCK,
        revision="r1",
    )


def _connector(
    service: Service, stats: Path, backend: Any, caches: list[torch.Tensor]
) -> KVStoreConnector:
    """A worker-side connector over ``caches`` (one per layer), as vLLM's GPU model runner
    registers them, each layer's attention on ``backend``."""
    transfer = KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="client.vllm_connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"server": service.target, "stats_path": str(stats)},
    )
    config = SimpleNamespace(
        kv_transfer_config=transfer,
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        model_config=SimpleNamespace(
            get_num_layers=lambda parallel: LAYERS,
            get_total_num_kv_heads=lambda: HEADS,
            get_head_size=lambda: HEAD_DIM,
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, rank=0),
        compilation_config=SimpleNamespace(
            static_forward_context={name: SimpleNamespace(attn_backend=backend) for name in NAMES}
        ),
    )
    connector = KVStoreConnector(config, KVConnectorRole.WORKER)
    connector.register_kv_caches(dict(zip(NAMES, caches, strict=True)))
    assert isinstance(connector._layout, ViewLayout)
    return connector


def _kv(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, n, HEADS, HEAD_DIM, generator=g).to(DTYPE)


@pytest.mark.parametrize("same_host", [True, False], ids=["segment", "bytes"])
@pytest.mark.parametrize(("name", "module"), BACKENDS, ids=[b[0] for b in BACKENDS])
def test_kv_saved_from_a_cuda_cache_loads_into_a_fresh_one_bit_exact(
    name: str, module: str, same_host: bool, service: Service, tmp_path: Path
) -> None:
    backend = _backend(name, module)
    layouts = _layouts(backend)
    for i, src in enumerate(layouts):
        spec = _spec(f"{name}-{src.name}-{same_host}")
        tokens = list(range(2000 + 100 * i, 2000 + 100 * i + 4 * BLOCK + 5))
        n = 4 * BLOCK
        kv = _kv(n, seed=i)
        prefill = cuda_views(src)
        saved_ids = [5, 11, 2, 17]
        for layer, cache in enumerate(prefill):
            backend_write(cache, kv[layer].cuda(), saved_ids)
        saver = _connector(service, tmp_path / f"save-{i}", backend, prefill)
        save = Transfer("req-save", tokens[:n], 0, n, saved_ids)
        _run_step(saver, KVStoreConnectorMetadata(spec=spec.to_dict(), saves=[save]), LAYERS)
        saver.finish_puts()
        assert saver.counters.stored_blocks == 4, src.name
        with Client(service.target) as client:
            stored, got = client.get_prefix(spec, tokens)
        assert got == n
        assert torch.equal(stored, kv), src.name
        saver.shutdown()

        # A decode node on the next layout loads it; vLLM's own hit is the first block, and
        # three tokens of the second are computed already (so a partial block is written too).
        dst = layouts[(i + 1) % len(layouts)]
        decode = cuda_views(dst)
        before = [c.clone() for c in decode]
        loader = _connector(service, tmp_path / f"load-{i}", backend, decode)
        if not same_host:  # as with a remote service: bytes, staged in page-locked memory
            loader._store.client()._aio._segments.for_fetch = False
        loaded_ids = [9, 0, 21, 4]
        start = BLOCK + 3
        load = Transfer("req-load", tokens[:n], start, n, loaded_ids)
        _run_step(loader, KVStoreConnectorMetadata(spec=spec.to_dict(), loads=[load]), LAYERS)
        assert loader.get_block_ids_with_load_errors() == set(), (src.name, dst.name)
        if same_host:
            # The segment the hit arrived in is page-locked (registered once, kept).
            segments = loader._store.open_segments()
            assert segments
            pinned = [torch.from_numpy(np.frombuffer(s.mapping, np.uint8)) for s in segments]
            assert any(p.is_pinned() for p in pinned)
            del pinned
        torch.cuda.synchronize()
        for layer, cache in enumerate(decode):
            got_kv = backend_read(cache, loaded_ids, n)
            assert torch.equal(got_kv[:, start:], kv[layer, :, start:]), (src.name, dst.name)
            old = backend_read(before[layer], loaded_ids, n)
            assert torch.equal(got_kv[:, :start], old[:, :start])  # vLLM's own tokens: as they were
            untouched = [b for b in range(NUM_BLOCKS) if b not in loaded_ids]
            assert torch.equal(cache[untouched], before[layer][untouched])
        assert loader.counters.loaded_tokens == n - start
        loader.shutdown()


def _gpu(connector: KVStoreConnector) -> GpuCopies:
    assert connector._worker is not None
    gpu = connector._worker._gpu
    assert gpu is not None, "a CUDA cache must get the CUDA copies"
    return gpu


def test_a_load_on_the_side_stream_is_ordered_before_the_forwards_use(
    service: Service, tmp_path: Path
) -> None:
    backend = _backend(*BACKENDS[0])
    spec = _spec("ordered-load")
    n = 2 * BLOCK
    warm_tokens = list(range(6000, 6000 + n + 1))
    tokens = list(range(7000, 7000 + n + 1))
    kv = _kv(n, seed=11)
    with Client(service.target) as client:
        assert client.put(spec, warm_tokens, _kv(n, seed=12)).stored == 2
        assert client.put(spec, tokens, kv).stored == 2
    caches = cuda_views(_layouts(backend)[0])
    connector = _connector(service, tmp_path, backend, caches)
    gpu = _gpu(connector)
    # A first load, unchecked: the segment's registration and the first allocations (which may
    # wait for the device) happen there, not in the step below.
    warm = Transfer("req-warm", warm_tokens[:n], 0, n, [10, 12])
    _run_step(connector, KVStoreConnectorMetadata(spec=spec.to_dict(), loads=[warm]), LAYERS)
    assert connector.get_block_ids_with_load_errors() == set()
    torch.cuda.synchronize()

    # The loads' stream is busy for a while: the load's copies queue behind that.
    with torch.cuda.stream(gpu.load_stream):
        torch.cuda._sleep(SLEEP_CYCLES)
    block_ids = [3, 8]
    load = Transfer("req-ordered", tokens[:n], 0, n, block_ids)
    connector.bind_connector_metadata(KVStoreConnectorMetadata(spec=spec.to_dict(), loads=[load]))
    connector.start_load_kv(None)
    seen = []
    for name, cache in zip(NAMES, caches, strict=True):
        connector.wait_for_layer_load(name)
        seen.append(cache.clone())  # the forward's first use of the layer, on its own stream
        if name == NAMES[0]:
            # The host went on (the copy is still queued behind the sleep); the GPU waits.
            assert not gpu.load_stream.query()
            assert not torch.cuda.current_stream().query()
    connector.wait_for_save()
    assert connector.get_block_ids_with_load_errors() == set()
    torch.cuda.synchronize()
    for layer, copy in enumerate(seen):
        assert torch.equal(backend_read(copy, block_ids, n), kv[layer]), layer
    connector.shutdown()


def test_a_save_copies_what_the_forward_wrote_without_the_forward_waiting(
    service: Service, tmp_path: Path
) -> None:
    backend = _backend(*BACKENDS[0])
    spec = _spec("ordered-save")
    n = 3 * BLOCK
    warm_tokens = list(range(8000, 8000 + n))
    tokens = list(range(9000, 9000 + n))
    kv = _kv(n, seed=13)
    caches = cuda_views(_layouts(backend)[-1])
    connector = _connector(service, tmp_path, backend, caches)
    gpu = _gpu(connector)
    block_ids = [6, 1, 14]
    # A first save of the same size, unchecked: the page-locked staging is allocated there.
    warm = Transfer("req-warm", warm_tokens, 0, n, block_ids)
    _run_step(connector, KVStoreConnectorMetadata(spec=spec.to_dict(), saves=[warm]), LAYERS)
    connector.finish_puts()
    torch.cuda.synchronize()

    on_gpu = kv.cuda()  # before the sleep: a copy to the GPU would wait for it
    save = Transfer("req-save", tokens, 0, n, block_ids)
    connector.bind_connector_metadata(KVStoreConnectorMetadata(spec=spec.to_dict(), saves=[save]))
    connector.start_load_kv(None)
    # The forward's stream is slow to write the K/V: the saves must wait for it on the GPU.
    torch.cuda._sleep(SLEEP_CYCLES)
    for layer, (name, cache) in enumerate(zip(NAMES, caches, strict=True)):
        backend_write(cache, on_gpu[layer], block_ids)
        connector.save_kv_layer(name, torch.empty(0), None)
    assert not gpu.save_stream.query()  # the copies are queued, not done: the host went on
    connector.wait_for_save()
    connector.finish_puts()
    assert connector.counters.stored_blocks == 6  # the warm-up's 3 and these 3
    with Client(service.target) as client:
        stored, got = client.get_prefix(spec, tokens)
    assert got == n
    assert torch.equal(stored, kv)
    connector.shutdown()
