"""The ``kvstore`` commands that talk to a server, run as real subprocesses against
``KVStoreServer`` in this process (port 0, G2 + G3 in tmp dirs).

Blocks are stored through ``AsyncClient``; each command runs as ``python -m kvstore.cli ...``
through ``asyncio.create_subprocess_exec``, so the server keeps serving while the test waits,
and independent commands run at once (each pays about 2 s of interpreter and torch start-up).
Checks are on what a user sees: the text and JSON on stdout, the message on stderr, the exit
status, and the store's state read back through the client afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client import AsyncClient
from kvstore.cli.loadgen import shared_prefix as _shared_prefix
from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from kvstore.engine.engine import EngineConfig
from kvstore.service.auth import TenantConfig
from kvstore.service.server import KVStoreServer, ServerConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

# 4096-byte payloads in 8 KiB slots.
SPEC = ModelSpec(
    "cli-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=16
)
SPEC_ARGS = (
    "--model", "cli-test", "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
    "--dtype", "bfloat16", "--block-tokens", "16",
)  # fmt: skip
BT = SPEC.block_tokens
SLOT = 8192
assert HEADER_BYTES + SPEC.block_nbytes <= SLOT
ADMIN_TOKEN = "admin-token-0123456789"
ALICE_TOKEN = "alice-token-0123456789"
# A table cell boundary: a tab when the output is piped (as here), a rich box rule on a terminal.
BAR = r"\s*[│|\t]\s*"


def store_config(tmp_path: Path, tenants: tuple[TenantConfig, ...] = ()) -> StoreConfig:
    return StoreConfig(
        g2=PinnedTierConfig(256 * SLOT, pin="never", segment_prefix="kvstore-clitest"),
        g3=LmdbTierConfig(str(tmp_path / "g3"), 64 << 20),
        engine=EngineConfig(reaper_interval_s=0.05),
        server=ServerConfig(listen="127.0.0.1:0", shutdown_grace_s=0.5),
        tenants=tenants,
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[KVStoreServer]:
    s = KVStoreServer(store_config(tmp_path))
    await s.start()
    yield s
    await s.stop(0)


def target(server: KVStoreServer) -> str:
    return f"127.0.0.1:{server.port}"


def tokens_of(seed: int, num_tokens: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, num_tokens)]


def kv_of(num_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_layers, 2, num_tokens, SPEC.num_kv_heads, SPEC.head_dim)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


async def put(server: KVStoreServer, tokens: list[int], seed: int = 0) -> list[BlockHash]:
    """Store a prompt (write-through copies included) and return its block hashes."""
    async with AsyncClient(target(server)) as client:
        result = await client.put(SPEC, tokens, kv_of(len(tokens), seed), durable=True)
    # No tenants: the salt is empty and the server's names are the plain chain hashes.
    assert result.hashes == block_hashes(SPEC, tokens)
    return result.hashes


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.rc == 0, self.err
        return json.loads(self.out)


def cli_env(server: KVStoreServer | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(COLUMNS="80", PYTHONIOENCODING="utf-8")
    if server is not None:
        env["KVSTORE_SERVER"] = target(server)
    env.update(extra)
    return env


async def start(server: KVStoreServer | None, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvstore.cli", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(server, **env),
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process, timeout_s: float = 60) -> Run:
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    run = Run(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in run.err, run.err
    return run


async def kvstore(server: KVStoreServer | None, *args: str, **env: str) -> Run:
    return await finish(await start(server, *args, **env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- tiers, ls, inspect ----------------------------------------------------------------------------


async def test_tiers_shows_each_tier_and_the_counters(server: KVStoreServer) -> None:
    tokens = tokens_of(1, 6 * BT)
    await put(server, tokens)
    async with AsyncClient(target(server)) as client:
        _, hit = await client.get_prefix(SPEC, tokens)
    assert hit == 6 * BT

    table, status = await asyncio.gather(
        kvstore(server, "tiers"), kvstore(server, "status", "--json")
    )
    assert table.rc == 0, table.err
    assert re.search(rf"G2{BAR}6{BAR}", table.out), table.out
    assert re.search(rf"G3{BAR}6{BAR}", table.out), table.out
    assert re.search(rf"fragmentation{BAR}largest free", table.out), table.out
    for counter in ("lookups", "promotions", "demotions", "evictions", "corrupt", "leases"):
        assert re.search(rf"{counter}{BAR}\d+", table.out), counter

    doc = status.json()
    assert doc["num_blocks"] == 6
    tiers = {t["tier"]: t for t in doc["tiers"]}
    assert tiers["G2"]["num_blocks"] == tiers["G3"]["num_blocks"] == 6
    assert tiers["G2"]["used_bytes"] == 6 * (HEADER_BYTES + SPEC.block_nbytes)
    assert tiers["G2"]["capacity_bytes"] == 256 * SLOT
    g2 = tiers["G2"]
    # G2 allocates by bytes: six blocks rounded up to 256 bytes each, the rest one free extent.
    assert g2["allocated_bytes"] == 6 * -(-(HEADER_BYTES + SPEC.block_nbytes) // 256) * 256
    assert g2["largest_free_bytes"] == g2["capacity_bytes"] - g2["allocated_bytes"]
    assert g2["fragmentation"] == 0.0
    assert g2["free_extents"] == 1
    assert tiers["G3"]["allocated_bytes"] == 0  # not a slab tier
    assert g2["num_hits"] >= 6
    assert g2["hit_rate"] == pytest.approx(g2["num_hits"] / (g2["num_hits"] + g2["num_misses"]))
    assert doc["counters"]["lookups"] >= 1
    assert doc["queue_depth"] == 0


async def test_ls_lists_blocks_and_inspect_shows_the_header(server: KVStoreServer) -> None:
    hashes = await put(server, tokens_of(2, 4 * BT))
    missing = "ab" * 16
    listing, page, table, absent, bad = await asyncio.gather(
        kvstore(server, "ls"),
        kvstore(server, "ls", "--tier", "g3", "--limit", "2", "--json"),
        kvstore(server, "inspect", hashes[1].hex()),
        kvstore(server, "inspect", missing),
        kvstore(server, "inspect", "not-a-hash"),
    )

    assert listing.rc == 0, listing.err
    for h in hashes:  # whole, at 80 columns
        assert h.hex() in listing.out
    assert "4 blocks" in listing.out

    doc = page.json()
    assert doc["truncated"] is True
    assert [b["hash"] for b in doc["blocks"]] == sorted(h.hex() for h in hashes)[:2]
    for block in doc["blocks"]:
        assert set(block["tiers"]) == {"G2", "G3"}
        assert block["nbytes"] == HEADER_BYTES + SPEC.block_nbytes
        i = [h.hex() for h in hashes].index(block["hash"])
        assert block["parent"] == (hashes[i - 1].hex() if i else block["parent"])

    assert table.rc == 0, table.err
    assert re.search(rf"dtype{BAR}bfloat16", table.out), table.out
    assert re.search(rf"shape{BAR}\[2, 2, 16, 2, 16\]", table.out)
    assert re.search(rf"codec{BAR}RAW", table.out)
    assert re.search(rf"raw xxh3{BAR}[0-9a-f]{{16}}", table.out)
    assert re.search(rf"parent{BAR}{hashes[0].hex()}", table.out)

    assert absent.rc == 1
    assert f"block {missing} is not stored on {target(server)}" in absent.err
    assert bad.rc == 2
    assert "is not a block hash" in bad.err


# -- lookup ----------------------------------------------------------------------------------------


async def test_lookup_shows_the_block_map_with_holes(server: KVStoreServer, tmp_path: Path) -> None:
    tokens = tokens_of(3, 5 * BT + 3)
    hashes = await put(server, tokens)
    async with AsyncClient(target(server)) as client:
        assert await client.evict(SPEC, [hashes[2]]) == 1  # from every tier: a hole
    text = "Blocks of bytes: every byte of this text is one token id. " * 2
    text_hashes = await put(server, list(text.encode()))
    (tmp_path / "tokens.txt").write_text(", ".join(map(str, tokens[:40])) + "\n" +
                                         " ".join(map(str, tokens[40:])))  # fmt: skip
    np.save(tmp_path / "tokens.npy", np.array(tokens, dtype=np.int32))
    (tmp_path / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    (tmp_path / "prompt.txt").write_text(text)

    table, doc_run, from_text = await asyncio.gather(
        kvstore(server, "lookup", "--tokens-file", str(tmp_path / "tokens.txt"), *SPEC_ARGS),
        kvstore(server, "lookup", "--json", "--model-spec", str(tmp_path / "spec.json"),
                "--tokens-file", str(tmp_path / "tokens.npy")),
        kvstore(server, "lookup", "--model-spec", str(tmp_path / "spec.json"),
                "--text-file", str(tmp_path / "prompt.txt")),
    )  # fmt: skip

    assert table.rc == 0, table.err
    rows = {int(m[1]): m[0] for m in re.finditer(r"^\s*(\d)\s+\d+-\d+\s.*$", table.out, re.M)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert "missing" in rows[2]
    assert "HOLE" in rows[2]
    for i in (0, 1, 3, 4):
        assert "G2" in rows[i]
        assert "HOLE" not in rows[i]
        assert hashes[i].hex() in rows[i]
    assert "hit 32 of 83 tokens (2 of 5 full blocks)" in table.out
    assert "1 hole (block 2)" in table.out

    doc = doc_run.json()
    assert (doc["num_tokens"], doc["hit_blocks"], doc["hit_tokens"]) == (83, 2, 32)
    assert doc["holes"] == [2]
    assert [b["tier"] for b in doc["blocks"]] == ["G2", "G2", None, "G2", "G2"]
    assert [b["hash"] for b in doc["blocks"]] == [h.hex() for h in hashes]

    assert from_text.rc == 0, from_text.err
    n = len(text_hashes)
    assert f"hit {n * BT} of {len(text.encode())} tokens ({n} of {n} full blocks)" in from_text.out
    assert "no holes" in from_text.out


# -- pin, unpin, evict, flush ----------------------------------------------------------------------


async def test_pin_evict_unpin_and_flush_change_the_store(server: KVStoreServer) -> None:
    tokens = tokens_of(4, 3 * BT)
    h0, h1, h2 = (h.hex() for h in await put(server, tokens))
    async with AsyncClient(target(server)) as client:

        async def tiers() -> list[str | None]:
            return (await client.lookup(SPEC, tokens)).tiers

        async def pinned(h: str) -> bool:
            info = await client.inspect(bytes.fromhex(h))
            assert info is not None
            return info.pinned

        pin, refused, demote = await asyncio.gather(
            kvstore(server, "pin", h0, h1, "--ttl", "60", *SPEC_ARGS),
            kvstore(server, "flush"),
            kvstore(server, "evict", h2, "--tier", "G2", *SPEC_ARGS),
        )
        assert pin.rc == 0, pin.err
        assert pin.out.strip() == "pinned 2 of 2 blocks for 60 s"
        assert await pinned(h0)
        assert await pinned(h1)
        assert refused.rc == 2
        assert "add --yes" in refused.err
        assert demote.out.strip() == "evicted 1 of 1 blocks from G2"
        assert await tiers() == ["G2", "G2", "G3"]  # nothing flushed; h2 demoted to G3

        evict = await kvstore(server, "evict", h0, h2, *SPEC_ARGS)  # h0 is pinned: it stays
        assert evict.rc == 0, evict.err
        assert evict.out.startswith("evicted 1 of 2 blocks from every tier")
        assert await tiers() == ["G2", "G2", None]

        unpin = await kvstore(server, "unpin", h0, h1, "--json", *SPEC_ARGS)
        assert unpin.json() == {"unpinned": 2, "requested": 2}
        assert not await pinned(h0)
        assert not await pinned(h1)

        flush = await kvstore(server, "flush", "--tier", "G2", "--yes", "--json")
        assert flush.json() == {"flushed": 2, "tier": "G2"}
        assert await tiers() == ["G3", "G3", None]
        usage = {t.tier: t.num_blocks for t in (await client.stats()).tiers}
        assert usage == {"G2": 0, "G3": 2}


async def test_cli_details_an_operator_trips_over(server: KVStoreServer, tmp_path: Path) -> None:
    tokens = tokens_of(8, 2 * BT)
    h0, h1 = (h.hex() for h in await put(server, tokens))
    (tmp_path / "object.json").write_text(json.dumps({"prompt": tokens}))
    (tmp_path / "ids.json").write_text(json.dumps({"input_ids": [tokens]}))
    (tmp_path / "words.txt").write_text("12 34 five 6")
    bad_tier, unpin, bad_json, ids, words, listing = await asyncio.gather(
        kvstore(server, "ls", "--tier", "G9"),
        kvstore(server, "unpin", h0, *SPEC_ARGS),
        kvstore(server, "lookup", "--tokens-file", str(tmp_path / "object.json"), *SPEC_ARGS),
        kvstore(server, "lookup", "--tokens-file", str(tmp_path / "ids.json"), *SPEC_ARGS),
        kvstore(server, "lookup", "--tokens-file", str(tmp_path / "words.txt"), *SPEC_ARGS),
        kvstore(server, "pin", h1, *SPEC_ARGS),
    )
    assert bad_tier.rc == 2
    assert "'G9' is not a tier; use one of G1, G2, G3, G4" in bad_tier.err
    # A stored block that was not pinned: the message must not claim it is not stored.
    assert unpin.rc == 0, unpin.err
    assert unpin.out.strip() == (
        "unpinned 0 of 1 blocks (the others were not pinned, or are not stored in this namespace)"
    )
    assert bad_json.rc == 2
    assert 'a JSON object without an "input_ids" or "tokens" array' in bad_json.err
    assert "invalid literal" not in bad_json.err
    assert ids.rc == 0, ids.err
    assert "hit 32 of 32 tokens" in ids.out
    assert words.rc == 2
    assert "word 3 is 'five', not an integer" in words.err
    assert listing.rc == 0, listing.err

    # Piped, a table is whole: tab-separated cells, nothing cut to fit 80 columns.
    ls = await kvstore(server, "ls", COLUMNS="40")
    assert ls.rc == 0, ls.err
    lines = ls.out.splitlines()
    assert lines[0] == "# 2 blocks"
    assert lines[1].split("\t") == ["hash", "parent", "tiers", "size", "hits", "held"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[2:]}
    size = f"{(HEADER_BYTES + SPEC.block_nbytes) / 1024:.1f} KiB"
    assert rows[h1] == [h1, h0[:8], "G2,G3", size, "0", "pinned"]
    assert "…" not in ls.out


# -- events ----------------------------------------------------------------------------------------


async def test_events_stop_after_count_and_on_ctrl_c(server: KVStoreServer) -> None:
    await put(server, tokens_of(5, 2 * BT))
    after = server.engine.events.last_seq
    tail = await start(server, "events", "--after", str(after), "--count", "3")
    snapshot = await start(server, "events", "--snapshot", "--count", "2", "--json")
    endless = await start(server, "events", "--snapshot")
    new = await put(server, tokens_of(6, 2 * BT))

    # Connected once it printed the first snapshot line; then Ctrl-C ends it cleanly.
    assert endless.stdout is not None
    first = await asyncio.wait_for(endless.stdout.readline(), 30)
    assert b"stored*" in first
    endless.send_signal(signal.SIGINT)
    stopped = await finish(endless)
    assert stopped.rc == 0, stopped.err

    lines = (await finish(tail)).out.splitlines()
    assert len(lines) == 3
    seqs = [int(line.split()[0]) for line in lines]
    assert seqs == list(range(after + 1, after + 4))
    stored = [line.split() for line in lines if line.split()[1] == "stored"]
    assert [(s[2], s[4]) for s in stored[:2]] == [("G2", h.hex()) for h in new]

    docs = [json.loads(line) for line in (await finish(snapshot)).out.splitlines()]
    assert len(docs) == 2
    assert all(d["snapshot"] and d["kind"] == "stored" for d in docs)


async def test_events_say_why_a_block_was_removed(server: KVStoreServer) -> None:
    hashes = await put(server, tokens_of(8, 2 * BT))
    after = server.engine.events.last_seq
    tail = await start(server, "events", "--after", str(after), "--count", "1")
    as_json = await start(server, "events", "--after", str(after), "--count", "1", "--json")
    async with AsyncClient(target(server)) as client:
        assert await client.evict(SPEC, [hashes[1]], tier="G2") == 1
    line = (await finish(tail)).out.split()
    assert line[1:3] == ["removed", "G2"]
    assert line[-2:] == [hashes[1].hex(), "request"]
    doc = json.loads((await finish(as_json)).out)
    assert (doc["kind"], doc["hash"], doc["reason"]) == ("removed", hashes[1].hex(), "request")


# -- bench -----------------------------------------------------------------------------------------


BENCH = ("bench", "--duration", "1", "--concurrency", "2", "--prompt-tokens", "96",
         "--shared-prefix-tokens", "48", *SPEC_ARGS)  # fmt: skip


async def test_bench_runs_clean_and_catches_wrong_blocks(server: KVStoreServer) -> None:
    # Blocks with other bytes, planted under the shared prefix of the run with seed 7: the
    # bench must notice every fetch of them.
    planted = await put(server, _shared_prefix(7, 48), seed=99)
    # Pinned: the other two runs fill G2, and a planted block evicted from G2 would be replaced
    # there by the seed-7 run's own (right) put, which the fetches then find first.
    async with AsyncClient(target(server)) as client:
        assert await client.pin(SPEC, planted) == len(planted)
    table, doc_run, wrong = await asyncio.gather(
        kvstore(server, *BENCH, "--seed", "1"),
        kvstore(server, *BENCH, "--seed", "2", "--json"),
        kvstore(server, *BENCH, "--seed", "7", "--json"),
    )
    assert table.rc == 0, table.err
    assert re.search(rf"fetch{BAR}\d+{BAR}0{BAR}", table.out), table.out
    assert re.search(rf"put{BAR}\d+{BAR}0{BAR}", table.out), table.out
    assert "0 blocks differed" in table.out

    doc = doc_run.json()
    assert doc["errors"] == doc["mismatched_blocks"] == 0
    assert doc["by_op"]["fetch"]["count"] > 0
    assert doc["by_op"]["put"]["count"] > 0
    assert doc["by_op"]["fetch"]["p50_ms"] <= doc["by_op"]["fetch"]["p99_ms"]
    assert doc["by_op"]["put"]["gb_per_s"] > 0
    assert 0 < doc["hit_rate"] <= 1

    assert wrong.rc == 1
    assert json.loads(wrong.out)["mismatched_blocks"] > 0
    assert "blocks differed" in wrong.err


# -- failures --------------------------------------------------------------------------------------


async def test_unreachable_server_is_one_clear_line() -> None:
    address = f"127.0.0.1:{free_port()}"
    tiers, events = await asyncio.gather(
        kvstore(None, "tiers", "--server", address),
        kvstore(None, "events", KVSTORE_SERVER=address),
    )
    for run in (tiers, events):
        assert run.rc == 1
        assert run.out == ""
        (line,) = run.err.strip().splitlines()
        assert line.startswith(f"Error: cannot reach kvstore at {address}: ")


async def test_tokens_and_admin_rights(tmp_path: Path) -> None:
    tenants = (
        TenantConfig("admin", ADMIN_TOKEN, salt="admin-salt", admin=True),
        TenantConfig("alice", ALICE_TOKEN, salt="alice-salt"),
    )
    server = KVStoreServer(store_config(tmp_path, tenants))
    await server.start()
    try:
        admin, alice, stranger = await asyncio.gather(
            kvstore(server, "tiers", "--json", KVSTORE_TOKEN=ADMIN_TOKEN),
            kvstore(server, "ls", KVSTORE_TOKEN=ALICE_TOKEN),
            kvstore(server, "tiers", "--token", "no-such-token-0123456789"),
        )
    finally:
        await server.stop(0)
    assert {t["tier"] for t in admin.json()["tiers"]} == {"G2", "G3"}
    assert alice.rc == 1
    assert "permission denied" in alice.err
    assert "admin" in alice.err
    assert stranger.rc == 1
    assert "not authenticated" in stranger.err
