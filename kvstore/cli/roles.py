"""The prefill and decode roles of disaggregated serving, as commands: ``kvstore prefill``
computes a prompt's K/V with the model and stores it in a service, ``kvstore decode`` continues
a prompt from what a prefill node stored. The model and the roles' code are imported when the
command runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvstore.cli.options import (
    CONNECT_OPTIONS,
    MODEL_OPTIONS,
    PROMPT_FILE_OPTIONS,
    model_worker,
    read_tokens,
    stdout,
    with_options,
)
from kvstore.core.errors import KVStoreError

if TYPE_CHECKING:
    from client import AsyncClient

__all__ = ["COMMANDS"]

_PROMPT_OPTIONS = (
    *PROMPT_FILE_OPTIONS,
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
)


def _role_client(server: str, token: str | None, tls_ca: str | None) -> AsyncClient:
    from client import AsyncClient

    return AsyncClient(server, token=token, tls_ca=tls_ca, timeout_s=300.0)


@click.command("prefill")
@with_options(CONNECT_OPTIONS)
@with_options(MODEL_OPTIONS)
@with_options(_PROMPT_OPTIONS)
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
    from kvstore.roles.nodes import prefill

    tokens = read_tokens(tokens_file, text_file)
    worker = model_worker(model_dir, seed, dtype, block_tokens, device)

    async def run() -> Any:
        async with _role_client(server, token, tls_ca) as kv:
            return await prefill(worker, kv, tokens)

    try:
        with stdout.status(f"prefilling {len(tokens)} tokens"):
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


@click.command("decode")
@with_options(CONNECT_OPTIONS)
@with_options(MODEL_OPTIONS)
@with_options(_PROMPT_OPTIONS)
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
    from kvstore.roles.nodes import decode

    tokens = read_tokens(tokens_file, text_file)
    worker = model_worker(model_dir, seed, dtype, block_tokens, device)

    async def run() -> Any:
        async with _role_client(server, token, tls_ca) as kv:
            return await decode(
                worker, kv, tokens, max_new_tokens=max_new_tokens, repair_holes=repair_holes
            )

    try:
        with stdout.status("decoding"):
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


COMMANDS = (prefill_command, decode_command)
