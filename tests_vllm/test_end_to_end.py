"""vLLM engines in separate processes sharing K/V through a kvstore service.

One scenario, in order (each engine start costs about half a minute here, so the engines are
few and the second one runs several rounds):

1. baseline: vLLM without the connector, on prompts A..E (a 160-token shared prefix, then 120
   tokens of their own);
2. process 1 with the connector on A..C, prefilling in chunks of 96 tokens: no hits (but for
   the shared prefix, when a prompt starts after another one finished), saves every full prompt
   block once the prompt's last chunk is computed;
3. process 2 on A..E: A..C hit all their full blocks but the last token's, D and E the shared
   prefix's full blocks;
   - the service restarts (same G3, empty G2), same prompts again: hits from G3, loaded
     asynchronously (the request waits aside for its fetch);
   - a middle block of each prompt is evicted, same prompts again: only the blocks before the
     hole are claimed;
   - a block of A is corrupted on disk while the service is down: the lookup promises it, the
     fetch fails its checksum, the connector reports the vLLM blocks from there on as load
     errors and vLLM recomputes them;
4. blocks computed by `kvstore worker` (transformers, not vLLM) in the worker's namespace, with a
   hole punched in: process 3 with ``repair_holes`` has the worker fill the hole and loads
   everything.

Every run's greedy tokens equal the baseline's.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import (
    BLOCK_SIZE,
    PYTHON,
    REPO,
    Engine,
    Service,
    child_env,
    connector_stats,
    run_engine,
)

from client import Client, Stats
from kvstore import ModelSpec

pytestmark = pytest.mark.timeout(900)

PREFIX_TOKENS = 160
SUFFIX_TOKENS = 120
VOCAB = (4, 1000)  # token ids drawn from here: no special tokens
# The evicted block: a prompt's own (so that no other prompt's save fills it), with a stored
# block after it.
HOLE = 6
CORRUPT = 5  # the block of prompt A corrupted in G3: its first own block, 2 stored after it
CHUNK_TOKENS = 96  # process 1's prefill chunk (vLLM's token budget per step)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefix = [rng.randrange(*VOCAB) for _ in range(PREFIX_TOKENS)]
    return [prefix + [rng.randrange(*VOCAB) for _ in range(SUFFIX_TOKENS)] for _ in range(5)]


PROMPTS = _prompts()
FULL = (PREFIX_TOKENS + SUFFIX_TOKENS - 1) // BLOCK_SIZE * BLOCK_SIZE  # all but the last token
SHARED = PREFIX_TOKENS // BLOCK_SIZE * BLOCK_SIZE


@dataclass
class Scenario:
    baseline: dict[str, Any]
    first: dict[str, Any]
    first_stats: dict[str, dict[str, Any]]
    # rounds: hits, after the restart, after the eviction, after the corruption
    second: list[dict[str, Any]]
    second_stats: list[dict[str, dict[str, Any]]]
    server_stats: list[Stats]  # after process 1, after each round of process 2
    metrics: list[dict[str, float]]  # the same moments; counters restart with the service
    evicted: int
    holes_after_resave: list[int]
    holes_after_recompute: list[int]
    repaired: dict[str, Any]
    repaired_stats: dict[str, dict[str, Any]]
    worker_spec: ModelSpec
    namespace: ModelSpec
    times: dict[str, float]


def _stats(service: Service) -> Stats:
    with Client(service.target) as kv:
        return kv.stats()


def _evict(service: Service, spec: ModelSpec, block: int) -> int:
    """Evict block ``block`` of every prompt; the number of blocks removed."""
    with Client(service.target) as kv:
        return sum(kv.evict(spec, [kv.lookup(spec, p).hashes[block]]) for p in PROMPTS)


@pytest.fixture(scope="module")
def scenario(
    model_dir: Path, service: Service, tmp_path_factory: pytest.TempPathFactory
) -> Scenario:
    folder = tmp_path_factory.mktemp("engines")
    times: dict[str, float] = {}
    connector = {"server": service.target}

    began = time.monotonic()
    baseline = run_engine(folder, "baseline", model_dir, PROMPTS, None)
    times["baseline"] = time.monotonic() - began

    began = time.monotonic()
    first = run_engine(
        folder,
        "first",
        model_dir,
        PROMPTS[:3],
        connector,
        engine_args={"max_num_batched_tokens": CHUNK_TOKENS},
    )
    times["process 1"] = time.monotonic() - began
    first_stats = connector_stats(folder / "first" / "stats")
    namespace = ModelSpec.from_dict(first_stats["scheduler"]["namespace"])
    server_stats = [_stats(service)]
    metrics = [service.metrics()]

    began = time.monotonic()
    second = Engine(folder, "second", model_dir, [PROMPTS] * 4, connector)
    rounds, round_stats = [], []
    worker: subprocess.Popen[bytes] | None = None
    try:
        rounds.append(second.result())
        round_stats.append(connector_stats(second.folder / "stats"))
        server_stats.append(_stats(service))
        metrics.append(service.metrics())
        service.restart()  # same port, same G3; G2 starts empty
        second.proceed()
        rounds.append(second.result())
        round_stats.append(connector_stats(second.folder / "stats"))
        server_stats.append(_stats(service))
        metrics.append(service.metrics())
        evicted = _evict(service, namespace, HOLE)
        second.proceed()
        rounds.append(second.result())
        round_stats.append(connector_stats(second.folder / "stats"))
        server_stats.append(_stats(service))
        metrics.append(service.metrics())
        with Client(service.target) as kv:
            holes_after_resave = [h for p in PROMPTS for h in kv.lookup(namespace, p).holes]
            stored, _ = kv.get_prefix(namespace, PROMPTS[0])
        service.stop()
        _corrupt(service.g3_path, stored[:, :, CORRUPT * BLOCK_SIZE : (CORRUPT + 1) * BLOCK_SIZE])
        service.start()
        # The model worker of step 4 loads while process 2 runs its last round.
        spec_file = folder / "worker-spec.json"
        worker = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "kvstore.cli",
                "worker",
                "--server",
                service.target,
                "--model",
                str(model_dir),
                "--dtype",
                "float32",
                "--block-tokens",
                str(BLOCK_SIZE),
                "--spec-out",
                str(spec_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "worker.log").open("w"),
            env=child_env(),
            cwd=REPO,
        )
        second.proceed()
        rounds.append(second.result())
        round_stats.append(connector_stats(second.folder / "stats"))
        server_stats.append(_stats(service))
        metrics.append(service.metrics())
        with Client(service.target) as kv:
            holes_after_recompute = kv.lookup(namespace, PROMPTS[0]).holes
        second.close()
        times["process 2 (4 rounds)"] = time.monotonic() - began

        began = time.monotonic()
        worker_spec = _store_with_worker(service, model_dir, spec_file)
        repaired = run_engine(
            folder,
            "repair",
            model_dir,
            PROMPTS,
            {**connector, "repair_holes": True, "model_spec": str(spec_file)},
        )
        times["process 3 (repair)"] = time.monotonic() - began
        repaired_stats = connector_stats(folder / "repair" / "stats")
    finally:
        second.close()  # a no-op when closed already
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
    result = Scenario(
        baseline=baseline,
        first=first,
        first_stats=first_stats,
        second=rounds,
        second_stats=round_stats,
        server_stats=server_stats,
        metrics=metrics,
        evicted=evicted,
        holes_after_resave=holes_after_resave,
        holes_after_recompute=holes_after_recompute,
        repaired=repaired,
        repaired_stats=repaired_stats,
        worker_spec=worker_spec,
        namespace=namespace,
        times=times,
    )
    _report(result)
    return result


def _report(scenario: Scenario) -> None:
    """What the runs took and counted, for the log (``pytest -s`` shows it)."""
    print("\nengine runs (s):", {k: round(v, 1) for k, v in scenario.times.items()})
    moments = [
        "after process 1",
        "after round 1",
        "after restart + round 2",
        "after eviction + round 3",
        "after corruption + restart + round 4",
    ]
    for name, stats, metrics in zip(moments, scenario.server_stats, scenario.metrics, strict=True):
        tiers = {t.tier: (t.num_blocks, t.num_hits) for t in stats.tiers}
        hits = {k: v for k, v in metrics.items() if k.startswith("kvstore_lookup")}
        print(f"kvstore {name}: tier (blocks, reads) {tiers}; {hits}")


def _corrupt(g3_path: Path, block: torch.Tensor) -> None:
    """Flip one byte of a stored block's payload in G3's file (the service is stopped). G3
    keeps blocks raw: the payload is the tensor's bytes, found by its first 4 KiB."""
    path = g3_path / "data.mdb"
    data = path.read_bytes()
    payload = block.contiguous().numpy().tobytes()
    at = data.find(payload[:4096])
    assert at >= 0, "block not found in G3's file"
    assert data.find(payload[:4096], at + 1) < 0, "block found twice in G3's file"
    with path.open("r+b") as f:
        f.seek(at + 1000)
        f.write(bytes([data[at + 1000] ^ 0x40]))


def _store_with_worker(service: Service, model_dir: Path, spec_file: Path) -> ModelSpec:
    """Blocks of the prompts as transformers computes them, stored in the namespace of the
    attached `kvstore worker`, then a hole at ``HOLE``."""
    from kvstore.worker.model import ModelWorker, WorkerConfig

    model = ModelWorker(
        WorkerConfig(model_dir=str(model_dir), dtype="float32", block_tokens=BLOCK_SIZE)
    )
    deadline = time.monotonic() + 120
    with Client(service.target) as kv:
        while not kv.stats().workers:
            assert time.monotonic() < deadline, "kvstore worker did not attach"
            time.sleep(0.5)
        spec = ModelSpec.from_dict(json.loads(spec_file.read_text()))
        assert spec == model.spec  # the connector will use the worker's namespace
        for tokens in PROMPTS:
            kv.put(spec, tokens, model.prefill(tokens))
    assert _evict(service, spec, HOLE) == len(PROMPTS)
    return spec


def _hit_blocks(metrics: dict[str, float], tier: str) -> float:
    return metrics.get(f"kvstore_lookup_hit_blocks_total{{tier={tier}}}", 0.0)


def test_saving_leaves_outputs_alone(scenario: Scenario) -> None:
    assert scenario.first["outputs"] == scenario.baseline["outputs"][:3]
    # A computes everything; B and C may find the shared prefix A saved, when vLLM schedules
    # them after A's prefill (its token budget per step decides).
    cached = scenario.first["num_cached_tokens"]
    assert cached[0] == 0
    assert set(cached[1:]) <= {0, SHARED}
    worker = scenario.first_stats["worker"]
    # A..C share 5 blocks and have 3 of their own each (280 tokens: 8 full blocks).
    assert worker["stored_blocks"] == SHARED // BLOCK_SIZE + 3 * (FULL - SHARED) // BLOCK_SIZE
    assert worker["saves"] == 3


def test_second_process_gets_the_prefix(scenario: Scenario) -> None:
    result = scenario.second[0]
    assert result["num_cached_tokens"] == [FULL, FULL, FULL, SHARED, SHARED]
    assert result["outputs"] == scenario.baseline["outputs"]
    stats = scenario.second_stats[0]
    assert stats["scheduler"]["matched_tokens"] == 3 * FULL + 2 * SHARED
    assert stats["worker"]["loaded_tokens"] == 3 * FULL + 2 * SHARED
    assert stats["worker"]["load_error_blocks"] == 0
    assert stats["worker"]["async_loads"] == 0  # G2 hits load in the step, layer by layer
    # The service's hit counters rose by at least the tokens vLLM was given (lookups and
    # fetches both count).
    before, after = scenario.metrics[0], scenario.metrics[1]
    rise = after["kvstore_lookup_hit_tokens_total"] - before["kvstore_lookup_hit_tokens_total"]
    assert rise >= 3 * FULL + 2 * SHARED


def test_hits_after_a_restart_come_from_g3(scenario: Scenario) -> None:
    result = scenario.second[1]
    assert result["num_cached_tokens"] == [FULL] * 5  # D and E were saved by round 1
    assert result["outputs"] == scenario.baseline["outputs"]
    # G2 started empty: every distinct block (5 shared, 3 of each prompt's own) was found in G3
    # at least once (later lookups may find a copy promoted to G2).
    distinct = SHARED // BLOCK_SIZE + 5 * (FULL - SHARED) // BLOCK_SIZE
    assert _hit_blocks(scenario.metrics[2], "G3") >= distinct
    g3 = next(t for t in scenario.server_stats[2].tiers if t.tier == "G3")
    assert g3.num_hits >= distinct  # blocks read from G3
    # Hits with blocks in G3 load asynchronously (``load_async="lower"``): each request waits
    # aside for its fetch, and vLLM schedules it once ``get_finished`` reports it.
    before, after = scenario.second_stats[0]["worker"], scenario.second_stats[1]["worker"]
    assert after["async_loads"] - before["async_loads"] == len(PROMPTS)
    assert after["loaded_tokens"] - before["loaded_tokens"] == len(PROMPTS) * FULL


def test_a_hole_limits_the_hit_to_the_blocks_before_it(scenario: Scenario) -> None:
    assert scenario.evicted == len(PROMPTS)
    result = scenario.second[2]
    assert result["num_cached_tokens"] == [HOLE * BLOCK_SIZE] * 5
    assert result["outputs"] == scenario.baseline["outputs"]
    # Process 2 recomputed the blocks from the hole on, and saved them again: no hole left.
    assert scenario.holes_after_resave == []


def test_a_block_that_fails_to_load_is_recomputed(scenario: Scenario) -> None:
    result = scenario.second[3]
    assert result["outputs"] == scenario.baseline["outputs"]
    assert result["num_cached_tokens"][1:] == [FULL] * 4
    # Blocks CORRUPT..7 of A (tokens 160..255) did not arrive: 3 vLLM blocks recomputed.
    before, after = scenario.second_stats[2]["worker"], scenario.second_stats[3]["worker"]
    assert after["load_error_blocks"] - before["load_error_blocks"] == FULL // BLOCK_SIZE - CORRUPT
    assert scenario.server_stats[4].counters.get("corrupt", 0) >= 1
    # vLLM recomputed the blocks, and the connector saved them again.
    assert scenario.holes_after_recompute == []


def test_worker_repairs_the_hole_and_vllm_uses_transformers_blocks(scenario: Scenario) -> None:
    # Blocks computed by transformers, loaded into vLLM's paged cache: equal outputs mean the
    # layout mapping is exact, not merely self-consistent.
    result = scenario.repaired
    assert result["num_cached_tokens"] == [FULL] * 5
    assert result["outputs"] == scenario.baseline["outputs"]
    scheduler = scenario.repaired_stats["scheduler"]
    assert scheduler["repairs"] >= 1
    assert scheduler["repaired_blocks"] == len(PROMPTS)
    assert scheduler["namespace"] == scenario.worker_spec.to_dict()


def test_vllm_blocks_equal_transformers_kv(
    scenario: Scenario, service: Service, model_dir: Path
) -> None:
    from kvstore.worker.model import ModelWorker, WorkerConfig

    model = ModelWorker(
        WorkerConfig(model_dir=str(model_dir), dtype="float32", block_tokens=BLOCK_SIZE)
    )
    with Client(service.target) as kv:
        stored, n = kv.get_prefix(scenario.namespace, PROMPTS[1])
    assert n == (PREFIX_TOKENS + SUFFIX_TOKENS) // BLOCK_SIZE * BLOCK_SIZE
    expected = model.prefill(PROMPTS[1])[:, :, :n]
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-4)
