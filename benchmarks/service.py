"""The service's Fetch path against the floors beneath it, measured in the same run.

Run ``python -m benchmarks.service [--quick]`` from the repository root. A kvstore server runs
in this process (G2 + G3, port 0) holding one prompt of 2 MiB blocks; the client fetches its
leading hit into one preallocated tensor, alternating with each baseline:

- same-host Fetch into an ordinary tensor (the server copies the verified blocks into the
  client's own segment, the client copies them into its tensor) against a plain memcpy of the
  same bytes into a pre-faulted buffer; target ≥ 0.5× (two copies);
- same-host Fetch into a K/V buffer (``kv_buffer``: the tensor lives in the client's segment, and
  the server writes each verified block straight into its place) against the same memcpy;
  target ≥ 0.8× (one copy, checksummed in the same pass);
- same-host Put from an ordinary tensor (the client copies its tensor into its segment, the
  server copies the blocks into G2; G3 receives them in the background) of the same prompt,
  after a flush each time, against the same memcpy;
- same-host Put from a K/V buffer (no copy in the client; the server reads the blocks out of the
  segment) against the same memcpy; target ≥ 0.7×;
- bytes Fetch (payload streamed in 1 MiB chunks) against a raw Python gRPC server stream of the
  same payload in 1 MiB messages (bytes in, bytes out, no protobuf), received into the same kind
  of buffer; target ≥ 0.7×;
- for reference, the floor under every same-host row: a memcpy of the same bytes between two
  shared-memory mappings (a memfd, as the client's segments are, and a ``/dev/shm`` segment, as
  G2 is) against the memcpy between two heap buffers that the rows are measured against. Shared
  memory here has small pages only (``transparent_hugepage/shmem_enabled`` is ``never``), heap
  memory gets huge pages, so a one-copy path cannot beat this ratio on this host.

Client and servers share one event loop and one process, as in the baseline, so the ratios
compare the protocols rather than the number of cores.

A second table measures what a huge request does to small ones: the latency of a 4-block Lookup
alone, against the same Lookup issued every 20 ms while three 2M-token Lookups (512K blocks each)
run beside it (client in this process, server in another, so that the client's own timing is
not held up by the server's work).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from benchmarks.report import Table, amedians_s, print_tables
from client import AsyncClient
from kvstore.config import StoreConfig
from kvstore.core.keys import ModelSpec
from kvstore.service.server import KVStoreServer, ServerConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

MiB = 1 << 20
CHUNK = 1 * MiB
HEADERS = ("path", "payload", "kvstore GB/s", "baseline", "baseline GB/s", "ratio", "target")
TEXT = frozenset({"path", "payload", "baseline", "target"})


class RawStream:
    """A bare gRPC server-streaming method that sends a payload in fixed-size raw messages."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "bench.Raw",
            {
                "Stream": grpc.unary_stream_rpc_method_handler(
                    self.stream,
                    request_deserializer=lambda b: b,
                    response_serializer=lambda b: b,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        view = memoryview(self.payload)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])


async def run(args: argparse.Namespace, workdir: Path) -> list[tuple[str, ...]]:
    spec = ModelSpec(
        "bench/service",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        block_tokens=16,
    )  # 2 MiB blocks
    num_blocks = args.total_mib // 2
    slot = spec.block_nbytes + 4096
    config = StoreConfig(
        g2=PinnedTierConfig(
            slot * (num_blocks + 8) * 2, pin="never", segment_prefix="kvstore-bench"
        ),
        g3=LmdbTierConfig(str(workdir / "g3"), 4 * spec.block_nbytes * num_blocks),
        server=ServerConfig(listen="127.0.0.1:0"),
    )
    server = KVStoreServer(config)
    port = await server.start()
    raw: RawStream | None = None
    try:
        tokens = np.arange(num_blocks * spec.block_tokens, dtype=np.int64)
        g = torch.Generator().manual_seed(0)
        kv = torch.randn((32, 2, len(tokens), 8, 128), generator=g).to(torch.bfloat16)
        target = f"127.0.0.1:{port}"
        out = torch.empty_like(kv)
        out.view(torch.uint8).fill_(1)  # pre-faulted
        nbytes = kv.numel() * kv.element_size()
        rows: list[tuple[str, ...]] = []
        async with (
            AsyncClient(target, same_host=True) as shm_client,
            AsyncClient(target, same_host=False) as byte_client,
        ):
            await byte_client.put(spec, tokens, kv, durable=True)

            # Same host vs memcpy.
            src = np.frombuffer(kv.contiguous().view(torch.uint8).numpy(), dtype=np.uint8)
            dst = np.ones(nbytes, dtype=np.uint8)

            async def same_host() -> None:
                _, n = await shm_client.get_prefix(spec, tokens, out=out)
                assert n == len(tokens)

            async def memcpy() -> None:
                np.copyto(dst, src)

            def memcpy_row(path: str, t: float, base: float, target: float | None) -> None:
                ratio = base / t
                verdict = "(measured)"
                if target is not None:
                    verdict = f"{'yes' if ratio >= target else 'NO'} (≥ {target}×)"
                rows.append(
                    (
                        path,
                        f"{nbytes // MiB} MiB",
                        f"{nbytes / t / 1e9:.2f}",
                        "memcpy",
                        f"{nbytes / base / 1e9:.2f}",
                        f"{ratio:.2f}×",
                        verdict,
                    )
                )

            # The floor of a same-host copy on this host: shared mapping to shared mapping.
            with contextlib.ExitStack() as stack:
                fd = os.memfd_create("kvstore-bench")
                stack.callback(os.close, fd)
                os.ftruncate(fd, nbytes)
                seg = stack.enter_context(mmap.mmap(fd, nbytes))
                shm = shared_memory.SharedMemory(create=True, size=nbytes)
                stack.callback(shm.unlink)
                stack.callback(shm.close)
                # Views in a list: dropped before the mappings close (else BufferError).
                ends = [np.frombuffer(seg, dtype=np.uint8), np.frombuffer(shm.buf, dtype=np.uint8)]
                ends[0][:] = src
                ends[1][:] = 0

                async def shm_copy() -> None:
                    np.copyto(ends[1], ends[0])

                shm_t, shm_base = await amedians_s(shm_copy, memcpy, args.repeats)
                ends.clear()
            floor = (
                "memcpy, shared mapping to shared mapping (floor)",
                f"{nbytes // MiB} MiB",
                f"{nbytes / shm_t / 1e9:.2f}",
                "memcpy",
                f"{nbytes / shm_base / 1e9:.2f}",
                f"{shm_base / shm_t:.2f}×",
                "(reference)",
            )

            t, base = await amedians_s(same_host, memcpy, args.repeats)
            assert torch.equal(out, kv), "same-host fetch returned other bytes"
            memcpy_row("Fetch, same host, into a tensor", t, base, 0.5)

            # Into a K/V buffer: the tensor is in the client's segment, one copy in all.
            buffer = await shm_client.kv_buffer(spec, len(tokens))

            async def into_buffer() -> None:
                _, n = await shm_client.get_prefix(spec, tokens, out=buffer)
                assert n == len(tokens)

            t, base = await amedians_s(into_buffer, memcpy, args.repeats)
            assert torch.equal(buffer, kv), "fetch into a K/V buffer returned other bytes"
            memcpy_row("Fetch, same host, into a K/V buffer", t, base, 0.8)

            # Same-host puts vs memcpy: the store is flushed (untimed) before each put.
            for path, source, target in (
                ("Put, same host, from a tensor", kv, None),
                ("Put, same host, from a K/V buffer", buffer, 0.7),
            ):
                put_s, copy_s = [], []
                for _ in range(args.repeats + 1):
                    await shm_client.flush()
                    start = time.perf_counter()
                    result = await shm_client.put(spec, tokens, source)
                    put_s.append(time.perf_counter() - start)
                    assert result.stored == num_blocks
                    start = time.perf_counter()
                    np.copyto(dst, src)
                    copy_s.append(time.perf_counter() - start)
                t, base = statistics.median(put_s[1:]), statistics.median(copy_s[1:])
                memcpy_row(path, t, base, target)
            await byte_client.put(spec, tokens, kv, durable=True)
            _, n = await byte_client.get_prefix(spec, tokens, out=out)
            assert n == len(tokens)
            assert torch.equal(out, kv), "a K/V buffer put stored other bytes"

            # Bytes vs a raw gRPC stream of the same payload.
            raw = RawStream(bytes(src))
            await raw.server.start()
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{raw.port}",
                options=[("grpc.max_receive_message_length", 64 * MiB)],
            )
            call = channel.unary_stream(
                "/bench.Raw/Stream",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )

            async def bytes_fetch() -> None:
                _, n = await byte_client.get_prefix(spec, tokens, out=out)
                assert n == len(tokens)

            async def raw_stream() -> None:
                pos = 0
                async for message in call(b""):
                    dst[pos : pos + len(message)] = np.frombuffer(message, dtype=np.uint8)
                    pos += len(message)
                assert pos == nbytes

            out.zero_()
            t, base = await amedians_s(bytes_fetch, raw_stream, args.repeats)
            assert torch.equal(out, kv), "bytes fetch returned other bytes"
            await channel.close()
            ratio = base / t
            rows.append(
                (
                    "Fetch, bytes over gRPC",
                    f"{nbytes // MiB} MiB",
                    f"{nbytes / t / 1e9:.2f}",
                    "raw gRPC stream, 1 MiB messages",
                    f"{nbytes / base / 1e9:.2f}",
                    f"{ratio:.2f}×",
                    f"{'yes' if ratio >= 0.7 else 'NO'} (≥ 0.7×)",
                )
            )
        rows.append(floor)
        return rows
    finally:
        if raw is not None:
            await raw.server.stop(None)
        await server.stop()


_HEAVY_SERVER = """
import asyncio, sys
from kvstore.config import StoreConfig
from kvstore.service.server import KVStoreServer, ServerConfig
from tiers.pinned_memory import PinnedTierConfig

async def main():
    config = StoreConfig(
        g2=PinnedTierConfig(64 << 20, pin="never", segment_prefix="kvstore-bench"),
        g3=None,
        server=ServerConfig(listen="127.0.0.1:0", max_prompt_tokens=1 << 21),
    )
    server = KVStoreServer(config)
    print(await server.start(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def heavy_rows(port: int) -> list[tuple[str, ...]]:
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    spec = ModelSpec("bench/heavy", 2, 2, 8, "float16", 4)
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        namespace = pb.Namespace(
            model_id=spec.name,
            num_layers=2,
            num_kv_heads=2,
            head_dim=8,
            dtype="float16",
            block_tokens=4,
        )
        small = pb.LookupRequest(prompt=pb.Prompt(namespace=namespace, tokens_u32le=bytes(64)))
        huge = pb.LookupRequest(
            prompt=pb.Prompt(
                namespace=namespace, tokens_u32le=np.arange(1 << 21, dtype="<u4").tobytes()
            )
        )

        async def timed() -> float:
            start = time.perf_counter()
            await stub.Lookup(small)
            return time.perf_counter() - start

        for _ in range(5):
            await timed()
        alone = [await timed() for _ in range(50)]
        bigs = [asyncio.ensure_future(stub.Lookup(huge)) for _ in range(3)]
        during: list[float] = []
        while not all(b.done() for b in bigs):
            during.append(await timed())
            await asyncio.sleep(0.02)
        await asyncio.gather(*bigs)
    rows: list[tuple[str, ...]] = []
    for name, fn in (("median", statistics.median), ("max", max)):
        a, d = fn(alone) * 1e3, fn(during) * 1e3
        rows.append(
            (
                f"4-block Lookup, {name}",
                f"{d:.1f}",
                f"{a:.1f}",
                f"{d / a:.1f}×",
                str(len(during)),
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="less data, fewer repeats")
    args = parser.parse_args(argv)
    args.total_mib = 32 if args.quick else 128
    args.repeats = 3 if args.quick else 9
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-service-") as workdir:
        rows = asyncio.run(run(args, Path(workdir)))
    # The server of the second table runs in a process of its own.
    proc = subprocess.Popen(
        [sys.executable, "-c", _HEAVY_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        heavy = asyncio.run(heavy_rows(int(proc.stdout.readline())))
    finally:
        proc.kill()
        proc.wait()
    title = (
        f"Fetch through the service vs its floors, one prompt of 2 MiB blocks, "
        f"alternating samples, median of {args.repeats}{' (quick)' if args.quick else ''}"
    )
    heavy_title = "Small requests beside huge ones: three 2M-token Lookups at once"
    heavy_headers = ("request", "during (ms)", "alone (ms)", "during / alone", "samples")
    print_tables(
        [
            Table(title, HEADERS, rows, TEXT),
            Table(heavy_title, heavy_headers, heavy, frozenset({"request"})),
        ],
        "grpcio",
        "protobuf",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
