"""``kvstore inspect`` with the short hash prefixes an operator copies from ``kvstore ls``, and
``kvstore tiers``'s counters: the table and ``--json`` show the same ones under the same names.
Against a real server (``KVStoreServer`` in this process, as in test_cli_client.py)."""

from __future__ import annotations

import asyncio
import re

import test_cli_client
from test_cli_client import (
    BAR,
    BT,
    SPEC,
    kvstore,
    put,
    target,
    tokens_of,
)

from client import AsyncClient
from kvstore.core.keys import BlockHash, block_hashes
from kvstore.service.server import KVStoreServer

server = test_cli_client.server  # the fixture: a KVStoreServer on a free port, G2 + G3


def _shortest_unique(hashes: list[BlockHash], digits: int) -> dict[str, str]:
    """Prefixes of ``digits`` hex digits: the unique ones (prefix -> hash)."""
    by_prefix: dict[str, list[str]] = {}
    for h in hashes:
        by_prefix.setdefault(h.hex()[:digits], []).append(h.hex())
    return {p: found[0] for p, found in by_prefix.items() if len(found) == 1}


async def test_inspect_takes_a_unique_prefix(server: KVStoreServer) -> None:
    hashes = await put(server, tokens_of(21, 6 * BT))
    unique = _shortest_unique(hashes, 8)
    prefix, whole = next(iter(unique.items()))
    short, upper, as_json = await asyncio.gather(
        kvstore(server, "inspect", prefix),
        kvstore(server, "inspect", whole[:6].upper()),
        kvstore(server, "inspect", prefix, "--json"),
    )
    assert short.rc == 0, short.err
    assert f"block {whole}" in short.out
    assert re.search(rf"dtype{BAR}bfloat16", short.out)
    if whole[:6] in _shortest_unique(hashes, 6):
        assert upper.rc == 0, upper.err
        assert f"block {whole}" in upper.out
    assert as_json.json()["hash"] == whole


def _two_prompts_sharing_a_prefix(digits: int) -> tuple[list[int], list[int], str]:
    """Two one-block prompts whose block hashes share their first ``digits`` hex digits (found by
    trying seeds: about 300 for 4 digits, by the birthday bound), and that prefix."""
    seen: dict[str, list[int]] = {}
    for seed in range(100_000):
        tokens = tokens_of(1000 + seed, BT)
        prefix = block_hashes(SPEC, tokens)[0].hex()[:digits]
        if prefix in seen:
            return seen[prefix], tokens, prefix
        seen[prefix] = tokens
    raise AssertionError("no two prompts share a prefix")


async def test_an_ambiguous_or_unknown_prefix_is_a_clear_error(server: KVStoreServer) -> None:
    first, second, prefix = _two_prompts_sharing_a_prefix(4)
    shared = [*(await put(server, first)), *(await put(server, second))]
    stored = {h.hex() for h in shared}
    absent = next(
        f"{n:04x}" for n in range(1 << 16) if not any(s.startswith(f"{n:04x}") for s in stored)
    )
    ambiguous, longer, missing, too_short, not_hex = await asyncio.gather(
        kvstore(server, "inspect", prefix),
        kvstore(server, "inspect", shared[1].hex()[:12]),
        kvstore(server, "inspect", absent),
        kvstore(server, "inspect", "abc"),
        kvstore(server, "inspect", "xyz0"),
    )
    assert ambiguous.rc == 1
    assert f"{prefix} is ambiguous" in ambiguous.err
    for h in shared:
        assert h.hex() in ambiguous.err
    assert longer.rc == 0, longer.err  # more digits settle it
    assert f"block {shared[1].hex()}" in longer.out
    assert missing.rc == 1
    assert f"no block whose hash starts with {absent} is stored on {target(server)}" in missing.err
    assert too_short.rc == 2
    assert "give at least 4 hex digits" in too_short.err
    assert not_hex.rc == 2
    assert "is not a block hash" in not_hex.err
    for run in (ambiguous, missing, too_short, not_hex):
        assert "Traceback" not in run.err


def _table_counters(out: str) -> dict[str, int]:
    """The rows of the ``counters`` table in ``kvstore tiers``'s piped output."""
    lines = out.splitlines()
    start = lines.index("# counters") + 2  # the title, then the header line
    rows: dict[str, int] = {}
    for line in lines[start:]:
        if line.startswith("#"):
            break
        name, value = line.split("\t")
        rows[name] = int(value)
    return rows


async def test_tiers_json_holds_the_counters_the_table_shows(server: KVStoreServer) -> None:
    tokens = tokens_of(24, 4 * BT)
    await put(server, tokens)
    async with AsyncClient(target(server)) as client:
        await client.get_prefix(SPEC, tokens)
    table, as_json = await asyncio.gather(
        kvstore(server, "tiers"), kvstore(server, "tiers", "--json")
    )
    assert table.rc == 0, table.err
    shown = _table_counters(table.out)
    doc = as_json.json()
    assert doc["counters"] == shown
    # One naming style: snake_case names, the main counters first, always there for an admin.
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in shown), shown
    assert list(shown)[:8] == [
        "lookups", "promotions", "demotions", "evictions", "corrupt", "leases",
        "leases_held", "queue_depth",
    ]  # fmt: skip
    assert shown["lookups"] >= 1
    assert shown["queue_depth"] == doc["queue_depth"]
    assert shown["leases_held"] == doc["num_leases"]
