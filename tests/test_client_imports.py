"""The client and the commands that only talk to a server run without importing torch.

torch takes about a second to import; ``kvstore ls`` and ``kvstore tiers`` carry no K/V, so the
client imports it only where a tensor is made or checked (client/__init__.py). Each command runs
as a real subprocess against ``KVStoreServer`` in this process (port 0, G2 + G3 in a tmp dir),
holding blocks stored through ``AsyncClient``; the check is on what the interpreter imported and
on what the command printed, not on a clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from client import AsyncClient
from kvstore.config import StoreConfig
from kvstore.core.keys import BlockHash, ModelSpec
from kvstore.service.server import KVStoreServer, ServerConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

SPEC = ModelSpec(
    "imports-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=8
)
MARK = "modules-after-the-command:"
# Runs the CLI in-process, then reports on stderr (stdout is the command's) whether torch is in.
RUN_CLI = (
    "import json, sys\n"
    "from kvstore.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:], prog_name='kvstore')\n"
    "    code = 0\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    f"print({MARK!r}, json.dumps({{'torch': 'torch' in sys.modules, 'code': code}}),\n"
    "      file=sys.stderr)\n"
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[KVStoreServer]:
    config = StoreConfig(
        g2=PinnedTierConfig(64 << 20, pin="never", segment_prefix="kvstore-importtest"),
        g3=LmdbTierConfig(str(tmp_path / "g3"), 64 << 20),
        server=ServerConfig(listen="127.0.0.1:0", shutdown_grace_s=0.5),
    )
    s = KVStoreServer(config)
    await s.start()
    yield s
    await s.stop(0)


async def stored(server: KVStoreServer) -> list[BlockHash]:
    kv = torch.ones((SPEC.num_layers, 2, 3 * SPEC.block_tokens, SPEC.num_kv_heads, SPEC.head_dim))
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        result = await client.put(SPEC, list(range(3 * SPEC.block_tokens)), kv.half())
    return result.hashes


async def kvstore(server: KVStoreServer, *args: str) -> tuple[str, bool]:
    """stdout of ``kvstore ARGS --server ...``, and whether the command imported torch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["COLUMNS"] = "100"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_CLI, *args, "--server", f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = json.loads(err.decode().rpartition(MARK)[2])
    assert report["code"] == 0, err.decode()
    return out.decode(), report["torch"]


async def test_ls_and_tiers_run_without_torch(server: KVStoreServer) -> None:
    hashes = await stored(server)
    (listing, ls_torch), (tiers, tiers_torch) = await asyncio.gather(
        kvstore(server, "ls"), kvstore(server, "tiers")
    )
    for h in hashes:
        assert h.hex() in listing
    assert "3 blocks" in listing
    for word in ("G2", "G3", "lookups"):
        assert word in tiers, tiers
    assert not ls_torch, "kvstore ls imported torch"
    assert not tiers_torch, "kvstore tiers imported torch"


def test_import_client_does_not_import_torch() -> None:
    code = "import sys, client; print('torch' in sys.modules, client.Client.__name__)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.split() == ["False", "Client"]
