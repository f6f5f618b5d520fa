"""The same-host protocol against a real server (issue J, items 1-4): server-owned sealed memfd
segments, handed to one tenant by descriptor with a one-time ticket.

What was broken before, and is tested here: a same-host Fetch handed out the server's whole G2
segment (every tenant's blocks); a Put could name any shared-memory segment on the host for the
server to open; truncating a segment under a same-host Put killed the server with SIGBUS; and a
corrupt G2 block reached the client on the same-host path.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_server import (
    BIG,
    SPEC,
    bearer,
    expect_status,
    fetch,
    payloads,
    prompt,
    put,
    running,
    store_config,
    tokens_of,
)

from client import AsyncClient
from client.channel import MiB
from client.convert import BlockSource, prompt_of
from client.fetch import fetch_into_segment, fetch_request, fetch_shared
from client.same_host import Region, put_into
from kvstore.core.block_format import HEADER_BYTES, torch_dtype
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.service.auth import TenantConfig
from kvstore.service.segments import SegmentRegistry
from kvstore.service.server import SERVICE_NAME as SERVICE
from kvstore.service.server import ServerConfig
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.segments import receive_segment_fd

StatusCode = grpc.StatusCode
NBYTES = SPEC.block_nbytes
TOKEN_A, TOKEN_B = "token-of-tenant-a-" + "x" * 16, "token-of-tenant-b-" + "y" * 16
A, B = bearer(TOKEN_A), bearer(TOKEN_B)


def tenant_config(tmp_path: Path, **server: Any) -> Any:
    return store_config(
        tmp_path,
        tenants=[TenantConfig("a", TOKEN_A), TenantConfig("b", TOKEN_B)],
        server=ServerConfig(
            listen="127.0.0.1:0", secret="a-server-secret-of-some-length", **server
        ),
    )


@contextmanager
def mapped(reply: Any) -> Iterator[mmap.mmap]:
    """The client's side of OpenSegment: receive the descriptor with the ticket and map it."""
    fd = receive_segment_fd(reply.socket, reply.ticket)
    try:
        mapping = mmap.mmap(fd, reply.size_bytes)
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        mapping.close()


@asynccontextmanager
async def segment(
    stub: pb_grpc.KVStoreStub, size: int, metadata: Any = None
) -> AsyncIterator[tuple[int, mmap.mmap]]:
    reply = await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=size), metadata=metadata)
    assert reply.size_bytes == size
    try:
        with await asyncio.to_thread(lambda: mapped(reply)) as mapping:
            yield reply.segment_id, mapping
    finally:
        close = pb.CloseSegmentRequest(segment_id=reply.segment_id)
        await stub.CloseSegment(close, metadata=metadata)


def slots_of(mapping: mmap.mmap, header: pb.FetchHeader) -> list[bytes]:
    return [bytes(mapping[s.offset : s.offset + s.length]) for s in header.slots]


async def fetch_into(
    stub: pb_grpc.KVStoreStub, p: pb.Prompt, segment_id: int, metadata: Any = None, **kw: Any
) -> pb.FetchHeader:
    request = pb.FetchRequest(prompt=p, segment_id=segment_id, **kw)
    messages = [m async for m in stub.Fetch(request, metadata=metadata)]
    assert len(messages) == 1  # the slots travel in the header: one message per reply
    assert messages[0].WhichOneof("msg") == "header"
    return messages[0].header


def slot_puts(p: pb.Prompt, segment_id: int, offsets: list[int]) -> list[pb.PutRequest]:
    return [pb.PutRequest(header=pb.PutHeader(prompt=p, segment_id=segment_id))] + [
        pb.PutRequest(slot=pb.SlotRef(block_index=i, offset=off, length=NBYTES))
        for i, off in enumerate(offsets)
    ]


# -- fetch into the caller's own segment --------------------------------------------------------


async def test_fetch_copies_the_blocks_into_the_callers_segment(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=4)
        p = prompt(tokens)
        blocks = payloads(3, seed=4)
        await put(stub, p, blocks)
        async with segment(stub, 100 + 3 * NBYTES) as (sid, mapping):
            header = await fetch_into(stub, p, sid, segment_offset=100)
            assert list(header.block_hashes) == block_hashes(SPEC, tokens)
            assert [(s.block_index, s.offset) for s in header.slots] == [
                (i, 100 + i * NBYTES) for i in range(3)
            ]
            assert slots_of(mapping, header) == blocks
            # Copied, not lent: no lease is left behind, and the blocks may go at once.
            assert (await server.engine.stats()).num_leases == 0
            assert (await stub.Evict(pb.BlocksRequest(block_hashes=header.block_hashes))).count == 3

            # As many as fit: a segment of 2.5 blocks from offset 0 takes two.
            await put(stub, p, blocks)
        async with segment(stub, 2 * NBYTES + NBYTES // 2) as (sid, mapping):
            header = await fetch_into(stub, p, sid)
            assert slots_of(mapping, header) == blocks[:2]
            await expect_status(
                stub.Fetch(pb.FetchRequest(prompt=p, segment_id=sid, segment_offset=3 * NBYTES)),
                StatusCode.INVALID_ARGUMENT,
                "outside",
            )


async def test_fetch_into_a_segment_reads_lower_tiers(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(2 * 4, seed=5)
        p = prompt(tokens)
        blocks = payloads(2, seed=5)
        await put(stub, p, blocks)
        await server.engine.drain()
        hashes = block_hashes(SPEC, tokens)
        await stub.Evict(pb.BlocksRequest(block_hashes=hashes[::-1], tier=pb.TIER_G2))
        found = await stub.Lookup(pb.LookupRequest(prompt=p))
        assert list(found.tiers) == [pb.TIER_G3] * 2
        async with segment(stub, 2 * NBYTES) as (sid, mapping):
            header = await fetch_into(stub, p, sid)
            assert slots_of(mapping, header) == blocks


def flip_g2_byte(server: Any, key: bytes, at: int, mask: int) -> None:
    """Corrupt G2's copy of block ``key`` in place: byte ``at`` XOR ``mask``."""
    view = server.engine.tier("G2", SPEC.fingerprint).view_of(key)
    view[at] ^= mask
    del view


async def test_a_corrupt_g2_block_never_reaches_the_same_host_client(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=8)
        blocks = payloads(3, seed=8)
        await put(stub, prompt(tokens), blocks, durable=True)  # a good copy in G3
        hashes = block_hashes(SPEC, tokens)
        flip_g2_byte(server, hashes[1], HEADER_BYTES + 5, 0x10)  # one payload byte in G2
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            kv, n = await client.get_prefix(SPEC, tokens)
        assert n == 12
        got = [
            kv[:, :, 4 * i : 4 * i + 4].contiguous().view(torch.uint8).numpy().tobytes()
            for i in range(3)
        ]
        assert got == blocks  # block 1 came from G3; the flipped copy was dropped
        assert (await server.engine.stats()).counters["corrupt"] == 1


def layer_major(blocks: list[bytes]) -> bytes:
    """Block payloads ``[layers, 2, block_tokens, heads, dim]`` laid out as one tensor ``[layers,
    2, tokens, heads, dim]``: what a layer-by-layer fetch leaves in the segment."""
    piece = NBYTES // (2 * SPEC.num_layers)
    return b"".join(
        block[row * piece : (row + 1) * piece]
        for row in range(2 * SPEC.num_layers)
        for block in blocks
    )


def kv_of(blocks: list[bytes]) -> torch.Tensor:
    tokens = len(blocks) * SPEC.block_tokens
    raw = bytearray(layer_major(blocks))
    shape = (SPEC.num_layers, 2, tokens, SPEC.num_kv_heads, SPEC.head_dim)
    return torch.frombuffer(raw, dtype=torch.float16).view(shape).clone()


async def test_fetch_by_layer_sends_each_layer_as_it_is_copied(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=11)
        p = prompt(tokens)
        blocks = payloads(3, seed=11)
        await put(stub, p, blocks)
        async with segment(stub, 64 + 3 * NBYTES) as (sid, mapping):
            request = pb.FetchRequest(prompt=p, segment_id=sid, segment_offset=64, by_layer=True)
            messages = [m async for m in stub.Fetch(request)]
            kinds = [m.WhichOneof("msg") for m in messages]
            assert kinds == ["header"] + ["progress"] * SPEC.num_layers
            assert messages[0].header.by_layer
            assert not messages[0].header.slots
            assert list(messages[0].header.block_hashes) == block_hashes(SPEC, tokens)
            assert [m.progress.layers_done for m in messages[1:]] == [1, 2]
            assert [m.progress.done for m in messages[1:]] == [False, True]
            assert messages[-1].progress.verified_blocks == 3
            assert bytes(mapping[64 : 64 + 3 * NBYTES]) == layer_major(blocks)
            assert bytes(mapping[:64]) == bytes(64)  # nothing before segment_offset
            assert (await server.engine.stats()).num_leases == 0


async def test_get_prefix_by_layer_hands_over_layers_in_order(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4 + 2, seed=12)  # a trailing partial block is not fetched
        blocks = payloads(3, seed=12)
        await put(stub, prompt(tokens[:12]), blocks)
        want = kv_of(blocks)
        for same_host in (True, False):  # the segment, or bytes then layer by layer
            got: list[tuple[int, torch.Tensor]] = []
            async with AsyncClient(f"127.0.0.1:{server.port}", same_host=same_host) as client:
                n = await client.get_prefix_by_layer(
                    SPEC, tokens, lambda layer, kv, got=got: got.append((layer, kv.clone()))
                )
                # Where the hit landed: a segment of this client's, or none over bytes.
                assert len(client.same_host_segments) == (1 if same_host else 0)
            assert n == 12
            assert [layer for layer, _ in got] == list(range(SPEC.num_layers))
            for layer, kv in got:
                assert torch.equal(kv.view(torch.int16), want[layer].view(torch.int16))
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            miss = await client.get_prefix_by_layer(SPEC, tokens_of(8, seed=99), lambda *_: None)
        assert miss == 0


async def test_a_corrupt_g2_block_ends_a_layer_by_layer_hit(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=13)
        blocks = payloads(3, seed=13)
        await put(stub, prompt(tokens), blocks, durable=True)  # a good copy in G3
        hashes = block_hashes(SPEC, tokens)
        flip_g2_byte(server, hashes[1], HEADER_BYTES + NBYTES - 3, 0x01)  # in the last layer
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            n = await client.get_prefix_by_layer(SPEC, tokens, lambda *_: None)
            assert n == 4  # block 0 only: the bytes of blocks 1 and 2 are not to be used
            assert (await server.engine.stats()).counters["corrupt"] == 1
            got: dict[int, torch.Tensor] = {}
            n = await client.get_prefix_by_layer(
                SPEC, tokens, lambda layer, kv: got.setdefault(layer, kv.clone())
            )
        assert n == 12  # the flipped copy was dropped; blocks 1 and 2 came from G3
        want = kv_of(blocks)
        assert all(torch.equal(got[i].view(torch.int16), want[i].view(torch.int16)) for i in got)


async def test_a_layer_by_layer_hit_mixes_g2_and_g3_and_ends_at_a_miss(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(6 * 4, seed=14)
        blocks = payloads(6, seed=14)
        await put(stub, prompt(tokens), blocks, durable=True)
        hashes = block_hashes(SPEC, tokens)
        assert await server.engine.evict(hashes[1:3], "G2") == 2  # blocks 1, 2: in G3 only
        assert await server.engine.evict(hashes[4:5]) == 1  # block 4: nowhere
        tiers = (await server.engine.lookup(SPEC, tokens)).tiers
        assert tiers == ["G2", "G3", "G3", "G2", None, "G2"]
        async with segment(stub, 6 * NBYTES) as (sid, mapping):
            request = pb.FetchRequest(prompt=prompt(tokens), segment_id=sid, by_layer=True)
            messages = [m async for m in stub.Fetch(request)]
            assert list(messages[0].header.block_hashes) == hashes[:4]
            assert messages[-1].progress.verified_blocks == 4
            assert bytes(mapping[: 4 * NBYTES]) == layer_major(blocks[:4])


# -- put from the caller's own segment ----------------------------------------------------------


async def test_put_reads_only_segments_the_server_issued(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (_, stub, channel):
        blocks = payloads(3, seed=6)
        p = prompt(tokens_of(3 * 4, seed=6))
        async with segment(stub, 4 * NBYTES + 100) as (sid, mapping):
            # Out of order in the segment, at offsets that are not block-aligned.
            offsets = [100 + 2 * NBYTES, 100, 100 + NBYTES]
            for off, data in zip(offsets, blocks, strict=True):
                mapping[off : off + NBYTES] = data
            result = await stub.Put(iter(slot_puts(p, sid, offsets)))
            assert (result.stored, result.already) == (3, 0)
            _, got, _ = await fetch(stub, p)
            assert got == blocks

            q = prompt(tokens_of(3 * 4, seed=7))
            outside = slot_puts(q, sid, [4 * NBYTES])
            await expect_status(stub.Put(iter(outside)), StatusCode.INVALID_ARGUMENT, "outside")
            unknown = slot_puts(q, sid + 1000, [0])
            await expect_status(stub.Put(iter(unknown)), StatusCode.FAILED_PRECONDITION, "not open")
        # Closed with the context: its id is refused from now on.
        gone = slot_puts(q, sid, [0])
        await expect_status(stub.Put(iter(gone)), StatusCode.FAILED_PRECONDITION, "not open")
        # The old field named a segment of the client's choosing (any /dev/shm name, another
        # tenant's, another program's): it is no field any more, so slots need a segment id.
        header = pb.PutHeader(prompt=q).SerializeToString()
        name = b"otherapp-secret-seg"
        header += b"\x22" + bytes([len(name)]) + name  # field 4, length-delimited
        raw_put = channel.stream_unary(f"/{SERVICE}/Put")
        messages = [
            b"\x0a" + bytes([len(header)]) + header if len(header) < 128 else b"",
            pb.PutRequest(
                slot=pb.SlotRef(block_index=0, offset=0, length=NBYTES)
            ).SerializeToString(),
        ]
        assert messages[0]
        await expect_status(
            raw_put(iter(messages)), StatusCode.INVALID_ARGUMENT, "need header.segment_id"
        )
        assert (await stub.Lookup(pb.LookupRequest(prompt=q))).hit_blocks == 0


async def test_a_client_cannot_shrink_a_segment_under_the_server(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (_, stub, _):
        reply = await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=4 * NBYTES))
        fd = await asyncio.to_thread(receive_segment_fd, reply.socket, reply.ticket)
        try:
            # Truncating the segment while the server read it killed the server (SIGBUS).
            for size in (0, NBYTES, 8 * NBYTES):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            assert os.fstat(fd).st_size == 4 * NBYTES
            blocks = payloads(4, seed=9)
            os.pwrite(fd, b"".join(blocks), 0)
            p = prompt(tokens_of(4 * 4, seed=9))
            result = await stub.Put(
                iter(slot_puts(p, reply.segment_id, [i * NBYTES for i in range(4)]))
            )
            assert result.stored == 4
            assert (await fetch(stub, p))[1] == blocks
        finally:
            os.close(fd)


# -- tickets and tenants ------------------------------------------------------------------------


async def test_a_ticket_hands_over_its_segment_once(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (_, stub, _):
        reply = await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=NBYTES))
        fd = await asyncio.to_thread(receive_segment_fd, reply.socket, reply.ticket)
        os.close(fd)
        with pytest.raises(PermissionError):
            await asyncio.to_thread(receive_segment_fd, reply.socket, reply.ticket)
        with pytest.raises(PermissionError):
            await asyncio.to_thread(receive_segment_fd, reply.socket, secrets.token_bytes(32))


def test_an_unclaimed_ticket_expires() -> None:
    registry = SegmentRegistry(ticket_s=0.05)
    try:
        seg = registry.open("t", 4096)
        registry.expire(now=seg.ticket_expires + 1)
        with pytest.raises(PermissionError):
            receive_segment_fd(registry.socket_name, seg.ticket)
        assert registry.get(seg.segment_id, "t") is seg  # the segment itself stays open
    finally:
        registry.shutdown()


async def test_tenants_cannot_name_or_read_each_others_segments(tmp_path: Path) -> None:
    async with running(tenant_config(tmp_path)) as (_, stub, _):
        tokens = tokens_of(3 * 4, seed=10)
        a_blocks = payloads(3, seed=10)
        await put(stub, prompt(tokens), a_blocks, metadata=A)
        async with (
            segment(stub, 3 * NBYTES, A) as (a_sid, _),
            segment(stub, 3 * NBYTES, B) as (b_sid, b_map),
        ):
            # B names A's segment: refused as if it did not exist, and nothing is stored.
            q = prompt(tokens_of(3 * 4, seed=11))
            await expect_status(
                stub.Put(iter(slot_puts(q, a_sid, [0])), metadata=B),
                StatusCode.FAILED_PRECONDITION,
                "not open for this tenant",
            )
            await expect_status(
                stub.Fetch(pb.FetchRequest(prompt=prompt(tokens), segment_id=a_sid), metadata=B),
                StatusCode.FAILED_PRECONDITION,
                "not open for this tenant",
            )
            closed = await stub.CloseSegment(pb.CloseSegmentRequest(segment_id=a_sid), metadata=B)
            assert not closed.closed
            assert (await stub.Lookup(pb.LookupRequest(prompt=q), metadata=B)).hit_blocks == 0
            # B fetches the same tokens into its own segment: its salt gives other blocks (none
            # stored), and its segment holds nothing of A's.
            header = await fetch_into(stub, prompt(tokens), b_sid, metadata=B)
            assert list(header.block_hashes) == []
            whole = bytes(b_map)
            assert not any(block[:64] in whole for block in a_blocks)
            # A's own fetch into A's segment works.
            header = await fetch_into(stub, prompt(tokens), a_sid, metadata=A)
            assert len(header.slots) == 3
        assert await stub.CloseSegment(pb.CloseSegmentRequest(segment_id=a_sid), metadata=A)


# -- bounds, expiry, off ------------------------------------------------------------------------


async def test_segment_bytes_are_bounded_per_tenant(tmp_path: Path) -> None:
    config = tenant_config(tmp_path, tenant_segment_bytes=4 << 20)
    async with running(config) as (server, stub, _):
        first = await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=3 << 20), metadata=A)
        await expect_status(
            stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=2 << 20), metadata=A),
            StatusCode.RESOURCE_EXHAUSTED,
            "tenant_segment_bytes",
        )
        # Another tenant's bound is its own.
        other = await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=3 << 20), metadata=B)
        mine = (await stub.Stats(pb.StatsRequest(), metadata=A)).tenant
        assert (mine.name, mine.segments, mine.segment_bytes) == ("a", 1, 3 << 20)
        assert mine.max_segment_bytes == 4 << 20
        closed = await stub.CloseSegment(
            pb.CloseSegmentRequest(segment_id=first.segment_id), metadata=A
        )
        assert closed.closed
        await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=2 << 20), metadata=A)
        assert server.segments.usage() == {"a": (1, 2 << 20), "b": (1, 3 << 20)}
        await expect_status(
            stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=0), metadata=A),
            StatusCode.INVALID_ARGUMENT,
            "size_bytes",
        )
        assert other.segment_id != first.segment_id


async def test_an_idle_segment_is_closed_and_the_client_opens_another(tmp_path: Path) -> None:
    config = store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0", segment_idle_s=0.2))
    async with (
        running(config) as (server, _stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        tokens = tokens_of(3 * 4, seed=12)
        kv = torch.randn(2, 2, 12, 2, 8).to(torch.float16)
        assert (await client.put(SPEC, tokens, kv)).stored == 3
        (first,) = server.segments.usage().values()
        mine = (await client.stats()).tenant
        assert (mine["segments"], mine["segment_bytes"]) == (1, first[1])
        await asyncio.sleep(0.4)
        server.segments.expire()
        assert server.segments.usage() == {}
        got, n = await client.get_prefix(SPEC, tokens)  # the closed segment is replaced
        assert n == 12
        assert torch.equal(got, kv)
        assert list(server.segments.usage().values()) == [first]
        metric = "kvstore_payload_bytes_out_total"
        shm = server.metrics.registry.get_sample_value(metric, {"path": "shm"})
        assert shm == 3 * NBYTES


async def test_segments_off_means_bytes(tmp_path: Path) -> None:
    config = store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0", same_host=False))
    async with running(config) as (server, stub, _):
        await expect_status(
            stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=NBYTES)),
            StatusCode.FAILED_PRECONDITION,
            "off",
        )
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            tokens = tokens_of(2 * 4, seed=13)
            kv = torch.randn(2, 2, 8, 2, 8).to(torch.float16)
            assert (await client.put(SPEC, tokens, kv)).stored == 2
            got, _n = await client.get_prefix(SPEC, tokens)
            assert torch.equal(got, kv)
        metric = "kvstore_payload_bytes_in_total"
        assert server.metrics.registry.get_sample_value(metric, {"path": "stream"}) == 2 * NBYTES


# -- one client's segments, shared through the allocator (issue 16) -----------------------------


def kv_random(spec: ModelSpec, num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=g).to(torch_dtype(spec.dtype))


def bits(kv: torch.Tensor) -> torch.Tensor:
    return kv.contiguous().view(torch.uint8)


async def test_concurrent_calls_share_one_segment_at_disjoint_offsets(tmp_path: Path) -> None:
    async with (
        running(store_config(tmp_path)) as (server, _stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        segments, rpc = client._segments, client._rpc
        kvs = [kv_random(SPEC, 12, seed=60 + i) for i in range(2)]
        tokens = [tokens_of(12, seed=60 + i) for i in range(2)]
        regions: list[Region] = []
        both = asyncio.Event()

        async def in_flight(region: Region, call: Awaitable[Any]) -> Any:
            # Neither call goes on before both hold their regions: they are in flight together.
            regions.append(region)
            if len(regions) % 2 == 0:
                both.set()
            await asyncio.wait_for(both.wait(), 10)
            return await call

        def put_one(i: int) -> Awaitable[Any]:
            source = BlockSource(SPEC, kvs[i])
            header = pb.PutHeader(prompt=prompt_of(SPEC, tokens[i], None), num_blocks=3)
            return segments.use(
                3 * NBYTES, lambda r: in_flight(r, put_into(rpc, header, source, r))
            )

        results = await asyncio.gather(put_one(0), put_one(1))
        assert [r.stored for r in results] == [3, 3]
        first, second = regions
        assert first.segment is second.segment
        assert len(server.segments.usage()) == 1
        assert len(segments.segments) == 1
        assert first.end <= second.offset or second.end <= first.offset

        both.clear()

        def fetch_one(i: int) -> Awaitable[Any]:
            request = fetch_request(SPEC, tokens[i], None, 0, MiB)
            return fetch_shared(
                rpc,
                segments,
                SPEC,
                request,
                lambda r, region: in_flight(region, fetch_into_segment(rpc, SPEC, r, region, None)),
            )

        got = await asyncio.gather(fetch_one(0), fetch_one(1))
        third, fourth = regions[2:]
        assert third.segment is fourth.segment is first.segment
        assert third.end <= fourth.offset or fourth.end <= third.offset
        for i in range(2):
            assert torch.equal(bits(got[i]), bits(kvs[i]))
        # Through the public calls as well: puts and fetches at once, exact bytes back.
        more = [kv_random(SPEC, 16, seed=62 + i) for i in range(3)]
        more_tokens = [tokens_of(16, seed=62 + i) for i in range(3)]
        puts = await asyncio.gather(
            *(client.put(SPEC, t, kv) for t, kv in zip(more_tokens, more, strict=True))
        )
        assert [r.stored for r in puts] == [4, 4, 4]
        fetched = await asyncio.gather(*(client.get_prefix(SPEC, t) for t in more_tokens))
        for (kv, n), want in zip(fetched, more, strict=True):
            assert n == 16
            assert torch.equal(bits(kv), bits(want))
        assert len(server.segments.usage()) == 1
        metric = "kvstore_payload_bytes_out_total"
        shm = server.metrics.registry.get_sample_value(metric, {"path": "shm"})
        assert shm == (2 * 3 + 3 * 4) * NBYTES  # every fetch went through the segment


async def test_a_kv_buffer_and_calls_share_one_segment(tmp_path: Path) -> None:
    async with (
        running(store_config(tmp_path)) as (server, stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        segments = client._segments
        kv, other = kv_random(SPEC, 8, seed=64), kv_random(SPEC, 8, seed=65)
        tokens, other_tokens = tokens_of(8, seed=64), tokens_of(8, seed=65)
        buffer = await client.kv_buffer(SPEC, 8)
        buffer.copy_(kv)
        located = segments.locate(SPEC, buffer)
        assert located is not None
        region, layout = located
        assert layout.offset == region.offset
        assert (await client.put(SPEC, tokens, buffer)).stored == 2  # from the buffer
        assert (await client.put(SPEC, other_tokens, other)).stored == 2  # through a region
        got, n = await client.get_prefix(SPEC, other_tokens)  # into a region, then copied
        assert n == 8
        assert torch.equal(bits(got), bits(other))
        layers: list[torch.Tensor] = []
        hit = await client.get_prefix_by_layer(
            SPEC, other_tokens, lambda _layer, kv: layers.append(kv.clone())
        )
        assert hit == 8
        assert torch.equal(bits(torch.stack(layers)), bits(other))  # a region past the buffer
        assert torch.equal(bits(buffer), bits(kv))  # no call wrote over the buffer
        buffer.zero_()
        got, n = await client.get_prefix(SPEC, tokens, out=buffer)  # straight into it
        assert n == 8
        assert got.data_ptr() == buffer.data_ptr()
        assert torch.equal(bits(buffer), bits(kv))
        assert [n for n, _ in server.segments.usage().values()] == [1]
        assert segments.segments == [region.segment]
        assert (await fetch(stub, prompt(other_tokens)))[1] == [
            bits(other[:, :, i : i + 4]).numpy().tobytes() for i in (0, 4)
        ]
        # Freed, its extent goes to the next buffer; an ordinary tensor is not a buffer.
        assert not await client.free_kv_buffer(kv)
        assert await client.free_kv_buffer(buffer)
        assert segments.locate(SPEC, buffer) is None
        again = await client.kv_buffer(SPEC, 8)
        assert not again.any()  # zeroed, though the region held the old buffer's bytes
        located = segments.locate(SPEC, again)
        assert located is not None
        assert located[0].offset == region.offset


async def test_the_segments_stay_few_over_calls_of_growing_size(tmp_path: Path) -> None:
    bound = 7 << 20
    server_config = ServerConfig(
        listen="127.0.0.1:0", tenant_segment_bytes=bound, max_prompt_tokens=8192
    )
    config = store_config(tmp_path, g2_bytes=32 << 20, g3=False, server=server_config)
    async with (
        running(config) as (server, _stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        sizes = []
        for i, blocks in enumerate((1, 8, 40, 80, 200, 10, 120)):  # 32 KiB blocks: to 6.25 MiB
            tokens = tokens_of(blocks * BIG.block_tokens, seed=70 + i)
            kv = kv_random(BIG, blocks * BIG.block_tokens, seed=70 + i)
            assert (await client.put(BIG, tokens, kv)).stored == blocks
            got, n = await client.get_prefix(BIG, tokens)
            assert n == blocks * BIG.block_tokens
            assert torch.equal(bits(got), bits(kv))
            ((count, nbytes),) = server.segments.usage().values()
            assert count == 1
            assert nbytes <= bound
            sizes.append(nbytes)
        # Doubled while that fits the bound, then just the need (7 MiB), then reused.
        assert sizes == [1 << 20, 1 << 20, 2 << 20, 4 << 20, 7 << 20, 7 << 20, 7 << 20]
        for path in ("in", "out"):
            metric = f"kvstore_payload_bytes_{path}_total"
            shm = server.metrics.registry.get_sample_value(metric, {"path": "shm"})
            assert shm == 459 * BIG.block_nbytes  # no call fell back to bytes


async def test_a_closed_segment_takes_its_regions_and_buffers_with_it(tmp_path: Path) -> None:
    config = store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0", segment_idle_s=0.2))
    async with (
        running(config) as (server, _stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        segments = client._segments
        kvs = [kv_random(SPEC, 8, seed=80 + i) for i in range(3)]
        tokens = [tokens_of(8, seed=80 + i) for i in range(3)]
        buffer = await client.kv_buffer(SPEC, 8)
        buffer.copy_(kvs[0])
        assert (await client.put(SPEC, tokens[1], kvs[1])).stored == 2
        (old,) = segments.segments
        await asyncio.sleep(0.4)
        server.segments.expire()
        assert server.segments.usage() == {}
        # Two calls at once find the segment gone: both go through one new segment.
        puts = await asyncio.gather(
            client.put(SPEC, tokens[0], buffer), client.put(SPEC, tokens[2], kvs[2])
        )
        assert [r.stored for r in puts] == [2, 2]
        (new,) = segments.segments
        assert new is not old
        assert segments.locate(SPEC, buffer) is None  # the buffer went the ordinary way
        assert torch.equal(bits(buffer), bits(kvs[0]))  # and is still valid memory
        fetched = await asyncio.gather(*(client.get_prefix(SPEC, t) for t in tokens))
        for (kv, n), want in zip(fetched, kvs, strict=True):
            assert n == 8
            assert torch.equal(bits(kv), bits(want))
        assert [n for n, _ in server.segments.usage().values()] == [1]
