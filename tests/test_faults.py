"""Faults and hostile input against a real server (issue J): malformed bytes, refused puts,
tiers that are down or full, heavy requests beside small ones, pin and lease bounds.

Requests are built by hand where the point is bytes the generated stubs would never send.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from test_server import expect_status, payloads, prompt, put, running, store_config, tokens_of

from kvstore.server import SERVICE_NAME as SERVICE
from kvstore.v1 import kvstore_pb2 as pb

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
