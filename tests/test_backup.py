"""``kvstore backup``: a consistent copy of G3 taken while the service runs, verified block by
block, that a new service starts from. Real LMDB files, a real server, the CLI as its own
process (LMDB must not be opened twice in one process)."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

import lmdb
import torch
from test_server import SPEC, store_config

from client import AsyncClient
from kvstore.core.block_format import HEADER_BYTES
from kvstore.service.server import KVStoreServer

ROOT = Path(__file__).resolve().parent.parent


async def backup(g3: Path, dest: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvstore.cli",
        "backup",
        "--set",
        f"g3.path={g3}",
        str(dest),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def kv_of(tokens: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_layers, 2, len(tokens), SPEC.num_kv_heads, SPEC.head_dim)
    return torch.randn(shape, generator=g).to(torch.float16)


async def test_a_backup_taken_while_serving_restores_every_block(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    assert config.g3 is not None
    tokens = list(range(10, 10 + 12 * SPEC.block_tokens))
    kv = kv_of(tokens, 1)
    server = KVStoreServer(config)
    target = f"127.0.0.1:{await server.start()}"
    try:
        async with AsyncClient(target) as client:
            await client.put(SPEC, tokens, kv, durable=True)
            code, out = await backup(Path(config.g3.path), tmp_path / "backup")
            assert code == 0, out
            assert "12 ok, 0 bad" in out
            # The service kept going: a put after the backup is not in it.
            later = list(range(5000, 5000 + 2 * SPEC.block_tokens))
            await client.put(SPEC, later, kv_of(later, 2), durable=True)
    finally:
        await server.stop(0)

    restored = replace(
        store_config(tmp_path, g3_dir="unused"),
        g3=replace(config.g3, path=str(tmp_path / "backup")),
    )
    server = KVStoreServer(restored)
    target = f"127.0.0.1:{await server.start()}"
    try:
        async with AsyncClient(target) as client:
            past, n = await client.get_prefix(SPEC, tokens)
            assert n == len(tokens)
            assert torch.equal(past, kv)
            assert (await client.lookup(SPEC, later)).hit_blocks == 0
    finally:
        await server.stop(0)


async def test_a_backup_reports_blocks_that_were_corrupt(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    assert config.g3 is not None
    tokens = list(range(10, 10 + 4 * SPEC.block_tokens))
    async with KVStoreServer(config) as server:
        await server.engine.put(SPEC, tokens, kv_of(tokens, 3), durable=True)
        hashes = server.engine.hashes(SPEC, tokens)
    env = lmdb.open(config.g3.path, max_dbs=4, map_size=config.g3.map_size)
    with env.begin(db=env.open_db(b"blocks"), write=True) as txn:
        value = bytearray(txn.get(hashes[2]))
        value[HEADER_BYTES + 3] ^= 0x01
        txn.put(hashes[2], value)
    env.close()
    code, out = await backup(Path(config.g3.path), tmp_path / "backup")
    assert code == 1
    assert "3 ok, 1 bad" in out
    assert hashes[2].hex() in out
    code, out = await backup(Path(config.g3.path), tmp_path / "backup")
    assert code == 1
    assert "is not empty" in out
