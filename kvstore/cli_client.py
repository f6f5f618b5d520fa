"""The ``kvstore`` commands that talk to a running server through ``client.Client``.

Commands, in the order an operator reaches for them: ``tiers`` (alias ``status``: usage and
counters), ``ls`` (the blocks), ``inspect HASH`` (one block's header), ``lookup`` (a prompt's block
map, holes marked), ``pin`` / ``unpin`` / ``evict`` / ``flush`` (operator actions), ``events``
(tail the Watch stream), ``repair`` (recompute a prompt's holes with the server's model worker)
and ``bench`` (a load generator that checks every byte it gets back).

Every command takes ``--server HOST:PORT``, ``--token``, ``--tls-ca``, ``--timeout`` (also from
``KVSTORE_SERVER``, ``KVSTORE_TOKEN``, ``KVSTORE_TLS_CA``, ``KVSTORE_TIMEOUT``) and ``--json`` (one
JSON document on stdout instead of rich tables; ``events`` writes one JSON object per line).
Failures the client reports (``KVStoreError``) become one line on stderr and exit status 1; usage
errors exit 2, as click does. ``kvstore stats`` is the offline counterpart of ``tiers``: it opens
the store's files itself instead of asking a server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import click
import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client import Client
from client.errors import AuthError, ServiceUnavailableError
from client.results import BlockInfo, Event, Lookup, Stats
from kvstore.block_format import torch_dtype
from kvstore.cli_options import (
    DEFAULT_SERVER,
    PROMPT_FILE_OPTIONS,
    print_table,
    read_tokens,
    server_option,
    tls_ca_option,
    token_option,
)
from kvstore.errors import KVStoreError
from kvstore.keys import DIGEST_BYTES, DTYPES, BlockHash, ModelSpec, block_hashes

__all__ = ["DEFAULT_SERVER", "Remote"]

TIERS = ("G1", "G2", "G3", "G4")
# Counters `tiers` shows first, in this order; the engine's other counters follow.
_MAIN_COUNTERS = ("lookups", "promotions", "demotions", "evictions", "corrupt", "leases")

_out = Console()
_err = Console(stderr=True)


def _cli_group() -> click.Group:
    """The ``kvstore`` group these commands join.

    ``kvstore/cli.py`` imports this module on its last line. Run as ``python -m kvstore.cli`` it
    is the module ``__main__``, not ``kvstore.cli``: importing ``kvstore.cli`` here would execute
    cli.py a second time and register every command on a second group that nobody runs.
    """
    main_module = sys.modules.get("__main__")
    module_spec = getattr(main_module, "__spec__", None)
    if module_spec is not None and module_spec.name == "kvstore.cli":
        group = getattr(main_module, "main", None)
    else:
        # Under the `kvstore` script, or any other importer, kvstore.cli is the module being
        # imported (or already is): `main` exists by the time its last line imports us.
        from kvstore.cli import main as group
    if not isinstance(group, click.Group):
        raise RuntimeError("kvstore.cli must define the click group `main` before importing us")
    return group


main = _cli_group()


# -- connection options and errors ---------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class Remote:
    """Where the server is and how to talk to it: the options every command here shares."""

    server: str
    token: str | None
    tls_ca: str | None
    timeout_s: float
    as_json: bool

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        """A connected ``Client``; every ``KVStoreError`` leaves as a one-line click error."""
        try:
            with self._client() as kv:
                yield kv
        except ServiceUnavailableError as exc:
            raise click.ClickException(self._unavailable(exc)) from None
        except AuthError as exc:
            what = "permission denied" if exc.code == "PERMISSION_DENIED" else "not authenticated"
            raise click.ClickException(
                f"kvstore at {self.server}: {what}: {_one_line(str(exc))}"
            ) from None
        except KVStoreError as exc:
            raise click.ClickException(_one_line(str(exc))) from None

    def _client(self, **overrides: Any) -> Client:
        options: dict[str, Any] = {"token": self.token, "timeout_s": self.timeout_s}
        if self.tls_ca is not None:
            options["tls_ca"] = self.tls_ca
        return Client(self.server, **(options | overrides))

    def _unavailable(self, exc: ServiceUnavailableError) -> str:
        # UNAVAILABLE means either "no server there" or "the server is up but a tier behind it
        # is down"; the status code alone cannot tell them apart, and its text is no API. The
        # health service answers without touching any tier: ask it, once, without retries.
        detail = _one_line(str(exc)).removeprefix(f"{self.server}: ")
        try:
            with self._client(retries=0, timeout_s=min(self.timeout_s, 3.0)) as probe:
                probe.health()
        except KVStoreError:
            return f"cannot reach kvstore at {self.server}: {detail}"
        return f"kvstore at {self.server} is unavailable: {detail}"

    def emit(self, document: Any) -> None:
        click.echo(json.dumps(document, indent=2))


_REMOTE_OPTIONS = (
    server_option,
    token_option,
    tls_ca_option,
    click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        envvar="KVSTORE_TIMEOUT",
        show_envvar=True,
        metavar="SECONDS",
        help="Limit for each call to the server.",
    ),
    click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document instead of tables."
    ),
)


def _with_options(options: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _remote(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the connection options; the command gets them as one ``Remote`` first argument."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        server: str,
        token: str | None,
        tls_ca: str | None,
        timeout_s: float,
        as_json: bool,
        **kwargs: Any,
    ) -> Any:
        return fn(Remote(server, token or None, tls_ca, timeout_s, as_json), *args, **kwargs)

    decorated: Callable[..., Any] = command
    for option in reversed(_REMOTE_OPTIONS):
        decorated = option(decorated)
    return decorated


# -- namespace and token options -----------------------------------------------------------------


_SPEC_FIELDS = {
    "model": "--model",
    "layers": "--layers",
    "kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
    "dtype": "--dtype",
}
_SPEC_OPTIONS = (
    click.option(
        "--model-spec",
        "model_spec",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        metavar="SPEC.json",
        help='The namespace as JSON: {"model_id": ..., "num_layers": ..., "num_kv_heads": ..., '
        '"head_dim": ..., "dtype": ..., "block_tokens": ..., "revision": ..., '
        '"tokenizer_id": ...}.',
    ),
    click.option("--model", default=None, metavar="MODEL_ID", help="Or give it field by field."),
    click.option("--layers", type=click.IntRange(min=1), default=None, metavar="N"),
    click.option("--kv-heads", type=click.IntRange(min=1), default=None, metavar="N"),
    click.option("--head-dim", type=click.IntRange(min=1), default=None, metavar="N"),
    click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None),
    click.option(
        "--block-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="Tokens per block (default 256, as ModelSpec).",
    ),
    click.option("--revision", default=None, help="Weights revision (default empty)."),
    click.option("--tokenizer-id", default=None, help="Tokenizer id (default empty)."),
)


def _spec_from(
    model_spec: Path | None,
    model: str | None,
    layers: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    dtype: str | None,
    block_tokens: int | None,
    revision: str | None,
    tokenizer_id: str | None,
    *,
    default: ModelSpec | None,
) -> ModelSpec:
    given = {
        "model": model,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "block_tokens": block_tokens,
        "revision": revision,
        "tokenizer_id": tokenizer_id,
    }
    if model_spec is not None:
        if any(v is not None for v in given.values()):
            raise click.UsageError("give the namespace with --model-spec or with --model, not both")
        try:
            data = json.loads(model_spec.read_text())
            if not isinstance(data, dict):
                raise click.BadParameter("must hold a JSON object", param_hint="--model-spec")
            return ModelSpec.from_dict(data)
        except (OSError, ValueError, TypeError, KVStoreError) as exc:
            raise click.BadParameter(
                f"{model_spec}: {_one_line(str(exc))}", param_hint="--model-spec"
            ) from None
    if all(v is None for v in given.values()):
        if default is not None:
            return default
        raise click.UsageError(
            "this command needs the namespace: --model-spec SPEC.json, or --model MODEL_ID "
            "--layers N --kv-heads N --head-dim N --dtype D [--block-tokens N]"
        )
    missing = [flag for name, flag in _SPEC_FIELDS.items() if given[name] is None]
    if missing:
        raise click.UsageError(f"--model also needs {', '.join(missing)}")
    try:
        return ModelSpec(
            cast(str, model),
            num_layers=cast(int, layers),
            num_kv_heads=cast(int, kv_heads),
            head_dim=cast(int, head_dim),
            dtype=cast(str, dtype),
            block_tokens=block_tokens or 256,
            revision=revision or "",
            tokenizer_id=tokenizer_id or "",
        )
    except KVStoreError as exc:
        raise click.UsageError(str(exc)) from None


def _namespace(*, default: ModelSpec | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Add the namespace options; the command gets a ``spec: ModelSpec`` keyword (``default``
    when none is given, a usage error when there is no default)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(
            *args: Any,
            model_spec: Path | None,
            model: str | None,
            layers: int | None,
            kv_heads: int | None,
            head_dim: int | None,
            dtype: str | None,
            block_tokens: int | None,
            revision: str | None,
            tokenizer_id: str | None,
            **kwargs: Any,
        ) -> Any:
            spec = _spec_from(
                model_spec,
                model,
                layers,
                kv_heads,
                head_dim,
                dtype,
                block_tokens,
                revision,
                tokenizer_id,
                default=default,
            )
            return fn(*args, spec=spec, **kwargs)

        decorated: Callable[..., Any] = command
        for option in reversed(_SPEC_OPTIONS):
            decorated = option(decorated)
        return decorated

    return decorate


def _hash_of(value: str) -> BlockHash:
    try:
        raw = bytes.fromhex(value.strip())
    except ValueError:
        raw = b""
    if len(raw) != DIGEST_BYTES:
        raise click.BadParameter(f"{value!r} is not a block hash ({2 * DIGEST_BYTES} hex digits)")
    return BlockHash(raw)


def _hashes(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
    # A callback rather than a click.ParamType subclass: ParamType is generic only from click
    # 8.2 on, and we support 8.1.
    if isinstance(values, str):
        return _hash_of(values)
    return tuple(_hash_of(v) for v in values)


def _tier(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Not click.Choice(case_sensitive=False): its error lists the choices lower-cased
    # ("'G9' is not one of 'g1', 'g2', ..."), which are not the names anything else shows.
    if value is None:
        return None
    name = value.strip().upper()
    if name not in TIERS:
        raise click.BadParameter(f"{value!r} is not a tier; use one of {', '.join(TIERS)}")
    return name


_tier_option = click.option(
    "--tier",
    default=None,
    callback=_tier,
    metavar="|".join(TIERS),
    help="Only this tier (default: every tier).",
)


# -- formatting ----------------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _short(value: bytes | None) -> str:
    return "-" if value is None else value.hex()[:8]


def _rate(hits: int, misses: int) -> float | None:
    return hits / (hits + misses) if hits + misses else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _hash_column(table: Table, name: str = "hash") -> None:
    table.add_column(name, no_wrap=True, min_width=2 * DIGEST_BYTES)


def _block_doc(info: BlockInfo) -> dict[str, Any]:
    return {
        "hash": info.block_hash.hex(),
        "parent": _hex(info.parent_hash),
        "namespace": info.namespace_fingerprint.hex(),
        "tiers": info.tiers,
        "nbytes": info.nbytes,
        "hits": info.hits,
        "pinned": info.pinned,
        "leases": info.leases,
    }


# -- tiers / status ------------------------------------------------------------------------------


def _stats_doc(remote: Remote, stats: Stats) -> dict[str, Any]:
    return {
        "server": remote.server,
        "num_blocks": stats.num_blocks,
        "num_leases": stats.num_leases,
        "queue_depth": stats.queue_depth,
        "tiers": [
            {
                "tier": t.tier,
                "name": t.name,
                "capacity_bytes": t.capacity_bytes,
                "used_bytes": t.used_bytes,
                "num_blocks": t.num_blocks,
                "num_hits": t.num_hits,
                "num_misses": t.num_misses,
                "hit_rate": _rate(t.num_hits, t.num_misses),
                "num_corrupt": t.num_corrupt,
            }
            for t in stats.tiers
        ],
        "counters": stats.counters,
        "workers": [
            {
                "worker_id": w.worker_id,
                "name": w.name,
                "namespace": w.spec.to_dict(),
                "address": w.address,
                "tasks_done": w.tasks_done,
                "blocks_computed": w.blocks_computed,
                "busy": w.busy,
            }
            for w in stats.workers
        ],
    }


@main.command("tiers")
@_remote
def tiers_command(remote: Remote) -> None:
    """Each tier of a running server (capacity, use, blocks, hit rate, corrupt) and its counters.

    `kvstore stats` is the offline counterpart: it opens the store's files itself.
    """
    with remote.client() as kv:
        stats = kv.stats()
    if remote.as_json:
        remote.emit(_stats_doc(remote, stats))
        return
    table = Table(title=f"kvstore at {remote.server}: {stats.num_blocks} blocks")
    table.add_column("tier")
    for col in ("blocks", "used", "capacity", "used %", "hit rate", "corrupt"):
        table.add_column(col, justify="right", no_wrap=True)
    for t in stats.tiers:
        used = t.used_bytes / t.capacity_bytes if t.capacity_bytes else None
        table.add_row(
            t.name,
            str(t.num_blocks),
            _size(t.used_bytes),
            _size(t.capacity_bytes),
            _percent(used),
            _percent(_rate(t.num_hits, t.num_misses)),
            f"[red]{t.num_corrupt}" if t.num_corrupt else "0",
        )
    if not stats.tiers:
        table.caption = "no per-tier numbers: they are for admin tenants"
    counters = Table(title="counters")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name in _MAIN_COUNTERS:
        # The engine reports a counter once it moved; an admin's view shows the main ones always.
        if name in stats.counters or stats.tiers:
            counters.add_row(name, str(stats.counters.get(name, 0)))
    counters.add_row("leases held", str(stats.num_leases))
    counters.add_row("queue depth", str(stats.queue_depth))
    for name in sorted(set(stats.counters) - set(_MAIN_COUNTERS)):
        counters.add_row(f"[dim]{name}", f"[dim]{stats.counters[name]}")
    print_table(table, _out)
    print_table(counters, _out)
    if stats.tiers:  # admins: the attached model workers
        workers = Table(title="model workers (hole repair)")
        for col in ("id", "name", "namespace", "address"):
            workers.add_column(col)
        for col in ("tasks", "blocks", "busy"):
            workers.add_column(col, justify="right")
        for w in stats.workers:
            workers.add_row(
                str(w.worker_id),
                w.name,
                w.spec.name,
                w.address,
                str(w.tasks_done),
                str(w.blocks_computed),
                "yes" if w.busy else "",
            )
        if not stats.workers:
            workers.caption = "none attached: holes cannot be repaired (start `kvstore worker`)"
        print_table(workers, _out)


@main.command("health")
@click.option(
    "--worker",
    "worker_name",
    default=None,
    metavar="NAME",
    help="Also require a model worker of this name (or name prefix, e.g. a host name) to be "
    "attached (admin). For a worker's own health check.",
)
@_remote
def health_command(remote: Remote, worker_name: str | None) -> None:
    """Exit 0 when the server answers SERVING on the standard gRPC health service (1 otherwise).

    For container and supervisor health checks.
    """
    with remote.client() as kv:
        status = kv.health()
        workers = kv.stats().workers if worker_name is not None else []
    attached = [w for w in workers if w.name == worker_name or w.name.startswith(f"{worker_name}:")]
    healthy = status == "SERVING" and (worker_name is None or bool(attached))
    if remote.as_json:
        remote.emit({"status": status, "healthy": healthy, "workers": [w.name for w in attached]})
    else:
        line = status
        if worker_name is not None:
            line += f"; worker {worker_name}: " + ("attached" if attached else "NOT attached")
        click.echo(line)
    if not healthy:
        sys.exit(1)


main.add_command(
    click.Command(
        "status",
        callback=tiers_command.callback,
        params=tiers_command.params,
        help="The same as `kvstore tiers`.",
    )
)


# -- ls, inspect ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _closing(items: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """Close a client iterator (and the server stream behind it) when leaving early."""
    try:
        yield items
    finally:
        if isinstance(items, Generator):
            items.close()


@main.command("ls")
@_tier_option
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Blocks to show at most (0: all of them).",
)
@_remote
def ls_command(remote: Remote, tier: str | None, limit: int) -> None:
    """The blocks a server holds, in hash order, a page at a time."""
    blocks: list[BlockInfo] = []
    more = False
    page_size = min(limit + 1, 1000) if limit else 1000
    with remote.client() as kv, _closing(kv.list_blocks(tier, page_size=page_size)) as items:
        for info in items:
            if limit and len(blocks) == limit:
                more = True
                break
            blocks.append(info)
    if remote.as_json:
        remote.emit({"blocks": [_block_doc(b) for b in blocks], "truncated": more})
        return
    where = f" in {tier}" if tier else ""
    title = f"{len(blocks)} blocks{where}"
    if more:
        title = f"first {len(blocks)} blocks{where} (--limit 0 lists all)"
    # No vertical rules: a row (32 hex digits of hash and six short columns) fits 80 columns.
    table = Table(title=title, box=box.SIMPLE_HEAD)
    _hash_column(table)
    table.add_column("parent", no_wrap=True)
    table.add_column("tiers", no_wrap=True)
    for col in ("size", "hits"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("held", no_wrap=True)
    for b in blocks:
        held = ["pinned"] if b.pinned else []
        if b.leases:
            held.append(f"{b.leases} lease{'s' if b.leases > 1 else ''}")
        table.add_row(
            b.block_hash.hex(),
            _short(b.parent_hash),
            ",".join(b.tiers),
            _size(b.nbytes),
            str(b.hits),
            ", ".join(held),
        )
    print_table(table, _out)


@main.command("inspect")
@click.argument("block_hash", callback=_hashes, metavar="HASH")
@_remote
def inspect_command(remote: Remote, block_hash: BlockHash) -> None:
    """One block: where it is, and its header (dtype, shape, codec, checksums)."""
    with remote.client() as kv:
        info = kv.inspect(block_hash)
    if info is None:
        raise click.ClickException(f"block {block_hash.hex()} is not stored on {remote.server}")
    doc = _block_doc(info) | {
        "dtype": info.dtype,
        "shape": list(info.shape),
        "codec": info.codec,
        "raw_xxh3": f"{info.raw_xxh3:016x}",
        "payload_xxh3": f"{info.payload_xxh3:016x}",
    }
    if remote.as_json:
        remote.emit(doc)
        return
    table = Table(title=f"block {info.block_hash.hex()}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    rows = {
        "parent": doc["parent"] or "- (first block of its chain)",
        "namespace": doc["namespace"],
        "tiers": ", ".join(info.tiers),
        "size": f"{_size(info.nbytes)} ({info.nbytes} bytes)",
        "hits": str(info.hits),
        "pinned": "yes" if info.pinned else "no",
        "leases": str(info.leases),
        "dtype": info.dtype,
        "shape": "[" + ", ".join(map(str, info.shape)) + "]",
        "codec": info.codec,
        "raw xxh3": doc["raw_xxh3"],
        "payload xxh3": doc["payload_xxh3"],
    }
    for name, value in rows.items():
        table.add_row(name, value)
    print_table(table, _out)


# -- lookup --------------------------------------------------------------------------------------


def _lookup_doc(spec: ModelSpec, num_tokens: int, found: Lookup) -> dict[str, Any]:
    bt = found.block_tokens or spec.block_tokens
    return {
        "namespace": spec.to_dict(),
        "num_tokens": num_tokens,
        "block_tokens": bt,
        "num_blocks": len(found.hashes),
        "hit_blocks": found.hit_blocks,
        "hit_tokens": found.hit_tokens,
        "holes": found.holes,
        "blocks": [
            {
                "index": i,
                "start": i * bt,
                "end": (i + 1) * bt,
                "hash": h.hex(),
                "tier": tier,
                "hole": i in found.holes,
            }
            for i, (h, tier) in enumerate(zip(found.hashes, found.tiers, strict=True))
        ],
    }


def _lookup_summary(num_tokens: int, found: Lookup) -> str:
    n = len(found.hashes)
    parts = [
        f"hit {found.hit_tokens} of {num_tokens} tokens ({found.hit_blocks} of {n} full blocks)"
    ]
    holes = found.holes
    if holes:
        which = ", ".join(map(str, holes))
        parts.append(f"{len(holes)} hole{'s' if len(holes) > 1 else ''} (block {which})")
    else:
        parts.append("no holes")
    by_tier: dict[str, int] = {}
    for tier in found.tiers:
        by_tier[tier or "missing"] = by_tier.get(tier or "missing", 0) + 1
    if by_tier:
        parts.append(", ".join(f"{name} {count}" for name, count in sorted(by_tier.items())))
    return "; ".join(parts)


@main.command("lookup")
@_with_options(PROMPT_FILE_OPTIONS)
@_namespace()
@_remote
def lookup_command(
    remote: Remote, spec: ModelSpec, tokens_file: Path | None, text_file: Path | None
) -> None:
    """Where each full block of a prompt is, tier by tier, with holes marked.

    A hole is a missing block with a present block after it: the hit ends before it.
    """
    tokens = read_tokens(tokens_file, text_file)
    with remote.client() as kv:
        found = kv.lookup(spec, tokens)
    num_tokens = len(tokens)
    if remote.as_json:
        remote.emit(_lookup_doc(spec, num_tokens, found))
        return
    bt = found.block_tokens or spec.block_tokens
    table = Table(
        title=f"{spec.name}: {num_tokens} tokens, {len(found.hashes)} full blocks",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("block", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("tier")
    table.add_column("")
    _hash_column(table)
    holes = set(found.holes)
    for i, (h, tier) in enumerate(zip(found.hashes, found.tiers, strict=True)):
        table.add_row(
            str(i),
            f"{i * bt}-{(i + 1) * bt - 1}",
            tier or "[yellow]missing",
            "[bold red]HOLE" if i in holes else "",
            h.hex(),
        )
    print_table(table, _out)
    tail = num_tokens - len(found.hashes) * bt
    summary = _lookup_summary(num_tokens, found)
    if tail:
        summary += f"; the last {tail} tokens are no full block (never stored)"
    click.echo(summary)


@main.command("repair")
@_with_options(PROMPT_FILE_OPTIONS)
@click.option(
    "--exact",
    is_flag=True,
    help="Recompute from the first hole to the last stored block, replacing the blocks after "
    "the hole too (bit-identical to a prefill from scratch).",
)
@_namespace()
@_remote
def repair_command(
    remote: Remote,
    spec: ModelSpec,
    tokens_file: Path | None,
    text_file: Path | None,
    exact: bool,
) -> None:
    """Recompute the holes of a prompt's stored prefix with a model worker of the server.

    Only the missing blocks go through the model (with the blocks before them as past); the
    blocks after each hole are reused. Needs `kvstore worker` attached for the namespace.
    The model's time counts against --timeout.
    """
    tokens = read_tokens(tokens_file, text_file)
    with remote.client() as kv, _err.status("repairing (the model is running)", spinner="dots"):
        started = time.perf_counter()
        result = kv.repair(spec, tokens, exact=exact, timeout_s=remote.timeout_s)
        seconds = time.perf_counter() - started
    if remote.as_json:
        remote.emit(
            {
                "namespace": spec.to_dict(),
                "repaired": result.repaired,
                "hit_blocks_before": result.hit_blocks_before,
                "hit_blocks": result.hit_blocks,
                "kept": result.kept,
                "worker": result.worker,
                "seconds": seconds,
            }
        )
        return
    if not result.repaired and not result.kept:
        click.echo(f"no holes: the hit is {result.hit_blocks} blocks; nothing to repair")
        return
    bt = spec.block_tokens
    table = Table(
        title=f"repaired by {result.worker} in {seconds * 1000:.1f} ms", box=box.SIMPLE_HEAD
    )
    table.add_column("block", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("")
    for i in result.repaired:
        table.add_row(str(i), f"{i * bt}-{(i + 1) * bt - 1}", "[green]recomputed")
    for i in result.kept:
        table.add_row(str(i), f"{i * bt}-{(i + 1) * bt - 1}", "[yellow]kept (leased or pinned)")
    print_table(table, _out)
    click.echo(
        f"hit {result.hit_blocks_before} -> {result.hit_blocks} blocks "
        f"({result.hit_blocks_before * bt} -> {result.hit_blocks * bt} tokens)"
    )


# -- pin, unpin, evict, flush --------------------------------------------------------------------


def _counted(remote: Remote, verb: str, done: int, asked: int, where: str, why: str) -> None:
    """Report a count; ``why`` says what the blocks that were not counted may be."""
    if remote.as_json:
        remote.emit({verb: done, "requested": asked})
        return
    line = f"{verb} {done} of {asked} blocks{where}"
    if done < asked:
        line += f" (the others {why})"
    click.echo(line)


@main.command("pin")
@click.argument("hashes", nargs=-1, required=True, callback=_hashes, metavar="HASH...")
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Unpin after this long (default: until `kvstore unpin`).",
)
@_namespace()
@_remote
def pin_command(
    remote: Remote, spec: ModelSpec, hashes: tuple[BlockHash, ...], ttl_s: float
) -> None:
    """Keep blocks in their tiers: no eviction, no demotion."""
    with remote.client() as kv:
        done = kv.pin(spec, list(hashes), ttl_s=ttl_s)
    where = f" for {ttl_s:g} s" if ttl_s else " until unpinned"
    _counted(remote, "pinned", done, len(hashes), where, "are not stored in this namespace")


@main.command("unpin")
@click.argument("hashes", nargs=-1, required=True, callback=_hashes, metavar="HASH...")
@_namespace()
@_remote
def unpin_command(remote: Remote, spec: ModelSpec, hashes: tuple[BlockHash, ...]) -> None:
    """Let pinned blocks be evicted again."""
    with remote.client() as kv:
        done = kv.unpin(spec, list(hashes))
    _counted(
        remote,
        "unpinned",
        done,
        len(hashes),
        "",
        "were not pinned, or are not stored in this namespace",
    )


@main.command("evict")
@click.argument("hashes", nargs=-1, required=True, callback=_hashes, metavar="HASH...")
@_tier_option
@_namespace()
@_remote
def evict_command(
    remote: Remote, spec: ModelSpec, hashes: tuple[BlockHash, ...], tier: str | None
) -> None:
    """Remove blocks from one tier (demoted below as placement says) or from every tier.

    Leased and pinned blocks stay.
    """
    with remote.client() as kv:
        done = kv.evict(spec, list(hashes), tier=tier)
    where = f" from {tier}" if tier else " from every tier"
    why = "are not stored there in this namespace, or are pinned or leased"
    _counted(remote, "evicted", done, len(hashes), where, why)


@main.command("flush")
@_tier_option
@click.option("--yes", is_flag=True, help="Really remove the blocks.")
@_remote
def flush_command(remote: Remote, tier: str | None, yes: bool) -> None:
    """Remove every block that is not leased or pinned, from one tier or from all of them."""
    where = tier or "every tier"
    if not yes:
        raise click.UsageError(
            f"flush removes every block that is not leased or pinned from {where} of "
            f"{remote.server}; add --yes to do it"
        )
    with remote.client() as kv:
        done = kv.flush(tier)
    if remote.as_json:
        remote.emit({"flushed": done, "tier": tier})
    else:
        click.echo(f"flushed {done} blocks from {where}")


# -- events --------------------------------------------------------------------------------------


def _event_line(event: Event) -> str:
    kind = event.kind + ("*" if event.snapshot else "")
    return (
        f"{event.seq:>10}  {kind:<8} {event.tier or '-':<3} {event.from_tier or '-':<3} "
        f"{event.block_hash.hex()}"
    )


def _event_doc(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "tier": event.tier,
        "from": event.from_tier,
        "hash": event.block_hash.hex(),
        "parent": _hex(event.parent_hash),
        "namespace": event.namespace_fingerprint.hex(),
        "time_s": event.time_s,
        "snapshot": event.snapshot,
    }


# A tail that has seen nothing for this long says on stderr that it is waiting, once.
_WAITING_NOTICE_S = 1.0


@main.command("events")
@click.option(
    "--after",
    "after_seq",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="SEQ",
    help="Resume after this sequence number (0: from now).",
)
@click.option(
    "--count",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after this many events (default: run until Ctrl-C).",
)
@click.option(
    "--idle-timeout",
    "idle_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop once no event has come for this long (default: wait for ever).",
)
@click.option(
    "--snapshot",
    is_flag=True,
    help="Also print the snapshot of what is stored that the server sends first (kind marked *).",
)
@_remote
def events_command(
    remote: Remote, after_seq: int, count: int, idle_timeout_s: float | None, snapshot: bool
) -> None:
    """Tail the server's events: one line per event (seq, kind, tier, from, hash).

    With --json, one JSON object per line. A watch that starts at 0, or resumes after events the
    server no longer keeps, begins with a snapshot of what is stored; it is skipped unless
    --snapshot is given. On a quiet server the tail says on stderr that it waits; --count,
    --idle-timeout or Ctrl-C end it.
    """
    # Ctrl-C (and SIGTERM) end the tail even where the process inherited SIGINT ignored, as a
    # command started in the background of a shell does: Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    seen = 0
    gap_noted = False
    waiting_noted = False
    last_seq = after_seq
    with remote.client() as kv:
        # The stream is read on a thread of its own so that this one can notice silence (a
        # blocking iterator cannot say "nothing yet"); the thread ends with the client.
        inbox: queue.Queue[Event | BaseException | None] = queue.Queue()

        def read() -> None:
            try:
                for event in kv.watch(after_seq):
                    inbox.put(event)
                inbox.put(None)
            except BaseException as exc:  # handed to the main thread, which reports it
                inbox.put(exc)

        threading.Thread(target=read, name="kvstore-events", daemon=True).start()
        idle_since = time.monotonic()
        try:
            while not (count and seen >= count):
                wait_s = _WAITING_NOTICE_S if not waiting_noted else 0.5
                if idle_timeout_s is not None:
                    wait_s = min(wait_s, max(0.0, idle_since + idle_timeout_s - time.monotonic()))
                try:
                    item = inbox.get(timeout=wait_s)
                except queue.Empty:
                    idle_s = time.monotonic() - idle_since
                    if idle_timeout_s is not None and idle_s >= idle_timeout_s:
                        click.echo(
                            f"no event for {idle_timeout_s:g} s after seq {last_seq}; stopping",
                            err=True,
                        )
                        break
                    if not waiting_noted and idle_s >= _WAITING_NOTICE_S:
                        waiting_noted = True
                        how = "Ctrl-C stops"
                        if count:
                            how = f"{count - seen} more to go; Ctrl-C stops"
                        click.echo(
                            f"waiting for events after seq {last_seq} on {remote.server} ({how})",
                            err=True,
                        )
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                idle_since = time.monotonic()
                last_seq = max(last_seq, item.seq)
                if item.snapshot and not snapshot:
                    if after_seq and not gap_noted:
                        gap_noted = True
                        click.echo(
                            f"events after {after_seq} are no longer kept by the server; it "
                            "resent a snapshot (--snapshot prints it)",
                            err=True,
                        )
                    continue
                click.echo(json.dumps(_event_doc(item)) if remote.as_json else _event_line(item))
                seen += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a tail without --count ends


# -- bench ---------------------------------------------------------------------------------------


# The default namespace is an 8B Llama's (32 layers, 8 KV heads of 128) with 64-token blocks:
# 8 MiB blocks, the size the default G2 slots are made for.
BENCH_SPEC = ModelSpec(
    "kvstore/bench", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=64
)
# Part of the iterations fetch a recent prompt again instead of a new one: new prompts measure
# the shared-prefix path (hit the prefix, put the rest), revisits fetch back whole prompts that
# were put, so suffix blocks are verified too.
_REVISIT_FRACTION = 0.25
_MAX_ERRORS_KEPT = 5
_POOL_BYTES = 64 << 20
_POOL_STEP = 16  # block offsets into the pool: aligned for every dtype's view


def _shared_prefix(seed: int, num_tokens: int) -> list[int]:
    """The tokens every prompt of a bench run with this seed starts with."""
    rng = random.Random(seed)
    return [rng.randrange(1 << 31) for _ in range(num_tokens)]


@dataclass(slots=True)
class _Op:
    latencies_s: list[float] = field(default_factory=list)
    num_errors: int = 0
    nbytes: int = 0

    def doc(self, seconds: float) -> dict[str, Any]:
        lat = np.array(self.latencies_s) if self.latencies_s else None
        return {
            "count": len(self.latencies_s),
            "errors": self.num_errors,
            "bytes": self.nbytes,
            "gb_per_s": self.nbytes / seconds / 1e9 if seconds > 0 else 0.0,
            "p50_ms": None if lat is None else float(np.percentile(lat, 50) * 1e3),
            "p99_ms": None if lat is None else float(np.percentile(lat, 99) * 1e3),
        }


class _Bench:
    """Workers that fetch and put random prompts sharing a prefix, verifying every block.

    The bytes of a block are a deterministic function of its *unsalted* chain hash, computed
    here, which depends only on the tokens up to the block, exactly like the server's (salted)
    name for it. So whichever worker, or earlier run, stored a block, what comes back under a
    prompt's leading tokens must equal the bytes derived here, bit for bit.

    Why a window into one random pool rather than fresh random bytes per block: generating 8 MiB
    of random bytes takes about as long as storing them, and the bench would measure itself.
    Each block is the window of the pool at an offset taken from its hash: a copy, no generation.
    Two blocks share bytes only if their offsets collide (1 in millions: the pool is at least
    64 MiB, offsets step by 16 bytes), so a wrong block is caught all the same.
    """

    def __init__(
        self, kv: Client, spec: ModelSpec, prompt_tokens: int, prefix_tokens: int, seed: int
    ) -> None:
        self.kv = kv
        self.spec = spec
        self.prompt_tokens = prompt_tokens
        self.prefix = _shared_prefix(seed, prefix_tokens)
        self.seed = seed
        self.ops = {"fetch": _Op(), "put": _Op()}
        self.hit_tokens = 0
        self.asked_tokens = 0
        self.mismatched_blocks = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self._recent: deque[list[int]] = deque(maxlen=64)
        # The pool depends on the namespace only: blocks stored by an earlier run (with the same
        # --seed) still hold the bytes this run expects.
        pool_bytes = max(2 * spec.block_nbytes, _POOL_BYTES)
        rng = np.random.default_rng(int.from_bytes(spec.fingerprint[:8], "little"))
        self._pool = torch.frombuffer(bytearray(rng.bytes(pool_bytes)), dtype=torch.uint8)
        self._num_offsets = (pool_bytes - spec.block_nbytes) // _POOL_STEP + 1
        # A block's bytes as [layers, 2, block_tokens, kv_heads, head_dim * itemsize]: the
        # shape of a block's slice of a prompt tensor viewed as bytes.
        self._byte_shape = (*spec.block_shape[:-1], spec.head_dim * spec.itemsize)

    @property
    def num_ops(self) -> int:
        return sum(len(op.latencies_s) for op in self.ops.values())

    @property
    def num_errors(self) -> int:
        return sum(op.num_errors for op in self.ops.values()) + self.mismatched_blocks

    def block_bytes(self, key: bytes) -> torch.Tensor:
        offset = int.from_bytes(key[:8], "little") % self._num_offsets * _POOL_STEP
        return self._pool[offset : offset + self.spec.block_nbytes].view(self._byte_shape)

    def prompt_buffer(self) -> torch.Tensor:
        spec = self.spec
        shape = (spec.num_layers, 2, self.prompt_tokens, spec.num_kv_heads, spec.head_dim)
        return torch.empty(shape, dtype=torch_dtype(spec.dtype))

    def fill(self, kv: torch.Tensor, keys: list[BlockHash]) -> torch.Tensor:
        """The K/V of a prompt's full blocks, written into ``kv`` (a prompt buffer)."""
        bt = self.spec.block_tokens
        raw = kv.view(torch.uint8)
        for i, key in enumerate(keys):
            raw[:, :, i * bt : (i + 1) * bt] = self.block_bytes(key)
        return kv[:, :, : len(keys) * bt]

    def warm_up(self) -> None:
        """Store the shared prefix once; an error here ends the bench (the server refuses this
        namespace, or is full) instead of running a benchmark of errors."""
        keys = block_hashes(self.spec, self.prefix)
        if keys:
            tokens = self.prefix[: len(keys) * self.spec.block_tokens]
            self.kv.put(self.spec, tokens, self.fill(self.prompt_buffer(), keys))

    def _failed(self, op: str, exc: KVStoreError) -> None:
        with self.lock:
            self.ops[op].num_errors += 1
            if len(self.errors) < _MAX_ERRORS_KEPT:
                self.errors.append(f"{op}: {type(exc).__name__}: {_one_line(str(exc))}")

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        spec, bt = self.spec, self.spec.block_tokens
        # Reused from one iteration to the next: fresh 100 MiB tensors would cost page faults
        # on every call, which is client overhead, not store speed.
        fetched, prompt = self.prompt_buffer(), self.prompt_buffer()
        while not self.stop.is_set():
            with self.lock:
                revisit = self._recent[rng.randrange(len(self._recent))] if self._recent else None
            if revisit is not None and rng.random() < _REVISIT_FRACTION:
                tokens = revisit
            else:
                suffix = self.prompt_tokens - len(self.prefix)
                tokens = self.prefix + [rng.randrange(1 << 31) for _ in range(suffix)]
            keys = block_hashes(spec, tokens)
            t0 = time.perf_counter()
            try:
                got, hit = self.kv.get_prefix(spec, tokens, out=fetched)
            except KVStoreError as exc:
                self._failed("fetch", exc)
                continue
            seconds = time.perf_counter() - t0
            raw = got.view(torch.uint8)
            bad = sum(
                not torch.equal(raw[:, :, i * bt : (i + 1) * bt], self.block_bytes(key))
                for i, key in enumerate(keys[: hit // bt])
            )
            with self.lock:
                fetch = self.ops["fetch"]
                fetch.latencies_s.append(seconds)
                fetch.nbytes += hit // bt * spec.block_nbytes
                self.hit_tokens += hit
                self.asked_tokens += len(keys) * bt
                self.mismatched_blocks += bad
                if bad and len(self.errors) < _MAX_ERRORS_KEPT:
                    self.errors.append(f"fetch: {bad} blocks differ from what was put")
            if hit >= len(keys) * bt or self.stop.is_set():
                continue
            kv = self.fill(prompt, keys)
            t0 = time.perf_counter()
            try:
                self.kv.put(spec, tokens, kv)
            except KVStoreError as exc:
                self._failed("put", exc)
                continue
            seconds = time.perf_counter() - t0
            with self.lock:
                put = self.ops["put"]
                put.latencies_s.append(seconds)
                put.nbytes += len(keys) * spec.block_nbytes
                self._recent.append(tokens)


def _bench_doc(bench: _Bench, seconds: float, concurrency: int) -> dict[str, Any]:
    return {
        "namespace": bench.spec.to_dict(),
        "block_bytes": bench.spec.block_nbytes,
        "duration_s": seconds,
        "concurrency": concurrency,
        "prompt_tokens": bench.prompt_tokens,
        "shared_prefix_tokens": len(bench.prefix),
        "ops": bench.num_ops,
        "errors": bench.num_errors,
        "mismatched_blocks": bench.mismatched_blocks,
        "hit_rate": bench.hit_tokens / bench.asked_tokens if bench.asked_tokens else None,
        "by_op": {name: op.doc(seconds) for name, op in bench.ops.items()},
        "first_errors": bench.errors,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@main.command("bench")
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option(
    "--shared-prefix-tokens",
    type=click.IntRange(min=0),
    default=512,
    show_default=True,
    help="Leading tokens every prompt shares (what later prompts hit).",
)
@click.option("--seed", type=int, default=None, help="Seed of the prompts (default: random).")
@_namespace(default=BENCH_SPEC)
@_remote
def bench_command(
    remote: Remote,
    spec: ModelSpec,
    duration_s: float,
    concurrency: int,
    prompt_tokens: int,
    shared_prefix_tokens: int,
    seed: int | None,
) -> None:
    """Load a running server with puts and fetches of random prompts that share a prefix.

    Each worker fetches the leading hit of a prompt, checks every block bit for bit against the
    bytes it must hold, and puts the prompt when part of it was missing. The namespace defaults
    to an 8B Llama's with 64-token (8 MiB) blocks; blocks must fit the server's g2.slot_bytes.
    Exits 1 if any call failed or any block differed.
    """
    if shared_prefix_tokens > prompt_tokens:
        raise click.BadParameter(
            f"{shared_prefix_tokens} is more than --prompt-tokens {prompt_tokens}",
            param_hint="--shared-prefix-tokens",
        )
    if prompt_tokens < spec.block_tokens:
        raise click.BadParameter(
            f"{prompt_tokens} tokens make no full block of {spec.block_tokens}",
            param_hint="--prompt-tokens",
        )
    seed = random.randrange(1 << 31) if seed is None else seed
    with remote.client() as kv:
        status = kv.health()
        if status != "SERVING":
            raise click.ClickException(f"kvstore at {remote.server} is {status}")
        bench = _Bench(kv, spec, prompt_tokens, shared_prefix_tokens, seed)
        bench.warm_up()
        threads = [
            threading.Thread(target=bench.worker, args=(i,), name=f"bench-{i}", daemon=True)
            for i in range(concurrency)
        ]
        with Progress(
            TextColumn("bench"),
            BarColumn(),
            TextColumn("{task.fields[ops]} ops, {task.fields[errors]} errors"),
            TimeElapsedColumn(),
            console=_err,
        ) as progress:
            task = progress.add_task("bench", total=duration_s, ops=0, errors=0)
            t0 = time.perf_counter()
            for thread in threads:
                thread.start()
            try:
                while (elapsed := time.perf_counter() - t0) < duration_s:
                    progress.update(
                        task, completed=elapsed, ops=bench.num_ops, errors=bench.num_errors
                    )
                    time.sleep(min(0.1, duration_s - elapsed))
            except KeyboardInterrupt:
                click.echo("interrupted: finishing the calls in flight", err=True)
            finally:
                bench.stop.set()
                for thread in threads:
                    thread.join()
            seconds = time.perf_counter() - t0
            progress.update(task, completed=duration_s, ops=bench.num_ops, errors=bench.num_errors)
    doc = _bench_doc(bench, seconds, concurrency)
    if remote.as_json:
        remote.emit(doc)
    else:
        _print_bench(doc)
    if bench.num_errors:
        for line in bench.errors:
            click.echo(f"bench error: {line}", err=True)
        raise click.ClickException(
            f"{bench.num_errors} errors ({bench.mismatched_blocks} blocks differed)"
        )


def _print_bench(doc: dict[str, Any]) -> None:
    table = Table(title=f"kvstore bench: {doc['duration_s']:.1f} s, {doc['concurrency']} workers")
    table.add_column("op")
    for col in ("ops", "errors", "GB/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, op in doc["by_op"].items():
        table.add_row(
            name,
            str(op["count"]),
            f"[red]{op['errors']}" if op["errors"] else "0",
            f"{op['gb_per_s']:.3f}",
            _ms(op["p50_ms"]),
            _ms(op["p99_ms"]),
        )
    table.add_section()
    errors = f"[red]{doc['errors']}" if doc["errors"] else "0"
    table.add_row("total", str(doc["ops"]), errors, "", "", "")
    print_table(table, _out)
    ns = doc["namespace"]
    click.echo(
        f"prompts of {doc['prompt_tokens']} tokens, the first {doc['shared_prefix_tokens']} "
        f"shared; {_size(doc['block_bytes'])} blocks of {ns['model_id']}"
    )
    click.echo(
        f"hit rate {_percent(doc['hit_rate'])} of fetched tokens; "
        f"{doc['mismatched_blocks']} blocks differed from what was put"
    )
