"""The prefill and decode roles of disaggregated serving, as commands: ``kvstore prefill``
computes a prompt's K/V with the model and stores it in a service, ``kvstore decode`` continues
a prompt from what a prefill node stored. The model and the roles' code are imported when the
command runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvstore.cli.options import (
    PROMPT_FILE_OPTIONS,
    Connection,
    ModelChoice,
    connect_options,
    model_options,
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


def _run_role(
    connection: Connection,
    what: str,
    role: Callable[[AsyncClient], Awaitable[Any]],
) -> Any:
    """Run ``role`` against the service of ``connection`` under a status line ``what``; a
    ``KVStoreError`` leaves as a one-line click error."""
    from client import AsyncClient

    async def run() -> Any:
        async with AsyncClient(
            connection.server, token=connection.token, tls_ca=connection.tls_ca, timeout_s=300.0
        ) as kv:
            return await role(kv)

    try:
        with stdout.status(what):
            return asyncio.run(run())
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


def _result_doc(result: Any, **first: Any) -> dict[str, Any]:
    """The JSON document of a role's ``result``: ``first``, then each field of the result, its
    seconds (``x_s``) as milliseconds (``x_ms``)."""
    doc = dict(first)
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if field.name.endswith("_s"):
            doc[field.name.removesuffix("_s") + "_ms"] = value * 1000
        else:
            doc[field.name] = value
    return doc


def _emit(doc: dict[str, Any], as_json: bool) -> bool:
    """Print ``doc`` as one JSON document with ``--json``; whether it did."""
    if as_json:
        click.echo(json.dumps(doc))
    return as_json


@click.command("prefill")
@connect_options
@model_options
@with_options(_PROMPT_OPTIONS)
def prefill_command(
    connection: Connection,
    model: ModelChoice,
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
    worker = model.worker()
    result = _run_role(
        connection, f"prefilling {len(tokens)} tokens", lambda kv: prefill(worker, kv, tokens)
    )
    server = connection.server
    doc = _result_doc(result, server=server, namespace=worker.spec.to_dict())
    if _emit(doc, as_json):
        return
    click.echo(
        f"prefilled {result.num_tokens} tokens in {doc['compute_ms']:.1f} ms; stored "
        f"{result.stored_blocks} blocks ({result.already_blocks} already there) at {server} in "
        f"{doc['store_ms']:.1f} ms"
    )


@click.command("decode")
@connect_options
@model_options
@with_options(_PROMPT_OPTIONS)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--repair-holes", is_flag=True, help="Have the service repair holes before fetching.")
def decode_command(
    connection: Connection,
    model: ModelChoice,
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
    worker = model.worker()
    result = _run_role(
        connection,
        "decoding",
        lambda kv: decode(
            worker, kv, tokens, max_new_tokens=max_new_tokens, repair_holes=repair_holes
        ),
    )
    # tokens named here too, to keep prompt_tokens right after them in the document.
    doc = _result_doc(
        result, server=connection.server, tokens=result.tokens, prompt_tokens=len(tokens)
    )
    if _emit(doc, as_json):
        return
    click.echo(" ".join(map(str, result.tokens)))
    click.echo(
        f"prompt {len(tokens)} tokens: {result.hit_tokens} from kvstore "
        f"({doc['fetch_ms']:.1f} ms), {result.computed_tokens} computed here; "
        f"{len(result.tokens)} new tokens in {doc['generate_ms']:.1f} ms",
        err=True,
    )


COMMANDS = (prefill_command, decode_command)
