"""The connector's worker side without an engine: vLLM's own CPU cache kernel, a real kvstore
service, and a stand-in for the engine's configuration (the few fields the worker side reads).

- ``BlockLayout`` inverts exactly what the kernel writes, for every CPU instruction set and
  dtype this machine runs;
- a load that gets fewer blocks than the scheduler promised names the vLLM blocks that did not
  arrive (``get_block_ids_with_load_errors``), and fills only the ones that did;
- a layer the engine never asked to load is reported too, never left holding garbage;
- an async load (its request not in the step) lands while steps go on, and ``get_finished``
  reports it once, no earlier than its load errors;
- a save reads back from kvstore as the K/V that went into the paged cache;
- the weights' revision changes with one weight, not with the folder or a model card;
- ``kv_connector_extra_config`` is checked (a misspelt key is an error, not a default).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from processes import Service
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from client import Client
from client.vllm.metadata import Transfer as _Transfer
from client.vllm.namespace import rank_heads as _shard
from client.vllm_connector import (
    BlockLayout,
    ConnectorConfig,
    KVStoreConnector,
    KVStoreConnectorMetadata,
    shard_spec,
    weights_revision,
)
from kvstore import ModelSpec
from kvstore.core.errors import ConfigError

LAYERS, HEADS, HEAD_DIM, BLOCK = 2, 2, 32, 32
NUM_BLOCKS = 12


def _isas() -> list[str]:
    isas = ["vec", "vec16"]
    if torch.cpu._is_amx_tile_supported():
        isas.append("amx")
    return isas


def _layer(isa: str) -> Any:
    """vLLM's CPU attention implementation behind a stand-in for its Attention module (which
    carries the instruction set and the K/V scales the kernel reads)."""
    # Built without __init__, which wants a whole engine configuration; do_kv_cache_update reads
    # these two fields of it.
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type = "decoder"
    impl.kv_cache_dtype = "auto"
    return SimpleNamespace(impl=impl, isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)


def _write(layer: Any, cache: torch.Tensor, kv: torch.Tensor, block_ids: list[int]) -> None:
    """What vLLM does in a forward pass: the kernel puts tokens ``[0, n)`` of ``kv`` ``[2, n,
    heads, head_dim]`` into the slots of ``block_ids``."""
    n = kv.shape[1]
    slots = torch.tensor([block_ids[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)])
    layer.impl.do_kv_cache_update(layer, kv[0].contiguous(), kv[1].contiguous(), cache, slots)


def _cache(dtype: torch.dtype, heads: int = HEADS) -> torch.Tensor:
    return torch.full((NUM_BLOCKS, heads, BLOCK, 2 * HEAD_DIM), -7.0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", _isas())
def test_layout_inverts_the_kernel(isa: str, dtype: torch.dtype) -> None:
    layer = _layer(isa)
    cache = _cache(dtype)
    layout = BlockLayout.probe(layer, cache, BLOCK, HEADS, HEAD_DIM)
    assert layout._affine, "every CPU kernel layout is affine: the strided path must run"
    kv = torch.randn(2, 3 * BLOCK - 5, HEADS, HEAD_DIM).to(dtype)
    block_ids = [4, 9, 1]
    _write(layer, cache, kv, block_ids)
    flat = cache.view(NUM_BLOCKS, -1)
    out = torch.empty_like(kv)
    layout.gather(flat, block_ids, out=out)
    assert torch.equal(out, kv)
    # A load of tokens [40, 80) writes exactly the bytes the kernel would, and nothing else.
    other = _cache(dtype)
    layout.scatter(other.view(NUM_BLOCKS, -1), block_ids, kv[:, :80], 40)
    expected = _cache(dtype)
    _write(layer, expected, kv[:, :80], block_ids)
    partial = _cache(dtype)
    _write(layer, partial, kv[:, :40], block_ids)
    # expected differs from an untouched cache exactly in tokens [0, 80); remove [0, 40)
    touched = expected != _cache(dtype)
    before = partial != _cache(dtype)
    mask = touched & ~before
    assert torch.equal(other[mask], expected[mask])
    assert bool((other[~mask] == -7.0).all())


def test_probe_refuses_a_layout_it_cannot_map() -> None:
    cache = torch.zeros(NUM_BLOCKS, 2, BLOCK, HEADS, HEAD_DIM)  # not [blocks, H, B, 2D] bytes
    with pytest.raises(ConfigError, match=r"not blocks|cannot be mapped|permutation"):
        BlockLayout.probe(_layer("vec"), cache[:, :, :, :, :16], BLOCK, HEADS, HEAD_DIM)


def _connector(
    service: Service, stats: Path, kv_cache_config: Any = None, *, world: int = 1, rank: int = 0
) -> tuple[KVStoreConnector, list[torch.Tensor]]:
    """A worker-side connector with its caches registered, as vLLM's model runner does it
    (rank ``rank`` of ``world`` tensor-parallel ranks: its caches hold its share of the heads)."""
    transfer = KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="client.vllm_connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"server": service.target, "stats_path": str(stats)},
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    config = SimpleNamespace(
        kv_transfer_config=transfer,
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        model_config=SimpleNamespace(
            dtype=torch.float32,
            get_num_layers=lambda parallel: LAYERS,
            get_total_num_kv_heads=lambda: HEADS,
            get_head_size=lambda: HEAD_DIM,
        ),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=world, pipeline_parallel_size=1, rank=rank
        ),
        compilation_config=SimpleNamespace(
            static_forward_context={name: _layer("vec") for name in names}
        ),
    )
    connector = KVStoreConnector(config, KVConnectorRole.WORKER, kv_cache_config)
    caches = [_cache(torch.float32, HEADS // world) for _ in names]
    connector.register_kv_caches(dict(zip(names, caches, strict=True)))
    return connector, caches


SPEC = ModelSpec(
    "test/worker-side",
    num_layers=LAYERS,
    num_kv_heads=HEADS,
    head_dim=HEAD_DIM,
    dtype="float32",
    block_tokens=BLOCK,
    revision="r1",
)


def _store(service: Service, tokens: list[int], kv: torch.Tensor, evict: int | None = None) -> None:
    """Put ``kv`` for ``tokens``; then evict block ``evict`` (gone between the scheduler's
    lookup and the worker's fetch)."""
    with Client(service.target) as client:
        client.put(SPEC, tokens, kv)
        if evict is not None:
            assert client.evict(SPEC, [client.lookup(SPEC, tokens).hashes[evict]]) == 1


def _gathered(
    connector: KVStoreConnector, cache: torch.Tensor, block_ids: list[int], tokens: int
) -> torch.Tensor:
    """The first ``tokens`` of ``block_ids`` in one layer's paged cache, ``[2, tokens, heads,
    head_dim]``."""
    assert connector._layout is not None
    out = torch.empty(2, tokens, cache.shape[1], HEAD_DIM)
    connector._layout.gather(cache.view(NUM_BLOCKS, -1), block_ids, out=out)
    return out


def _run_step(connector: KVStoreConnector, meta: KVStoreConnectorMetadata, layers: int) -> None:
    """One forward pass as vLLM drives the connector: bind, load, per layer wait and save,
    then wait for the saves."""
    connector.bind_connector_metadata(meta)
    connector.start_load_kv(None)
    for i in range(layers):
        name = f"model.layers.{i}.self_attn.attn"
        connector.wait_for_layer_load(name)
        connector.save_kv_layer(name, torch.empty(0), None)
    connector.wait_for_save()


def test_load_reports_blocks_that_did_not_arrive(service: Service, tmp_path: Path) -> None:
    rng = random.Random(3)
    tokens = [rng.randrange(4, 1000) for _ in range(4 * BLOCK + 3)]
    kv = torch.randn(LAYERS, 2, 4 * BLOCK, HEADS, HEAD_DIM)
    _store(service, tokens, kv, evict=2)
    connector, caches = _connector(service, tmp_path)
    block_ids = [7, 3, 9, 1, 5]
    load = _Transfer("req-1", tokens[: 4 * BLOCK], 0, 4 * BLOCK, block_ids)
    _run_step(connector, KVStoreConnectorMetadata(spec=SPEC.to_dict(), loads=[load]), LAYERS)
    assert connector.get_block_ids_with_load_errors() == {9, 1}  # blocks 2 and 3 of the prompt
    assert connector.get_block_ids_with_load_errors() == set()  # reported once
    for layer, cache in enumerate(caches):
        got = _gathered(connector, cache, block_ids, 2 * BLOCK)
        assert torch.equal(got, kv[layer, :, : 2 * BLOCK])
        assert bool((cache[9] == -7.0).all())  # not filled with anything
        assert bool((cache[1] == -7.0).all())


def test_a_layer_never_loaded_is_reported(service: Service, tmp_path: Path) -> None:
    tokens = list(range(10, 10 + 2 * BLOCK + 1))
    with Client(service.target) as client:
        client.put(SPEC, tokens, torch.randn(LAYERS, 2, 2 * BLOCK, HEADS, HEAD_DIM))
    connector, _ = _connector(service, tmp_path)
    load = _Transfer("req-2", tokens[: 2 * BLOCK], BLOCK, 2 * BLOCK, [2, 6])
    _run_step(connector, KVStoreConnectorMetadata(spec=SPEC.to_dict(), loads=[load]), 1)
    assert connector.get_block_ids_with_load_errors() == {6}


def test_an_async_load_lands_between_steps_and_is_reported_once(
    service: Service, tmp_path: Path
) -> None:
    rng = random.Random(5)
    tokens = [rng.randrange(4, 1000) for _ in range(4 * BLOCK + 1)]
    kv = torch.randn(LAYERS, 2, 4 * BLOCK, HEADS, HEAD_DIM)
    _store(service, tokens, kv, evict=3)
    connector, caches = _connector(service, tmp_path)
    block_ids = [2, 8, 4, 10, 0]
    load = _Transfer("req-a", tokens[: 4 * BLOCK], BLOCK, 4 * BLOCK, block_ids, async_load=True)
    # The step that starts it runs no layer of its request: vLLM waits for no layer of it.
    connector.bind_connector_metadata(KVStoreConnectorMetadata(spec=SPEC.to_dict(), loads=[load]))
    connector.start_load_kv(None)
    connector.wait_for_save()
    finished: set[str] = set()
    errors: set[int] = set()
    for _ in range(500):  # the steps that follow, with no forward, each asking what is done
        connector.bind_connector_metadata(KVStoreConnectorMetadata())
        connector.start_load_kv(SimpleNamespace(attn_metadata=None))
        connector.wait_for_save()
        done = connector.get_finished(set())[1] or set()
        errors |= connector.get_block_ids_with_load_errors()
        if done:
            finished |= done
            break
        time.sleep(0.01)
    assert finished == {"req-a"}
    assert errors == {10}  # block 3 of the prompt was evicted; block 0 was not asked for
    assert connector.get_finished(set()) == (None, None)  # reported once
    assert connector.counters.async_loads == 1
    assert connector.counters.loaded_tokens == 2 * BLOCK
    for layer, cache in enumerate(caches):
        got = _gathered(connector, cache, block_ids[1:3], 2 * BLOCK)
        assert torch.equal(got, kv[layer, :, BLOCK : 3 * BLOCK])
        assert bool((cache[2] == -7.0).all())  # vLLM's own hit: left alone
        assert bool((cache[10] == -7.0).all())


def test_save_stores_what_the_paged_cache_holds(service: Service, tmp_path: Path) -> None:
    tokens = list(range(500, 500 + 3 * BLOCK + 7))
    kv = torch.randn(LAYERS, 2, len(tokens), HEADS, HEAD_DIM)
    connector, caches = _connector(service, tmp_path)
    block_ids = [11, 0, 6, 8]
    for layer, cache in enumerate(caches):
        _write(_layer("vec"), cache, kv[layer], block_ids)
    save = _Transfer("req-3", tokens[: 3 * BLOCK], 0, 3 * BLOCK, block_ids)
    _run_step(connector, KVStoreConnectorMetadata(spec=SPEC.to_dict(), saves=[save]), LAYERS)
    connector.finish_puts()  # the put runs in the background
    with Client(service.target) as client:
        stored, n = client.get_prefix(SPEC, tokens)
    assert n == 3 * BLOCK
    assert torch.equal(stored, kv[:, :, :n])
    assert connector.counters.stored_blocks == 3


def test_each_tensor_parallel_rank_stores_and_loads_its_own_heads(
    service: Service, tmp_path: Path
) -> None:
    tokens = list(range(300, 300 + 2 * BLOCK + 5))
    n = 2 * BLOCK
    kv = torch.randn(LAYERS, 2, len(tokens), HEADS, HEAD_DIM)
    block_ids = [3, 7, 1]
    save = _Transfer("req-tp", tokens[:n], 0, n, block_ids)
    for rank in range(2):  # TP 2 over 2 K/V heads: one head each
        connector, caches = _connector(service, tmp_path / f"save{rank}", world=2, rank=rank)
        for layer, cache in enumerate(caches):
            _write(_layer("vec"), cache, kv[layer, :, :, rank : rank + 1], block_ids)
        meta = KVStoreConnectorMetadata(spec=SPEC.to_dict(), saves=[save])  # the whole model's
        _run_step(connector, meta, LAYERS)
        connector.finish_puts()
        assert connector.counters.stored_blocks == 2
    with Client(service.target) as client:
        assert client.lookup(SPEC, tokens).hit_blocks == 0  # no block holds every head
        for rank in range(2):
            shard = shard_spec(SPEC, rank, rank + 1)
            assert shard.num_kv_heads == 1
            assert shard.fingerprint != SPEC.fingerprint
            stored, got = client.get_prefix(shard, tokens)
            assert got == n
            assert torch.equal(stored, kv[:, :, :n, rank : rank + 1])
    load = _Transfer("req-tp2", tokens[:n], 0, n, [5, 0])
    for rank in range(2):
        connector, caches = _connector(service, tmp_path / f"load{rank}", world=2, rank=rank)
        _run_step(connector, KVStoreConnectorMetadata(spec=SPEC.to_dict(), loads=[load]), LAYERS)
        assert connector.get_block_ids_with_load_errors() == set()
        for layer, cache in enumerate(caches):
            got = _gathered(connector, cache, [5, 0], n)
            assert torch.equal(got, kv[layer, :, :n, rank : rank + 1])


def test_heads_split_over_ranks_as_vllm_splits_them() -> None:
    assert [_shard(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # Fewer heads than ranks: each head is replicated on world / heads ranks, which share it.
    assert [_shard(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert _shard(4, 1, 0) == (0, 4)
    assert shard_spec(SPEC, 0, HEADS) is SPEC  # TP 1: the namespace of before
    with pytest.raises(ConfigError, match="do not split"):
        _shard(6, 4, 0)
    with pytest.raises(ConfigError, match="not a multiple"):
        _shard(2, 3, 0)


def test_revision_names_the_weights(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    base = weights_revision(model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert weights_revision(copy) == base  # the bytes, not the folder
    (copy / "README.md").write_text("a model card changes nothing")
    assert weights_revision(copy) == base
    tuned = tmp_path / "tuned"
    shutil.copytree(model_dir, tuned)
    weights = load_file(tuned / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] += 1e-3  # one weight of a fine-tune: same names, shapes and sizes
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert weights_revision(tuned) != base


def test_extra_config_is_checked() -> None:
    config = ConnectorConfig.from_extra({"server": "10.0.0.1:50051", "repair_holes": True})
    assert config.repair_holes
    assert config.block_tokens == 0  # vLLM's block size
    with pytest.raises(ConfigError, match="unknown"):
        ConnectorConfig.from_extra({"sever": "10.0.0.1:50051"})
    with pytest.raises(ConfigError, match="repair_holes must be bool"):
        ConnectorConfig.from_extra({"repair_holes": "yes"})
    with pytest.raises(ConfigError, match="timeout_s"):
        ConnectorConfig.from_extra({"timeout_s": 0})
    assert ConnectorConfig.from_extra({}).load_async == "lower"
    with pytest.raises(ConfigError, match="load_async must be one of"):
        ConnectorConfig.from_extra({"load_async": "sometimes"})


def test_a_hybrid_model_is_refused_naming_its_groups(service: Service, tmp_path: Path) -> None:
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM,
                             dtype=torch.float32)
    window = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM,
                               dtype=torch.float32, sliding_window=64)
    groups = [
        KVCacheGroupSpec(["model.layers.0.self_attn.attn", "model.layers.2.self_attn.attn"], full),
        KVCacheGroupSpec(["model.layers.1.self_attn.attn"], window),
    ]
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)
    with pytest.raises(ConfigError, match=r"2 KV cache groups \(group 0: FullAttentionSpec over "
                       r"2 layers .*group 1: SlidingWindowSpec over 1 layers"):
        _connector(service, tmp_path, kv_cache_config=config)


def test_a_layout_that_is_not_affine_still_round_trips() -> None:
    # A permutation no strided view expresses: the element-index path does the copy.
    size = 2 * BLOCK * HEADS * HEAD_DIM
    generator = torch.Generator().manual_seed(3)
    positions = torch.randperm(size, generator=generator).view(2, BLOCK, HEADS, HEAD_DIM)
    layout = BlockLayout(positions, (HEADS, BLOCK, 2 * HEAD_DIM))
    assert not layout._affine
    flat = _cache(torch.float32).view(NUM_BLOCKS, -1)
    kv = torch.randn(2, 3 * BLOCK - 5, HEADS, HEAD_DIM, generator=generator)
    block_ids = [4, 9, 1]
    layout.scatter(flat, block_ids, kv, 0)
    for t in (0, BLOCK + 3, 3 * BLOCK - 6):
        block = flat[block_ids[t // BLOCK]]
        assert torch.equal(block[positions[:, t % BLOCK].reshape(-1)], kv[:, t].reshape(-1))
    out = torch.empty_like(kv)
    layout.gather(flat, block_ids, out=out)
    assert torch.equal(out, kv)
