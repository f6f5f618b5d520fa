"""The ``kvstore`` command line: check the tiers, show the effective configuration.

Commands map one-to-one onto library calls; output is rich tables, long operations show progress
bars. ``serve`` runs the gRPC service; later issues add the inspection commands on the same group.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvstore.block_format import decode_block, encode_block
from kvstore.cli_options import (
    PROMPT_FILE_OPTIONS,
    print_table,
    read_tokens,
    server_option,
    tls_ca_option,
    token_option,
)
from kvstore.config import StoreConfig, load_config
from kvstore.data_folder import DataFolderLock, stored_blocks
from kvstore.engine import Engine
from kvstore.errors import KVStoreError
from kvstore.keys import ModelSpec, block_hashes
from kvstore.server import KVStoreServer
from tiers.base import Tier
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.lmdb_store import LmdbTier, LmdbTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig

console = Console()
_TIER_CLASSES: dict[type[Any], Callable[[Any], Tier]] = {
    GpuTierConfig: GpuMemoryTier,
    PinnedTierConfig: PinnedMemoryTier,
    LmdbTierConfig: LmdbTier,
    RedisTierConfig: RedisTier,
}


def _overrides(settings: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise click.BadParameter(f"{item!r}: use TIER.FIELD=VALUE, e.g. g3.path=/data/g3")
        out.setdefault(section.strip().lower(), {})[name.strip()] = value
    return out


def _load(config_path: str | None, settings: tuple[str, ...]) -> StoreConfig:
    try:
        return load_config(config_path, overrides=_overrides(settings))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="KVSTORE_CONFIG",
    help="TOML file with [g1]..[g4] tables.",
)
set_option = click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="TIER.FIELD=VALUE",
    help="Override one setting, e.g. --set g4.enabled=true --set g4.url=redis://host:6379/0.",
)
print_config_option = click.option(
    "--print-config",
    is_flag=True,
    help="Print the effective configuration (tokens and secrets masked) and exit.",
)
_MASKED = frozenset({"secret", "token", "salt"})


def _print_config(cfg: StoreConfig, title: str = "kvstore configuration") -> None:
    """Every section of the effective configuration, as every command resolves it (the data
    folder included), with tokens and secrets masked."""
    table = Table(title=title)
    table.add_column("section")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    sections: list[tuple[str, Any]] = [
        *cfg.tiers(),
        ("placement", cfg.placement),
        ("engine", cfg.engine),
        ("server", cfg.server),
        *((f"tenants[{i}]", tenant) for i, tenant in enumerate(cfg.tenants)),
    ]
    for name, section in sections:
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if field.name in _MASKED and value:
                value = "****"
            table.add_row(name, field.name, str(value))
    print_table(table, console)


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


@click.group()
@click.version_option(package_name="kvstore")
def main() -> None:
    """kvstore: tiered KV-cache storage for LLM inference."""


@main.command("config")
@config_option
@set_option
def show_config(config_path: str | None, settings: tuple[str, ...]) -> None:
    """Show the effective configuration (defaults < file < KVSTORE_* env < --set).

    The same as `--print-config` of serve, stats, backup, restore and selfcheck.
    """
    _print_config(_load(config_path, settings))


@main.command()
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
    cfg = _load(config_path, settings)
    if print_config:
        _print_config(cfg)
        return
    ok = asyncio.run(_selfcheck(cfg, num_blocks, block_tokens))
    sys.exit(0 if ok else 1)


@main.command()
@config_option
@set_option
@print_config_option
def stats(config_path: str | None, settings: tuple[str, ...], print_config: bool) -> None:
    """Open the store as the service would (rebuilding the index from G3) and show each tier.

    It reads the same data folder as `kvstore serve` with the same settings, and refuses one
    that holds no store.
    """
    cfg = _load(config_path, settings)
    if print_config:
        _print_config(cfg)
        return
    _store_folder(cfg, "stats")
    try:
        asyncio.run(_stats(cfg))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
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

    cfg = _load(config_path, settings)
    if print_config:
        _print_config(cfg)
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
        with console.status(f"copying {source} to {dest}"):
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
    print_table(table, console)
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

    from kvstore.block_format import verify_block
    from kvstore.errors import CorruptBlockError

    env = lmdb.open(str(folder), readonly=True, max_dbs=4, subdir=True, lock=False)
    bad: list[str] = []
    try:
        db = env.open_db(b"blocks", create=False)
        with env.begin(db=db) as txn:
            total = int(txn.stat(db)["entries"])
            if skip:
                return total, bad
            with Progress(
                TextColumn(what),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
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


@main.command()
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

    cfg = _load(config_path, settings)
    if print_config:
        _print_config(cfg)
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
            with console.status(f"copying {source} to {target}"):
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
    print_table(table, console)


@contextlib.contextmanager
def _rebuild_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar for the index rebuild at start; yields the engine's progress callback."""
    with Progress(
        TextColumn("rebuilding the index from G3"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("rebuild", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield report


async def _stats(cfg: StoreConfig) -> None:
    with _rebuild_progress() as report:
        t0 = time.perf_counter()
        engine = await Engine.open(cfg, progress=report)
    elapsed = time.perf_counter() - t0
    try:
        info = await engine.stats()
    finally:
        await engine.close()
    table = Table(title=f"kvstore tiers ({info.num_blocks} blocks indexed in {elapsed:.2f} s)")
    for col in ("tier", "blocks", "used", "capacity", "used %"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for name, tier in info.tiers.items():
        pct = 100 * tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0.0
        table.add_row(
            name,
            str(tier.num_blocks),
            _size(tier.used_bytes),
            _size(tier.capacity_bytes),
            f"{pct:.1f}",
        )
    print_table(table, console)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


async def _selfcheck(cfg: StoreConfig, num_blocks: int, block_tokens: int) -> bool:
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
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for name, tier_cfg in cfg.tiers():
            where = str(
                getattr(tier_cfg, "path", None)
                or getattr(tier_cfg, "url", None)
                or getattr(tier_cfg, "device", None)
                or "shared memory"
            )
            task = progress.add_task(f"{name} put+get", total=2 * num_blocks)
            try:
                tier = _TIER_CLASSES[type(tier_cfg)](tier_cfg)
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
    print_table(table, console)
    return all_ok


# -- serve ---------------------------------------------------------------------------------------

@main.command()
@config_option
@set_option
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Address to serve on (server.listen; port 0 picks a free one).",
)
@click.option(
    "--g4-url",
    default=None,
    metavar="URL",
    help="Turn G4 on with this Redis URL (g4.enabled=true, g4.url=URL).",
)
@print_config_option
def serve(
    config_path: str | None,
    settings: tuple[str, ...],
    listen: str | None,
    g4_url: str | None,
    print_config: bool,
) -> None:
    """Serve the gRPC API until SIGINT or SIGTERM.

    Embedded default: G2 shared memory + G3 LMDB in ./kvstore-data/g3 (unless g3.path is set),
    the same folder `kvstore stats`, `backup` and `restore` open with the same settings.
    """
    overrides: dict[str, dict[str, str]] = {}
    if g4_url:
        overrides["g4"] = {"enabled": "true", "url": g4_url}
    for section, values in _overrides(settings).items():
        overrides.setdefault(section, {}).update(values)
    if listen:
        overrides.setdefault("server", {})["listen"] = listen
    try:
        cfg = load_config(config_path, overrides=overrides)
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    if print_config:
        _print_config(cfg, "kvstore serve configuration")
        return
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(cfg))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(cfg: StoreConfig) -> None:
    server = KVStoreServer(cfg)
    with _rebuild_progress() as report:
        port = await server.start(progress=report)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = cfg.server.listen.rpartition(":")[0]
    tiers = " + ".join(name for name, _ in cfg.tiers())
    # click.echo flushes: a supervisor (or a test) reading stdout learns the port at once.
    click.echo(f"kvstore serving on {host}:{port} ({tiers}, {len(server.engine.index)} blocks)")
    try:
        await stop.wait()
    finally:
        click.echo("kvstore stopping", err=True)
        await server.stop()


# -- the model worker --------------------------------------------------------------------------


_CONNECT_OPTIONS = (server_option, token_option, tls_ca_option)
_MODEL_OPTIONS = (
    click.option(
        "--model",
        "model_dir",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        envvar="KVSTORE_WORKER_MODEL",
        show_envvar=True,
        metavar="DIR",
        help="A local transformers causal LM (Llama, Qwen2, Mistral, GPT-2, ...). Default: the "
        "small built-in model, built from a config with --seed.",
    ),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
    click.option(
        "--dtype",
        type=click.Choice(["float32", "float16", "bfloat16"]),
        default="float32",
        show_default=True,
        help="The model's compute dtype, and its blocks' dtype.",
    ),
    click.option(
        "--block-tokens",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        envvar="KVSTORE_WORKER_BLOCK_TOKENS",
        show_envvar=True,
        help="Tokens per block of the model's namespace.",
    ),
    click.option("--device", default="cpu", show_default=True, help="torch device of the model."),
)


def _with(options: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _model_worker(
    model_dir: str | None, seed: int, dtype: str, block_tokens: int, device: str
) -> Any:
    """The ``ModelWorker`` of the model options (transformers is imported only here: it takes
    seconds, and the other commands never need it)."""
    from kvstore.worker import ModelWorker, WorkerConfig

    config = WorkerConfig(
        model_dir=model_dir or "", seed=seed, dtype=dtype, block_tokens=block_tokens, device=device
    )
    with console.status("loading the model"):
        return ModelWorker(config)


@main.command("worker")
@_with(_CONNECT_OPTIONS)
@_with(_MODEL_OPTIONS)
@click.option(
    "--name",
    default="",
    envvar="KVSTORE_WORKER_NAME",
    show_envvar=True,
    help="Name in `kvstore tiers` and logs (default host:pid).",
)
@click.option(
    "--spec-out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="FILE",
    help="Write the worker's namespace as JSON (for --model-spec of the other commands).",
)
@click.option(
    "--keepalive",
    "keepalive_s",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    envvar="KVSTORE_WORKER_KEEPALIVE_S",
    show_envvar=True,
    metavar="SECONDS",
    help="Ping the server this often while idle (the server permits server.min_ping_interval_s "
    "and up, 10 s by default), so that a dead server or network path is noticed.",
)
@print_config_option
def worker_command(
    server: str,
    token: str | None,
    tls_ca: str | None,
    model_dir: str | None,
    seed: int,
    dtype: str,
    block_tokens: int,
    device: str,
    name: str,
    spec_out: str | None,
    keepalive_s: float,
    print_config: bool,
) -> None:
    """Run a model worker: attach to a kvstore server and repair holes for it.

    The server sends each repair of the worker's namespace (the model, its weights, dtype and
    block size) to one of the workers attached for it; several may attach, and a worker that
    goes away is replaced by the others. Runs until SIGINT or SIGTERM; reconnects when the
    server restarts.
    """
    from kvstore.worker_link import WorkerLink

    if print_config:
        table = Table(title="kvstore worker configuration")
        table.add_column("setting")
        table.add_column("value", overflow="fold")
        settings = {
            "server": server,
            "token": "****" if token else "",
            "tls_ca": tls_ca or "",
            "model": model_dir or "(the built-in model)",
            "seed": seed,
            "dtype": dtype,
            "block_tokens": block_tokens,
            "device": device,
            "name": name or "(host:pid)",
            "keepalive_s": keepalive_s,
        }
        for key, value in settings.items():
            table.add_row(key, str(value))
        print_table(table, console)
        return
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        worker = _model_worker(model_dir, seed, dtype, block_tokens, device)
        spec = worker.spec
        if spec_out:
            Path(spec_out).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
        link = WorkerLink(
            worker, server, token=token, tls_ca=tls_ca, name=name, keepalive_s=keepalive_s
        )
        click.echo(f"worker {link.name}: {spec.name} ({json.dumps(spec.to_dict())})")
        asyncio.run(_run_worker(link))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


async def _run_worker(link: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def announce() -> None:
        await link.attached.wait()
        # click.echo flushes: a supervisor (or a test) reading stdout learns it at once.
        click.echo(f"worker attached to {link.target} as worker {link.worker_id}")

    announcer = asyncio.create_task(announce())
    try:
        await link.run(stop)
    finally:
        announcer.cancel()
        click.echo("worker stopping", err=True)


# -- prefill / decode roles ----------------------------------------------------------------------

_PROMPT_OPTIONS = (
    *PROMPT_FILE_OPTIONS,
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
)


def _role_client(server: str, token: str | None, tls_ca: str | None) -> Any:
    from client import AsyncClient

    return AsyncClient(server, token=token, tls_ca=tls_ca, timeout_s=300.0)


@main.command("prefill")
@_with(_CONNECT_OPTIONS)
@_with(_MODEL_OPTIONS)
@_with(_PROMPT_OPTIONS)
def prefill_command(
    server: str,
    token: str | None,
    tls_ca: str | None,
    model_dir: str | None,
    seed: int,
    dtype: str,
    block_tokens: int,
    device: str,
    tokens_file: Path | None,
    text_file: Path | None,
    as_json: bool,
) -> None:
    """Prefill role: compute a prompt's K/V with the model and store it durably.

    --server is this node's own service (its G4 is the Redis the decode nodes share), or, in
    direct mode, the decode node's service. Returns once the blocks are in the service's
    write-through tiers.
    """
    from kvstore.roles import prefill

    tokens = read_tokens(tokens_file, text_file)
    worker = _model_worker(model_dir, seed, dtype, block_tokens, device)

    async def run() -> Any:
        async with _role_client(server, token, tls_ca) as kv:
            return await prefill(worker, kv, tokens)

    try:
        with console.status(f"prefilling {len(tokens)} tokens"):
            result = asyncio.run(run())
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    doc = {
        "server": server,
        "namespace": worker.spec.to_dict(),
        "num_tokens": result.num_tokens,
        "stored_blocks": result.stored_blocks,
        "already_blocks": result.already_blocks,
        "compute_ms": result.compute_s * 1000,
        "store_ms": result.store_s * 1000,
    }
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(
        f"prefilled {result.num_tokens} tokens in {doc['compute_ms']:.1f} ms; stored "
        f"{result.stored_blocks} blocks ({result.already_blocks} already there) at {server} in "
        f"{doc['store_ms']:.1f} ms"
    )


@main.command("decode")
@_with(_CONNECT_OPTIONS)
@_with(_MODEL_OPTIONS)
@_with(_PROMPT_OPTIONS)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--repair-holes", is_flag=True, help="Have the service repair holes before fetching.")
def decode_command(
    server: str,
    token: str | None,
    tls_ca: str | None,
    model_dir: str | None,
    seed: int,
    dtype: str,
    block_tokens: int,
    device: str,
    tokens_file: Path | None,
    text_file: Path | None,
    as_json: bool,
    max_new_tokens: int,
    repair_holes: bool,
) -> None:
    """Decode role: continue a prompt from the K/V a prefill node stored.

    --server is this node's own service: it finds the prefill node's blocks in the shared G4
    (or in its own tiers, in direct mode). Prints the generated token ids and how many prompt
    tokens the model had to run over here.
    """
    from kvstore.roles import decode

    tokens = read_tokens(tokens_file, text_file)
    worker = _model_worker(model_dir, seed, dtype, block_tokens, device)

    async def run() -> Any:
        async with _role_client(server, token, tls_ca) as kv:
            return await decode(
                worker, kv, tokens, max_new_tokens=max_new_tokens, repair_holes=repair_holes
            )

    try:
        with console.status("decoding"):
            result = asyncio.run(run())
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    doc = {
        "server": server,
        "tokens": result.tokens,
        "prompt_tokens": len(tokens),
        "hit_tokens": result.hit_tokens,
        "computed_tokens": result.computed_tokens,
        "fetch_ms": result.fetch_s * 1000,
        "generate_ms": result.generate_s * 1000,
    }
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(" ".join(map(str, result.tokens)))
    click.echo(
        f"prompt {len(tokens)} tokens: {result.hit_tokens} from kvstore "
        f"({doc['fetch_ms']:.1f} ms), {result.computed_tokens} computed here; "
        f"{len(result.tokens)} new tokens in {doc['generate_ms']:.1f} ms",
        err=True,
    )


from kvstore import cli_client  # noqa: E402,F401
from kvstore.demo import demo  # noqa: E402

main.add_command(demo)  # registers the commands that talk to a server

if __name__ == "__main__":
    main()
