"""The ``kvstore`` commands that look at a running server without changing it: ``tiers`` (alias
``status``: usage and counters), ``health`` (for container health checks), ``ls`` (the blocks),
``inspect HASH`` (one block's header; a unique prefix of the hash is enough) and ``lookup`` (a
prompt's block map, holes marked).

``kvstore stats`` is the offline counterpart of ``tiers``: it opens the store's files itself
instead of asking a server. Not ``inspect.py``: that name is the standard library's.
"""

from __future__ import annotations

import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.table import Table

from kvstore.cli.options import (
    PROMPT_FILE_OPTIONS,
    print_table,
    read_tokens,
    size,
    stdout,
    with_options,
)
from kvstore.cli.remote import (
    Remote,
    block_doc,
    closing,
    hash_column,
    namespace,
    percent,
    rate,
    remote_command,
    short,
    tier_option,
)
from kvstore.core.keys import DIGEST_BYTES, BlockHash, ModelSpec

if TYPE_CHECKING:
    from client import Client
    from client.results import BlockInfo, Lookup, Stats

__all__ = ["COMMANDS"]

# Counters `tiers` shows first, in this order; the engine's other counters follow.
_MAIN_COUNTERS = ("lookups", "promotions", "demotions", "evictions", "corrupt", "leases")
_GAUGES = ("leases_held", "queue_depth")


# -- tiers / status, health ----------------------------------------------------------------------


def _counters(stats: Stats) -> dict[str, int]:
    """The counters ``tiers`` shows, in its order and under the names its table and its
    ``--json`` share: the main engine counters (the engine reports a counter once it moved; an
    admin, who sees the tiers, gets the main ones always, 0 until they move), the leases held
    and the queue depth, then the engine's other counters by name."""
    shown = {
        name: stats.counters.get(name, 0)
        for name in _MAIN_COUNTERS
        if name in stats.counters or stats.tiers
    }
    shown["leases_held"] = stats.num_leases
    shown["queue_depth"] = stats.queue_depth
    shown.update(sorted((k, v) for k, v in stats.counters.items() if k not in _MAIN_COUNTERS))
    return shown


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
                "hit_rate": rate(t.num_hits, t.num_misses),
                "num_corrupt": t.num_corrupt,
                "allocated_bytes": t.allocated_bytes,
                "largest_free_bytes": t.largest_free_bytes,
                "fragmentation": t.fragmentation,
                "free_extents": t.free_extents,
            }
            for t in stats.tiers
        ],
        "counters": _counters(stats),
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


@click.command("tiers")
@remote_command
def tiers_command(remote: Remote) -> None:
    """Each tier of a running server (capacity, use, blocks, hit rate, corrupt) and its counters.

    For the memory tiers (G1, G2), which allocate blocks of any size in one slab, also the
    fragmentation of their free bytes (1 - largest free extent / free bytes) and the largest block
    that fits without an eviction.

    `kvstore stats` is the offline counterpart: it opens the store's files itself.
    """
    with remote.client() as kv:
        stats = kv.stats()
    if remote.as_json:
        remote.emit(_stats_doc(remote, stats))
        return
    table = Table(title=f"kvstore at {remote.server}: {stats.num_blocks} blocks")
    table.add_column("tier")
    columns = ("blocks", "used", "capacity", "used %", "fragmentation", "largest free")
    for col in (*columns, "hit rate", "corrupt"):
        table.add_column(col, justify="right", no_wrap=True)
    for t in stats.tiers:
        used = t.used_bytes / t.capacity_bytes if t.capacity_bytes else None
        slab = t.tier in ("G1", "G2")  # the tiers that allocate in a slab of their own
        table.add_row(
            t.name,
            str(t.num_blocks),
            size(t.used_bytes),
            size(t.capacity_bytes),
            percent(used),
            percent(t.fragmentation) if slab else "-",
            size(t.largest_free_bytes) if slab else "-",
            percent(rate(t.num_hits, t.num_misses)),
            f"[red]{t.num_corrupt}" if t.num_corrupt else "0",
        )
    if not stats.tiers:
        table.caption = "no per-tier numbers: they are for admin tenants"
    counters = Table(title="counters")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name, value in _counters(stats).items():
        # The engine's other counters (not the main ones, nor the two gauges) are dimmed.
        style = "" if name in _MAIN_COUNTERS or name in _GAUGES else "[dim]"
        counters.add_row(f"{style}{name}", f"{style}{value}")
    print_table(table, stdout)
    print_table(counters, stdout)
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
        print_table(workers, stdout)


@click.command("health")
@click.option(
    "--worker",
    "worker_name",
    default=None,
    metavar="NAME",
    help="Also require a model worker of this name (or name prefix, e.g. a host name) to be "
    "attached (admin). For a worker's own health check.",
)
@remote_command
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


status_command = click.Command(
    "status",
    callback=tiers_command.callback,
    params=tiers_command.params,
    help="The same as `kvstore tiers`.",
)



# -- ls, inspect ---------------------------------------------------------------------------------


@click.command("ls")
@tier_option
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Blocks to show at most (0: all of them).",
)
@remote_command
def ls_command(remote: Remote, tier: str | None, limit: int) -> None:
    """The blocks a server holds, in hash order, a page at a time."""
    blocks: list[BlockInfo] = []
    more = False
    page_size = min(limit + 1, 1000) if limit else 1000
    with remote.client() as kv, closing(kv.list_blocks(tier, page_size=page_size)) as items:
        for info in items:
            if limit and len(blocks) == limit:
                more = True
                break
            blocks.append(info)
    if remote.as_json:
        remote.emit({"blocks": [block_doc(b) for b in blocks], "truncated": more})
        return
    where = f" in {tier}" if tier else ""
    title = f"{len(blocks)} blocks{where}"
    if more:
        title = f"first {len(blocks)} blocks{where} (--limit 0 lists all)"
    # No vertical rules: a row (32 hex digits of hash and six short columns) fits 80 columns.
    table = Table(title=title, box=box.SIMPLE_HEAD)
    hash_column(table)
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
            short(b.parent_hash),
            ",".join(b.tiers),
            size(b.nbytes),
            str(b.hits),
            ", ".join(held),
        )
    print_table(table, stdout)


# A prefix as short as git's shortest: with fewer digits most prefixes would match many blocks.
MIN_PREFIX_DIGITS = 4
# An ambiguous prefix lists at most this many of the blocks it matches.
_MAX_CANDIDATES = 10


def _hash_or_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    text = value.strip().lower()
    digits = 2 * DIGEST_BYTES
    if not text or len(text) > digits or not set(text) <= set(string.hexdigits):
        raise click.BadParameter(
            f"{value!r} is not a block hash ({digits} hex digits, or a prefix of at least "
            f"{MIN_PREFIX_DIGITS} as `kvstore ls` shows)"
        )
    if len(text) < MIN_PREFIX_DIGITS:
        raise click.BadParameter(
            f"{value!r} is too short: give at least {MIN_PREFIX_DIGITS} hex digits of a block hash"
        )
    return text


def _resolve(kv: Client, remote: Remote, prefix: str) -> BlockHash:
    """The one stored block whose hash starts with ``prefix``: a whole hash as it is; otherwise
    found through ``ListBlocks`` pages, which come in hash order, so the scan ends at the first
    hash past the prefix."""
    if len(prefix) == 2 * DIGEST_BYTES:
        return BlockHash(bytes.fromhex(prefix))
    found: list[str] = []
    with closing(kv.list_blocks(page_size=1000)) as items:
        for info in items:
            text = info.block_hash.hex()
            if text.startswith(prefix):
                found.append(text)
                if len(found) > _MAX_CANDIDATES:
                    break
            elif text > prefix:
                break
    if not found:
        raise click.ClickException(
            f"no block whose hash starts with {prefix} is stored on {remote.server}"
        )
    if len(found) > 1:
        shown = "\n  ".join(found[:_MAX_CANDIDATES])
        more = " and more" if len(found) > _MAX_CANDIDATES else ""
        raise click.ClickException(
            f"{prefix} is ambiguous: these blocks on {remote.server} start with it{more} (give "
            f"more digits):\n  {shown}"
        )
    return BlockHash(bytes.fromhex(found[0]))


@click.command("inspect")
@click.argument("prefix", callback=_hash_or_prefix, metavar="HASH")
@remote_command
def inspect_command(remote: Remote, prefix: str) -> None:
    """One block: where it is, and its header (dtype, shape, codec, checksums).

    HASH is the whole block hash, or a unique prefix of it (at least 4 hex digits, as `kvstore
    ls` shows them in its parent column).
    """
    with remote.client() as kv:
        block_hash = _resolve(kv, remote, prefix)
        info = kv.inspect(block_hash)
    if info is None:
        raise click.ClickException(f"block {block_hash.hex()} is not stored on {remote.server}")
    doc = block_doc(info) | {
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
        "size": f"{size(info.nbytes)} ({info.nbytes} bytes)",
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
    print_table(table, stdout)


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


@click.command("lookup")
@with_options(PROMPT_FILE_OPTIONS)
@namespace()
@remote_command
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
    hash_column(table)
    holes = set(found.holes)
    for i, (h, tier) in enumerate(zip(found.hashes, found.tiers, strict=True)):
        table.add_row(
            str(i),
            f"{i * bt}-{(i + 1) * bt - 1}",
            tier or "[yellow]missing",
            "[bold red]HOLE" if i in holes else "",
            h.hex(),
        )
    print_table(table, stdout)
    tail = num_tokens - len(found.hashes) * bt
    summary = _lookup_summary(num_tokens, found)
    if tail:
        summary += f"; the last {tail} tokens are no full block (never stored)"
    click.echo(summary)


COMMANDS = (
    tiers_command,
    status_command,
    health_command,
    ls_command,
    inspect_command,
    lookup_command,
)
