"""The block format: bit-exact round trips for every dtype and codec, and every kind of damage or
mismatch refused with CorruptBlockError or SpecMismatchError."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
import torch
import zstandard

from kvstore.core import block_format
from kvstore.core.block_format import (
    HEADER_BYTES,
    Codec,
    decode_block,
    encode_block,
    encode_block_into,
    read_header,
    transcode_block,
    verify_block,
)
from kvstore.core.errors import CorruptBlockError, InvalidArgumentError, SpecMismatchError
from kvstore.core.keys import ModelSpec, block_hashes

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


# Blocks written by the first ZSTD_PLANES implementation (a numpy transpose), frozen before that
# code was rewritten: stored blocks must keep decoding, whatever the encoder does now. Spec
# FROZEN_SPEC(dtype), tokens [1, 2], parent hash bytes(range(16)), level 1, raw bytes
# FROZEN_RAW(n). The stored layout is byte planes: all bytes 0 of each element (the low bytes, on
# the little-endian machines we run), then all bytes 1, and so on.
FROZEN_PLANES = {
    "float16": (
        "4b56424b01020205010000000200000002000000010000000400000000000000000000001dda880cbb3e8e42"
        "e7d85af95b85c13e77a9687f8081038e7b24218d80b10337000102030405060708090a0b0c0d0e0f20000000"
        "000000002900000000000000551abad6e14eff19bdc122f2805ba4cd12b3fbf1456e73d60000000028b52ffd"
        "202001010003111f2d3b49576573818f9dabb9c7d50a18263442505e6c7a8896a4b2c0cedc"
    ),
    "float32": (
        "4b56424b01020105010000000200000002000000010000000400000000000000000000008a97839903026fd5"
        "f3360b8cb28717c1859c65a0d67e113046d5f353e1406dae000102030405060708090a0b0c0d0e0f40000000"
        "000000004900000000000000c1e24b9efab17e289e8b6d9815b5f62122ddac4ca05af2680000000028b52ffd"
        "2040010200031f3b57738fabc7e3ff1b37536f8ba70a26425e7a96b2ceea06223e5a7692ae112d4965819db9"
        "d5f10d2945617d99b51834506c88a4c0dcf814304c6884a0bc"
    ),
}


def frozen_spec(dtype: str) -> ModelSpec:
    return ModelSpec(
        "frozen", num_layers=1, num_kv_heads=1, head_dim=4, dtype=dtype, block_tokens=2
    )


def frozen_raw(nbytes: int) -> bytes:
    return bytes((7 * i + 3) % 256 for i in range(nbytes))


def planes_of(raw: bytes, itemsize: int) -> bytes:
    """The documented plane layout, written out by hand: byte j of every element, for each j."""
    return b"".join(raw[j::itemsize] for j in range(itemsize))


@pytest.mark.parametrize("dtype", sorted(FROZEN_PLANES))
def test_frozen_planes_blocks_still_decode(dtype: str) -> None:
    spec = frozen_spec(dtype)
    (h,) = block_hashes(spec, [1, 2])
    data = bytes.fromhex(FROZEN_PLANES[dtype])
    raw = frozen_raw(spec.block_nbytes)
    header = read_header(data)
    assert header.codec is Codec.ZSTD_PLANES
    assert header.parent_hash == bytes(range(16))
    # The frozen payload really is in the documented layout, independently of our decoder.
    payload = zstandard.ZstdDecompressor().decompress(data[HEADER_BYTES:])
    assert payload == planes_of(raw, spec.itemsize)
    assert decode_block(spec, h, data).view(torch.uint8).reshape(-1).numpy().tobytes() == raw
    dst = torch.full(spec.block_shape, 1.0, dtype=getattr(torch, dtype))
    decode_block(spec, h, data, out=dst)
    assert dst.view(torch.uint8).reshape(-1).numpy().tobytes() == raw


@pytest.mark.parametrize("dtype", DTYPES)
def test_planes_encoder_writes_the_frozen_layout(dtype: str) -> None:
    spec = spec_for(dtype)
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    t = tensor_for(spec)
    raw = t.view(torch.uint8).reshape(-1).numpy().tobytes()
    data = encode_block(spec, h, t, codec=Codec.ZSTD_PLANES)
    payload = zstandard.ZstdDecompressor().decompress(bytes(data[HEADER_BYTES:]))
    assert payload == planes_of(raw, spec.itemsize)


def test_general_transpose_path_keeps_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path big-endian machines take for 2-byte dtypes, run here: same bytes, same blocks."""
    spec = frozen_spec("float16")
    (h,) = block_hashes(spec, [1, 2])
    raw = frozen_raw(spec.block_nbytes)
    monkeypatch.setattr(block_format, "_LITTLE_ENDIAN", False)
    data = bytes.fromhex(FROZEN_PLANES["float16"])
    assert decode_block(spec, h, data).view(torch.uint8).reshape(-1).numpy().tobytes() == raw
    t = torch.frombuffer(bytearray(raw), dtype=torch.float16).reshape(spec.block_shape)
    again = encode_block(spec, h, t, codec=Codec.ZSTD_PLANES)
    assert zstandard.ZstdDecompressor().decompress(bytes(again[HEADER_BYTES:])) == planes_of(
        raw, 2
    )


def multi_chunk_spec(dtype: str) -> ModelSpec:
    """Blocks of a little over two fused-copy chunks, not a multiple of one: every loop runs a
    full chunk, another and a short tail."""
    return ModelSpec("m", num_layers=7, num_kv_heads=6, head_dim=64, dtype=dtype, block_tokens=50)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("codec", list(Codec))
def test_multi_chunk_blocks_round_trip(dtype: str, codec: Codec) -> None:
    spec = multi_chunk_spec(dtype)
    assert spec.block_nbytes > 2 * block_format._FUSE_CHUNK
    assert spec.block_nbytes % block_format._FUSE_CHUNK
    (h,) = block_hashes(spec, list(range(50)))
    t = tensor_for(spec, seed=3)
    data = encode_block(spec, h, t, codec=codec, parent_hash=bytes(16))
    assert torch.equal(decode_block(spec, h, data).view(torch.uint8), t.view(torch.uint8))
    dst = torch.zeros_like(t)
    decode_block(spec, h, data, out=dst)
    assert torch.equal(dst.view(torch.uint8), t.view(torch.uint8))
    if codec is not Codec.RAW:
        raw_again = transcode_block(transcode_block(data, Codec.RAW), codec)
        assert torch.equal(decode_block(spec, h, raw_again).view(torch.uint8), t.view(torch.uint8))


def _buffers(nbytes: int) -> dict[str, block_format.WritableBuffer]:
    """Every kind of buffer encode_block_into accepts, each ``nbytes`` long."""
    return {
        "bytearray": bytearray(nbytes),
        "memoryview": memoryview(bytearray(nbytes)),
        "numpy uint8": np.zeros(nbytes, dtype=np.uint8),
        "numpy float32 2-D": np.zeros((2, nbytes // 8), dtype=np.float32),
        "tensor uint8": torch.zeros(nbytes, dtype=torch.uint8),
        "tensor bfloat16": torch.zeros(nbytes // 2, dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("kind", list(_buffers(8)))
def test_encode_block_into_writes_what_encode_block_returns(kind: str) -> None:
    spec = multi_chunk_spec("bfloat16")
    h0, h1 = block_hashes(spec, list(range(100)))
    t = tensor_for(spec, seed=5)
    expected = encode_block(spec, h1, t, parent_hash=h0)
    # 8 spare bytes past the block: they must be left alone.
    out = _buffers(len(expected) + 8)[kind]
    n = encode_block_into(spec, h1, t, out, parent_hash=h0)
    assert n == len(expected) == HEADER_BYTES + spec.block_nbytes
    if isinstance(out, torch.Tensor):
        written = out.view(torch.uint8).numpy().tobytes()
    else:
        written = bytes(memoryview(out).cast("B"))  # type: ignore[arg-type]  # numpy: a buffer
    assert written[:n] == bytes(expected)
    assert written[n:] == bytes(8)
    assert read_header(written[:n]).parent_hash == h0
    assert torch.equal(decode_block(spec, h1, written[:n]).view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8_e4m3fn"])
def test_a_block_sliced_out_of_a_prompt_encodes_as_its_contiguous_copy(dtype: str) -> None:
    # Blocks cut along the tokens of [layers, 2, tokens, heads, dim] are gathered row by row
    # (each layer's K and V) straight into the block; other strides go through contiguous().
    spec = multi_chunk_spec(dtype)
    prompt = torch.cat([tensor_for(spec, seed=s) for s in range(3)], dim=2)
    odd = prompt.transpose(3, 4).contiguous().transpose(3, 4)  # heads and dim swapped in memory
    for kv in (prompt, odd):
        for i in range(3):
            block = kv[:, :, i * spec.block_tokens : (i + 1) * spec.block_tokens]
            assert not block.is_contiguous()
            (h,) = block_hashes(spec, list(range(i, i + spec.block_tokens)))
            out = bytearray(HEADER_BYTES + spec.block_nbytes)
            encode_block_into(spec, h, block, out)
            assert bytes(out) == bytes(encode_block(spec, h, block.contiguous()))
            assert torch.equal(
                decode_block(spec, h, out).view(torch.uint8), block.contiguous().view(torch.uint8)
            )


def test_encode_block_into_refuses_bad_buffers() -> None:
    spec = spec_for("float16")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    t = tensor_for(spec)
    size = HEADER_BYTES + spec.block_nbytes
    small = bytearray(b"\xee" * (size - 1))
    with pytest.raises(InvalidArgumentError, match=f"too small for a block of {size} bytes"):
        encode_block_into(spec, h, t, small)
    assert small == bytearray(b"\xee" * (size - 1))  # untouched
    with pytest.raises(InvalidArgumentError, match="writable"):
        encode_block_into(spec, h, t, memoryview(bytes(size)))
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        encode_block_into(spec, h, t, np.zeros(2 * size, dtype=np.uint8)[::2])
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        encode_block_into(spec, h, t, torch.zeros((size, 2), dtype=torch.uint8).t())
    with pytest.raises(InvalidArgumentError, match="buffer"):
        encode_block_into(spec, h, t, [0] * size)  # type: ignore[arg-type]
    with pytest.raises(SpecMismatchError):
        encode_block_into(spec, h, t.float(), bytearray(size))
    with pytest.raises(InvalidArgumentError, match="16 bytes"):
        encode_block_into(spec, h, t, bytearray(size), parent_hash=b"x")


@pytest.mark.parametrize("codec", list(Codec))
def test_decode_into_out_refuses_corruption_and_out_stays_usable(codec: Codec) -> None:
    spec = multi_chunk_spec("bfloat16")
    (h,) = block_hashes(spec, list(range(50)))
    t = tensor_for(spec, seed=7)
    data = encode_block(spec, h, t, codec=codec)
    out = torch.zeros_like(t)
    # A flip in the last chunk: the fused pass has already written everything before it.
    for pos in (HEADER_BYTES, len(data) - 1, HEADER_BYTES + (len(data) - HEADER_BYTES) // 2):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(CorruptBlockError, match=r"checksum|decompress"):
            decode_block(spec, h, bad, out=out)
    # out holds unspecified bytes now; the next good decode fills it completely.
    assert decode_block(spec, h, data, out=out) is out
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_raw_block_whose_header_lies_about_sizes_is_corrupt() -> None:
    """A well-formed header (its checksum is right) whose payload size disagrees with the raw
    size: refused as corruption, never a ValueError from the copy."""
    spec = spec_for("float16")
    (h,) = block_hashes(spec, [1, 2, 3, 4])
    data = encode_block(spec, h, tensor_for(spec))
    header = read_header(data)
    forged = block_format._pack_header(
        block_format.BlockHeader(
            header.version, header.codec, header.dtype, header.shape, header.fingerprint,
            header.block_hash, header.parent_hash, header.raw_nbytes, header.payload_nbytes - 2,
            header.raw_xxh3, header.payload_xxh3,
        )
    )
    with pytest.raises(CorruptBlockError, match="payload of"):
        decode_block(spec, h, forged + bytes(data[HEADER_BYTES:-2]))


def test_codecs_are_safe_to_use_from_several_threads() -> None:
    spec = multi_chunk_spec("bfloat16")
    hashes = block_hashes(spec, list(range(50 * 4)))
    tensors = [tensor_for(spec, seed=i) for i in range(4)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                for codec in (Codec.ZSTD, Codec.ZSTD_PLANES):
                    for level in (1, 3):
                        data = encode_block(spec, hashes[i], tensors[i], codec=codec, level=level)
                        back = decode_block(spec, hashes[i], data)
                        assert torch.equal(back.view(torch.uint8), tensors[i].view(torch.uint8))
        except BaseException as exc:  # any failure, assertion included, goes to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
