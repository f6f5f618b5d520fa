"""A batched Lookup through the service against its floor: hashing the prompt plus one round trip.

Run ``python -m benchmarks.lookup [--quick]`` from the repository root. A kvstore server (G2 only,
port 0) runs in this process and holds one prompt of 512 small blocks (16 tokens each, 8192
tokens). For the first 1, 64 and 512 blocks of that prompt the client's ``lookup`` alternates
with its baseline:

- ``AsyncClient.lookup(spec, tokens)``: the request built, sent, the prompt hashed on the server,
  the index walked, the reply built, sent and turned into a ``Lookup``;
- ``block_hashes(spec, tokens)`` (the hashing any lookup needs) followed by one raw gRPC unary
  round trip (a generic handler, bytes in and bytes out, no protobuf) whose request and reply
  are as large as the Lookup's own on the wire, measured in the same run by sending the
  serialized request to the service through the same kind of raw call.

The ratio is lookup / baseline; the target (issue 16) is ≤ 1.2× at 512 blocks. Mooncake's
``batch_is_exist`` of 512 keys, hashing included, took 1.6 ms on the issue's machine. Client and
both servers share one event loop and one process, as in benchmarks/service.py, so that the
ratio compares the protocols rather than the number of cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import grpc

from benchmarks.report import Table, amedians_s, print_tables
from client import AsyncClient
from client.convert import lookup_request
from kvstore.config import StoreConfig
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.service.server import KVStoreServer, ServerConfig
from tiers.pinned_memory import PinnedTierConfig

NUM_BLOCKS = 512
SIZES = (1, 64, NUM_BLOCKS)
TARGET = 1.2
HEADERS = (
    "blocks",
    "request B",
    "reply B",
    "Lookup ms",
    "hash ms",
    "raw RTT ms",
    "hash + RTT ms",
    "ratio",
    "target",
)
TEXT = frozenset({"target"})


def _identity(data: bytes) -> bytes:
    return data


class RawUnary:
    """A bare gRPC unary method that answers any request with one fixed reply (no protobuf)."""

    def __init__(self) -> None:
        self.reply = b""
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "bench.Raw",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(
                    self.unary, request_deserializer=_identity, response_serializer=_identity
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def unary(self, request: bytes, context: Any) -> bytes:
        return self.reply


async def run(args: argparse.Namespace) -> list[tuple[str, ...]]:
    spec = ModelSpec(
        "bench/lookup", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16
    )  # 2 KiB blocks: the put of the prompt is quick, the lookup does not care
    config = StoreConfig(
        g2=PinnedTierConfig(
            (spec.block_nbytes + 4096) * (NUM_BLOCKS + 8),
            pin="never",
            segment_prefix="kvstore-bench",
        ),
        g3=None,
        server=ServerConfig(listen="127.0.0.1:0"),
    )
    server = KVStoreServer(config)
    port = await server.start()
    raw = RawUnary()
    await raw.server.start()
    rows: list[tuple[str, ...]] = []
    try:
        import torch

        # A list, as engines hold prompts (vLLM's prompt_token_ids); values of a large vocabulary.
        tokens = [(i * 7919) % 152064 for i in range(NUM_BLOCKS * spec.block_tokens)]
        g = torch.Generator().manual_seed(0)
        kv = torch.randn((2, 2, len(tokens), 2, 8), generator=g).to(torch.float16)
        async with (
            AsyncClient(f"127.0.0.1:{port}", same_host=False) as store,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as service_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{raw.port}") as raw_channel,
        ):
            put = await store.put(spec, tokens, kv)
            assert put.stored == NUM_BLOCKS, put
            raw_lookup = service_channel.unary_unary(
                "/kvstore.v1.KVStore/Lookup",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
            raw_call = raw_channel.unary_unary(
                "/bench.Raw/Unary", request_serializer=_identity, response_deserializer=_identity
            )
            for num_blocks in SIZES:
                part = tokens[: num_blocks * spec.block_tokens]
                request = lookup_request(spec, part).SerializeToString()  # what lookup sends
                raw.reply = await raw_lookup(request)  # the Lookup's reply, byte for byte
                hash_s: list[float] = []
                rtt_s: list[float] = []

                async def lookup(part: list[int] = part, n: int = num_blocks) -> None:
                    found = await store.lookup(spec, part)
                    assert found.hit_blocks == n, found.hit_blocks

                async def baseline(
                    part: list[int] = part,
                    request: bytes = request,
                    hash_s: list[float] = hash_s,
                    rtt_s: list[float] = rtt_s,
                ) -> None:
                    start = time.perf_counter()
                    block_hashes(spec, part)
                    hashed = time.perf_counter()
                    reply = await raw_call(request)
                    rtt_s.append(time.perf_counter() - hashed)
                    hash_s.append(hashed - start)
                    assert len(reply) == len(raw.reply)

                t, base = await amedians_s(lookup, baseline, args.repeats)
                hashing, rtt = statistics.median(hash_s), statistics.median(rtt_s)
                ratio = t / base
                met = "yes" if ratio <= TARGET else "NO"
                rows.append(
                    (
                        str(num_blocks),
                        str(len(request)),
                        str(len(raw.reply)),
                        f"{t * 1e3:.3f}",
                        f"{hashing * 1e3:.3f}",
                        f"{rtt * 1e3:.3f}",
                        f"{base * 1e3:.3f}",
                        f"{ratio:.2f}×",
                        f"{met} (≤ {TARGET}×)" if num_blocks == NUM_BLOCKS else "(measured)",
                    )
                )
    finally:
        await raw.server.stop(None)
        await server.stop()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lookup", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    args.repeats = 100 if args.quick else 500
    rows = asyncio.run(run(args))
    title = (
        f"Lookup through the service vs hashing + one raw gRPC round trip of the same sizes, "
        f"16-token blocks, alternating samples, median of {args.repeats}"
        f"{' (quick)' if args.quick else ''}"
    )
    print_tables([Table(title, HEADERS, rows, TEXT)], "grpcio", "protobuf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
