"""Lookup on the wire: the packed reply (``packed_reply``) and the repeated one say the same, the
client reads both (a server that predates the packed fields sends the repeated ones), a
malformed packed reply is refused, and the blocks a Lookup finds are touched after the reply, in
the order of the lookups. A real server in-process on port 0 (G2 only), spoken to with the raw
generated stub and with the ``AsyncClient``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from client import AsyncClient
from client.convert import lookup_of
from kvstore.config import StoreConfig
from kvstore.core.errors import CorruptBlockError, InvalidTokenError
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.service.server import KVStoreServer, ServerConfig
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.convert import prompt_of
from tiers.pinned_memory import PinnedTierConfig

SPEC = ModelSpec(
    "lookup-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
)
G2 = pb.TIER_G2
MISSING = pb.TIER_UNSPECIFIED


@asynccontextmanager
async def serving(
    **server: Any,
) -> AsyncIterator[tuple[KVStoreServer, AsyncClient, pb_grpc.KVStoreStub]]:
    config = StoreConfig(
        g2=PinnedTierConfig(8 << 20, pin="never", segment_prefix="kvstore-ltest"),
        g3=None,
        server=ServerConfig(listen="127.0.0.1:0", **server),
    )
    kv_server = KVStoreServer(config)
    port = await kv_server.start()
    try:
        async with (
            AsyncClient(f"127.0.0.1:{port}", same_host=False) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            yield kv_server, client, pb_grpc.KVStoreStub(channel)
    finally:
        await kv_server.stop()


def tokens_of(num_tokens: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, num_tokens)]


def kv_of(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 2, num_tokens, 2, 8), generator=g).to(torch.float16)


async def test_packed_and_repeated_replies_agree_holes_included() -> None:
    tokens = tokens_of(6 * 4 + 2, seed=1)  # six full blocks and a partial one
    expected = block_hashes(SPEC, tokens)
    async with serving() as (_, client, stub):
        assert (await client.put(SPEC, tokens, kv_of(len(tokens), seed=1))).stored == 6
        assert await client.evict(SPEC, [expected[1], expected[3]]) == 2
        prompt = prompt_of(SPEC, tokens)
        packed = await stub.Lookup(pb.LookupRequest(prompt=prompt, packed_reply=True))
        plain = await stub.Lookup(pb.LookupRequest(prompt=prompt))
        via_client = await client.lookup(SPEC, tokens)

    # Each form fills its own fields only.
    assert (list(packed.block_hashes), list(packed.tiers)) == ([], [])
    assert (plain.packed_hashes, plain.packed_tiers) == (b"", b"")
    assert packed.packed_hashes == b"".join(expected)
    assert packed.packed_tiers == bytes([G2, MISSING, G2, MISSING, G2, G2])
    assert list(plain.block_hashes) == expected
    assert list(plain.tiers) == [G2, MISSING, G2, MISSING, G2, G2]
    for reply in (packed, plain):
        assert (reply.hit_blocks, reply.hit_tokens, reply.block_tokens) == (1, 4, 4)
        assert list(reply.holes) == [1, 3]
    assert lookup_of(packed) == lookup_of(plain) == via_client
    assert via_client.hashes == expected
    assert via_client.tiers == ["G2", None, "G2", None, "G2", "G2"]
    assert (via_client.hit_blocks, via_client.holes) == (1, [1, 3])


async def test_full_hit_partial_hit_and_no_block_at_all() -> None:
    tokens = tokens_of(5 * 4, seed=2)
    expected = block_hashes(SPEC, tokens)
    async with serving() as (_, client, _stub):
        await client.put(SPEC, tokens[:12], kv_of(12, seed=2))
        full = await client.lookup(SPEC, tokens[:12])
        partial = await client.lookup(SPEC, tokens)
        nothing = await client.lookup(SPEC, tokens[:3])  # shorter than one block
    assert (full.hashes, full.tiers, full.hit_blocks, full.holes) == (
        expected[:3], ["G2"] * 3, 3, []
    )
    assert (partial.tiers, partial.hit_tokens, partial.holes) == (
        ["G2", "G2", "G2", None, None], 12, []
    )
    assert (nothing.hashes, nothing.tiers, nothing.hit_blocks, nothing.holes) == ([], [], 0, [])


async def test_huge_lookups_off_the_event_loop_and_past_one_index_slice() -> None:
    spec = ModelSpec("lookup-huge", 1, 1, 8, "float16", block_tokens=1)
    tokens = tokens_of(16_500, seed=3)  # more blocks than the engine walks between two yields
    async with serving(heavy_prompt_tokens=64) as (_, client, _stub):
        await client.put(spec, tokens[:100], torch.ones((1, 2, 100, 1, 8), dtype=torch.float16))
        found = await client.lookup(spec, tokens)
    assert found.hashes == block_hashes(spec, tokens)
    assert found.tiers == ["G2"] * 100 + [None] * (len(tokens) - 100)
    assert (found.hit_blocks, found.holes) == (100, [])


def test_a_malformed_packed_reply_is_refused_and_unknown_tiers_read_as_missing() -> None:
    with pytest.raises(CorruptBlockError, match="20 bytes of hashes for 1 blocks"):
        lookup_of(pb.LookupResponse(packed_hashes=bytes(20), packed_tiers=bytes([G2])))
    with pytest.raises(CorruptBlockError, match="0 bytes of hashes for 2 blocks"):
        lookup_of(pb.LookupResponse(packed_tiers=bytes([G2, G2])))
    # A tier value from a newer server reads as missing, as in the repeated form.
    found = lookup_of(
        pb.LookupResponse(packed_hashes=b"a" * 16 + b"\0" * 16, packed_tiers=bytes([G2, 9]))
    )
    assert found.hashes == [b"a" * 16, b"\0" * 16]
    assert found.tiers == ["G2", None]


async def test_lookups_touch_what_they_find_in_the_order_they_came() -> None:
    a, b = tokens_of(3 * 4, seed=4), tokens_of(3 * 4, seed=5)
    ha, hb = block_hashes(SPEC, a), block_hashes(SPEC, b)
    async with serving() as (server, client, _stub):
        await client.put(SPEC, a, kv_of(12, seed=4))
        await client.put(SPEC, b, kv_of(12, seed=5))
        index = server.engine.index
        await client.lookup(SPEC, a)
        await asyncio.sleep(0.05)
        # Touched last block first: the first block of the prompt is the most recent.
        assert list(index.keys_in("G2"))[-3:] == ha[::-1]
        # Within one touch window: A, then B, then A again; A's touch lands last, once.
        await client.lookup(SPEC, a)
        await client.lookup(SPEC, b)
        await client.lookup(SPEC, a)
        await asyncio.sleep(0.05)
        assert list(index.keys_in("G2")) == hb[::-1] + ha[::-1]


async def test_generated_request_ids_differ_from_call_to_call() -> None:
    async with serving() as (_, _client, stub):
        ids = []
        for _ in range(3):
            call = stub.Lookup(pb.LookupRequest(prompt=prompt_of(SPEC, tokens_of(8, seed=6))))
            await call
            ids.append(dict(await call.trailing_metadata())["x-request-id"])
    assert len(set(ids)) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_unsigned_token_arrays_hash_as_their_values_and_bad_ones_are_refused() -> None:
    tokens = tokens_of(16, seed=7)
    expected = block_hashes(SPEC, tokens)
    small = [t % 200 for t in tokens]
    for dtype in ("<u4", ">u4", "uint64", "int64"):
        assert block_hashes(SPEC, np.array(tokens, dtype=dtype)) == expected
    for dtype in ("uint8", "uint16"):
        assert block_hashes(SPEC, np.array(small, dtype=dtype)) == block_hashes(SPEC, small)
    with pytest.raises(InvalidTokenError, match="token 3"):
        block_hashes(SPEC, np.array([1, 2, 3, 2**32], dtype="uint64"))
    with pytest.raises(InvalidTokenError, match="token 1"):
        block_hashes(SPEC, np.array([1, -1], dtype="int32"))
