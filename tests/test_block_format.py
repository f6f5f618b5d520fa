"""The block format: bit-exact round trips for every dtype and codec, and every kind of damage or
mismatch refused with CorruptBlockError or SpecMismatchError."""

from __future__ import annotations

import struct

import pytest
import torch

from kvstore.block_format import (
    HEADER_BYTES,
    Codec,
    decode_block,
    encode_block,
    read_header,
    transcode_block,
    verify_block,
)
from kvstore.errors import CorruptBlockError, InvalidArgumentError, SpecMismatchError
from kvstore.keys import ModelSpec, block_hashes

DTYPES = [
    name
    for name in ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
    if hasattr(torch, name)
]


def spec_for(dtype: str) -> ModelSpec:
    return ModelSpec("m", num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype, block_tokens=4)


def tensor_for(spec: ModelSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.block_shape, generator=g).to(getattr(torch, spec.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", list(Codec))
def test_round_trip_is_bit_exact(dtype: str, codec: Codec) -> None:
    spec = spec_for(dtype)
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    t = tensor_for(spec)
    data = encode_block(spec, h, t, codec=codec, level=3)
    header = read_header(data)
    assert header.codec is codec
    assert header.dtype == dtype
    assert header.shape == spec.block_shape
    assert header.block_hash == h
    assert header.fingerprint == spec.fingerprint
    out = decode_block(spec, h, data)
    assert out.dtype == t.dtype
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
    # Into a caller's tensor, in place.
    dst = torch.empty_like(t)
    assert decode_block(spec, h, bytes(data), out=dst) is dst
    assert torch.equal(dst.view(torch.uint8), t.view(torch.uint8))


def test_parent_hash_is_recorded_and_checked() -> None:
    spec = spec_for("float16")
    h0, h1 = block_hashes(spec, list(range(8)))
    data = encode_block(spec, h1, tensor_for(spec), parent_hash=h0)
    assert read_header(data).parent_hash == h0
    assert read_header(encode_block(spec, h0, tensor_for(spec))).parent_hash == bytes(16)
    bad = bytearray(data)
    bad[70] ^= 1  # inside the parent field
    with pytest.raises(CorruptBlockError, match="header checksum"):
        read_header(bad)
    with pytest.raises(InvalidArgumentError, match="parent hash must be 16 bytes"):
        encode_block(spec, h1, tensor_for(spec), parent_hash=b"x")


def test_non_contiguous_tensor_is_encoded_by_value() -> None:
    spec = spec_for("float32")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    base = torch.randn(spec.block_shape[::-1]).permute(4, 3, 2, 1, 0)
    assert not base.is_contiguous()
    assert torch.equal(decode_block(spec, h, encode_block(spec, h, base)), base)


def test_planes_compress_16_bit_kv_better_than_plain_zstd() -> None:
    spec = ModelSpec(
        "m", num_layers=4, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_tokens=64
    )
    (h,) = block_hashes(spec, list(range(64)))
    t = tensor_for(spec)
    raw = len(encode_block(spec, h, t))
    plain = len(encode_block(spec, h, t, codec=Codec.ZSTD))
    planes = len(encode_block(spec, h, t, codec=Codec.ZSTD_PLANES))
    assert planes < plain < raw


def test_mismatched_tensor_is_refused() -> None:
    spec = spec_for("float16")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    with pytest.raises(SpecMismatchError, match=r"dtype torch.float32 does not match .* float16"):
        encode_block(spec, h, torch.zeros(spec.block_shape))
    with pytest.raises(SpecMismatchError, match=r"shape \[3, 2, 5, 2, 8\] does not match"):
        encode_block(spec, h, torch.zeros((3, 2, 5, 2, 8), dtype=torch.float16))
    with pytest.raises(InvalidArgumentError, match="16 bytes"):
        encode_block(spec, b"short", tensor_for(spec))


@pytest.mark.parametrize("codec", list(Codec))
def test_every_flipped_byte_is_detected(codec: Codec) -> None:
    spec = spec_for("bfloat16")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    data = encode_block(spec, h, tensor_for(spec), codec=codec)
    # Every header byte and a spread of payload bytes.
    positions = list(range(HEADER_BYTES)) + list(range(HEADER_BYTES, len(data), 7))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(CorruptBlockError):
            decode_block(spec, h, bad)


def test_wrong_hash_namespace_and_truncation_are_corruption() -> None:
    spec = spec_for("float16")
    h0, h1 = block_hashes(spec, list(range(8)))
    data = encode_block(spec, h0, tensor_for(spec))
    with pytest.raises(CorruptBlockError, match="says it is"):
        decode_block(spec, h1, data)
    with pytest.raises(CorruptBlockError, match="says it is"):
        verify_block(h1, data)
    other = ModelSpec(
        "other-model", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
    )
    with pytest.raises(CorruptBlockError, match="another namespace"):
        decode_block(other, h0, data)
    same_shape_other_dtype = spec_for("bfloat16")
    with pytest.raises(CorruptBlockError):
        decode_block(same_shape_other_dtype, h0, data)
    with pytest.raises(CorruptBlockError, match="shorter than"):
        decode_block(spec, h0, data[:100])
    with pytest.raises(CorruptBlockError, match="header says"):
        decode_block(spec, h0, data[:-1])
    with pytest.raises(CorruptBlockError, match="header says"):
        decode_block(spec, h0, bytes(data) + b"\x00")


def test_header_that_lies_consistently_is_still_caught() -> None:
    """A forged header with a correct header checksum but a wrong payload checksum."""
    spec = spec_for("float16")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    data = bytearray(encode_block(spec, h, tensor_for(spec)))
    data[HEADER_BYTES] ^= 1
    with pytest.raises(CorruptBlockError, match="payload checksum"):
        verify_block(h, data)
    struct.pack_into("<4s", data, 0, b"XXXX")
    with pytest.raises(CorruptBlockError):
        read_header(data)


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.ZSTD_PLANES])
def test_transcode_round_trip(codec: Codec) -> None:
    spec = spec_for("float16")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    t = tensor_for(spec)
    raw = encode_block(spec, h, t)
    packed = transcode_block(raw, codec)
    assert read_header(packed).codec is codec
    assert torch.equal(decode_block(spec, h, packed), t)
    assert transcode_block(packed, Codec.RAW) == bytes(raw)
