"""``kvstore serve`` (the gRPC service, until SIGINT or SIGTERM) and ``kvstore worker`` (a model
worker attached to a server, repairing holes for it).

Both print one line on stdout once they are up (the port, the attachment): supervisors and tests
read it. The server and the model are imported when the command runs, not when the CLI starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from kvstore.cli.options import (
    Connection,
    ModelChoice,
    connect_options,
    env_option,
    model_options,
    print_table,
    rebuild_progress,
    seconds_option,
    stdout,
)
from kvstore.cli.settings import (
    config_option,
    load,
    overrides,
    print_config_option,
    print_settings,
    set_option,
)
from kvstore.core.errors import KVStoreError

if TYPE_CHECKING:
    from kvstore.config import StoreConfig
    from kvstore.worker.link import WorkerLink

__all__ = ["COMMANDS"]


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.command()
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
    # --set wins over --g4-url, --listen over --set.
    merged: dict[str, dict[str, str]] = {}
    if g4_url:
        merged["g4"] = {"enabled": "true", "url": g4_url}
    for section, values in overrides(settings).items():
        merged.setdefault(section, {}).update(values)
    if listen:
        merged.setdefault("server", {})["listen"] = listen
    cfg = load(config_path, merged)
    if print_config:
        print_settings(cfg, "kvstore serve configuration")
        return
    _log_to_stderr()
    try:
        asyncio.run(_serve(cfg))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(cfg: StoreConfig) -> None:
    from kvstore.service.server import KVStoreServer

    server = KVStoreServer(cfg)
    with rebuild_progress() as report:
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


@click.command("worker")
@connect_options
@model_options
@env_option(
    "--name",
    envvar="KVSTORE_WORKER_NAME",
    default="",
    help="Name in `kvstore tiers` and logs (default host:pid).",
)
@click.option(
    "--spec-out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="FILE",
    help="Write the worker's namespace as JSON (for --model-spec of the other commands).",
)
@seconds_option(
    "--keepalive",
    "keepalive_s",
    30.0,
    envvar="KVSTORE_WORKER_KEEPALIVE_S",
    help="Ping the server this often while idle (the server permits server.min_ping_interval_s "
    "and up, 10 s by default), so that a dead server or network path is noticed.",
)
@print_config_option
def worker_command(
    connection: Connection,
    model: ModelChoice,
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
    if print_config:
        table = Table(title="kvstore worker configuration")
        table.add_column("setting")
        table.add_column("value", overflow="fold")
        settings = {
            "server": connection.server,
            "token": "****" if connection.token else "",
            "tls_ca": connection.tls_ca or "",
            "model": model.model_dir or "(the built-in model)",
            "seed": model.seed,
            "dtype": model.dtype,
            "block_tokens": model.block_tokens,
            "device": model.device,
            "name": name or "(host:pid)",
            "keepalive_s": keepalive_s,
        }
        for key, value in settings.items():
            table.add_row(key, str(value))
        print_table(table, stdout)
        return
    from kvstore.worker.link import WorkerLink

    _log_to_stderr()
    try:
        worker = model.worker()
        spec = worker.spec
        if spec_out:
            Path(spec_out).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
        link = WorkerLink(
            worker,
            connection.server,
            token=connection.token,
            tls_ca=connection.tls_ca,
            name=name,
            keepalive_s=keepalive_s,
        )
        click.echo(f"worker {link.name}: {spec.name} ({json.dumps(spec.to_dict())})")
        asyncio.run(_run_worker(link))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


async def _run_worker(link: WorkerLink) -> None:
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


COMMANDS = (serve, worker_command)
