"""``kvstore put`` and ``kvstore get``: a prompt's K/V from a file into a running server and back,
so that an operator can test a deployment end to end without writing code.

The file is safetensors, one tensor ``kv`` of shape ``[layers, 2, tokens, kv_heads, head_dim]`` in
the namespace's dtype (the layout ``Client.put`` takes and ``Client.get_prefix`` returns); ``get``
writes the namespace and the number of tokens into the file's metadata. Why safetensors rather than
``torch.save``: it loads without unpickling (a ``.pt`` file from elsewhere can run code), and
other tools read it without torch. The package comes with transformers (the ``worker`` extra).

The prompt is given as for ``lookup`` (``--tokens-file`` or ``--text-file``), the namespace with
``--model-spec`` or ``--model ...``. torch, safetensors and the client are imported when the
command runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvstore.cli.options import (
    PROMPT_FILE_OPTIONS,
    progress_bar,
    read_tokens,
    size,
    stderr,
    with_options,
)
from kvstore.cli.remote import Remote, namespace, remote_command
from kvstore.core.keys import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["COMMANDS", "KV_TENSOR"]

KV_TENSOR = "kv"


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise click.ClickException(
            "kvstore put and get read and write safetensors files: install the safetensors "
            "package (it comes with kvstore[worker])"
        ) from None
    return safetensors


def _layout(spec: ModelSpec, tokens: str = "tokens") -> str:
    return (
        f"[layers={spec.num_layers}, 2, {tokens}, kv_heads={spec.num_kv_heads}, "
        f"head_dim={spec.head_dim}] {spec.dtype}"
    )


def _read_kv(path: Path, spec: ModelSpec, num_tokens: int) -> torch.Tensor:
    """The K/V tensor of a safetensors file, checked against the namespace and the prompt."""
    from kvstore.core.block_format import torch_dtype

    safetensors = _safetensors()
    hint = "FILE"
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            name = KV_TENSOR if KV_TENSOR in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise click.BadParameter(
                    f"{path} holds tensors {sorted(names)[:8]}, none named {KV_TENSOR!r}",
                    param_hint=hint,
                )
            kv: torch.Tensor = f.get_tensor(name)
    except (OSError, safetensors.SafetensorError) as exc:
        raise click.BadParameter(
            f"{path} is not a safetensors file ({exc})", param_hint=hint
        ) from None
    shape = tuple(kv.shape)
    want = (spec.num_layers, 2, None, spec.num_kv_heads, spec.head_dim)
    dtype = str(kv.dtype).removeprefix("torch.")
    if (
        len(shape) != len(want)
        or any(w is not None and s != w for s, w in zip(shape, want, strict=True))
        or kv.dtype != torch_dtype(spec.dtype)
    ):
        raise click.BadParameter(
            f"{path}: tensor {name!r} is {list(shape)} {dtype}; the namespace {spec.name} "
            f"needs {_layout(spec)}",
            param_hint=hint,
        )
    if shape[2] > num_tokens:
        raise click.BadParameter(
            f"{path} holds the K/V of {shape[2]} tokens, the prompt has only {num_tokens}: give "
            "the tokens the K/V was computed from",
            param_hint=hint,
        )
    if shape[2] < spec.block_tokens:
        raise click.BadParameter(
            f"{path} holds {shape[2]} tokens, no full block of {spec.block_tokens}: nothing "
            "would be stored",
            param_hint=hint,
        )
    return kv


@click.command("put")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@with_options(PROMPT_FILE_OPTIONS)
@click.option(
    "--durable/--no-durable",
    default=True,
    show_default=True,
    help="Return once the server's write-through copies (G3, G4) exist.",
)
@namespace()
@remote_command
def put_command(
    remote: Remote,
    spec: ModelSpec,
    file: Path,
    tokens_file: Path | None,
    text_file: Path | None,
    durable: bool,
) -> None:
    """Store a prompt's K/V from FILE (safetensors, tensor "kv").

    The tensor is [layers, 2, tokens, kv_heads, head_dim] in the namespace's dtype, for the
    leading tokens of the prompt; its full blocks are stored (a trailing partial block is not).
    """
    tokens = read_tokens(tokens_file, text_file)
    kv = _read_kv(file, spec, len(tokens))
    num_blocks = kv.shape[2] // spec.block_tokens
    nbytes = num_blocks * spec.block_nbytes
    with remote.client() as client, stderr.status(
        f"storing {num_blocks} blocks ({size(nbytes)}) at {remote.server}"
    ):
        started = time.perf_counter()
        result = client.put(spec, tokens, kv, durable=durable)
        seconds = time.perf_counter() - started
    doc = {
        "namespace": spec.to_dict(),
        "num_tokens": num_blocks * spec.block_tokens,
        "blocks": len(result.hashes),
        "stored": result.stored,
        "already": result.already,
        "hashes": [h.hex() for h in result.hashes],
        "bytes": nbytes,
        "seconds": seconds,
    }
    remote.report(
        doc,
        f"put {doc['num_tokens']} tokens as {len(result.hashes)} blocks ({size(nbytes)}) at "
        f"{remote.server} in {seconds * 1000:.1f} ms: {result.stored} stored, {result.already} "
        "already there",
    )


@click.command("get")
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@with_options(PROMPT_FILE_OPTIONS)
@click.option(
    "--max-blocks",
    type=click.IntRange(min=0),
    default=0,
    help="Fetch at most this many blocks (default: the whole stored prefix).",
)
@namespace()
@remote_command
def get_command(
    remote: Remote,
    spec: ModelSpec,
    file: Path,
    tokens_file: Path | None,
    text_file: Path | None,
    max_blocks: int,
) -> None:
    """Fetch the K/V of a prompt's stored prefix into FILE (safetensors, tensor "kv").

    Writes [layers, 2, hit tokens, kv_heads, head_dim] and, in the file's metadata, the
    namespace and the number of tokens. Exits 1, writing nothing, when no block of the prompt
    is stored.
    """
    import torch

    from kvstore.core.block_format import torch_dtype

    safetensors = _safetensors()
    tokens = read_tokens(tokens_file, text_file)
    received: list[torch.Tensor] = []

    with progress_bar("fetching layers", console=stderr, transient=True) as progress:
        task = progress.add_task("get", total=spec.num_layers)

        def on_layer(layer: int, kv: torch.Tensor) -> None:
            # kv is valid only during the call (a view of a shared segment): copy it out.
            if not received:
                shape = (spec.num_layers, *kv.shape)
                received.append(torch.empty(shape, dtype=torch_dtype(spec.dtype)))
            received[0][layer].copy_(kv)
            progress.update(task, completed=layer + 1)

        with remote.client() as client:
            started = time.perf_counter()
            hit = client.get_prefix_by_layer(spec, tokens, on_layer, max_blocks=max_blocks)
            seconds = time.perf_counter() - started
    if hit == 0 or not received:
        raise click.ClickException(
            f"no block of this prompt ({len(tokens)} tokens, namespace {spec.name}) is stored "
            f"on {remote.server}; nothing written"
        )
    kv = received[0][:, :, :hit].contiguous()
    metadata = {"namespace": json.dumps(spec.to_dict()), "num_tokens": str(hit)}
    try:
        safetensors.torch.save_file({KV_TENSOR: kv}, str(file), metadata=metadata)
    except OSError as exc:
        raise click.ClickException(f"cannot write {file}: {exc}") from None
    nbytes = kv.numel() * kv.element_size()
    doc = {
        "namespace": spec.to_dict(),
        "file": str(file),
        "num_tokens": len(tokens),
        "hit_tokens": hit,
        "blocks": hit // spec.block_tokens,
        "bytes": nbytes,
        "seconds": seconds,
    }
    remote.report(
        doc,
        f"got {hit} of {len(tokens)} tokens ({doc['blocks']} blocks, {size(nbytes)}) from "
        f"{remote.server} in {seconds * 1000:.1f} ms into {file}",
    )


COMMANDS = (put_command, get_command)
