"""Benchmark of the block format: encode/decode speed per codec against memcpy, and compression.

Run ``python -m benchmarks.codec [--quick]`` from the repository root. Two tables:

1. Throughput. Blocks of 2 MiB and 32 MiB shaped like a Llama-3-8B cache (32 layers, 8 KV heads,
   head_dim 128, float16; 16 and 256 tokens per block), filled with real K/V from
   ``benchmarks.kv_sample``. For each codec: ``encode_block``, ``decode_block`` returning a fresh
   tensor and ``decode_block(out=...)`` into a pre-allocated one, each as GB/s of raw tensor bytes
   and as a ratio to ``dst.copy_(src)`` of the same tensor measured in the same run, on one
   thread like the codecs; and, for the raw codec, ``encode_block_into`` a reused buffer.
2. Compression. Four 2 MiB blocks of real K/V (the default ``kv_sample`` model: 8 layers, 4 KV
   heads, head_dim 64, 1024 tokens) in float16 and bfloat16, and Gaussian noise of the same mean
   and spread for comparison: stored size, ratio and encode/decode speed per codec (and
   ``encode_block_into`` for the raw codec).

Timings are medians of several repeats after warm-up, taken round-robin across the rows of a
group; every output buffer that the API lets the caller supply is allocated once. Prints rich
tables and the same tables in Markdown for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.kv_sample import real_kv_blocks
from benchmarks.report import Settings, Table, medians_s, print_tables
from kvstore.core.block_format import (
    HEADER_BYTES,
    Codec,
    decode_block,
    encode_block,
    encode_block_into,
    torch_dtype,
)
from kvstore.core.keys import ModelSpec, root_hash

GB = 1e9
MiB = 2**20

# (label, codec, level). Level is ignored by the raw codec.
CODECS: tuple[tuple[str, Codec, int], ...] = (
    ("raw", Codec.RAW, 1),
    ("zstd -1", Codec.ZSTD, 1),
    ("zstd -3", Codec.ZSTD, 3),
    ("zstd_planes -1", Codec.ZSTD_PLANES, 1),
    ("zstd_planes -3", Codec.ZSTD_PLANES, 3),
)


@dataclass(frozen=True, slots=True)
class CacheGeometry:
    """The shape of a model's cache, the part of a ``ModelSpec`` that sizes a block."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def spec(self, dtype: str, block_tokens: int) -> ModelSpec:
        return ModelSpec(
            model_id=self.model_id,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            block_tokens=block_tokens,
        )

    def real_blocks(self, block_tokens: int, num_tokens: int, dtype: str) -> torch.Tensor:
        return real_kv_blocks(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_tokens=block_tokens,
            num_tokens=num_tokens,
            dtype=torch_dtype(dtype),
        )


# Llama-3-8B's cache geometry: 128 KiB per token in float16.
LARGE_MODEL = CacheGeometry("bench/llama3-8b-shaped", num_layers=32, num_kv_heads=8, head_dim=128)
THROUGHPUT_BLOCK_TOKENS = (16, 256)  # 2 MiB and 32 MiB blocks
SAMPLE_TOKENS = 256

# The default kv_sample model: 8 KiB per token in 16-bit floats, so 256 tokens make 2 MiB.
SMALL_MODEL = CacheGeometry("bench/llama-tiny-random", num_layers=8, num_kv_heads=4, head_dim=64)
COMPRESSION_BLOCK_TOKENS = 256
COMPRESSION_TOKENS = 1024

THROUGHPUT_HEADERS = (
    "block",
    "codec",
    "raw/stored",
    "encode GB/s",
    "encode ÷ memcpy",
    "decode GB/s",
    "decode ÷ memcpy",
    "decode→out GB/s",
    "decode→out ÷ memcpy",
)
COMPRESSION_HEADERS = (
    "data",
    "dtype",
    "codec",
    "raw MiB",
    "stored MiB",
    "raw/stored",
    "encode GB/s",
    "encode ÷ memcpy",
    "decode→out GB/s",
    "decode→out ÷ memcpy",
)
TEXT_COLUMNS = frozenset({"block", "codec", "data", "dtype"})


FULL = Settings(repeats=15, warmup=2, min_sample_s=0.05)
QUICK = Settings(repeats=3, warmup=1, min_sample_s=0.01)
INTO_LABEL = "raw, encode_block_into"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise, not torch.equal: NaN payloads and -0.0 must survive a round trip too.
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _copy_blocks(dst: torch.Tensor, src: torch.Tensor) -> None:
    for i in range(src.shape[0]):
        dst[i].copy_(src[i])


def _encode_all(
    spec: ModelSpec, hashes: Sequence[bytes], blocks: torch.Tensor, codec: Codec, level: int
) -> list[bytearray]:
    return [
        encode_block(spec, hashes[i], blocks[i], codec=codec, level=level)
        for i in range(blocks.shape[0])
    ]


def _encode_all_into(
    spec: ModelSpec, hashes: Sequence[bytes], blocks: torch.Tensor, outs: Sequence[np.ndarray]
) -> None:
    for i, out in enumerate(outs):
        encode_block_into(spec, hashes[i], blocks[i], out)


def _into_buffer(spec: ModelSpec) -> np.ndarray:
    """A reused destination for ``encode_block_into``, written once so its pages are mapped."""
    return np.ones(HEADER_BYTES + spec.block_nbytes, dtype=np.uint8)


def _decode_all(
    spec: ModelSpec, hashes: Sequence[bytes], encoded: Sequence[bytearray], outs: torch.Tensor
) -> None:
    for i, data in enumerate(encoded):
        decode_block(spec, hashes[i], data, out=outs[i])


def _ratio(baseline_s: float, s: float) -> str:
    """Speed relative to the baseline: above 1.00 is faster than memcpy."""
    return f"{baseline_s / s:.2f}"


def throughput_samples() -> dict[int, torch.Tensor]:
    """One real float16 block per throughput block size, keyed by tokens per block."""
    return {
        block_tokens: LARGE_MODEL.real_blocks(block_tokens, SAMPLE_TOKENS, "float16")[0]
        for block_tokens in THROUGHPUT_BLOCK_TOKENS
    }


def throughput(settings: Settings, samples: dict[int, torch.Tensor]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for block_tokens, src in samples.items():
        spec = LARGE_MODEL.spec("float16", block_tokens)
        block = f"{spec.block_nbytes / MiB:g} MiB ({block_tokens} tok)"
        dst = torch.empty_like(src)
        nbytes = spec.block_nbytes
        h = root_hash(spec)

        fns: dict[str, Callable[[], object]] = {"memcpy": functools.partial(dst.copy_, src)}
        encoded: dict[str, bytearray] = {}
        for label, codec, level in CODECS:
            data = encode_block(spec, h, src, codec=codec, level=level)
            dst.zero_()
            if not _same_bits(decode_block(spec, h, data, out=dst), src):
                raise AssertionError(f"{label} does not round-trip")
            encoded[label] = data
            fns[f"{label} encode"] = functools.partial(
                encode_block, spec, h, src, codec=codec, level=level
            )
            fns[f"{label} decode"] = functools.partial(decode_block, spec, h, data)
            fns[f"{label} decode out"] = functools.partial(decode_block, spec, h, data, out=dst)
        into = _into_buffer(spec)
        if encode_block_into(spec, h, src, into) != len(encoded["raw"]) or into.tobytes() != bytes(
            encoded["raw"]
        ):
            raise AssertionError("encode_block_into disagrees with encode_block")
        fns[f"{INTO_LABEL} encode"] = functools.partial(encode_block_into, spec, h, src, into)
        times = medians_s(fns, settings)

        memcpy_s = times["memcpy"]
        memcpy_gbs = f"{nbytes / memcpy_s / GB:.1f}"
        rows.append(
            (
                block,
                "memcpy (dst.copy_), baseline",
                "—",
                memcpy_gbs,
                "1.00",
                memcpy_gbs,
                "1.00",
                memcpy_gbs,
                "1.00",
            )
        )
        for label, _, _ in CODECS:
            enc_s = times[f"{label} encode"]
            dec_s = times[f"{label} decode"]
            out_s = times[f"{label} decode out"]
            rows.append(
                (
                    block,
                    label,
                    f"{nbytes / len(encoded[label]):.3f}",
                    f"{nbytes / enc_s / GB:.2f}",
                    _ratio(memcpy_s, enc_s),
                    f"{nbytes / dec_s / GB:.2f}",
                    _ratio(memcpy_s, dec_s),
                    f"{nbytes / out_s / GB:.2f}",
                    _ratio(memcpy_s, out_s),
                )
            )
            if label == "raw":
                into_s = times[f"{INTO_LABEL} encode"]
                rows.append(
                    (
                        block,
                        INTO_LABEL,
                        f"{nbytes / len(encoded[label]):.3f}",
                        f"{nbytes / into_s / GB:.2f}",
                        _ratio(memcpy_s, into_s),
                        "—",
                        "—",
                        "—",
                        "—",
                    )
                )
    return rows


def _gaussian_like(real: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise with the real cache's mean and standard deviation, in its dtype."""
    as_float = real.float()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(real.shape, generator=gen) * as_float.std() + as_float.mean()
    return noise.to(real.dtype)


def compression_samples() -> list[tuple[str, str, torch.Tensor]]:
    """(data label, dtype name, blocks): real K/V and matching noise in each 16-bit dtype."""
    samples = []
    for dtype_name in ("float16", "bfloat16"):
        real = SMALL_MODEL.real_blocks(COMPRESSION_BLOCK_TOKENS, COMPRESSION_TOKENS, dtype_name)
        samples.append(("real K/V", dtype_name, real))
        samples.append(("gaussian", dtype_name, _gaussian_like(real, seed=1)))
    return samples


def compression(
    settings: Settings, samples: list[tuple[str, str, torch.Tensor]]
) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for data_label, dtype_name, blocks in samples:
        spec = SMALL_MODEL.spec(dtype_name, COMPRESSION_BLOCK_TOKENS)
        num_blocks = blocks.shape[0]
        raw_nbytes = num_blocks * spec.block_nbytes
        hashes = [bytes([i]) * 16 for i in range(num_blocks)]
        outs = torch.empty_like(blocks)
        fns: dict[str, Callable[[], object]] = {
            "memcpy": functools.partial(_copy_blocks, outs, blocks)
        }
        stored: dict[str, int] = {}
        for label, codec, level in CODECS:
            encode_all = functools.partial(_encode_all, spec, hashes, blocks, codec, level)
            encoded = encode_all()
            decode_all = functools.partial(_decode_all, spec, hashes, encoded, outs)
            outs.zero_()
            decode_all()
            if not _same_bits(outs, blocks):
                raise AssertionError(f"{label} does not round-trip {data_label} {dtype_name}")
            stored[label] = sum(len(e) for e in encoded)
            fns[f"{label} encode"] = encode_all
            fns[f"{label} decode out"] = decode_all
        intos = [_into_buffer(spec) for _ in range(num_blocks)]
        fns[f"{INTO_LABEL} encode"] = functools.partial(
            _encode_all_into, spec, hashes, blocks, intos
        )
        times = medians_s(fns, settings)

        memcpy_s = times["memcpy"]
        memcpy_gbs = f"{raw_nbytes / memcpy_s / GB:.2f}"
        rows.append(
            (
                data_label,
                dtype_name,
                "memcpy (dst.copy_), baseline",
                f"{raw_nbytes / MiB:.2f}",
                "—",
                "—",
                memcpy_gbs,
                "1.00",
                memcpy_gbs,
                "1.00",
            )
        )
        for label, _, _ in CODECS:
            enc_s = times[f"{label} encode"]
            dec_s = times[f"{label} decode out"]
            rows.append(
                (
                    data_label,
                    dtype_name,
                    label,
                    f"{raw_nbytes / MiB:.2f}",
                    f"{stored[label] / MiB:.2f}",
                    f"{raw_nbytes / stored[label]:.3f}",
                    f"{raw_nbytes / enc_s / GB:.2f}",
                    _ratio(memcpy_s, enc_s),
                    f"{raw_nbytes / dec_s / GB:.2f}",
                    _ratio(memcpy_s, dec_s),
                )
            )
            if label == "raw":
                into_s = times[f"{INTO_LABEL} encode"]
                rows.append(
                    (
                        data_label,
                        dtype_name,
                        INTO_LABEL,
                        f"{raw_nbytes / MiB:.2f}",
                        f"{stored[label] / MiB:.2f}",
                        f"{raw_nbytes / stored[label]:.3f}",
                        f"{raw_nbytes / into_s / GB:.2f}",
                        _ratio(memcpy_s, into_s),
                        "—",
                        "—",
                    )
                )
    return rows


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.codec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    suffix = f"median of {settings.repeats}{' (quick)' if args.quick else ''}"
    # The samples come from model forward passes: build them on every core, before timing.
    large, small = throughput_samples(), compression_samples()
    # Every codec path runs on one core, so the baseline copy does too. A multi-threaded torch
    # copy also stalls whenever another process holds a core: on this shared 2-core machine the
    # same 2 MiB copy ran at 0.3 GB/s in one run and 80 GB/s in the next.
    with torch_threads(1):
        tables = [
            Table(
                "Block encode/decode, Llama-3-8B-shaped float16 real K/V; GB/s = 1e9 raw tensor "
                "bytes per second; ÷ memcpy = speed relative to dst.copy_(src) on 1 thread; "
                "encode_block_into writes into one reused, pre-faulted buffer; " + suffix,
                THROUGHPUT_HEADERS,
                throughput(settings, large),
                TEXT_COLUMNS,
                group_columns=1,
            ),
            Table(
                f"Compression of {COMPRESSION_TOKENS // COMPRESSION_BLOCK_TOKENS} blocks of "
                f"{COMPRESSION_BLOCK_TOKENS} tokens (8 layers, 4 KV heads, head_dim 64; 2 MiB "
                "each); raw/stored counts the 128-byte header; decode→out into pre-allocated "
                f"tensors; ÷ memcpy = speed relative to dst.copy_ on 1 thread; {suffix}",
                COMPRESSION_HEADERS,
                compression(settings, small),
                TEXT_COLUMNS,
                group_columns=2,
            ),
        ]
    print_tables(tables, "zstandard", "xxhash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
