"""The same-GPU hand-off (``HandOffG1``, ``AsyncClient.get_prefix_from_g1``) against a real server.

On any machine: every refusal, with its status and a message that names it, and with nothing
held afterwards — a prompt or ``device_uuid`` that is malformed (INVALID_ARGUMENT), a server with
several tenants (PERMISSION_DENIED: a handle would map their blocks too), a segment that was never
handed over on this host or is not the caller's, G1 off or on the CPU (FAILED_PRECONDITION); and
the copy of extents into a caller's tensor, on CPU tensors.

With CUDA (``pytest -m cuda``; skipped, and reported so, elsewhere): a server process with G1 on
the GPU and this process as its peer — the blocks put arrive bit-exact in a CUDA tensor through
the IPC handle, the lease is released after, and a second hand-off reuses the opened handle.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_same_host import TOKEN_A, segment, tenant_config
from test_server import SPEC, expect_status, payloads, prompt, put, running, store_config, tokens_of

from client import AsyncClient, Client, InvalidArgumentError
from client.g1_ipc import copy_blocks
from kvstore.service.server import ServerConfig
from kvstore.v1 import kvstore_pb2 as pb
from tiers.gpu_memory import GpuTierConfig

StatusCode = grpc.StatusCode
UUID = bytes(range(16))


def with_g1(config: Any, device: str = "cpu") -> Any:
    return dataclasses.replace(config, g1=GpuTierConfig(4 << 20, device=device))


def hand_off(p: pb.Prompt, segment_id: int, **kw: Any) -> pb.G1HandOffRequest:
    return pb.G1HandOffRequest(prompt=p, segment_id=segment_id, device_uuid=UUID, **kw)


async def leases(server: Any) -> int:
    return int(server.engine.index.num_leases)


# -- refusals, on any machine ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("g1", "why"), [(True, "not in a CUDA allocation"), (False, "G1 is off")], ids=["cpu", "off"]
)
async def test_g1_on_the_cpu_or_off_has_no_handle_and_holds_nothing(
    tmp_path: Path, g1: bool, why: str
) -> None:
    config = store_config(tmp_path)
    async with running(with_g1(config) if g1 else config) as (server, stub, _):
        p = prompt(tokens_of(4 * SPEC.block_tokens, 1))
        await put(stub, p, payloads(4, 1))
        async with segment(stub, 4096) as (segment_id, _):
            await expect_status(
                stub.HandOffG1(hand_off(p, segment_id)), StatusCode.FAILED_PRECONDITION, why
            )
        assert await leases(server) == 0


async def test_a_segment_never_handed_over_is_no_proof_of_the_host(tmp_path: Path) -> None:
    async with running(with_g1(store_config(tmp_path))) as (server, stub, _):
        p = prompt(tokens_of(2 * SPEC.block_tokens, 3))
        # OpenSegment answers anyone; only redeeming the ticket on the abstract socket proves
        # the host. This caller never redeems it.
        reply = await stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=4096))
        await expect_status(
            stub.HandOffG1(hand_off(p, reply.segment_id)),
            StatusCode.FAILED_PRECONDITION,
            "never handed over",
        )
        await expect_status(
            stub.HandOffG1(hand_off(p, reply.segment_id + 12345)),
            StatusCode.FAILED_PRECONDITION,
            "not open for this tenant",
        )
        assert await leases(server) == 0


async def test_malformed_requests_are_invalid_arguments(tmp_path: Path) -> None:
    async with running(with_g1(store_config(tmp_path))) as (_, stub, _):
        p = prompt(tokens_of(2 * SPEC.block_tokens, 4))
        async with segment(stub, 4096) as (segment_id, _):
            short = pb.G1HandOffRequest(prompt=p, segment_id=segment_id, device_uuid=b"\x01" * 5)
            await expect_status(stub.HandOffG1(short), StatusCode.INVALID_ARGUMENT, "device_uuid")
            await expect_status(
                stub.HandOffG1(hand_off(p, segment_id, num_blocks=3)),
                StatusCode.INVALID_ARGUMENT,
                "num_blocks",
            )
            await expect_status(
                stub.HandOffG1(hand_off(p, segment_id, ttl_s=-1.0)),
                StatusCode.INVALID_ARGUMENT,
                "ttl_s",
            )
            await expect_status(
                stub.HandOffG1(hand_off(pb.Prompt(), segment_id)),
                StatusCode.INVALID_ARGUMENT,
                "namespace",
            )


async def test_a_server_of_several_tenants_hands_out_no_handle(tmp_path: Path) -> None:
    config = with_g1(tenant_config(tmp_path))
    auth = (("authorization", f"Bearer {TOKEN_A}"),)
    async with running(config) as (server, stub, _):
        p = prompt(tokens_of(2 * SPEC.block_tokens, 5))
        async with segment(stub, 4096, auth) as (segment_id, _):
            await expect_status(
                stub.HandOffG1(hand_off(p, segment_id), metadata=auth),
                StatusCode.PERMISSION_DENIED,
                "one tenant",
            )
        assert await leases(server) == 0


async def test_the_client_refuses_a_cpu_tensor_and_reports_no_path(tmp_path: Path) -> None:
    config = with_g1(store_config(tmp_path, server=ServerConfig(listen="127.0.0.1:0")))
    async with running(config) as (server, _, _), AsyncClient(f"127.0.0.1:{server.port}") as store:
        tokens = tokens_of(2 * SPEC.block_tokens, 6)
        out = torch.zeros(SPEC.num_layers, 2, len(tokens), SPEC.num_kv_heads, SPEC.head_dim)
        with pytest.raises(InvalidArgumentError, match="CUDA tensor"):
            await store.get_prefix_from_g1(SPEC, tokens, out.half())


def test_extents_are_copied_into_their_tokens_and_bad_ones_refused() -> None:
    n = 3
    blocks = payloads(n, 7)
    # A slab with the blocks at scattered, aligned offsets, as G1 holds them.
    offsets = [4096, 0, 2 * 4096 + 256]
    slab = torch.zeros(4 * 4096 + SPEC.block_nbytes, dtype=torch.uint8)
    for off, data in zip(offsets, blocks, strict=True):
        slab[off : off + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    extents = [pb.G1Extent(offset=o, nbytes=SPEC.block_nbytes) for o in offsets]
    t = SPEC.block_tokens
    out = torch.zeros(SPEC.num_layers, 2, n * t, SPEC.num_kv_heads, SPEC.head_dim).half()
    assert copy_blocks(SPEC, slab, extents, out) == n
    for i, data in enumerate(blocks):
        got = out[:, :, i * t : (i + 1) * t].contiguous().view(torch.uint8).numpy().tobytes()
        assert got == data
    outside = [pb.G1Extent(offset=slab.numel() - 10, nbytes=SPEC.block_nbytes)]
    with pytest.raises(InvalidArgumentError, match="inside its slab"):
        copy_blocks(SPEC, slab, outside, out)
    wrong = [pb.G1Extent(offset=0, nbytes=SPEC.block_nbytes - 2)]
    with pytest.raises(InvalidArgumentError, match="not a block"):
        copy_blocks(SPEC, slab, wrong, out)


# -- the hand-off itself, with CUDA ----------------------------------------------------------------

_SERVER = textwrap.dedent(
    """
    import asyncio, dataclasses, sys
    sys.path[:0] = [{tests!r}]
    from test_server import store_config
    from pathlib import Path
    from kvstore.service.server import KVStoreServer, ServerConfig
    from tiers.gpu_memory import GpuTierConfig

    async def main():
        config = store_config(Path({tmp!r}), server=ServerConfig(listen="127.0.0.1:0"))
        config = dataclasses.replace(config, g1=GpuTierConfig(64 << 20, device="cuda:0"))
        server = KVStoreServer(config)
        port = await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(0)

    asyncio.run(main())
    """
)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_peer_process_copies_g1_blocks_through_the_ipc_handle(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)
    code = _SERVER.format(tests=tests, tmp=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tests).parent), tests]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with Client(f"127.0.0.1:{port}") as store:
            n, t = 6, SPEC.block_tokens
            tokens = tokens_of(n * t + 1, 8)
            g = torch.Generator().manual_seed(8)
            shape = (SPEC.num_layers, 2, n * t, SPEC.num_kv_heads, SPEC.head_dim)
            kv = torch.randn(shape, generator=g).half()
            store.put(SPEC, tokens[: n * t], kv)
            found = store.lookup(SPEC, tokens)
            assert found.tiers[:n] == ["G1"] * n
            out = torch.full(shape, float("nan"), dtype=torch.float16, device="cuda")
            assert store.get_prefix_from_g1(SPEC, tokens, out) == n * t
            assert torch.equal(out.cpu().view(torch.int16), kv.view(torch.int16))
            assert store.stats().num_leases == 0
            # Again: the handle opened once is reused, and a shorter hit copies what G1 holds.
            again = torch.zeros_like(out)
            assert store.get_prefix_from_g1(SPEC, tokens, again, max_blocks=2) == 2 * t
            assert torch.equal(again[:, :, : 2 * t].cpu(), kv[:, :, : 2 * t])
            assert not again[:, :, 2 * t :].any()
            other = tokens_of(2 * t, 9)
            assert store.get_prefix_from_g1(SPEC, other, out) == 0
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_a_caller_on_another_gpu_is_refused_before_anything_is_held(
    tmp_path: Path,
) -> None:
    """A caller naming a GPU other than G1's is refused before anything is held."""
    async with running(with_g1(store_config(tmp_path), "cuda:0")) as (server, stub, _):
        p = prompt(tokens_of(2 * SPEC.block_tokens, 10))
        await put(stub, p, payloads(2, 10))
        async with segment(stub, 4096) as (segment_id, _):
            await expect_status(
                stub.HandOffG1(hand_off(p, segment_id)),
                StatusCode.FAILED_PRECONDITION,
                "a handle opens on G1's GPU only",
            )
        assert await leases(server) == 0
