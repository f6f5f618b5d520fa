"""One data folder for every command, as an operator meets it: `kvstore serve` started with no
settings in a fresh folder (what `make run` does), then `kvstore backup`, `stats` and `restore`
run beside it with no settings either, as real processes against real LMDB files.

Only the G2 size differs from `make run` (64 MiB of shared memory instead of 1 GiB, in 64 KiB
slots): it does not change where the data goes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

from client import AsyncClient
from kvstore.config import load_config
from kvstore.core.keys import ModelSpec

SPEC = ModelSpec(
    "data-folder-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=8
)
NUM_BLOCKS = 12
# make run's defaults but a small G2; nothing about where G3 lives.
ENV = {"KVSTORE_G2_CAPACITY_BYTES": "64MiB"}


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(ENV, COLUMNS="200")
    return env


async def kvstore(cwd: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvstore.cli", *args,
        cwd=cwd, env=cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    assert b"Traceback" not in err, err.decode()
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def serving(cwd: Path) -> AsyncIterator[str]:
    """`kvstore serve` in ``cwd`` with no settings of where its data goes; yields its address."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvstore.cli", "serve", "--listen", "127.0.0.1:0",
        cwd=cwd, env=cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "kvstore serve ended before it served"
            if line.startswith("kvstore serving on "):
                break
        yield line.split()[3]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)


def kv_of(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_layers, 2, num_tokens, SPEC.num_kv_heads, SPEC.head_dim)
    return torch.randn(shape, generator=g).to(torch.float16)


def test_every_command_resolves_the_same_folder(tmp_path: Path) -> None:
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        default = load_config(env={})
        from_env = load_config(env={"KVSTORE_G3_PATH": "rel/g3"})
    finally:
        os.chdir(cwd)
    assert default.g3 is not None
    assert from_env.g3 is not None
    # Absolute once resolved: what --print-config shows is what every command opens.
    assert default.g3.path == str(tmp_path / "kvstore-data" / "g3")
    assert from_env.g3.path == str(tmp_path / "rel" / "g3")


async def test_backup_right_after_serve_holds_exactly_the_served_blocks(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    tokens = list(range(100, 100 + NUM_BLOCKS * SPEC.block_tokens))
    kv = kv_of(len(tokens), seed=1)
    async with serving(run) as target, AsyncClient(target) as client:
        assert (await client.put(SPEC, tokens, kv, durable=True)).stored == NUM_BLOCKS
        served = {t.tier: t.num_blocks for t in (await client.stats()).tiers}
        assert served["G3"] == NUM_BLOCKS

        # The same resolution everywhere, printed the same way.
        commands = {"serve": [], "stats": [], "backup": ["dest"], "restore": ["."],
                    "selfcheck": [], "config": []}  # fmt: skip
        printed = await asyncio.gather(
            *(kvstore(run, c, *extra, *(["--print-config"] * (c != "config")))
              for c, extra in commands.items())
        )  # fmt: skip
        for command, (rc, out, err) in zip(commands, printed, strict=True):
            assert rc == 0, err
            assert str(run / "kvstore-data" / "g3") in out, command

        (rc, out, err), (stats_rc, stats_out, stats_err) = await asyncio.gather(
            kvstore(run, "backup", str(tmp_path / "backup")), kvstore(run, "stats")
        )
        assert rc == 0, err
        assert re.search(r"blocks\s+12\b", out), out
        assert f"{NUM_BLOCKS} ok, 0 bad" in out
        assert stats_rc == 0, stats_err
        assert f"{NUM_BLOCKS} blocks indexed" in stats_out

        # A folder with no store is refused, not reported as an empty backup.
        refusals = await asyncio.gather(
            kvstore(elsewhere, "backup", str(tmp_path / "empty-backup")),
            kvstore(elsewhere, "stats"),
            kvstore(run, "restore", str(tmp_path / "backup"), "--force"),
            kvstore(run, "serve", "--listen", "127.0.0.1:0"),
        )
        for rc, _, err in refusals[:2]:
            assert rc == 1
            assert f"no kvstore store in {elsewhere / 'kvstore-data' / 'g3'}" in err
        assert not (elsewhere / "kvstore-data").exists()  # and nothing was created there
        assert not (tmp_path / "empty-backup").exists()

        # Not under a running service, and not twice on one folder.
        for rc, _, err in refusals[2:]:
            assert rc == 1
            assert "is in use by kvstore serve, pid" in err

    # Restore into a new node's folder, serve there: every block comes back bit for bit.
    new = tmp_path / "new"
    new.mkdir()
    rc, out, err = await kvstore(new, "restore", str(tmp_path / "backup"))
    assert rc == 0, err
    assert re.search(r"blocks\s+12\b", out), out
    rc, _, err = await kvstore(new, "restore", str(tmp_path / "backup"))
    assert rc == 1
    assert f"already holds {NUM_BLOCKS} blocks; --force replaces them" in err
    async with serving(new) as target, AsyncClient(target) as client:
        past, hit = await client.get_prefix(SPEC, tokens)
        assert hit == len(tokens)
        assert torch.equal(past, kv)


@pytest.mark.parametrize("what", ["not a store", "corrupt block"])
async def test_restore_refuses_a_bad_backup_and_changes_nothing(
    tmp_path: Path, what: str
) -> None:
    import lmdb

    from kvstore.core.block_format import HEADER_BYTES

    run = tmp_path / "run"
    run.mkdir()
    tokens = list(range(10, 10 + 4 * SPEC.block_tokens))
    async with serving(run) as target, AsyncClient(target) as client:
        await client.put(SPEC, tokens, kv_of(len(tokens), seed=2), durable=True)
    rc, _, err = await kvstore(run, "backup", str(tmp_path / "backup"))
    assert rc == 0, err
    data = run / "kvstore-data" / "g3" / "data.mdb"
    before = data.read_bytes()
    source = tmp_path / "backup"
    if what == "not a store":
        source = tmp_path / "plain"
        source.mkdir()
        (source / "notes.txt").write_text("hello")
        message = "holds no kvstore backup"
    else:
        env = lmdb.open(str(source), max_dbs=4)
        with env.begin(db=env.open_db(b"blocks"), write=True) as txn:
            key, value = next(iter(txn.cursor()))
            flipped = bytearray(value)
            flipped[HEADER_BYTES + 1] ^= 0x10
            txn.put(key, bytes(flipped))
        env.close()
        message = "1 of 4 blocks"
    rc, _, err = await kvstore(run, "restore", str(source), "--force")
    assert rc == 1
    assert message in err
    assert data.read_bytes() == before
