"""K/V buffers against a real server (issue 16, item 2): a caller's tensor that lives in a segment
the server issued to that client, so that a same-host put reads it and a same-host fetch writes
it in one copy each way, and the protocol underneath (``PutHeader.tensor``, ``FetchRequest.tensor``
naming a ``SegmentTensor``; ``PutHeader.slots``).

What must hold, and is tested here: the bytes round-trip exactly, through the buffer and through
bytes; a tensor named outside the segment, misaligned, too short, or in another tenant's segment
is refused with INVALID_ARGUMENT / FAILED_PRECONDITION and stores (or writes) nothing; a corrupt
G2 block is never counted as fetched, nor left looking valid; a buffer whose segment the server
closed, or whose client closed, stays valid memory and goes the ordinary way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_client import ServerThread
from test_same_host import (
    NBYTES,
    A,
    B,
    flip_g2_byte,
    kv_of,
    layer_major,
    segment,
    tenant_config,
)
from test_server import (
    SPEC,
    expect_status,
    fetch,
    payloads,
    prompt,
    put,
    running,
    store_config,
    tokens_of,
)

from client import AsyncClient, Client
from kvstore.core.block_format import HEADER_BYTES
from kvstore.core.keys import block_hashes
from kvstore.service.server import ServerConfig
from kvstore.v1 import kvstore_pb2 as pb

StatusCode = grpc.StatusCode
TOKEN_BYTES = SPEC.num_kv_heads * SPEC.head_dim * SPEC.itemsize  # one token of one (layer, K/V)
ROW = SPEC.block_tokens * TOKEN_BYTES  # one (layer, K/V) row of one block


def kv_tensor(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_layers, 2, num_tokens, SPEC.num_kv_heads, SPEC.head_dim)
    return torch.randn(shape, generator=g).to(torch.float16)


def blocks_of(kv: torch.Tensor) -> list[bytes]:
    """The block payloads of a K/V tensor, as the store keeps them."""
    n = kv.shape[2] // SPEC.block_tokens
    return [
        kv[:, :, i * SPEC.block_tokens : (i + 1) * SPEC.block_tokens]
        .contiguous()
        .view(torch.uint8)
        .numpy()
        .tobytes()
        for i in range(n)
    ]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN patterns included)."""
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def layout(offset: int, num_tokens: int, room: int | None = None) -> pb.SegmentTensor:
    """A contiguous ``[layers, 2, room, ...]`` tensor at ``offset``; ``num_tokens`` of it count."""
    row = (room or num_tokens) * TOKEN_BYTES
    return pb.SegmentTensor(
        offset=offset, layer_stride=2 * row, kv_stride=row, num_tokens=num_tokens
    )


def tensor_put(p: pb.Prompt, segment_id: int, tensor: pb.SegmentTensor, **kw: Any) -> Any:
    header = pb.PutHeader(prompt=p, segment_id=segment_id, tensor=tensor, **kw)
    return iter([pb.PutRequest(header=header)])


async def hit_blocks(stub: Any, p: pb.Prompt, metadata: Any = None) -> int:
    return int((await stub.Lookup(pb.LookupRequest(prompt=p), metadata=metadata)).hit_blocks)


# -- put from a K/V buffer -----------------------------------------------------------------------


async def test_a_put_of_a_kv_buffer_round_trips_exactly(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        target = f"127.0.0.1:{server.port}"
        tokens = tokens_of(3 * 4 + 2, seed=21)  # a trailing partial block is not stored
        kv = kv_tensor(14, seed=21)
        async with AsyncClient(target, same_host=True) as client:
            buffer = await client.kv_buffer(SPEC, 20)
            assert buffer.shape == (SPEC.num_layers, 2, 20, SPEC.num_kv_heads, SPEC.head_dim)
            assert buffer.dtype == torch.float16
            assert not buffer.any()
            buffer[:, :, :14] = kv
            result = await client.put(SPEC, tokens, buffer[:, :, :14])
            assert (result.stored, result.already) == (3, 0)
            # The buffer's own segment is the only one: no copy went through another.
            ((num, nbytes),) = server.segments.usage().values()
            assert num == 1
            assert nbytes >= 20 * 2 * SPEC.num_layers * TOKEN_BYTES
        # Read back as bytes over gRPC (no segment): the exact payloads.
        _, got, _ = await fetch(stub, prompt(tokens[:12]))
        assert got == blocks_of(kv)
        async with AsyncClient(target, same_host=False) as client:
            back, n = await client.get_prefix(SPEC, tokens)
        assert n == 12
        assert same(back, kv[:, :, :12])
        metric = "kvstore_payload_bytes_in_total"
        assert server.metrics.registry.get_sample_value(metric, {"path": "shm"}) == 3 * NBYTES


async def test_a_put_of_a_slice_of_a_kv_buffer_stores_that_slice(tmp_path: Path) -> None:
    async with (
        running(store_config(tmp_path)) as (server, stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        kv = kv_tensor(16, seed=22)
        buffer = await client.kv_buffer(SPEC, 16)
        buffer.copy_(kv)
        # Tokens 4..12 of the buffer: offset and strides other than the buffer's start.
        tokens = tokens_of(8, seed=22)
        assert (await client.put(SPEC, tokens, buffer[:, :, 4:12])).stored == 2
        _, got, _ = await fetch(stub, prompt(tokens))
        assert got == blocks_of(kv[:, :, 4:12])


def test_the_sync_client_hands_out_kv_buffers_too(tmp_path: Path) -> None:
    kv = kv_tensor(8, seed=23)
    tokens = tokens_of(8, seed=23)
    with (
        ServerThread(store_config(tmp_path)) as st,
        Client(st.target, same_host=True) as client,
    ):
        buffer = client.kv_buffer(SPEC, 8)
        buffer.copy_(kv)
        assert client.put(SPEC, tokens, buffer).stored == 2
        out = client.kv_buffer(SPEC, 8)
        got, n = client.get_prefix(SPEC, tokens, out=out)
        assert n == 8
        assert same(got, kv)
        assert got.data_ptr() == out.data_ptr()
        assert client.free_kv_buffer(out)
        assert not client.free_kv_buffer(out)  # once


# -- fetch into a K/V buffer ---------------------------------------------------------------------


async def test_a_fetch_into_a_kv_buffer_writes_the_blocks_in_place(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=24)
        blocks = payloads(3, seed=24)
        await put(stub, prompt(tokens), blocks)
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            buffer = await client.kv_buffer(SPEC, 20)
            buffer.view(torch.int16).fill_(0x5555)
            got, n = await client.get_prefix(SPEC, tokens, out=buffer)
            assert n == 12
            assert got.data_ptr() == buffer.data_ptr()  # a view of the buffer: nothing copied
            assert same(got, kv_of(blocks))
            assert (buffer[:, :, 12:].view(torch.int16) == 0x5555).all()  # past the hit: as was
            ((num, _),) = server.segments.usage().values()
            assert num == 1  # the buffer's segment only
            # Fewer tokens of room than the hit: as many whole blocks as fit.
            got, n = await client.get_prefix(SPEC, tokens, out=buffer[:, :, 14:20])
            assert n == 4
            assert same(got, kv_of(blocks[:1]))
            # A miss leaves the buffer as it was.
            before = buffer.clone()
            _, n = await client.get_prefix(SPEC, tokens_of(8, seed=99), out=buffer)
            assert n == 0
            assert same(buffer, before)
        assert (await server.engine.stats()).num_leases == 0


async def test_a_fetch_into_a_kv_buffer_reads_lower_tiers(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=25)
        blocks = payloads(3, seed=25)
        await put(stub, prompt(tokens), blocks, durable=True)
        hashes = block_hashes(SPEC, tokens)
        assert await server.engine.evict(hashes[1:2], "G2") == 1  # block 1 in G3 only
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            buffer = await client.kv_buffer(SPEC, 12)
            got, n = await client.get_prefix(SPEC, tokens, out=buffer)
        assert n == 12
        assert same(got, kv_of(blocks))


async def test_a_corrupt_g2_block_is_not_counted_as_fetched(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=26)
        blocks = payloads(3, seed=26)
        await put(stub, prompt(tokens), blocks)
        await server.engine.drain()
        hashes = block_hashes(SPEC, tokens)
        assert await server.engine.evict(hashes, "G3") == 3  # no good copy anywhere else
        flip_g2_byte(server, hashes[1], HEADER_BYTES + NBYTES - 7, 0x04)  # in the last row
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            buffer = await client.kv_buffer(SPEC, 12)
            buffer.view(torch.int16).fill_(0x1111)
            got, n = await client.get_prefix(SPEC, tokens, out=buffer)
            assert n == 4
            assert same(got, kv_of(blocks[:1]))
            # Block 1's bytes did not stay behind looking like a block; block 2 was not written.
            assert not buffer[:, :, 4:8].view(torch.int16).any()
            assert (buffer[:, :, 8:12].view(torch.int16) == 0x1111).all()
        assert (await server.engine.stats()).counters["corrupt"] == 1
        assert (await stub.Lookup(pb.LookupRequest(prompt=prompt(tokens)))).hit_blocks == 1


async def test_a_corrupt_g2_block_is_read_from_g3_instead(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(3 * 4, seed=27)
        blocks = payloads(3, seed=27)
        await put(stub, prompt(tokens), blocks, durable=True)  # a good copy in G3
        flip_g2_byte(server, block_hashes(SPEC, tokens)[0], HEADER_BYTES, 0x80)
        async with AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client:
            buffer = await client.kv_buffer(SPEC, 12)
            got, n = await client.get_prefix(SPEC, tokens, out=buffer)
        assert n == 12
        assert same(got, kv_of(blocks))
        assert (await server.engine.stats()).counters["corrupt"] == 1


# -- the protocol: bounds, tenants ---------------------------------------------------------------


async def test_a_tensor_outside_the_segment_is_refused_and_stores_nothing(
    tmp_path: Path,
) -> None:
    async with running(store_config(tmp_path)) as (_, stub, _):
        tokens = tokens_of(2 * 4, seed=28)
        p = prompt(tokens)
        size = 2 * NBYTES + 256
        async with segment(stub, size) as (sid, mapping):
            kv = kv_tensor(8, seed=28)
            mapping[256 : 256 + 2 * NBYTES] = kv.view(torch.uint8).numpy().tobytes()
            bad = [
                (layout(257, 8), "multiple"),  # not a whole number of items
                (pb.SegmentTensor(offset=256, layer_stride=513, kv_stride=256, num_tokens=8),
                 "multiple"),
                (layout(512, 8), "outside"),  # runs past the end
                (layout(256, 8, room=9), "outside"),  # rows too far apart
                (pb.SegmentTensor(offset=256, layer_stride=1 << 62, kv_stride=2, num_tokens=8),
                 "outside"),
                (pb.SegmentTensor(offset=1 << 63, layer_stride=2, kv_stride=2, num_tokens=8),
                 "outside"),
                (pb.SegmentTensor(offset=0, layer_stride=2, kv_stride=2, num_tokens=1 << 60),
                 "outside"),
                (layout(256, 4), "fewer than"),  # two blocks announced, room for one
            ]
            for tensor, fragment in bad:
                await expect_status(
                    stub.Put(tensor_put(p, sid, tensor)), StatusCode.INVALID_ARGUMENT, fragment
                )
                if fragment == "fewer than":
                    continue  # a fetch fills as many blocks as a tensor has room for
                await expect_status(
                    stub.Fetch(pb.FetchRequest(prompt=p, segment_id=sid, tensor=tensor)),
                    StatusCode.INVALID_ARGUMENT,
                    fragment,
                )
            # A tensor without a segment, or with slots too, or with messages after the header.
            header = pb.PutHeader(prompt=p, tensor=layout(256, 8))
            await expect_status(
                stub.Put(iter([pb.PutRequest(header=header)])),
                StatusCode.INVALID_ARGUMENT,
                "segment_id",
            )
            header = pb.PutHeader(prompt=p, segment_id=sid, tensor=layout(256, 8))
            header.slots.add(block_index=0, offset=256, length=NBYTES)
            await expect_status(
                stub.Put(iter([pb.PutRequest(header=header)])),
                StatusCode.INVALID_ARGUMENT,
                "no header.slots",
            )
            after = [
                pb.PutRequest(header=pb.PutHeader(prompt=p, segment_id=sid, tensor=layout(256, 8))),
                pb.PutRequest(slot=pb.SlotRef(block_index=0, offset=0, length=NBYTES)),
            ]
            await expect_status(stub.Put(iter(after)), StatusCode.INVALID_ARGUMENT, "no messages")
            await expect_status(
                stub.Fetch(pb.FetchRequest(prompt=p, tensor=layout(256, 8))),
                StatusCode.INVALID_ARGUMENT,
                "segment_id",
            )
            assert await hit_blocks(stub, p) == 0
            # The same tensor, inside: stored, exactly.
            result = await stub.Put(tensor_put(p, sid, layout(256, 8)))
            assert (result.stored, result.already) == (2, 0)
            assert (await fetch(stub, p))[1] == blocks_of(kv)


async def test_another_tenants_segment_is_refused_and_nothing_is_stored_or_written(
    tmp_path: Path,
) -> None:
    async with running(tenant_config(tmp_path)) as (_, stub, _):
        tokens = tokens_of(2 * 4, seed=29)
        p = prompt(tokens)
        await put(stub, p, payloads(2, seed=29), metadata=A)
        async with segment(stub, 2 * NBYTES, A) as (a_sid, a_map):
            a_map[:] = b"\x77" * (2 * NBYTES)
            await expect_status(
                stub.Put(tensor_put(p, a_sid, layout(0, 8)), metadata=B),
                StatusCode.FAILED_PRECONDITION,
                "not open for this tenant",
            )
            assert await hit_blocks(stub, p, B) == 0
            # B's fetch into A's segment: refused, and A's bytes are untouched (B's own blocks
            # of these tokens: none; A's blocks of them: never B's to read).
            await put(stub, p, payloads(2, seed=30), metadata=B)
            await expect_status(
                stub.Fetch(
                    pb.FetchRequest(prompt=p, segment_id=a_sid, tensor=layout(0, 8)), metadata=B
                ),
                StatusCode.FAILED_PRECONDITION,
                "not open for this tenant",
            )
            assert bytes(a_map) == b"\x77" * (2 * NBYTES)
            # A's own fetch into its segment: its own blocks.
            messages = [
                m
                async for m in stub.Fetch(
                    pb.FetchRequest(prompt=p, segment_id=a_sid, tensor=layout(0, 8)), metadata=A
                )
            ]
            assert len(messages) == 1
            assert len(messages[0].header.block_hashes) == 2
            assert not messages[0].header.slots
            assert bytes(a_map) == layer_major(payloads(2, seed=29))


async def test_header_slots_make_a_put_one_message(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (_, stub, _):
        blocks = payloads(3, seed=31)
        p = prompt(tokens_of(3 * 4, seed=31))
        async with segment(stub, 3 * NBYTES) as (sid, mapping):
            for i, data in enumerate(blocks):
                mapping[i * NBYTES : (i + 1) * NBYTES] = data
            header = pb.PutHeader(prompt=p, segment_id=sid)
            header.slots.add(block_index=0, offset=2 * NBYTES, length=NBYTES)
            header.slots.add(block_index=1, offset=0, length=NBYTES)
            # The last slot follows as a message of its own: the two forms mix.
            messages = [
                pb.PutRequest(header=header),
                pb.PutRequest(slot=pb.SlotRef(block_index=2, offset=NBYTES, length=NBYTES)),
            ]
            assert (await stub.Put(iter(messages))).stored == 3
            assert (await fetch(stub, p))[1] == [blocks[2], blocks[0], blocks[1]]
            # Slots need a segment; one outside it is refused.
            q = prompt(tokens_of(4, seed=32))
            header = pb.PutHeader(prompt=q, segment_id=sid)
            header.slots.add(block_index=0, offset=3 * NBYTES, length=NBYTES)
            await expect_status(
                stub.Put(iter([pb.PutRequest(header=header)])),
                StatusCode.INVALID_ARGUMENT,
                "outside",
            )
            header = pb.PutHeader(prompt=q)
            header.slots.add(block_index=0, offset=0, length=NBYTES)
            await expect_status(
                stub.Put(iter([pb.PutRequest(header=header)])),
                StatusCode.INVALID_ARGUMENT,
                "segment_id",
            )
            assert await hit_blocks(stub, q) == 0


async def test_a_layer_by_layer_fetch_goes_into_a_named_tensor(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (_, stub, _):
        tokens = tokens_of(2 * 4, seed=33)
        blocks = payloads(2, seed=33)
        await put(stub, prompt(tokens), blocks)
        room = 12  # a tensor with room for 12 tokens at offset 64: rows 12 tokens apart
        async with segment(stub, 64 + 2 * SPEC.num_layers * room * TOKEN_BYTES) as (sid, mapping):
            request = pb.FetchRequest(
                prompt=prompt(tokens), segment_id=sid, by_layer=True, tensor=layout(64, room)
            )
            messages = [m async for m in stub.Fetch(request)]
            assert messages[-1].progress.verified_blocks == 2
            whole = bytes(mapping[64:])
            for r in range(2 * SPEC.num_layers):  # row r of each block, side by side
                at = r * room * TOKEN_BYTES
                side_by_side = b"".join(b[r * ROW : (r + 1) * ROW] for b in blocks)
                assert whole[at : at + 2 * ROW] == side_by_side


# -- life cycle ----------------------------------------------------------------------------------


async def test_closing_the_client_invalidates_its_buffers_cleanly(tmp_path: Path) -> None:
    async with running(store_config(tmp_path)) as (server, stub, _):
        target = f"127.0.0.1:{server.port}"
        kv = kv_tensor(8, seed=34)
        tokens = tokens_of(8, seed=34)
        async with AsyncClient(target, same_host=True) as client:
            buffer = await client.kv_buffer(SPEC, 8)
            buffer.copy_(kv)
            assert server.segments.usage()
        assert server.segments.usage() == {}  # closed on the server with the client
        with pytest.raises(RuntimeError, match="closed"):
            await client.put(SPEC, tokens, buffer)
        # The tensor is still memory of this process, intact and writable.
        assert same(buffer, kv)
        buffer[0, 0, 0, 0, 0] = 1.5
        kv[0, 0, 0, 0, 0] = 1.5
        # Another client does not know it: an ordinary tensor, put and fetched the ordinary way.
        async with AsyncClient(target, same_host=True) as other:
            assert (await other.put(SPEC, tokens, buffer)).stored == 2
            into = torch.zeros_like(kv)
            got, n = await other.get_prefix(SPEC, tokens, out=into)
            assert n == 8
            assert same(got, kv)
            got, n = await other.get_prefix(SPEC, tokens, out=buffer)
            assert n == 8
            assert same(buffer, kv)
        assert (await fetch(stub, prompt(tokens)))[1] == blocks_of(kv)


async def test_a_buffer_whose_segment_the_server_closed_goes_the_ordinary_way(
    tmp_path: Path,
) -> None:
    config = store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0", segment_idle_s=0.2))
    async with (
        running(config) as (server, stub, _),
        AsyncClient(f"127.0.0.1:{server.port}", same_host=True) as client,
    ):
        kv = kv_tensor(8, seed=35)
        tokens = tokens_of(8, seed=35)
        buffer = await client.kv_buffer(SPEC, 8)
        buffer.copy_(kv)
        await asyncio.sleep(0.4)
        server.segments.expire()
        assert server.segments.usage() == {}
        assert (await client.put(SPEC, tokens, buffer)).stored == 2  # copied, through another
        assert (await fetch(stub, prompt(tokens)))[1] == blocks_of(kv)
        buffer.zero_()
        got, n = await client.get_prefix(SPEC, tokens, out=buffer)
        assert n == 8
        assert same(buffer, kv)
        assert got.data_ptr() == buffer.data_ptr()


async def test_without_segments_a_kv_buffer_is_an_ordinary_tensor(tmp_path: Path) -> None:
    config = store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0", same_host=False))
    async with running(config) as (server, _, _):
        for same_host in (False, True):  # never tried, or refused by the server
            async with AsyncClient(f"127.0.0.1:{server.port}", same_host=same_host) as client:
                kv = kv_tensor(8, seed=36)
                tokens = tokens_of(8, seed=36 + same_host)
                buffer = await client.kv_buffer(SPEC, 8)
                assert buffer.shape == kv.shape
                assert not buffer.any()
                buffer.copy_(kv)
                assert (await client.put(SPEC, tokens, buffer)).stored == 2
                buffer.zero_()
                _, n = await client.get_prefix(SPEC, tokens, out=buffer)
                assert n == 8
                assert same(buffer, kv)
                assert (await client.kv_buffer(SPEC, 0)).shape[2] == 0
        assert server.segments.usage() == {}
