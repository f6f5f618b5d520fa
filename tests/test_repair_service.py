"""Hole repair through the service: the Repair RPC, Fetch with ``repair_holes``, the client and
the CLI, with model workers in the server's process and as separate ``kvstore worker``
processes attached through the Work stream.

Real parts throughout: a gRPC server on real tiers (G2 shared memory, G3 LMDB), the default
transformer of kvstore/worker/model.py (a 4-layer Llama with GQA, seed 0), worker processes started
with the CLI and killed with SIGKILL. K/V of repaired blocks is compared with a prefill from
scratch within tests/test_worker.py's tolerance (the reason for it is written there); greedy
tokens are compared exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from click.testing import CliRunner
from test_server import store_config

from client import AsyncClient, AuthError, NoWorkerError
from kvstore.cli import main as cli
from kvstore.config import StoreConfig
from kvstore.core.keys import ModelSpec
from kvstore.service.auth import TenantConfig
from kvstore.service.server import KVStoreServer, ServerConfig
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.worker.link import WorkerLink
from kvstore.worker.model import ModelWorker, WorkerConfig

pytest.importorskip("transformers")

BT = 16  # the default worker's block_tokens
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # float32; see tests/test_worker.py
NEW_TOKENS = 8
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> ModelWorker:
    return ModelWorker(WorkerConfig())


def prompt(num_blocks: int, seed: int, tail: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(num_blocks * BT + tail)]


@asynccontextmanager
async def serving(
    tmp_path: Path, workers: tuple[ModelWorker, ...] = (), config: StoreConfig | None = None
) -> AsyncIterator[tuple[KVStoreServer, str]]:
    server = KVStoreServer(config or store_config(tmp_path), workers=workers)
    port = await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def store_with_holes(
    kv: AsyncClient, model: ModelWorker, tokens: list[int], holes: list[int]
) -> tuple[torch.Tensor, list[Any]]:
    """Put the prompt's K/V, then evict ``holes``; returns the K/V and the block hashes."""
    full = model.prefill(tokens)
    put = await kv.put(model.spec, tokens, full)
    assert put.stored == len(tokens) // BT
    assert await kv.evict(model.spec, [put.hashes[i] for i in holes]) == len(holes)
    found = await kv.lookup(model.spec, tokens)
    assert found.holes == [h for h in holes if h < max(i for i, t in enumerate(found.tiers) if t)]
    return full, put.hashes


async def wait_for(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def assert_blocks(got: torch.Tensor, want: torch.Tensor, repaired: list[int]) -> None:
    """Repaired blocks within tolerance of the prefill, the others bit for bit."""
    assert got.shape == want.shape
    for i in range(got.shape[2] // BT):
        block, original = got[:, :, i * BT : (i + 1) * BT], want[:, :, i * BT : (i + 1) * BT]
        if i in repaired:
            torch.testing.assert_close(block, original, **TOLERANCE)
        else:
            assert torch.equal(block, original), f"block {i} changed"


# -- a worker in the server's process ------------------------------------------------------------


async def test_repair_rpc_fills_holes_and_generation_is_unchanged(
    tmp_path: Path, model: ModelWorker
) -> None:
    tokens = prompt(8, seed=1, tail=5)
    want = model.generate(tokens, max_new_tokens=NEW_TOKENS)
    async with serving(tmp_path, (model,)) as (_, target), AsyncClient(target) as kv:
        full, _ = await store_with_holes(kv, model, tokens, [0, 3, 4, 6])
        result = await kv.repair(model.spec, tokens)
        assert result.repaired == [0, 3, 4, 6]
        assert (result.hit_blocks_before, result.hit_blocks) == (0, 8)
        assert result.worker == model.name
        past, n = await kv.get_prefix(model.spec, tokens)
        assert n == 8 * BT
        assert_blocks(past, full[:, :, :n], [0, 3, 4, 6])
        assert model.generate(tokens, past, max_new_tokens=NEW_TOKENS) == want
        # Nothing left to repair: a no-op that computes nothing.
        again = await kv.repair(model.spec, tokens)
        assert (again.repaired, again.hit_blocks, again.worker) == ([], 8, "")
        stats = await kv.stats()
        assert stats.counters["repaired_blocks"] == 4
        (info,) = stats.workers
        assert (info.spec, info.address, info.tasks_done, info.blocks_computed) == (
            model.spec,
            "in-process",
            1,
            4,
        )


async def test_fetch_can_repair_holes_first(tmp_path: Path, model: ModelWorker) -> None:
    tokens = prompt(6, seed=2)
    async with serving(tmp_path, (model,)) as (_, target), AsyncClient(target) as kv:
        full, _ = await store_with_holes(kv, model, tokens, [2])
        past, n = await kv.get_prefix(model.spec, tokens)
        assert n == 2 * BT  # the hit stops at the hole
        past, n = await kv.get_prefix(model.spec, tokens, repair_holes=True)
        assert n == 6 * BT
        assert_blocks(past, full, [2])


async def test_exact_repair_replaces_the_suffix_through_the_service(
    tmp_path: Path, model: ModelWorker
) -> None:
    tokens = prompt(6, seed=3)
    async with serving(tmp_path, (model,)) as (_, target), AsyncClient(target) as kv:
        full, _ = await store_with_holes(kv, model, tokens, [1])
        result = await kv.repair(model.spec, tokens, exact=True)
        assert result.repaired == [1, 2, 3, 4, 5]
        assert result.kept == []
        past, n = await kv.get_prefix(model.spec, tokens)
        assert n == 6 * BT
        assert_blocks(past, full, [1, 2, 3, 4, 5])


async def test_repair_without_a_worker_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, model: ModelWorker
) -> None:
    tokens = prompt(5, seed=4)
    async with serving(tmp_path) as (server, target), AsyncClient(target) as kv:
        await store_with_holes(kv, model, tokens, [1])
        before = await kv.lookup(model.spec, tokens)
        with pytest.raises(NoWorkerError, match="no model worker is attached") as err:
            await kv.repair(model.spec, tokens)
        assert err.value.code == "FAILED_PRECONDITION"
        assert "kvstore worker --server" in str(err.value)
        with pytest.raises(NoWorkerError):
            await kv.get_prefix(model.spec, tokens, repair_holes=True)
        assert await kv.lookup(model.spec, tokens) == before
        # A prompt without holes needs no worker.
        whole = prompt(3, seed=5)
        await kv.put(model.spec, whole, model.prefill(whole))
        assert (await kv.repair(model.spec, whole)).hit_blocks == 3
        assert server.engine.counters.values.get("repairs", 0) == 0


async def test_a_worker_of_another_namespace_does_not_repair(
    tmp_path: Path, model: ModelWorker
) -> None:
    other = ModelWorker(WorkerConfig(block_tokens=8))
    tokens = prompt(4, seed=6)
    async with serving(tmp_path, (other,)) as (_, target), AsyncClient(target) as kv:
        await store_with_holes(kv, model, tokens, [1])
        with pytest.raises(NoWorkerError, match=r"block_tokens=8 \(asked: 16\)"):
            await kv.repair(model.spec, tokens)


async def test_bad_repair_requests_are_refused_with_the_reason(
    tmp_path: Path, model: ModelWorker
) -> None:
    tokens = prompt(4, seed=7)
    async with (
        serving(tmp_path, (model,)) as (_, target),
        AsyncClient(target) as kv,
        grpc.aio.insecure_channel(target) as channel,
    ):
        await store_with_holes(kv, model, tokens, [1])
        before = await kv.lookup(model.spec, tokens)
        stub = pb_grpc.KVStoreStub(channel)
        # A token outside the model's vocabulary: the worker refuses it, nothing is stored.
        bad = list(tokens)
        bad[BT] = 5000
        put = await kv.put(model.spec, bad, torch.zeros(4, 2, 4 * BT, 2, 32))
        await kv.evict(model.spec, [put.hashes[1]])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Repair(pb.RepairRequest(prompt=_prompt_message(model.spec, bad)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "token 16 is 5000; the model's vocabulary has 1024" in str(err.value.details())
        assert (await kv.lookup(model.spec, bad)).holes == [1]
        # A namespace that is no valid ModelSpec.
        broken = _prompt_message(model.spec, tokens)
        broken.namespace.dtype = "int7"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Repair(pb.RepairRequest(prompt=broken))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt.namespace" in str(err.value.details())
        assert await kv.lookup(model.spec, tokens) == before


def _prompt_message(spec: ModelSpec, tokens: list[int]) -> Any:
    from client.convert import prompt_of

    return prompt_of(spec, tokens, None)


# -- workers attached through the Work stream ----------------------------------------------------


async def test_linked_workers_share_the_repairs(tmp_path: Path, model: ModelWorker) -> None:
    prompts = [prompt(6, seed=20 + i) for i in range(6)]
    async with serving(tmp_path) as (server, target), AsyncClient(target, timeout_s=60) as kv:
        stop = asyncio.Event()
        links = [WorkerLink(ModelWorker(WorkerConfig()), target, name=f"w{i}") for i in range(2)]
        runs = [asyncio.create_task(link.run(stop)) for link in links]
        try:
            await wait_for(lambda: len(server.pool) == 2, "two workers to attach")
            fulls = [(await store_with_holes(kv, model, p, [1, 4]))[0] for p in prompts]
            results = await asyncio.gather(*(kv.repair(model.spec, p) for p in prompts))
            assert all(r.repaired == [1, 4] for r in results)
            assert {r.worker for r in results} == {"w0", "w1"}
            assert sum(link.tasks_done for link in links) == len(prompts)
            for p, full in zip(prompts, fulls, strict=True):
                past, n = await kv.get_prefix(model.spec, p)
                assert n == 6 * BT
                assert_blocks(past, full, [1, 4])
            workers = {w.name: w for w in (await kv.stats()).workers}
            assert sorted(workers) == ["w0", "w1"]
            assert sum(w.blocks_computed for w in workers.values()) == 2 * len(prompts)
            assert all(w.address.startswith("ipv4:127.0.0.1:") for w in workers.values())
        finally:
            stop.set()
            await asyncio.gather(*runs)
        await wait_for(lambda: len(server.pool) == 0, "the workers to detach")


async def test_a_linked_worker_reconnects_after_a_server_restart(
    tmp_path: Path, model: ModelWorker
) -> None:
    config = store_config(tmp_path)
    server = KVStoreServer(config)
    port = await server.start()
    target = f"127.0.0.1:{port}"
    link = WorkerLink(ModelWorker(WorkerConfig()), target, reconnect_s=0.05)
    stop = asyncio.Event()
    run = asyncio.create_task(link.run(stop))
    try:
        await wait_for(lambda: link.attachments == 1, "the first attach")
        await server.stop(0)
        from dataclasses import replace

        server = KVStoreServer(replace(config, server=replace(config.server, listen=target)))
        await server.start()
        await wait_for(lambda: link.attachments == 2, "the worker to come back")
        tokens = prompt(4, seed=30)
        async with AsyncClient(target) as kv:
            await store_with_holes(kv, model, tokens, [2])
            assert (await kv.repair(model.spec, tokens)).repaired == [2]
    finally:
        stop.set()
        await run
        await server.stop(0)


async def test_workers_attach_with_an_admin_token_and_repair_every_tenants_holes(
    tmp_path: Path, model: ModelWorker
) -> None:
    tenants = (
        TenantConfig("ops", "tok-ops-0123456789abcd", admin=True),
        TenantConfig("team-a", "tok-team-a-0123456789"),
    )
    config = store_config(
        tmp_path,
        tenants=tenants,
        server=ServerConfig(listen="127.0.0.1:0", secret="s" * 32, max_prompt_tokens=4096),
    )
    server = KVStoreServer(config)
    target = f"127.0.0.1:{await server.start()}"
    try:
        refused = WorkerLink(model, target, token="tok-team-a-0123456789")
        with pytest.raises(AuthError, match="Work needs an admin tenant"):
            await refused.run()
        stop = asyncio.Event()
        link = WorkerLink(model, target, token="tok-ops-0123456789abcd")
        run = asyncio.create_task(link.run(stop))
        try:
            await wait_for(link.attached.is_set, "the admin's worker to attach")
            tokens = prompt(5, seed=60)
            async with AsyncClient(target, token="tok-team-a-0123456789") as kv:
                full, _ = await store_with_holes(kv, model, tokens, [2])
                result = await kv.repair(model.spec, tokens)
                assert result.repaired == [2]
                past, n = await kv.get_prefix(model.spec, tokens)
                assert n == 5 * BT
                assert_blocks(past, full, [2])
            # The tenant's blocks are under its own salt: another tenant's view has none.
            async with AsyncClient(target, token="tok-ops-0123456789abcd") as ops:
                assert (await ops.lookup(model.spec, tokens)).hit_blocks == 0
        finally:
            stop.set()
            await run
    finally:
        await server.stop(0)


# -- worker processes ----------------------------------------------------------------------------


@contextmanager
def worker_process(target: str, name: str, spec_out: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstore.cli",
            "worker",
            "--server",
            target,
            "--name",
            name,
            "--spec-out",
            str(spec_out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_worker_processes_survive_one_dying_mid_repair(
    tmp_path: Path, model: ModelWorker
) -> None:
    tokens = prompt(8, seed=40)
    config = store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0", worker_timeout_s=2))
    async with serving(tmp_path, config=config) as (server, target):
        with (
            worker_process(target, "first", tmp_path / "first.json") as first,
            worker_process(target, "second", tmp_path / "second.json") as second,
        ):
            await wait_for(lambda: len(server.pool) == 2, "two worker processes to attach")
            # Same default model, same seed: the same namespace as the test's own worker.
            for out in ("first.json", "second.json"):
                assert ModelSpec.from_dict(json.loads((tmp_path / out).read_text())) == model.spec
            async with AsyncClient(target, timeout_s=60, retries=0) as kv:
                full, _ = await store_with_holes(kv, model, tokens, [2, 5])
                # The pool gives the task to the worker that attached first when both are idle:
                # freeze that one so that it holds the task without answering, then kill it.
                first_id = min(w.worker_id for w in server.pool.workers())
                victim = {w.worker_id: w.name for w in server.pool.workers()}[first_id]
                proc = first if victim == "first" else second
                os.kill(proc.pid, signal.SIGSTOP)
                repair = asyncio.create_task(kv.repair(model.spec, tokens))
                await wait_for(
                    lambda: any(w.busy for w in server.pool.workers()), "the task to go out"
                )
                os.kill(proc.pid, signal.SIGKILL)
                result = await repair
                assert result.repaired == [2, 5]
                assert result.worker == ("second" if victim == "first" else "first")
                past, n = await kv.get_prefix(model.spec, tokens)
                assert n == 8 * BT
                assert_blocks(past, full, [2, 5])
                assert [w.name for w in server.pool.workers()] == [result.worker]

                # The last worker hangs (stopped, never answers): after server.worker_timeout_s
                # it is dropped, the repair is UNAVAILABLE, and nothing of it is stored.
                survivor = second if proc is first else first
                hashes = (await kv.lookup(model.spec, tokens)).hashes
                await kv.evict(model.spec, [hashes[3]])
                os.kill(survivor.pid, signal.SIGSTOP)
                with pytest.raises(Exception, match="did not answer task 2 within 2 s") as err:
                    await kv.repair(model.spec, tokens)
                assert getattr(err.value, "code", "") == "UNAVAILABLE"
                assert "nothing of it was stored" in str(err.value)
                assert (await kv.lookup(model.spec, tokens)).holes == [3]
                assert len(server.pool) == 0
                # And with no worker left, a clear precondition failure.
                with pytest.raises(NoWorkerError):
                    await kv.repair(model.spec, tokens)


async def test_cli_repair_and_worker_listing(tmp_path: Path, model: ModelWorker) -> None:
    tokens = prompt(5, seed=50)
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(" ".join(map(str, tokens)))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(model.spec.to_dict()))
    async with serving(tmp_path, (model,)) as (_, target):
        async with AsyncClient(target) as kv:
            await store_with_holes(kv, model, tokens, [1, 3])
        runner = CliRunner()
        args = ["--server", target, "--model-spec", str(spec_file), "--tokens-file"]

        def invoke(*extra: str) -> Any:
            return runner.invoke(cli, ["repair", *args, str(tokens_file), *extra])

        result = await asyncio.to_thread(invoke, "--json")
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        assert doc["repaired"] == [1, 3]
        assert (doc["hit_blocks_before"], doc["hit_blocks"]) == (1, 5)
        result = await asyncio.to_thread(invoke)
        assert result.exit_code == 0, result.output
        assert "no holes" in result.output
        listing = await asyncio.to_thread(runner.invoke, cli, ["tiers", "--server", target])
        assert listing.exit_code == 0, listing.output
        assert "model workers" in listing.output
        listing = await asyncio.to_thread(
            runner.invoke, cli, ["tiers", "--server", target, "--json"]
        )
        health = await asyncio.to_thread(
            runner.invoke, cli, ["health", "--server", target, "--worker", model.name]
        )
        assert (health.exit_code, health.output.strip()) == (
            0,
            f"SERVING; worker {model.name}: attached",
        )
        health = await asyncio.to_thread(
            runner.invoke, cli, ["health", "--server", target, "--worker", "nobody"]
        )
        assert (health.exit_code, health.output.strip()) == (
            1,
            "SERVING; worker nobody: NOT attached",
        )
        (worker,) = json.loads(listing.output)["workers"]
        assert ModelSpec.from_dict(worker["namespace"]) == model.spec
        assert (worker["tasks_done"], worker["blocks_computed"]) == (1, 2)


@pytest.mark.parametrize(
    ("min_ping_interval_s", "stays"),
    [(0.5, True), (300.0, False)],
    ids=["server-permits-the-pings", "server-refuses-them"],
)
async def test_an_idle_worker_stays_attached_for_ten_keepalive_intervals(
    tmp_path: Path, min_ping_interval_s: float, stays: bool
) -> None:
    # The worker pings every second on a stream that carries nothing. A server that permits
    # that keeps the same attachment for ten intervals; one with gRPC's default bound (5
    # minutes: the bug this setting fixed) answers GOAWAY too_many_pings after a few pings and
    # the worker detaches and comes back. The second case shows that this test can fail.
    keepalive_s = 1.0
    base = store_config(tmp_path)
    config = replace(base, server=replace(base.server, min_ping_interval_s=min_ping_interval_s))
    async with serving(tmp_path, config=config) as (server, target):
        link = WorkerLink(
            ModelWorker(WorkerConfig()), target, reconnect_s=0.05, keepalive_s=keepalive_s
        )
        stop = asyncio.Event()
        run = asyncio.create_task(link.run(stop))
        try:
            await wait_for(lambda: link.attachments == 1, "the first attach")
            worker_id = link.worker_id
            if stays:
                # Idle time is what this case is about: there is nothing to wait on but the
                # clock, and any detach in it fails the test.
                deadline = time.monotonic() + 10 * keepalive_s
                while time.monotonic() < deadline:
                    assert link.attachments == 1
                    assert link.attached.is_set()
                    await asyncio.sleep(keepalive_s / 10)
                assert [w.worker_id for w in server.pool.workers()] == [worker_id]
            else:
                await wait_for(lambda: link.attachments > 1, "GOAWAY and a new attach", 60)
        finally:
            stop.set()
            await run
