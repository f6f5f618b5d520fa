"""``kvstore put`` and ``kvstore get`` as an operator runs them: a safetensors file of K/V into a
real server (``KVStoreServer`` in this process, as in test_cli_client.py) and back to a file,
byte for byte; and one clear line, exit status 2, for a file that is not safetensors, a tensor of
the wrong shape or dtype, or K/V longer than the prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_cli_client
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli_client import (
    BT,
    SPEC,
    SPEC_ARGS,
    kv_of,
    kvstore,
    target,
    tokens_of,
)

from client import AsyncClient
from kvstore.service.server import KVStoreServer

server = test_cli_client.server  # the fixture: a KVStoreServer on a free port, G2 + G3


def write_tokens(path: Path, tokens: list[int]) -> Path:
    path.write_text(" ".join(map(str, tokens)))
    return path


async def test_put_then_get_round_trips_the_bytes(server: KVStoreServer, tmp_path: Path) -> None:
    tokens = tokens_of(11, 4 * BT + 5)
    tokens_file = write_tokens(tmp_path / "prompt.txt", tokens)
    kv = kv_of(4 * BT + 5, seed=3)
    save_file({"kv": kv}, str(tmp_path / "in.safetensors"))

    put = await kvstore(
        server, "put", str(tmp_path / "in.safetensors"), "--tokens-file", str(tokens_file),
        *SPEC_ARGS, "--json",
    )  # fmt: skip
    doc = put.json()
    assert (doc["blocks"], doc["stored"], doc["already"]) == (4, 4, 0)
    assert doc["num_tokens"] == 4 * BT
    again = await kvstore(
        server, "put", str(tmp_path / "in.safetensors"), "--tokens-file", str(tokens_file),
        *SPEC_ARGS,
    )  # fmt: skip
    assert again.rc == 0, again.err
    assert f"put {4 * BT} tokens as 4 blocks" in again.out
    assert "0 stored, 4 already there" in again.out

    # What a client of the server gets back is what the file held (the full blocks of it).
    async with AsyncClient(target(server)) as client:
        served, hit = await client.get_prefix(SPEC, tokens)
    assert hit == 4 * BT
    assert torch.equal(served.view(torch.uint8), kv[:, :, :hit].contiguous().view(torch.uint8))

    out = tmp_path / "out.safetensors"
    got = await kvstore(server, "get", str(out), "--tokens-file", str(tokens_file), *SPEC_ARGS)
    assert got.rc == 0, got.err
    assert f"got {4 * BT} of {len(tokens)} tokens (4 blocks" in got.out
    with safe_open(str(out), framework="pt") as f:
        back = f.get_tensor("kv")
        metadata = f.metadata()
    assert back.dtype == torch.bfloat16
    assert back.view(torch.uint8).numpy().tobytes() == (
        kv[:, :, : 4 * BT].contiguous().view(torch.uint8).numpy().tobytes()
    )
    assert json.loads(metadata["namespace"]) == SPEC.to_dict()
    assert metadata["num_tokens"] == str(4 * BT)

    # The file get wrote is one put takes back.
    replay = await kvstore(
        server, "put", str(out), "--tokens-file", str(tokens_file), *SPEC_ARGS, "--json"
    )
    assert replay.json()["already"] == 4

    capped = await kvstore(
        server, "get", str(tmp_path / "two.safetensors"), "--tokens-file", str(tokens_file),
        "--max-blocks", "2", *SPEC_ARGS, "--json",
    )  # fmt: skip
    assert (capped.json()["hit_tokens"], capped.json()["blocks"]) == (2 * BT, 2)


async def test_get_of_a_prompt_nothing_is_stored_for(server: KVStoreServer, tmp_path: Path) -> None:
    tokens_file = write_tokens(tmp_path / "prompt.txt", tokens_of(12, 3 * BT))
    out = tmp_path / "none.safetensors"
    run = await kvstore(server, "get", str(out), "--tokens-file", str(tokens_file), *SPEC_ARGS)
    assert run.rc == 1
    assert "no block of this prompt" in run.err
    assert "nothing written" in run.err
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("garbage", "is not a safetensors file"),
        ("shape", "needs [layers=2, 2, tokens, kv_heads=2, head_dim=16] bfloat16"),
        ("dtype", "float32; the namespace"),
        ("names", "none named 'kv'"),
        ("too_long", "the prompt has only"),
        ("no_block", "no full block of 16"),
    ],
)
async def test_put_refuses_a_bad_file_in_one_line(
    server: KVStoreServer, tmp_path: Path, case: str, message: str
) -> None:
    tokens = tokens_of(13, 2 * BT)
    tokens_file = write_tokens(tmp_path / "prompt.txt", tokens)
    path = tmp_path / f"{case}.safetensors"
    kv = kv_of(2 * BT)
    if case == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif case == "shape":
        save_file({"kv": kv.reshape(2, 2, 2 * BT, 1, 32).contiguous()}, str(path))
    elif case == "dtype":
        save_file({"kv": kv.float()}, str(path))
    elif case == "names":
        save_file({"k": kv[:, 0].contiguous(), "v": kv[:, 1].contiguous()}, str(path))
    elif case == "too_long":
        save_file({"kv": kv_of(3 * BT)}, str(path))
    else:
        save_file({"kv": kv[:, :, : BT - 1].contiguous()}, str(path))
    run = await kvstore(server, "put", str(path), "--tokens-file", str(tokens_file), *SPEC_ARGS)
    assert run.rc == 2, (run.out, run.err)
    assert message in run.err, run.err
    assert "Traceback" not in run.err
    async with AsyncClient(target(server)) as client:
        assert (await client.lookup(SPEC, tokens)).hit_blocks == 0  # nothing was stored
