"""The commands that open the store's files themselves, offline: ``config`` (the effective
configuration), ``stats`` (the tiers as the service would open them), ``selfcheck`` (write, read
back and delete test blocks in every tier), ``backup`` and ``restore`` (G3's LMDB environment).

They find the store the way ``kvstore serve`` does (the same defaults, file, ``KVSTORE_*``
variables and ``--set``). The engine, the tiers and torch are imported inside the commands:
the CLI starts without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from kvstore.cli.options import print_table, progress_bar, rebuild_progress, size, stdout
from kvstore.cli.settings import (
    config_option,
    load,
    print_config_option,
    print_settings,
    set_option,
)
from kvstore.core.data_folder import DataFolderLock, stored_blocks
from kvstore.core.errors import KVStoreError
from kvstore.core.keys import ModelSpec, block_hashes

if TYPE_CHECKING:
    from kvstore.config import StoreConfig
    from tiers.base import Tier

__all__ = ["COMMANDS"]


def _store_folder(cfg: StoreConfig, command: str) -> Path:
    """G3's folder, which must hold a store: an empty folder is an operator's mistake (the
    service keeps its data elsewhere), and reporting zero blocks would hide it."""
    if cfg.g3 is None:
        raise click.ClickException(
            f"G3 is off in this configuration (g3.enabled=false): `kvstore {command}` works on "
            "the store in G3's folder"
        )
    folder = Path(cfg.g3.path)
    if stored_blocks(folder) is None:
        raise click.ClickException(
            f"no kvstore store in {folder} (g3.path): `kvstore {command}` refuses a folder that "
            "holds none. The service keeps its store where its g3.path says (default "
            "./kvstore-data/g3 in the folder `kvstore serve` was started in): give this command "
            "the service's --config, KVSTORE_G3_PATH or --set g3.path=DIR, or run it from there."
        )
    return folder


@click.command("config")
@config_option
@set_option
def show_config(config_path: str | None, settings: tuple[str, ...]) -> None:
    """Show the effective configuration (defaults < file < KVSTORE_* env < --set).

    The same as `--print-config` of serve, stats, backup, restore and selfcheck.
    """
    print_settings(load(config_path, settings))


@click.command()
@config_option
@set_option
@print_config_option
@click.option("--blocks", "num_blocks", default=32, show_default=True, help="Blocks per tier.")
@click.option("--block-tokens", default=16, show_default=True, help="Tokens per test block.")
def selfcheck(
    config_path: str | None,
    settings: tuple[str, ...],
    print_config: bool,
    num_blocks: int,
    block_tokens: int,
) -> None:
    """Write, read back, verify and delete test blocks in every enabled tier."""
    cfg = load(config_path, settings)
    if print_config:
        print_settings(cfg)
        return
    ok = asyncio.run(_selfcheck(cfg, num_blocks, block_tokens))
    sys.exit(0 if ok else 1)


@click.command()
@config_option
@set_option
@print_config_option
def stats(config_path: str | None, settings: tuple[str, ...], print_config: bool) -> None:
    """Open the store as the service would (rebuilding the index from G3) and show each tier.

    It reads the same data folder as `kvstore serve` with the same settings, and refuses one
    that holds no store.
    """
    cfg = load(config_path, settings)
    if print_config:
        print_settings(cfg)
        return
    _store_folder(cfg, "stats")
    try:
        asyncio.run(_stats(cfg))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@config_option
@set_option
@print_config_option
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--no-verify", is_flag=True, help="Skip reading back every block of the copy (faster)."
)
def backup(
    config_path: str | None,
    settings: tuple[str, ...],
    print_config: bool,
    dest: Path,
    no_verify: bool,
) -> None:
    """Copy G3 (the LMDB environment at g3.path) to DEST while the service runs.

    LMDB copies from one read transaction: the backup is a consistent snapshot, and the service
    keeps writing meanwhile. The copy is compacted (free pages dropped), then every block in it
    is verified (header and payload checksums) unless --no-verify. Restore: stop the service,
    point g3.path at the copy (or move it into place), start: the index is rebuilt from it.
    """
    import lmdb

    cfg = load(config_path, settings)
    if print_config:
        print_settings(cfg)
        return
    source = _store_folder(cfg, "backup")
    assert cfg.g3 is not None
    if dest.exists() and any(dest.iterdir()):
        raise click.ClickException(f"{dest} exists and is not empty; give a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # max_readers as the service's: a read-only handle shares its reader table. No lock=False:
    # the copy's read transaction must be visible to the service's writer.
    env = lmdb.open(
        str(source),
        readonly=True,
        max_dbs=4,
        max_readers=cfg.g3.max_readers,
        map_size=cfg.g3.map_size,
        subdir=True,
    )
    try:
        with stdout.status(f"copying {source} to {dest}"):
            env.copy(str(dest), compact=True)
    finally:
        env.close()
    copied = time.perf_counter() - started
    size = (dest / "data.mdb").stat().st_size
    total, bad = _verify_store(dest, "verifying the copy", skip=no_verify)
    table = Table(title=f"G3 backup of {source}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("blocks", str(total))
    table.add_row("bytes", f"{size / (1 << 20):.1f} MiB")
    table.add_row("copy time", f"{copied:.2f} s")
    table.add_row("verified", "skipped" if no_verify else f"{total - len(bad)} ok, {len(bad)} bad")
    print_table(table, stdout)
    if bad:
        for line in bad[:20]:
            click.echo(f"corrupt in the source: {line}", err=True)
        raise click.ClickException(
            f"{len(bad)} blocks of the copy failed verification (they were corrupt in G3; the "
            "service deletes such blocks when it reads them)"
        )


def _verify_store(folder: Path, what: str, *, skip: bool = False) -> tuple[int, list[str]]:
    """``(blocks, problems)`` of the LMDB store in ``folder``: every block's header and payload
    checksums read back, with a progress bar (only counted with ``skip``)."""
    import lmdb

    from kvstore.core.block_format import verify_block
    from kvstore.core.errors import CorruptBlockError

    env = lmdb.open(str(folder), readonly=True, max_dbs=4, subdir=True, lock=False)
    bad: list[str] = []
    try:
        db = env.open_db(b"blocks", create=False)
        with env.begin(db=db) as txn:
            total = int(txn.stat(db)["entries"])
            if skip:
                return total, bad
            with progress_bar(what) as progress:
                task = progress.add_task("verify", total=total)
                for key, value in txn.cursor():
                    try:
                        verify_block(key, value)
                    except CorruptBlockError as exc:
                        bad.append(f"{bytes(key).hex()}: {exc}")
                    progress.advance(task)
    finally:
        env.close()
    return total, bad


@click.command()
@config_option
@set_option
@print_config_option
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--force", is_flag=True, help="Replace the blocks g3.path holds now.")
def restore(
    config_path: str | None,
    settings: tuple[str, ...],
    print_config: bool,
    source: Path,
    force: bool,
) -> None:
    """Put a backup (from `kvstore backup`) in place as G3, at g3.path.

    The service must be stopped: restore holds the data folder's lock, which a running service
    holds too. Every block of SOURCE is verified first; nothing changes unless all of them pass.
    The copy is written next to the store and renamed over it, so a crash midway leaves either
    the old store or the restored one. Start the service afterwards: it rebuilds its index from
    the restored G3.
    """
    import lmdb

    cfg = load(config_path, settings)
    if print_config:
        print_settings(cfg)
        return
    if cfg.g3 is None:
        raise click.ClickException("G3 is off in this configuration (g3.enabled=false)")
    if stored_blocks(source) is None:
        raise click.ClickException(f"{source} holds no kvstore backup (no LMDB store of blocks)")
    target = Path(cfg.g3.path)
    if target.resolve() == source.resolve():
        raise click.ClickException(f"{source} is g3.path itself")
    lock = DataFolderLock(target)
    try:
        lock.acquire("kvstore restore")
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        held = stored_blocks(target)
        if held and not force:
            raise click.ClickException(
                f"g3.path {target} already holds {held} blocks; --force replaces them"
            )
        total, bad = _verify_store(source, "verifying the backup")
        if bad:
            for line in bad[:20]:
                click.echo(f"corrupt in the backup: {line}", err=True)
            raise click.ClickException(
                f"{len(bad)} of {total} blocks of {source} failed verification; nothing restored"
            )
        staging = target / ".restore"
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
        staging.mkdir(exist_ok=True)
        started = time.perf_counter()
        env = lmdb.open(str(source), readonly=True, max_dbs=4, subdir=True, lock=False)
        try:
            with stdout.status(f"copying {source} to {target}"):
                env.copy(str(staging), compact=True)
        finally:
            env.close()
        # rename(2) is atomic: the store at g3.path is the old one or the restored one. LMDB's
        # lock file belongs to the old store's readers; with the folder locked there are none.
        (staging / "data.mdb").replace(target / "data.mdb")
        with contextlib.suppress(FileNotFoundError):
            (target / "lock.mdb").unlink()
        staging.rmdir()
        seconds = time.perf_counter() - started
    finally:
        lock.release()
    table = Table(title=f"G3 restored from {source}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("g3.path", str(target))
    table.add_row("blocks", str(total))
    table.add_row("replaced", str(held or 0))
    table.add_row("copy time", f"{seconds:.2f} s")
    print_table(table, stdout)


async def _stats(cfg: StoreConfig) -> None:
    from kvstore.engine.engine import Engine

    with rebuild_progress() as report:
        t0 = time.perf_counter()
        engine = await Engine.open(cfg, progress=report)
    elapsed = time.perf_counter() - t0
    try:
        info = await engine.stats()
    finally:
        await engine.close()
    table = Table(title=f"kvstore tiers ({info.num_blocks} blocks indexed in {elapsed:.2f} s)")
    for col in ("tier", "blocks", "used", "capacity", "used %", "fragmentation %"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for name, tier in info.tiers.items():
        pct = 100 * tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0.0
        table.add_row(
            name,
            str(tier.num_blocks),
            size(tier.used_bytes),
            size(tier.capacity_bytes),
            f"{pct:.1f}",
            f"{100 * tier.fragmentation:.1f}" if name in ("G1", "G2") else "-",
        )
    print_table(table, stdout)


def _open_tier(tier_cfg: object) -> Tier:
    """The tier of a ``[gN]`` section, as the engine opens it."""
    from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
    from tiers.lmdb_store import LmdbTier, LmdbTierConfig
    from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
    from tiers.redis_store import RedisTier, RedisTierConfig

    classes: dict[type[Any], Callable[[Any], Tier]] = {
        GpuTierConfig: GpuMemoryTier,
        PinnedTierConfig: PinnedMemoryTier,
        LmdbTierConfig: LmdbTier,
        RedisTierConfig: RedisTier,
    }
    return classes[type(tier_cfg)](tier_cfg)


async def _selfcheck(cfg: StoreConfig, num_blocks: int, block_tokens: int) -> bool:
    import torch

    from kvstore.core.block_format import decode_block, encode_block

    spec = ModelSpec(
        "kvstore/selfcheck",
        num_layers=8,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        block_tokens=block_tokens,
    )
    # A fresh salt: the check never touches (or is confused by) blocks of earlier runs.
    hashes = block_hashes(
        spec, list(range(num_blocks * block_tokens)), salt=secrets.token_bytes(16)
    )
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(spec.block_shape, generator=g).to(torch.bfloat16) for _ in hashes]
    blocks = [(h, encode_block(spec, h, t)) for h, t in zip(hashes, tensors, strict=True)]
    nbytes = sum(len(v) for _, v in blocks)

    table = Table(title=f"kvstore self-check: {num_blocks} blocks of {nbytes // num_blocks} bytes")
    for col in ("tier", "where", "put GB/s", "get GB/s", "result"):
        table.add_column(col)
    all_ok = True
    with progress_bar(transient=True) as progress:
        for name, tier_cfg in cfg.tiers():
            where = str(
                getattr(tier_cfg, "path", None)
                or getattr(tier_cfg, "url", None)
                or getattr(tier_cfg, "device", None)
                or "shared memory"
            )
            task = progress.add_task(f"{name} put+get", total=2 * num_blocks)
            try:
                tier = _open_tier(tier_cfg)
            except KVStoreError as exc:
                table.add_row(name, where, "-", "-", f"[red]cannot open: {exc}")
                all_ok = False
                continue
            try:
                t0 = time.perf_counter()
                for key, value in blocks:
                    await tier.put([(key, value)])
                    progress.advance(task)
                t1 = time.perf_counter()
                got = []
                for key, _ in blocks:
                    got.extend(await tier.get([key]))
                    progress.advance(task)
                t2 = time.perf_counter()
                bad = [
                    i
                    for i, ((key, value), back) in enumerate(zip(blocks, got, strict=True))
                    if back != value or not torch.equal(decode_block(spec, key, back), tensors[i])
                ]
                result = "[green]ok" if not bad else f"[red]{len(bad)} blocks differ"
                all_ok &= not bad
                table.add_row(
                    name,
                    where,
                    f"{nbytes / (t1 - t0) / 1e9:.2f}",
                    f"{nbytes / (t2 - t1) / 1e9:.2f}",
                    result,
                )
            except KVStoreError as exc:
                table.add_row(name, where, "-", "-", f"[red]{type(exc).__name__}: {exc}")
                all_ok = False
            finally:
                # Best effort: a tier that failed above may fail here too; its error is reported.
                with contextlib.suppress(KVStoreError):
                    await tier.delete(hashes)
                await tier.close()
    print_table(table, stdout)
    return all_ok


COMMANDS = (show_config, selfcheck, stats, backup, restore)
