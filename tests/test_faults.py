"""Faults and hostile input against a real server (issue J): malformed bytes, refused puts,
tiers that are down or full, heavy requests beside small ones, pin and lease bounds.

Requests are built by hand where the point is bytes the generated stubs would never send.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis_servers import RedisServer, start_redis_server
from test_server import (
    BIG,
    SPEC,
    _kvstore,
    bearer,
    expect_status,
    fetch,
    payloads,
    prompt,
    put,
    put_messages,
    running,
    store_config,
    tokens_of,
)

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, Codec
from kvstore.core.keys import block_hashes
from kvstore.service.auth import TenantConfig
from kvstore.service.server import SERVICE_NAME as SERVICE
from kvstore.service.server import ServerConfig
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

StatusCode = grpc.StatusCode

# Bytes that no message decodes: garbage (an unterminated tag), a truncated length-delimited
# field.
_UNDECODABLE = [b"\xff\xff\xff\xff", b"\x0a\x05ab"]
# Invalid UTF-8 in a string field: Prompt.namespace.model_id, for messages whose field 1 is the
# prompt (or PutRequest.header.prompt).
_BAD_UTF8 = b"\x0a\x06\x0a\x04\x0a\x02\xff\xfe"
_BAD_UTF8_PUT = b"\x0a\x08" + _BAD_UTF8
_UNARY = [
    "Lookup",
    "Reserve",
    "Release",
    "Repair",
    "Pin",
    "Unpin",
    "Evict",
    "Flush",
    "Stats",
    "ListBlocks",
    "Inspect",
    "OpenSegment",
    "CloseSegment",
]


async def test_undecodable_requests_are_invalid_argument_for_every_method(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(store_config(tmp_path)) as (_, stub, channel):
        await put(stub, prompt(tokens_of(8, 1)), payloads(2, 1))
        for method in _UNARY:
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            for raw in _UNDECODABLE:
                await expect_status(call(raw), StatusCode.INVALID_ARGUMENT, "malformed")
        for raw in _UNDECODABLE:
            fetch = channel.unary_stream(f"/{SERVICE}/Fetch")
            await expect_status(fetch(raw), StatusCode.INVALID_ARGUMENT, "malformed")
            watch = channel.unary_stream(f"/{SERVICE}/Watch")
            await expect_status(watch(raw), StatusCode.INVALID_ARGUMENT, "malformed")
            put_call = channel.stream_unary(f"/{SERVICE}/Put")
            await expect_status(put_call(iter([raw])), StatusCode.INVALID_ARGUMENT, "malformed")
            # A good header, then garbage: refused, and nothing of the stream stored.
            header = pb.PutRequest(header=pb.PutHeader(prompt=prompt(tokens_of(8, 2))))
            await expect_status(
                put_call(iter([header.SerializeToString(), raw])),
                StatusCode.INVALID_ARGUMENT,
                "malformed",
            )
            work = channel.stream_stream(f"/{SERVICE}/Work")
            await expect_status(work(iter([raw])), StatusCode.INVALID_ARGUMENT, "malformed")
        for method in ("Lookup", "Reserve", "Repair"):
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            await expect_status(call(_BAD_UTF8), StatusCode.INVALID_ARGUMENT, "malformed")
        fetch = channel.unary_stream(f"/{SERVICE}/Fetch")
        await expect_status(fetch(_BAD_UTF8), StatusCode.INVALID_ARGUMENT, "malformed")
        put_call = channel.stream_unary(f"/{SERVICE}/Put")
        await expect_status(
            put_call(iter([_BAD_UTF8_PUT])), StatusCode.INVALID_ARGUMENT, "malformed"
        )
        stats = await stub.Stats(pb.StatsRequest())
        assert stats.num_blocks == 2
    assert "Traceback" not in caplog.text
    assert "Exception" not in caplog.text


# -- durable puts when a tier is down or full ---------------------------------------------------


def _g4_config(tmp_path: Path, redis: RedisServer, *, timeout_ms: int = 500) -> StoreConfig:
    config = store_config(tmp_path, g4=redis)
    assert config.g4 is not None
    return replace(
        config,
        g4=replace(config.g4, timeout_ms=timeout_ms, codec=Codec.RAW),
        engine=replace(config.engine, tier_retry_s=2.0),
    )


async def test_durable_put_with_g4_down_is_unavailable_and_never_ok_on_retry(
    tmp_path: Path,
) -> None:
    with start_redis_server() as redis:
        async with running(_g4_config(tmp_path, redis)) as (server, stub, _):
            p = prompt(tokens_of(16, 3))
            redis.kill()
            await expect_status(
                put(stub, p, payloads(4, 3), durable=True), StatusCode.UNAVAILABLE, "G4"
            )
            # The same put again, Redis still down: refused again (fast: the tier is known down),
            # never acknowledged without its G4 copy.
            for _ in range(2):
                started = time.monotonic()
                await expect_status(
                    put(stub, p, payloads(4, 3), durable=True), StatusCode.UNAVAILABLE, "G4"
                )
                assert time.monotonic() - started < 0.4  # < one G4 timeout: no round trip
            # The refused puts stored nothing, not even in G2.
            assert (await stub.Lookup(pb.LookupRequest(prompt=p))).hit_blocks == 0
            # A non-durable put does not need G4: acknowledged.
            assert (await put(stub, p, payloads(4, 3))).stored == 4
            # Reads still work with G4 gone.
            _, blocks, _ = await fetch(stub, p)
            assert blocks == payloads(4, 3)
    with start_redis_server() as redis:
        async with running(_g4_config(tmp_path / "again", redis)) as (server, stub, _):
            p = prompt(tokens_of(16, 5))
            redis.pause()  # SIGSTOP: connections hang instead of failing
            try:
                started = time.monotonic()
                await expect_status(
                    put(stub, p, payloads(4, 5), durable=True), StatusCode.UNAVAILABLE, "G4"
                )
                # Bounded by the tier's timeout (500 ms a round trip), not by the block count.
                assert time.monotonic() - started < 3.0
            finally:
                redis.resume()
            await asyncio.sleep(2.1)  # engine.tier_retry_s: G4 is tried again
            reply = await put(stub, p, payloads(4, 5), durable=True)
            assert list(reply.block_hashes) == block_hashes(SPEC, tokens_of(16, 5))
            tier = server.engine.tier("G4", SPEC.fingerprint)
            assert all(await tier.exists(list(reply.block_hashes)))


def _serve(tmp_path: Path, g3: Path, *settings: str) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    args = [*_kvstore(), "serve", "--set", f"g3.path={g3}", "--listen", "127.0.0.1:0"]
    for setting in ("g2.capacity_bytes=2MiB", "g2.pin=never", *settings):
        args += ["--set", setting]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "serve.log").open("a"),
        cwd=tmp_path,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("kvstore serving on "):
            return proc, int(line.split()[3].rpartition(":")[2])
    proc.kill()
    raise AssertionError((tmp_path / "serve.log").read_text())


def _sync_put(stub: Any, p: pb.Prompt, blocks: list[bytes]) -> grpc.StatusCode:
    try:
        stub.Put(iter(put_messages(p, blocks, durable=True)), timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _sync_fetch(stub: Any, p: pb.Prompt) -> list[bytes]:
    blocks: dict[int, bytearray] = {}
    for message in stub.Fetch(pb.FetchRequest(prompt=p), timeout=30):
        if message.WhichOneof("msg") == "chunk":
            blocks.setdefault(message.chunk.block_index, bytearray()).extend(message.chunk.data)
    return [bytes(blocks[i]) for i in sorted(blocks)]


def _durable_puts_then_kill(
    tmp_path: Path, g3: Path, settings: tuple[str, ...], rounds: int
) -> tuple[dict[int, list[bytes]], list[grpc.StatusCode]]:
    """Durable puts of distinct 4-block prompts; kill -9 the server. Returns the acknowledged
    prompts (seed -> blocks) and the status of every put."""
    proc, port = _serve(tmp_path, g3, *settings)
    acked: dict[int, list[bytes]] = {}
    codes = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KVStoreStub(channel)
            for seed in range(rounds):
                blocks = payloads(4, 100 + seed, BIG)
                p = prompt(tokens_of(64, 100 + seed), BIG)
                code = _sync_put(stub, p, blocks)
                codes.append(code)
                if code == grpc.StatusCode.OK:
                    acked[seed] = blocks
                else:
                    # Refused: the same put again is refused too (the disk is still full),
                    # never acknowledged without its G3 copy.
                    assert _sync_put(stub, p, blocks) == code
    finally:
        proc.kill()  # kill -9: no flush, no clean close
        proc.wait()
    return acked, codes


def _check_after_restart(tmp_path: Path, g3: Path, acked: dict[int, list[bytes]]) -> None:
    proc, port = _serve(tmp_path, g3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KVStoreStub(channel)
            for seed, blocks in acked.items():
                got = _sync_fetch(stub, prompt(tokens_of(64, 100 + seed), BIG))
                assert got == blocks, f"acknowledged durable prompt {seed}: {len(got)} of 4 blocks"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a disk that fills up. Needs the right to mount (root, as in CI here)."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_g3_disk_full_is_resource_exhausted_and_acknowledged_blocks_survive_kill(
    tmp_path: Path, small_disk: Path
) -> None:
    g3 = small_disk / "g3"
    # G3 believes it may use 64 MiB; the disk under it holds 3.
    acked, codes = _durable_puts_then_kill(tmp_path, g3, ("g3.capacity_bytes=64MiB",), rounds=40)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert len(acked) >= 5
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log
    _check_after_restart(tmp_path, g3, acked)


def test_a_full_g3_capacity_keeps_the_newest_acknowledged_blocks_across_kill(
    tmp_path: Path,
) -> None:
    g3 = tmp_path / "g3"
    # Room in G3 for about 10 of the 4-block prompts; 40 are put.
    acked, codes = _durable_puts_then_kill(tmp_path, g3, ("g3.capacity_bytes=1400KiB",), rounds=40)
    assert set(codes) == {grpc.StatusCode.OK}, codes
    # Older prompts may have been evicted by capacity (G3 is a cache); the newest ones must all
    # be there after the crash.
    newest = {seed: acked[seed] for seed in range(35, 40)}
    _check_after_restart(tmp_path, g3, newest)


# -- pins and leases are bounded per tenant (item 10) --------------------------------------------

TOKEN_A, TOKEN_B = "token-of-tenant-a-" + "x" * 16, "token-of-tenant-b-" + "y" * 16
A, B = bearer(TOKEN_A), bearer(TOKEN_B)


def tenant_config(tmp_path: Path, **server: Any) -> StoreConfig:
    return store_config(
        tmp_path,
        tenants=[TenantConfig("a", TOKEN_A), TenantConfig("b", TOKEN_B)],
        server=ServerConfig(
            listen="127.0.0.1:0",
            secret="a-server-secret-of-some-length",
            max_prompt_tokens=1 << 14,
            **server,
        ),
    )


async def test_pins_are_bounded_per_tenant_in_blocks_and_bytes(tmp_path: Path) -> None:
    async with running(tenant_config(tmp_path, max_pinned_blocks_per_tenant=10)) as (_, stub, _):
        tokens = tokens_of(20 * 4, 30)
        hashes = (await put(stub, prompt(tokens), payloads(20, 30), metadata=A)).block_hashes
        pin = stub.Pin
        assert (await pin(pb.BlocksRequest(block_hashes=hashes[:10]), metadata=A)).count == 10
        await expect_status(
            pin(pb.BlocksRequest(block_hashes=hashes[8:12]), metadata=A),
            StatusCode.RESOURCE_EXHAUSTED,
            "max_pinned_blocks_per_tenant",
        )
        usage = (await stub.Stats(pb.StatsRequest(), metadata=A)).tenant
        assert (usage.pinned_blocks, usage.max_pinned_blocks) == (10, 10)
        # Nothing of the refused request was pinned: block 10 can still go.
        assert (await stub.Evict(pb.BlocksRequest(block_hashes=hashes[10:11]), metadata=A)).count
        # Pinning again what is pinned costs nothing; unpinning makes room.
        assert (await pin(pb.BlocksRequest(block_hashes=hashes[:10]), metadata=A)).count == 10
        await stub.Unpin(pb.BlocksRequest(block_hashes=hashes[:2]), metadata=A)
        assert (await pin(pb.BlocksRequest(block_hashes=hashes[11:13]), metadata=A)).count == 2
        # Tenant b's bound is its own.
        other = (await put(stub, prompt(tokens), payloads(20, 31), metadata=B)).block_hashes
        assert (await pin(pb.BlocksRequest(block_hashes=other[:10]), metadata=B)).count == 10

    # Bytes: G2 is 64 slots of 64 KiB (4 MiB); a share of 3 % is 3 blocks of BIG (32 KiB each).
    async with running(tenant_config(tmp_path / "bytes", pin_share=0.03)) as (_, stub, _):
        big = prompt(tokens_of(4 * 16, 32), BIG)
        hashes = (await put(stub, big, payloads(4, 32, BIG), metadata=A)).block_hashes
        await expect_status(
            stub.Pin(pb.BlocksRequest(block_hashes=hashes), metadata=A),
            StatusCode.RESOURCE_EXHAUSTED,
            "pin_share",
        )
        assert (await stub.Pin(pb.BlocksRequest(block_hashes=hashes[:3]), metadata=A)).count == 3
        usage = (await stub.Stats(pb.StatsRequest(), metadata=A)).tenant
        assert usage.pinned_bytes == 3 * (HEADER_BYTES + BIG.block_nbytes)


async def test_one_tenant_cannot_pin_g2_away_from_the_others(tmp_path: Path) -> None:
    # The attack of the issue: pin forever (ttl 0) until G2 is all pinned. Defaults only.
    async with running(tenant_config(tmp_path)) as (server, stub, _):
        pinned, refused = 0, None
        for seed in range(64):
            p = prompt(tokens_of(16, 40 + seed), BIG)
            hashes = (await put(stub, p, payloads(1, 40 + seed, BIG), metadata=A)).block_hashes
            try:
                pinned += (await stub.Pin(pb.BlocksRequest(block_hashes=hashes), metadata=A)).count
            except grpc.aio.AioRpcError as exc:
                refused = exc.code()
                break
        assert refused == StatusCode.RESOURCE_EXHAUSTED
        assert 0 < pinned < 64
        # Tenant b stores as much as before: G2 evicts a's unpinned blocks, not b's puts.
        p = prompt(tokens_of(24 * 16, 99), BIG)
        result = await put(stub, p, payloads(24, 99, BIG), metadata=B)
        assert result.stored == 24
        found = await stub.Lookup(pb.LookupRequest(prompt=p), metadata=B)
        assert found.hit_blocks == 24
        assert server.engine.index.num_in("G2") <= 64


async def test_leases_are_bounded_per_tenant(tmp_path: Path) -> None:
    async with running(tenant_config(tmp_path, max_leased_blocks_per_tenant=8)) as (_, stub, _):
        p = prompt(tokens_of(6 * 4, 50))
        await put(stub, p, payloads(6, 50), metadata=A)
        first = await stub.Reserve(pb.ReserveRequest(prompt=p), metadata=A)
        assert len(first.block_hashes) == 6
        await expect_status(
            stub.Reserve(pb.ReserveRequest(prompt=p), metadata=A),
            StatusCode.RESOURCE_EXHAUSTED,
            "max_leased_blocks_per_tenant",
        )
        usage = (await stub.Stats(pb.StatsRequest(), metadata=A)).tenant
        assert (usage.leased_blocks, usage.max_leased_blocks) == (6, 8)
        assert usage.leased_bytes == 6 * (HEADER_BYTES + SPEC.block_nbytes)
        await stub.Release(pb.ReleaseRequest(lease_id=first.lease_id), metadata=A)
        again = await stub.Reserve(pb.ReserveRequest(prompt=p, num_blocks=4), metadata=A)
        assert len(again.block_hashes) == 4
        # A Fetch's own lease is the server's, for the length of the copy: not bounded.
        _, got, _ = await fetch(stub, p, metadata=A)
        assert len(got) == 6


# -- a refused Put stores nothing (item 7) -------------------------------------------------------

# 600 blocks of 32 KiB: two 16 MiB store batches of the Put handler, the first stored before the
# second arrives.
_ROLL = 600


def _roll_config(tmp_path: Path, **tenants: Any) -> StoreConfig:
    return store_config(
        tmp_path,
        g2_blocks=2 * _ROLL,
        g3=False,
        server=ServerConfig(listen="127.0.0.1:0", max_prompt_tokens=1 << 14),
        **tenants,
    )


async def wait_for(predicate: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _chunk(i: int, data: bytes, offset: int = 0) -> pb.PutRequest:
    return pb.PutRequest(chunk=pb.BlockChunk(block_index=i, offset=offset, data=data))


async def _write_blocks(call: Any, blocks: list[bytes], start: int = 0) -> None:
    for i, data in enumerate(blocks, start):
        await call.write(_chunk(i, data))


async def test_a_put_refused_in_its_second_batch_stores_nothing(tmp_path: Path) -> None:
    async with running(_roll_config(tmp_path)) as (server, stub, _):
        p = prompt(tokens_of(_ROLL * 16, 60), BIG)
        blocks = payloads(_ROLL, 60, BIG)
        call = stub.Put()
        await call.write(pb.PutRequest(header=pb.PutHeader(prompt=p)))
        await _write_blocks(call, blocks[:550])
        await wait_for(lambda: len(server.engine.index) >= 512, "the first batch to be stored")
        await call.write(_chunk(550, blocks[550], offset=7))  # not where block 550 starts
        await call.done_writing()
        await expect_status(call, StatusCode.INVALID_ARGUMENT, "expected a chunk of block 550")
        assert (await stub.Lookup(pb.LookupRequest(prompt=p))).hit_blocks == 0
        assert len(server.engine.index) == 0
        assert server.engine.counters.values["put_rollback_blocks"] >= 512


async def test_a_put_broken_off_after_a_stored_batch_stores_nothing(tmp_path: Path) -> None:
    async with running(_roll_config(tmp_path)) as (server, stub, _):
        p = prompt(tokens_of(_ROLL * 16, 61), BIG)
        call = stub.Put()
        await call.write(pb.PutRequest(header=pb.PutHeader(prompt=p)))
        await _write_blocks(call, payloads(550, 61, BIG))
        await wait_for(lambda: len(server.engine.index) >= 512, "the first batch to be stored")
        call.cancel()
        await wait_for(lambda: len(server.engine.index) == 0, "the stored batch to be removed")
        assert (await stub.Lookup(pb.LookupRequest(prompt=p))).hit_blocks == 0


async def test_a_failed_put_keeps_what_another_put_was_acknowledged_for(tmp_path: Path) -> None:
    async with running(_roll_config(tmp_path)) as (server, stub, _):
        tokens = tokens_of(_ROLL * 16, 62)
        blocks = payloads(_ROLL, 62, BIG)
        p = prompt(tokens, BIG)
        failing = stub.Put()
        await failing.write(pb.PutRequest(header=pb.PutHeader(prompt=p)))
        await _write_blocks(failing, blocks[:550])
        await wait_for(lambda: len(server.engine.index) >= 512, "the first batch to be stored")
        # Another client puts the first 512 blocks and is acknowledged: they stay hers.
        done = await put(stub, p, blocks[:512], num_blocks=512)
        assert (done.stored, done.already) == (0, 512)
        await failing.write(_chunk(550, b""))  # a chunk without data
        await failing.done_writing()
        await expect_status(failing, StatusCode.INVALID_ARGUMENT, "no data")
        found = await stub.Lookup(pb.LookupRequest(prompt=p))
        assert found.hit_blocks == 512
        assert len(server.engine.index) == 512
        _, got, _ = await fetch(stub, p, max_blocks=512)
        assert got == blocks[:512]


async def test_a_put_past_the_quota_in_its_second_batch_stores_nothing(tmp_path: Path) -> None:
    quota = 560 * (HEADER_BYTES + BIG.block_nbytes)
    config = _roll_config(tmp_path, tenants=[TenantConfig("a", TOKEN_A, quota_bytes=quota)])
    config = replace(config, server=replace(config.server, secret="a-server-secret-of-length"))
    async with running(config) as (server, stub, _):
        p = prompt(tokens_of(_ROLL * 16, 63), BIG)
        reply = stub.Put(iter(put_messages(p, payloads(_ROLL, 63, BIG))), metadata=A)
        await expect_status(reply, StatusCode.RESOURCE_EXHAUSTED, "quota")
        assert len(server.engine.index) == 0
        usage = (await stub.Stats(pb.StatsRequest(), metadata=A)).tenant
        assert usage.stored_bytes == 0


# -- heavy requests do not stall small ones (item 8) ---------------------------------------------


async def test_small_lookups_complete_while_a_2m_token_lookup_runs(tmp_path: Path) -> None:
    config = store_config(
        tmp_path, server=ServerConfig(listen="127.0.0.1:0", max_prompt_tokens=1 << 21)
    )
    async with running(config) as (server, _, _):
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
            stub = pb_grpc.KVStoreStub(ch)
            small = prompt(tokens_of(16, 70))
            await put(stub, small, payloads(4, 70))
            huge = pb.Prompt(
                namespace=small.namespace, tokens_u32le=bytes(range(256)) * (1 << 15)
            )  # 2M tokens: 512K blocks of 4 tokens
            registry = server.metrics.registry
            big = asyncio.ensure_future(stub.Lookup(pb.LookupRequest(prompt=huge)))
            await wait_for(
                lambda: registry.get_sample_value("kvstore_rpcs_in_flight", {"method": "Lookup"}),
                "the huge lookup to start",
            )
            for _ in range(2):
                found = await stub.Lookup(pb.LookupRequest(prompt=small))
                assert found.hit_blocks == 4
            # The small lookups were answered while the huge one was still being worked on
            # (before, its hashing and index work held the event loop until it was done).
            assert not big.done()
            reply = await big
            assert len(reply.block_hashes) == 1 << 19
            assert reply.hit_blocks == 0
