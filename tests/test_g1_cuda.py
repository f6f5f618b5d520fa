"""G1 on a real GPU: the slab as one cudaMalloc, copies on the tier's own stream, puts invisible
until their copies complete, what same-GPU peers need (``ipc_handle``, ``device_uuid``,
``extent_of``), and blocks moving between G1 and pinned G2 through the engine, bit-exact.

The tests marked ``cuda`` skip (reported by ``pytest -ra``) without a CUDA device;
``scripts/gpu_check.sh`` runs them on a GPU machine. The first tests run anywhere: the
device-independent part of that API on a G1 built on the CPU.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import xxhash

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, decode_block, encode_block, read_header
from kvstore.core.extents import GRANULARITY
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes
from kvstore.engine.engine import Engine, EngineConfig
from tiers.gpu_memory import DEVICE_UUID_BYTES, IPC_HANDLE_BYTES, GpuMemoryTier, GpuTierConfig
from tiers.pinned_memory import PinnedTierConfig

# 16 KiB payloads: 2 layers x 2 x 16 tokens x 2 KV heads x 64 dims x 2 bytes.
SPEC = ModelSpec("g1", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
# 8 MiB payloads, for copies that take long enough to be caught in flight (>= 0.1 ms each).
BIG = ModelSpec(
    "g1-big", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=64
)
MiB = 1 << 20

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def content(spec: ModelSpec, key: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF)
    return torch.randn(spec.block_shape, generator=g).to(torch.float16)


def blocks(n: int, spec: ModelSpec = SPEC, first: int = 0) -> list[tuple[BlockHash, bytearray]]:
    tokens = list(range(first, first + n * spec.block_tokens))
    return [(h, encode_block(spec, h, content(spec, h))) for h in block_hashes(spec, tokens)]


def slab_view(tier: GpuMemoryTier, key: bytes) -> torch.Tensor:
    """The whole slab as uint8, through the storage under ``tensor_of``'s view."""
    view = tier.tensor_of(key)
    assert view is not None
    storage = view.untyped_storage()
    assert storage.nbytes() == tier.slab_bytes
    return torch.empty(0, dtype=torch.uint8, device=view.device).set_(storage)


def slab_payload(tier: GpuMemoryTier, key: bytes) -> bytes:
    """The bytes of the slab at ``extent_of(key)``, read through ``tensor_of``'s storage."""
    extent = tier.extent_of(key)
    assert extent is not None
    offset, nbytes, _ = extent
    return bytes(slab_view(tier, key)[offset : offset + nbytes].cpu().numpy())


def pinned(items: list[tuple[BlockHash, bytearray]]) -> list[tuple[BlockHash, memoryview]]:
    """The blocks copied into page-locked host memory (views of pinned tensors, which the views
    keep alive), to put from."""
    out = []
    for key, value in items:
        host = torch.empty(len(value), dtype=torch.uint8, pin_memory=True)
        host.numpy()[:] = np.frombuffer(value, dtype=np.uint8)
        out.append((key, memoryview(host.numpy())))
    return out


# -- anywhere: extent_of, slab_bytes, and the CUDA-only answers on the CPU ----------------------


async def test_extent_of_names_each_payload_in_the_slab_on_cpu() -> None:
    async with GpuMemoryTier(GpuTierConfig(1 * MiB, device="cpu")) as tier:
        assert tier.slab_bytes >= 1 * MiB
        assert tier.slab_bytes % GRANULARITY == 0
        items = blocks(5)
        assert await tier.put(items) == 5
        seen: list[tuple[int, int]] = []
        for key, value in items:
            extent = tier.extent_of(key)
            assert extent is not None
            offset, nbytes, payload_xxh3 = extent
            payload = bytes(value[HEADER_BYTES:])
            assert nbytes == len(payload) == SPEC.block_nbytes
            assert payload_xxh3 == read_header(value).payload_xxh3
            assert payload_xxh3 == xxhash.xxh3_64_intdigest(payload)
            assert offset % GRANULARITY == 0
            assert offset >= 0
            assert offset + nbytes <= tier.slab_bytes
            assert slab_payload(tier, key) == payload
            seen.append((offset, offset + nbytes))
        seen.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(seen))  # no overlap
        assert tier.extent_of(b"\x00" * 16) is None
        assert await tier.delete([items[0][0]]) == 1
        assert tier.extent_of(items[0][0]) is None


async def test_ipc_handle_and_device_uuid_are_none_on_cpu() -> None:
    async with GpuMemoryTier(GpuTierConfig(1 * MiB, device="cpu")) as tier:
        await tier.put(blocks(1))
        assert tier.ipc_handle() is None
        assert tier.device_uuid() is None


# -- on a GPU: the tier ---------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
async def test_g1_on_cuda_round_trip_from_pinned_and_pageable_memory() -> None:
    async with GpuMemoryTier(GpuTierConfig(4 * MiB, device="cuda")) as tier:
        assert tier.device.type == "cuda"
        assert tier.device.index is not None
        items = blocks(8)
        # Half from pinned host memory (DMA on the tier's stream), half from pageable bytes.
        assert await tier.put(pinned(items[:4])) == 4
        assert await tier.put([(k, bytes(v)) for k, v in items[4:]]) == 4
        keys = [k for k, _ in items]
        assert await tier.exists(keys) == [True] * 8
        assert await tier.get(keys) == [v for _, v in items]
        # get_into a pinned and a pageable destination.
        locked = [torch.zeros(len(v), dtype=torch.uint8, pin_memory=True) for _, v in items]
        pageable = [bytearray(len(v)) for _, v in items]
        assert await tier.get_into(keys, locked) == [len(v) for _, v in items]
        assert await tier.get_into(keys, pageable) == [len(v) for _, v in items]
        for (key, value), p, q in zip(items, locked, pageable, strict=True):
            assert bytes(p.numpy()) == bytes(value) == bytes(q)
            view = tier.tensor_of(key)
            assert view is not None
            assert view.device == tier.device
            assert torch.equal(view.cpu(), decode_block(SPEC, key, value))
        assert await tier.delete(keys[:3]) == 3
        assert await tier.get(keys[:3]) == [None] * 3
        assert (await tier.stats()).num_blocks == 5


@pytest.mark.cuda
@needs_cuda
async def test_a_put_is_invisible_until_its_copies_complete() -> None:
    items = blocks(3, BIG)
    batch = pinned(items)
    keys = [k for k, _ in items]
    async with GpuMemoryTier(GpuTierConfig(4 * len(items[0][1]), device="cuda")) as tier:
        put = asyncio.create_task(tier.put(batch))
        await asyncio.sleep(0)  # the put queues 24 MiB of copies and waits for their event
        assert not put.done()
        # The same put again, meanwhile: it copies nothing and returns once the first is done.
        again = asyncio.create_task(tier.put(batch))
        await asyncio.sleep(0)
        # None of these awaits anything (a get of misses only queues no copy): the put cannot
        # resume and commit between them.
        assert all(tier.extent_of(k) is None and tier.tensor_of(k) is None for k in keys)
        assert await tier.exists(keys) == [False] * 3
        assert (await tier.stats()).num_blocks == 0
        assert await tier.get(keys) == [None] * 3
        assert not put.done()
        assert await put == 3
        assert await again == 0
        assert await tier.get(keys) == [v for _, v in items]


@pytest.mark.cuda
@needs_cuda
async def test_a_cancelled_put_stores_nothing_and_frees_its_extents() -> None:
    items = blocks(3, BIG)
    batch = pinned(items)
    async with GpuMemoryTier(GpuTierConfig(4 * len(items[0][1]), device="cuda")) as tier:
        free = tier.slab_stats().free_bytes
        put = asyncio.create_task(tier.put(batch))
        await asyncio.sleep(0)
        assert not put.done()
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        assert await tier.exists([k for k, _ in items]) == [False] * 3
        assert tier.slab_stats().free_bytes == free
        # The extents are free again: the same blocks fit and land whole.
        assert await tier.put(items) == 3
        assert await tier.get([k for k, _ in items]) == [v for _, v in items]


@pytest.mark.cuda
@needs_cuda
async def test_ipc_handle_device_uuid_and_extent_of_on_cuda() -> None:
    async with GpuMemoryTier(GpuTierConfig(4 * MiB, device="cuda")) as tier:
        items = blocks(4)
        await tier.put(items)
        uuid = tier.device_uuid()
        assert isinstance(uuid, bytes)
        assert len(uuid) == DEVICE_UUID_BYTES
        props = torch.cuda.get_device_properties(tier.device)
        assert uuid.hex() == str(props.uuid).removeprefix("GPU-").replace("-", "")
        for key, value in items:
            extent = tier.extent_of(key)
            assert extent is not None
            assert extent[2] == read_header(value).payload_xxh3
            assert slab_view(tier, key).device == tier.device
            assert slab_payload(tier, key) == bytes(value[HEADER_BYTES:])
        pytest.importorskip("cupy", reason="the slab is a cupy cudaMalloc only with cupy")
        handle = tier.ipc_handle()
        assert isinstance(handle, bytes)
        assert len(handle) == IPC_HANDLE_BYTES
        assert tier.ipc_handle() == handle  # computed once
    assert tier.ipc_handle() is None


@pytest.mark.cuda
@needs_cuda
async def test_a_second_process_reads_a_block_through_the_ipc_handle() -> None:
    """Offset 0 of the slab is the base of the allocation that the handle maps."""
    pytest.importorskip("cupy", reason="the slab is a cupy cudaMalloc only with cupy")
    async with GpuMemoryTier(GpuTierConfig(4 * MiB, device="cuda")) as tier:
        items = blocks(6)
        await tier.put(items)
        handle = tier.ipc_handle()
        assert handle is not None
        peer = textwrap.dedent(
            """
            import sys
            import cupy, numpy, xxhash
            handle, device = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
            for arg in sys.argv[3:]:
                offset, n = map(int, arg.split(":"))
                with cupy.cuda.Device(device):
                    base = cupy.cuda.runtime.ipcOpenMemHandle(handle)
                    try:
                        host = numpy.empty(n, dtype=numpy.uint8)
                        cupy.cuda.runtime.memcpy(
                            host.ctypes.data, base + offset, n,
                            cupy.cuda.runtime.memcpyDeviceToHost,
                        )
                    finally:
                        cupy.cuda.runtime.ipcCloseMemHandle(base)
                print(xxhash.xxh3_64_intdigest(host.tobytes()))
            """
        )
        extents = [tier.extent_of(k) for k, _ in items[1::2]]
        assert None not in extents
        args = [f"{e[0]}:{e[1]}" for e in extents if e is not None]
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", peer, handle.hex(), str(tier.device.index), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert [int(x) for x in out.stdout.split()] == [e[2] for e in extents if e is not None]


# -- on a GPU: through the engine, G1 over pinned G2 ---------------------------------------------


def engine_config() -> StoreConfig:
    block = HEADER_BYTES + SPEC.block_nbytes
    return StoreConfig(
        g1=GpuTierConfig(64 * block, device="cuda"),
        g2=PinnedTierConfig(64 * block, pin="require", segment_prefix="kvstore-g1test"),
        engine=EngineConfig(reaper_interval_s=0.05),
    )


def prompt(n: int, first: int) -> tuple[list[int], torch.Tensor, list[BlockHash]]:
    tokens = list(range(first, first + n * SPEC.block_tokens))
    hashes = block_hashes(SPEC, tokens)
    kv = torch.zeros(
        (SPEC.num_layers, 2, len(tokens), SPEC.num_kv_heads, SPEC.head_dim), dtype=torch.float16
    )
    bt = SPEC.block_tokens
    for i, h in enumerate(hashes):
        kv[:, :, i * bt : (i + 1) * bt] = content(SPEC, h)
    return tokens, kv, hashes


@pytest.mark.cuda
@needs_cuda
async def test_engine_puts_into_g1_and_reads_back_bit_exact() -> None:
    e = await Engine.open(engine_config())
    try:
        tokens, kv, hashes = prompt(6, first=0)
        assert (await e.put(SPEC, tokens, kv)).stored == 6
        assert (await e.lookup(SPEC, tokens)).tiers == ["G1"] * 6
        got = await e.get(SPEC, hashes)
        assert all(
            t is not None and torch.equal(t, content(SPEC, h))
            for h, t in zip(hashes, got, strict=True)
        )
        for device in ("cpu", "cuda"):
            out = torch.full_like(kv, -1.0, device=device)
            assert await e.get_into(SPEC, hashes, out) == 6
            assert torch.equal(out.cpu(), kv)
        g1 = e.tier("G1", SPEC.fingerprint)
        assert isinstance(g1, GpuMemoryTier)
        for h in hashes:
            view = g1.tensor_of(h)
            assert view is not None
            assert view.device.type == "cuda"
            assert torch.equal(view.cpu(), content(SPEC, h))
        assert await e.evict(hashes) == 6
        assert (await e.lookup(SPEC, tokens)).tiers == [None] * 6
        assert await g1.exists(hashes) == [False] * 6
    finally:
        await e.close()


@pytest.mark.cuda
@needs_cuda
async def test_blocks_move_between_g1_and_pinned_g2_bit_exact() -> None:
    e = await Engine.open(engine_config())
    try:
        tokens, kv, hashes = prompt(4, first=10_000)
        await e.put(SPEC, tokens, kv)
        g1, g2 = e.tier("G1", SPEC.fingerprint), e.tier("G2", SPEC.fingerprint)
        assert isinstance(g1, GpuMemoryTier)
        stored = await g1.get(hashes)
        assert None not in stored
        # Demotion: evicted from G1, the blocks are written back to G2, byte for byte.
        assert await e.evict(hashes, "G1") == 4
        await e.drain()
        assert (await e.lookup(SPEC, tokens)).tiers == ["G2"] * 4
        assert await g1.exists(hashes) == [False] * 4
        assert await g2.get(hashes) == stored
        # Promotion: a hit in G2 is copied back up into G1, byte for byte.
        got = await e.get(SPEC, hashes)
        assert all(
            t is not None and torch.equal(t, content(SPEC, h))
            for h, t in zip(hashes, got, strict=True)
        )
        await e.drain()
        assert (await e.lookup(SPEC, tokens)).tiers == ["G1"] * 4
        assert await g1.get(hashes) == stored
        for h, value in zip(hashes, stored, strict=True):
            assert value is not None
            assert slab_payload(g1, h) == bytes(value[HEADER_BYTES:])
        counters = (await e.stats()).counters
        assert counters["demotions"] >= 4
        assert counters["promotions"] >= 4
    finally:
        await e.close()
