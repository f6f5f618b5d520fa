"""G1 and G2 beyond the contract: size limits, the shared-memory segment's life cycle (no leak on
close or on ``kill -9``), and G1's in-place tensor views."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvstore.core.block_format import Codec, decode_block, encode_block
from kvstore.core.errors import BlockTooLargeError, ConfigError, InvalidArgumentError
from kvstore.core.keys import ModelSpec, block_hashes
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig, sweep_stale_segments

SPEC = ModelSpec("mem", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=8)
SHM = Path("/dev/shm")


def blocks(n: int, codec: Codec = Codec.RAW) -> list[tuple[bytes, bytearray]]:
    out = []
    for i, h in enumerate(block_hashes(SPEC, list(range(n * 8)))):
        t = torch.full(SPEC.block_shape, float(i), dtype=torch.float16)
        out.append((h, encode_block(SPEC, h, t, codec=codec)))
    return out


async def test_g2_refuses_a_block_larger_than_the_tier() -> None:
    # A block of SPEC is 2048 payload bytes + the 128-byte header: more than a 2 KiB tier.
    tier = PinnedMemoryTier(PinnedTierConfig(2048, pin="never", segment_prefix="kvstore-t"))
    try:
        with pytest.raises(BlockTooLargeError, match="larger than the whole tier"):
            await tier.put(blocks(2))
        assert (await tier.stats()).num_blocks == 0
    finally:
        await tier.close()


async def test_g2_segment_is_named_mapped_and_unlinked_on_close() -> None:
    tier = PinnedMemoryTier(
        PinnedTierConfig(1 << 20, pin="never", segment_prefix="kvstore-t")
    )
    name = tier.segment_name
    assert (SHM / name).exists()
    assert name.startswith(f"kvstore-t-{os.getpid()}-")
    (key, value), *_ = blocks(1)
    await tier.put([(key, value)])
    where = tier.slot_of(key)
    assert where is not None
    offset, n = where
    # A second mapping of the segment (what a same-host client will do) sees the block's bytes.
    from multiprocessing import shared_memory

    other = shared_memory.SharedMemory(name=name)
    try:
        assert bytes(other.buf[offset : offset + n]) == bytes(value)
    finally:
        other.close()
    await tier.close()
    assert not (SHM / name).exists()
    await tier.close()  # idempotent


def test_g2_segment_does_not_leak_when_the_owner_is_killed() -> None:
    script = textwrap.dedent(
        """
        import time
        from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
        t = PinnedMemoryTier(PinnedTierConfig(1 << 20, pin="never",
                                              segment_prefix="kvstore-crash"))
        print(t.segment_name, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    name = proc.stdout.readline().strip()
    assert (SHM / name).exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The resource tracker (a separate process) unlinks the segment once its owner is gone.
    deadline = time.monotonic() + 10
    while (SHM / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (SHM / name).exists()


def test_stale_segments_of_dead_processes_are_swept() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = SHM / f"kvstore-sweep-{dead.stdout.strip()}-deadbeef"
    alive = SHM / f"kvstore-sweep-{os.getpid()}-cafef00d"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    try:
        assert sweep_stale_segments("kvstore-sweep") == [stale.name]
        assert not stale.exists()
        assert alive.exists()
    finally:
        alive.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)


def test_g2_larger_than_dev_shm_is_refused_before_it_can_crash() -> None:
    # Touching pages of a segment past /dev/shm's free space would kill this process (SIGBUS):
    # the tier refuses before it creates anything.
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    slot = 1 << 20
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ConfigError, match=r"G2 needs \d+ bytes of shared memory but /dev/shm"):
        PinnedMemoryTier(PinnedTierConfig(free + 64 * slot, pin="never"))
    assert set(os.listdir("/dev/shm")) == before


def test_g2_config_errors() -> None:
    with pytest.raises(ConfigError, match="smaller than the allocation granularity"):
        PinnedMemoryTier(PinnedTierConfig(100, pin="never"))
    with pytest.raises(ConfigError, match="pin must be"):
        PinnedTierConfig(1 << 20, pin="sometimes")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pin=require"):
            PinnedMemoryTier(
                PinnedTierConfig(1 << 20, pin="require", segment_prefix="kvstore-t")
            )


async def test_g1_tensor_view_is_the_block_in_place() -> None:
    tier = GpuMemoryTier(GpuTierConfig(1 << 20, device="cpu"))
    try:
        items = blocks(3)
        await tier.put(items)
        for key, value in items:
            view = tier.tensor_of(key)
            assert view is not None
            assert view.shape == SPEC.block_shape
            assert torch.equal(view, decode_block(SPEC, key, value))
        assert tier.tensor_of(b"\x00" * 16) is None
    finally:
        await tier.close()


async def test_g1_stores_raw_blocks_only() -> None:
    tier = GpuMemoryTier(GpuTierConfig(1 << 20, device="cpu"))
    try:
        with pytest.raises(InvalidArgumentError, match="raw blocks only"):
            await tier.put(blocks(1, codec=Codec.ZSTD))
    finally:
        await tier.close()


def test_g1_on_cuda_without_cuda_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        GpuTierConfig(1 << 20, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_g1_and_pinned_g2_on_cuda() -> None:
    g1 = GpuMemoryTier(GpuTierConfig(1 << 22, device="cuda"))
    g2 = PinnedMemoryTier(
        PinnedTierConfig(1 << 22, pin="require", segment_prefix="kvstore-t")
    )
    try:
        assert g2.pinned
        items = blocks(4)
        for tier in (g1, g2):
            assert await tier.put(items) == 4
            assert await tier.get([k for k, _ in items]) == [v for _, v in items]
        view = g1.tensor_of(items[2][0])
        assert view is not None
        assert view.device.type == "cuda"
        assert torch.equal(view.cpu(), decode_block(SPEC, items[2][0], items[2][1]))
    finally:
        await g1.close()
        await g2.close()
