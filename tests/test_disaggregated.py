"""Disaggregated prefill/decode and KV-aware routing, end to end.

Two kvstore services in this process, each with its own G2 and G3, sharing one real redis-server
as G4 (the same G4 namespace); the prefill and decode roles run as ``kvstore prefill`` /
``kvstore decode`` processes, or in-process through ``kvstore.roles.nodes``. Generated tokens are
compared exactly with generation from scratch on one node; the decode node's own numbers (the
role's computed tokens, the service's hit-block metrics by tier) show the prefix came from G4.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from redis_servers import RedisServer
from test_server import store_config

from client import AsyncClient
from kvstore.roles.router import PrefixRouter
from kvstore.service.server import KVStoreServer
from kvstore.worker.model import ModelWorker, WorkerConfig

pytest.importorskip("transformers")

BT = 16
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> ModelWorker:
    return ModelWorker(WorkerConfig())


def prompt(num_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(num_tokens)]


@asynccontextmanager
async def node(
    tmp_path: Path, name: str, redis: RedisServer | None, g4_namespace: str = "pd"
) -> AsyncIterator[tuple[KVStoreServer, str]]:
    config = store_config(tmp_path, g4=redis, g4_namespace=g4_namespace, g3_dir=f"g3-{name}")
    server = KVStoreServer(config)
    port = await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def hit_blocks(server: KVStoreServer, tier: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "kvstore_lookup_hit_blocks_total", {"tier": tier}
    )
    return value or 0.0


async def cli(*args: str) -> dict[str, Any]:
    """Run ``kvstore ARGS --json`` as its own process; its JSON document."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvstore.cli",
        *args,
        "--json",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return doc


async def test_prefill_and_decode_processes_share_one_redis(
    tmp_path: Path, model: ModelWorker, redis_server: RedisServer
) -> None:
    tokens = prompt(9 * BT + 5, seed=1)
    want = model.generate(tokens, max_new_tokens=12)
    tokens_file = tmp_path / "prompt.txt"
    tokens_file.write_text(" ".join(map(str, tokens)))
    async with (
        node(tmp_path, "prefill", redis_server) as (_, prefill_node),
        node(tmp_path, "decode", redis_server) as (decode_server, decode_node),
    ):
        done = await cli("prefill", "--server", prefill_node, "--tokens-file", str(tokens_file))
        assert (done["num_tokens"], done["stored_blocks"]) == (len(tokens), 9)
        assert len(decode_server.engine.index) == 0  # nothing went to the decode node directly
        out = await cli(
            "decode",
            "--server",
            decode_node,
            "--tokens-file",
            str(tokens_file),
            "--max-new-tokens",
            "12",
        )
        assert out["tokens"] == want
        # The prefix came from the shared G4; only the 5 tokens after the last full block ran
        # through the model on the decode node.
        assert (out["hit_tokens"], out["computed_tokens"]) == (9 * BT, 5)
        assert hit_blocks(decode_server, "G4") == 9
        assert hit_blocks(decode_server, "G2") == 0
        assert decode_server.engine.counters.values.get("repairs", 0) == 0


async def test_direct_mode_writes_into_the_decode_nodes_service(
    tmp_path: Path, model: ModelWorker
) -> None:
    from kvstore.roles.nodes import decode, prefill

    tokens = prompt(6 * BT, seed=2)
    want = model.generate(tokens, max_new_tokens=8)
    async with node(tmp_path, "decode", None) as (server, target), AsyncClient(target) as kv:
        done = await prefill(model, kv, tokens)
        assert done.stored_blocks == 6
        result = await decode(model, kv, tokens, max_new_tokens=8)
        assert result.tokens == want
        # The whole prompt is stored: the last token runs again for the first new token's logits.
        assert (result.hit_tokens, result.computed_tokens) == (6 * BT, 1)
        assert hit_blocks(server, "G2") == 6


async def test_decode_of_an_unknown_prompt_computes_it_all(
    tmp_path: Path, model: ModelWorker
) -> None:
    from kvstore.roles.nodes import decode

    tokens = prompt(3 * BT + 2, seed=3)
    async with node(tmp_path, "decode", None) as (_, target), AsyncClient(target) as kv:
        result = await decode(model, kv, tokens, max_new_tokens=4)
        assert result.tokens == model.generate(tokens, max_new_tokens=4)
        assert (result.hit_tokens, result.computed_tokens) == (0, len(tokens))


async def until(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_router_sends_each_prompt_to_the_node_with_its_longest_prefix(
    tmp_path: Path, model: ModelWorker
) -> None:
    spec = model.spec
    shared = prompt(4 * BT, seed=10)
    on_a = shared + prompt(4 * BT, seed=11)  # 8 blocks on a
    on_b = shared + prompt(2 * BT, seed=12)  # 6 blocks on b; the first 4 shared with a
    async with (
        node(tmp_path, "a", None) as (_, a),
        node(tmp_path, "b", None) as (_, b),
        AsyncClient(a) as ka,
        AsyncClient(b) as kb,
    ):
        # One block stored before the router starts: it arrives in the snapshot.
        await kb.put(spec, on_b[:BT], model.prefill(on_b[:BT]))
        async with PrefixRouter({"a": ka, "b": kb}) as router:
            await until(lambda: router.num_blocks("b") == 1, "b's snapshot")
            assert router.route(spec, on_b).node == "b"
            await ka.put(spec, on_a, model.prefill(on_a))
            await kb.put(spec, on_b, model.prefill(on_b))
            await until(
                lambda: router.num_blocks("a") == 8 and router.num_blocks("b") == 6, "the puts"
            )
            route = router.route(spec, on_a + prompt(BT, seed=13))
            assert (route.node, route.hit_blocks) == ("a", {"a": 8, "b": 4})
            assert route.hit_tokens == 8 * BT
            route = router.route(spec, on_b)
            assert (route.node, route.hit_blocks) == ("b", {"a": 4, "b": 6})
            assert router.route(spec, prompt(3 * BT, seed=14)).hit_blocks == {"a": 0, "b": 0}
            # Evicting a's copy of the shared prefix moves its prompts' route to b.
            hashes = (await ka.lookup(spec, on_a)).hashes
            assert await ka.evict(spec, hashes[:2]) == 2
            await until(lambda: router.num_blocks("a") == 6, "a's evictions")
            route = router.route(spec, on_a)
            assert (route.node, route.hit_blocks) == ("b", {"a": 0, "b": 4})
            # What the router promised is what the node has.
            found = await kb.lookup(spec, on_a)
            assert found.hit_blocks == 4
            past, n = await kb.get_prefix(spec, on_a)
            assert n == 4 * BT
            assert torch.equal(past, model.prefill(on_a)[:, :, : 4 * BT])


async def test_router_counts_shared_g4_blocks_for_every_node(
    tmp_path: Path, model: ModelWorker, redis_server: RedisServer
) -> None:
    spec = model.spec
    tokens = prompt(5 * BT, seed=20)
    async with (
        node(tmp_path, "a", redis_server, g4_namespace="router") as (server_a, a),
        node(tmp_path, "b", redis_server, g4_namespace="router") as (_, b),
        AsyncClient(a) as ka,
        AsyncClient(b) as kb,
    ):
        await ka.put(spec, tokens, model.prefill(tokens), durable=True)
        hashes = (await ka.lookup(spec, tokens)).hashes
        async with PrefixRouter({"a": ka, "b": kb}) as router:
            await until(lambda: router.num_blocks("a") == 5, "a's snapshot")
            # a holds all 5 in G2, G3 and G4: a wins; b could fetch them from G4 too.
            route = router.route(spec, tokens)
            assert route.node == "a"
            assert route.hit_blocks == {"a": 5, "b": 5}
            # Only in G4 now: both nodes reach them alike; the tie goes to the first node.
            for tier in ("G2", "G3"):
                await ka.evict(spec, hashes, tier=tier)
            await until(lambda: server_a.engine.index.get(hashes[0]) is not None, "index")
            await until(
                lambda: all(router._views["a"].blocks.get(h) == {"G4"} for h in hashes),
                "the demotions",
            )
            assert router.route(spec, tokens).hit_blocks == {"a": 5, "b": 5}
