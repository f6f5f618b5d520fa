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

from kvstore.block_format import Codec
from kvstore.config import StoreConfig
from kvstore.keys import block_hashes
from kvstore.server import SERVICE_NAME as SERVICE
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
            # A non-durable put does not need G4: acknowledged.
            assert (await put(stub, prompt(tokens_of(8, 4)), payloads(2, 4))).stored == 2
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
    for setting in ("g2.capacity_bytes=2MiB", "g2.slot_bytes=64KiB", "g2.pin=never", *settings):
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
