"""The ``kvstore`` commands that change what a running server holds: ``pin`` / ``unpin`` (keep
blocks in their tiers), ``evict`` / ``flush`` (remove them), and ``repair`` (recompute a prompt's
holes with the server's model worker)."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich import box
from rich.table import Table

from kvstore.cli.options import (
    PROMPT_FILE_OPTIONS,
    print_table,
    read_tokens,
    stderr,
    stdout,
    with_options,
)
from kvstore.cli.remote import Remote, hashes_callback, namespace, remote_command, tier_option
from kvstore.core.keys import BlockHash, ModelSpec

__all__ = ["COMMANDS"]


# -- pin, unpin, evict, flush --------------------------------------------------------------------


def _counted(remote: Remote, verb: str, done: int, asked: int, where: str, why: str) -> None:
    """Report a count; ``why`` says what the blocks that were not counted may be."""
    line = f"{verb} {done} of {asked} blocks{where}"
    if done < asked:
        line += f" (the others {why})"
    remote.report({verb: done, "requested": asked}, line)


@click.command("pin")
@click.argument("hashes", nargs=-1, required=True, callback=hashes_callback, metavar="HASH...")
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Unpin after this long (default: until `kvstore unpin`).",
)
@namespace()
@remote_command
def pin_command(
    remote: Remote, spec: ModelSpec, hashes: tuple[BlockHash, ...], ttl_s: float
) -> None:
    """Keep blocks in their tiers: no eviction, no demotion."""
    with remote.client() as kv:
        done = kv.pin(spec, list(hashes), ttl_s=ttl_s)
    where = f" for {ttl_s:g} s" if ttl_s else " until unpinned"
    _counted(remote, "pinned", done, len(hashes), where, "are not stored in this namespace")


@click.command("unpin")
@click.argument("hashes", nargs=-1, required=True, callback=hashes_callback, metavar="HASH...")
@namespace()
@remote_command
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


@click.command("evict")
@click.argument("hashes", nargs=-1, required=True, callback=hashes_callback, metavar="HASH...")
@tier_option
@namespace()
@remote_command
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


@click.command("flush")
@tier_option
@click.option("--yes", is_flag=True, help="Really remove the blocks.")
@remote_command
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
    remote.report({"flushed": done, "tier": tier}, f"flushed {done} blocks from {where}")


# -- repair --------------------------------------------------------------------------------------


@click.command("repair")
@with_options(PROMPT_FILE_OPTIONS)
@click.option(
    "--exact",
    is_flag=True,
    help="Recompute from the first hole to the last stored block, replacing the blocks after "
    "the hole too (bit-identical to a prefill from scratch).",
)
@namespace()
@remote_command
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
    with remote.client() as kv, stderr.status("repairing (the model is running)", spinner="dots"):
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
    print_table(table, stdout)
    click.echo(
        f"hit {result.hit_blocks_before} -> {result.hit_blocks} blocks "
        f"({result.hit_blocks_before * bt} -> {result.hit_blocks * bt} tokens)"
    )


COMMANDS = (pin_command, unpin_command, evict_command, flush_command, repair_command)
