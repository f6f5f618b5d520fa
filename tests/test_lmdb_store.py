"""G3 beyond the contract: acknowledged writes survive ``kill -9`` of the writing process, and the
environment reopens with its byte count and keys rebuilt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvstore.core.block_format import decode_block
from kvstore.core.errors import ConfigError
from kvstore.core.keys import ModelSpec, block_hashes
from tiers.lmdb_store import LmdbTier, LmdbTierConfig

SPEC = ModelSpec(
    "crash", num_layers=4, num_kv_heads=4, head_dim=32, dtype="bfloat16", block_tokens=16
)

WRITER = textwrap.dedent(
    """
    import asyncio, sys, torch
    from kvstore.core.block_format import encode_block
    from kvstore.core.keys import ModelSpec, block_hashes
    from tiers.lmdb_store import LmdbTier, LmdbTierConfig

    spec = ModelSpec("crash", num_layers=4, num_kv_heads=4, head_dim=32, dtype="bfloat16",
                     block_tokens=16)
    sync = sys.argv[2] == "sync"

    async def main():
        tier = LmdbTier(LmdbTierConfig(sys.argv[1], 1 << 30, sync_on_commit=sync))
        i = 0
        while True:  # until killed
            (h,) = block_hashes(spec, list(range(i * 16, i * 16 + 16)))
            t = torch.full(spec.block_shape, float(i % 200)).to(torch.bfloat16)
            await tier.put([(h, encode_block(spec, h, t))])
            print(i, h.hex(), flush=True)  # acknowledged
            i += 1

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["nosync", "sync"])
def test_acknowledged_writes_survive_kill_9(tmp_path: Path, mode: str) -> None:
    path = str(tmp_path / "g3")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acked: list[tuple[int, str]] = []
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        i, h = line.split()
        acked.append((int(i), h))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Anything printed before the kill was acknowledged; read whatever is still buffered too.
    for line in proc.stdout:
        i, h = line.split()
        acked.append((int(i), h))
    assert len(acked) >= 40, "writer did not get going"

    import asyncio

    async def verify() -> None:
        tier = LmdbTier(LmdbTierConfig(path, 1 << 30))
        try:
            keys = [bytes.fromhex(h) for _, h in acked]
            got = await tier.get(keys)
            for (i, _), key, value in zip(acked, keys, got, strict=True):
                assert value is not None, f"acknowledged block {i} lost"
                t = decode_block(SPEC, key, value)
                assert float(t.float().flatten()[0]) == float(i % 200)
            stats = await tier.stats()
            assert stats.num_blocks >= len(acked)
            assert stats.num_corrupt == 0
        finally:
            await tier.close()

    asyncio.run(verify())


async def test_reopen_rebuilds_usage_and_lists_keys_in_batches(tmp_path: Path) -> None:
    import torch

    from kvstore.core.block_format import encode_block

    config = LmdbTierConfig(str(tmp_path / "g3"), 1 << 30)
    tier = LmdbTier(config)
    hashes = block_hashes(SPEC, list(range(16 * 5000)))
    t = torch.zeros(SPEC.block_shape, dtype=torch.bfloat16)
    blocks = [(h, encode_block(SPEC, h, t)) for h in hashes]
    for i in range(0, len(blocks), 500):
        await tier.put(blocks[i : i + 500])
    await tier.close()
    tier = LmdbTier(config)
    try:
        stats = await tier.stats()
        assert stats.num_blocks == 5000
        assert stats.used_bytes == sum(len(v) for _, v in blocks)
        listed = [k async for k in tier.iter_keys()]
        assert len(listed) == 5000
        assert set(listed) == set(hashes)
    finally:
        await tier.close()


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="capacity_bytes"):
        LmdbTierConfig("/tmp/x", 0)
    with pytest.raises(ConfigError, match="path"):
        LmdbTierConfig("", 1 << 20)
    with pytest.raises(ConfigError, match="cannot open LMDB"):
        LmdbTier(LmdbTierConfig("/proc/kvstore-cannot-be-here", 1 << 20))
