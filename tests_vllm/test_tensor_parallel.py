"""Tensor parallel 2: each rank stores and loads its own K/V heads through kvstore.

Three vLLM engines with ``tensor_parallel_size=2`` (two worker processes each, vLLM's ``mp``
executor on CPU), one after the other, against one kvstore service:

1. baseline without the connector;
2. process 1 with the connector computes and saves the prompts: each rank puts the blocks of
   its one K/V head (of the tiny model's two) into its own namespace;
3. process 2 with the connector gets every full block but the last token's from kvstore, on
   both ranks, and generates the baseline's tokens.

The namespaces are named by the heads they hold (``shard_spec``): nothing is stored under the
all-heads namespace, so an engine of tensor parallel size 1 never reads half a block.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from processes import BLOCK_SIZE, Service, run_engine

from client import Client
from client.vllm_connector import shard_spec
from kvstore import ModelSpec

pytestmark = pytest.mark.timeout(900)

PROMPT_TOKENS = 200
FULL = (PROMPT_TOKENS - 1) // BLOCK_SIZE * BLOCK_SIZE  # all but the last token's block
TP = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
# One core per rank: vLLM binds each CPU worker's threads to a NUMA node of its own by default,
# and this machine may have one.
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1" if (os.cpu_count() or 1) >= 2 else "0|0"}


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(4, 1000) for _ in range(PROMPT_TOKENS)] for _ in range(3)]


def _stats(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The scheduler's counters and each worker's (one per rank)."""
    files = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    scheduler = next(f for f in files if f["role"] == "scheduler")
    return scheduler, [f for f in files if f["role"] == "worker"]


def test_each_rank_stores_and_loads_its_own_heads(
    model_dir: Path, service: Service, tmp_path: Path
) -> None:
    prompts = _prompts()
    baseline = run_engine(tmp_path, "baseline", model_dir, prompts, None, engine_args=TP, env=ENV)
    connector = {"server": service.target}

    first = run_engine(tmp_path, "first", model_dir, prompts, connector, engine_args=TP, env=ENV)
    assert first["outputs"] == baseline["outputs"]
    scheduler, workers = _stats(tmp_path / "first" / "stats")
    assert len(workers) == 2
    blocks = PROMPT_TOKENS // BLOCK_SIZE
    assert [w["stored_blocks"] for w in workers] == [3 * blocks, 3 * blocks]

    spec = ModelSpec.from_dict(scheduler["namespace"])
    with Client(service.target) as kv:
        for p in prompts:
            assert kv.lookup(spec, p).hit_blocks == 0  # no block of all heads
            for head in range(spec.num_kv_heads):
                found = kv.lookup(shard_spec(spec, head, head + 1), p)
                assert found.hit_blocks == blocks

    second = run_engine(tmp_path, "second", model_dir, prompts, connector, engine_args=TP, env=ENV)
    assert second["num_cached_tokens"] == [FULL] * 3
    assert second["outputs"] == baseline["outputs"]
    scheduler, workers = _stats(tmp_path / "second" / "stats")
    assert scheduler["matched_tokens"] == 3 * FULL
    assert [w["loaded_tokens"] for w in workers] == [3 * FULL, 3 * FULL]
    assert [w["load_error_blocks"] for w in workers] == [0, 0]
