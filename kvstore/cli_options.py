"""Options and helpers that several ``kvstore`` commands share (``kvstore.cli`` and
``kvstore.cli_client``), defined once: where the server is, how to authenticate, and the prompt
given as a file of token ids or of text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import click
import numpy as np

__all__ = [
    "DEFAULT_SERVER",
    "PROMPT_FILE_OPTIONS",
    "check_server",
    "read_tokens",
    "server_option",
    "tls_ca_option",
    "token_option",
]

DEFAULT_SERVER = "127.0.0.1:50051"


def check_server(ctx: click.Context, param: click.Parameter, value: str) -> str:
    value = value.strip()
    if value.startswith(("unix:", "unix-abstract:")):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{value!r}: use HOST:PORT (or unix:/path)")
    return value


server_option = click.option(
    "--server",
    default=DEFAULT_SERVER,
    show_default=True,
    envvar="KVSTORE_SERVER",
    show_envvar=True,
    metavar="HOST:PORT",
    callback=check_server,
    help="The kvstore server (or unix:/path).",
)
token_option = click.option(
    "--token",
    default=None,
    envvar="KVSTORE_TOKEN",
    show_envvar=True,
    help="Bearer token of a tenant (an admin tenant for ls, inspect, events, flush and worker).",
)
tls_ca_option = click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    envvar="KVSTORE_TLS_CA",
    show_envvar=True,
    help="PEM file of the CA that signed the server's certificate: turns TLS on.",
)
PROMPT_FILE_OPTIONS = (
    click.option(
        "--tokens-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        metavar="FILE",
        help="Token ids: integers separated by whitespace or commas, or a .npy integer array.",
    ),
    click.option(
        "--text-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        metavar="FILE",
        help="A text file, read as UTF-8 bytes with each byte one token id (no tokenizer is "
        "available offline): this finds blocks stored from the same bytes, not from a model's "
        "tokenizer. Use --tokens-file with your tokenizer's ids for real prompts.",
    ),
)


def read_tokens(tokens_file: Path | None, text_file: Path | None) -> np.ndarray[Any, Any]:
    if (tokens_file is None) == (text_file is None):
        raise click.UsageError("give the prompt with exactly one of --tokens-file and --text-file")
    if text_file is not None:
        return np.frombuffer(text_file.read_bytes(), dtype=np.uint8).astype(np.int64)
    assert tokens_file is not None
    hint = "--tokens-file"
    if tokens_file.suffix == ".npy":
        try:
            array = np.load(tokens_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{tokens_file}: {exc}", param_hint=hint) from None
        if array.dtype.kind not in "iu":
            raise click.BadParameter(
                f"{tokens_file} holds {array.dtype}, not integers", param_hint=hint
            )
        return cast(np.ndarray[Any, Any], array.reshape(-1))
    words = tokens_file.read_text().replace(",", " ").split()
    try:
        return np.array([int(w) for w in words], dtype=np.int64)
    except ValueError as exc:
        raise click.BadParameter(
            f"{tokens_file}: {exc}; expected integers separated by whitespace or commas",
            param_hint=hint,
        ) from None
