"""Block identity: frozen test vectors, the byte layouts behind them, determinism across processes,
and clear errors for bad tokens and specs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kvstore.core.errors import ConfigError, InvalidArgumentError, InvalidTokenError
from kvstore.core.keys import ModelSpec, block_hashes, encode_extra_keys, root_hash

SPEC = ModelSpec(
    "kvstore/test-model",
    num_layers=2,
    num_kv_heads=2,
    head_dim=4,
    dtype="float16",
    block_tokens=4,
    revision="r1",
    tokenizer_id="tok-1",
)

# Frozen vectors. If one of these changes, every stored block in every deployment becomes
# unreachable: change them only together with a new namespace/root tag.
CANONICAL = (
    b'{"block_tokens":4,"dtype":"float16","head_dim":4,"model_id":"kvstore/test-model",'
    b'"num_kv_heads":2,"num_layers":2,"revision":"r1","tokenizer_id":"tok-1"}'
)
FINGERPRINT = "a1d3fb7da845a4feb0a181d710e7c38f"
ROOT = "29db15b8b0d416edc59cbd9eacaed757"
ROOT_SALTED = "7886e6b1b77c7078f6438c018d5865ec"
HASHES = ["9fe8f9f8781d88c00bc339baaf715194", "4b208d47b45aad0e0e3ecf4fd39a425a"]
HASHES_SALTED = ["b3ed96eacf3604bdeb7d7b92bde1f6ff", "7d2a1a7aa2493c5bca3a9aaa01408ced"]
HASHES_EXTRA = ["b52a9c62b8f0c1985783f5dff817c929", "b55669d6f70da1685b82ab853892e927"]
EXTRA_TOKENS = [0, 1, 2**32 - 1, 7, 100000, 5, 6, 8]
EXTRA_KEYS: list[list[bytes | str | int]] = [["lora-7", 7, b"\x00"], []]


def test_frozen_vectors() -> None:
    assert SPEC.canonical_encoding() == CANONICAL
    assert SPEC.fingerprint.hex() == FINGERPRINT
    assert root_hash(SPEC).hex() == ROOT
    assert root_hash(SPEC, b"tenant-a").hex() == ROOT_SALTED
    assert [h.hex() for h in block_hashes(SPEC, list(range(10)))] == HASHES
    assert [h.hex() for h in block_hashes(SPEC, list(range(10)), salt=b"tenant-a")] == HASHES_SALTED
    assert [
        h.hex() for h in block_hashes(SPEC, EXTRA_TOKENS, extra_keys=EXTRA_KEYS)
    ] == HASHES_EXTRA


def test_vectors_follow_the_documented_layout() -> None:
    """Re-derive the vectors from hashlib alone, as an implementation in another language would."""
    fp = hashlib.blake2b(b"kvstore.namespace.v1\x00" + CANONICAL, digest_size=16).digest()
    assert fp.hex() == FINGERPRINT
    h = hashlib.blake2b(b"kvstore.root.v1\x00" + fp + b"tenant-a", digest_size=16).digest()
    assert h.hex() == ROOT_SALTED
    out = []
    for i in range(2):
        tokens = b"".join(t.to_bytes(4, "little") for t in range(4 * i, 4 * i + 4))
        h = hashlib.blake2b(h + tokens, digest_size=16).digest()
        out.append(h.hex())
    assert out == HASHES_SALTED
    extra = b"s" + (6).to_bytes(4, "little") + b"lora-7"
    extra += b"i" + (8).to_bytes(4, "little") + (7).to_bytes(8, "little", signed=True)
    extra += b"b" + (1).to_bytes(4, "little") + b"\x00"
    assert encode_extra_keys(EXTRA_KEYS[0]) == extra


def test_two_processes_compute_the_same_hashes() -> None:
    script = textwrap.dedent(
        """
        import json, random
        from kvstore.core.keys import ModelSpec, block_hashes
        spec = ModelSpec("m", num_layers=4, num_kv_heads=8, head_dim=64, dtype="bfloat16",
                         block_tokens=16)
        rng = random.Random(1234)
        tokens = [rng.randrange(0, 2**32) for _ in range(1000)]
        print(json.dumps([h.hex() for h in block_hashes(spec, tokens, salt=b"s",
                                                       extra_keys=[["x"]] * 62)]))
        """
    )
    outputs = []
    for seed in ("0", "4242"):  # different hash randomisation must not matter
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
        )
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 62


def test_only_full_blocks_are_hashed_and_chain_is_prefix_stable() -> None:
    assert block_hashes(SPEC, [1, 2, 3]) == []
    long = block_hashes(SPEC, list(range(20)))
    assert len(long) == 5
    assert block_hashes(SPEC, list(range(11))) == long[:2]
    # The same block tokens after a different prefix get a different hash.
    other = block_hashes(SPEC, [9, 9, 9, 9, *range(4, 8)])
    assert other[1] != long[1]


def test_parent_continues_a_chain() -> None:
    full = block_hashes(SPEC, list(range(16)))
    tail = block_hashes(SPEC, list(range(8, 16)), parent=full[1])
    assert tail == full[2:]


def test_inputs_as_list_numpy_and_torch_agree() -> None:
    tokens = list(range(1000, 1040))
    expected = block_hashes(SPEC, tokens)
    assert block_hashes(SPEC, np.array(tokens, dtype=np.int64)) == expected
    assert block_hashes(SPEC, np.array(tokens, dtype=np.uint32)) == expected
    assert block_hashes(SPEC, torch.tensor(tokens)) == expected
    assert block_hashes(SPEC, tuple(tokens)) == expected


def test_namespace_and_salt_separate_hashes() -> None:
    tokens = list(range(8))
    other_dtype = ModelSpec(
        "kvstore/test-model",
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        dtype="bfloat16",
        block_tokens=4,
        revision="r1",
        tokenizer_id="tok-1",
    )
    assert other_dtype.fingerprint != SPEC.fingerprint
    assert set(block_hashes(other_dtype, tokens)).isdisjoint(block_hashes(SPEC, tokens))
    assert set(block_hashes(SPEC, tokens, salt=b"a")).isdisjoint(
        block_hashes(SPEC, tokens, salt=b"b")
    )


def test_extra_keys_are_typed() -> None:
    tokens = list(range(4))
    a = block_hashes(SPEC, tokens, extra_keys=[["7"]])
    b = block_hashes(SPEC, tokens, extra_keys=[[b"7"]])
    c = block_hashes(SPEC, tokens, extra_keys=[[7]])
    assert len({a[0], b[0], c[0]}) == 3
    assert block_hashes(SPEC, tokens, extra_keys=[[]]) == block_hashes(SPEC, tokens)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([0, 1, -1, 3], "token 2 is -1"),
        ([0, 2**32, 2, 3], "token 1 is 4294967296"),
        ([0, 1, 2, 3.0], "token 3 is 3.0"),
        ([0, "1", 2, 3], "token 1 is '1'"),
        (np.array([0.5, 1.0, 2.0, 3.0]), "integers"),
        (np.array([0, -5, 2, 3]), "token 1 is -5"),
        (np.zeros((2, 4), dtype=np.int64), "one-dimensional"),
    ],
)
def test_bad_tokens_are_clear_errors(tokens: object, message: str) -> None:
    with pytest.raises(InvalidTokenError, match=message):
        block_hashes(SPEC, tokens)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="extra_keys has 1 entries"):
        block_hashes(SPEC, list(range(8)), extra_keys=[[]])
    with pytest.raises(InvalidArgumentError, match="parent hash must be 16 bytes"):
        block_hashes(SPEC, list(range(8)), parent=b"short")
    with pytest.raises(InvalidArgumentError, match="not bool"):
        encode_extra_keys([True])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "int8", "not supported"),
        ("num_layers", 0, "num_layers must be an integer >= 1"),
        ("block_tokens", -4, "block_tokens"),
        ("head_dim", 2.5, "head_dim"),
        ("model_id", "", "model_id must not be empty"),
    ],
)
def test_bad_spec_is_config_error(field: str, value: object, message: str) -> None:
    fields = SPEC.to_dict() | {field: value}
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**fields)


def test_spec_shapes_and_round_trip() -> None:
    assert SPEC.block_shape == (2, 2, 4, 2, 4)
    assert SPEC.block_nbytes == 2 * 2 * 4 * 2 * 4 * 2
    assert ModelSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ConfigError, match="unknown ModelSpec fields"):
        ModelSpec.from_dict(SPEC.to_dict() | {"bogus": 1})
