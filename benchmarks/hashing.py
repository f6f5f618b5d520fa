"""Benchmark of ``kvstore.core.keys.block_hashes`` on a 128K-token prompt, against bare blake2b.

Run ``python -m benchmarks.hashing [--quick]`` from the repository root. For 16, 64 and 256 tokens
per block and for a token list, a numpy int64 array and a torch int64 tensor, it times
``block_hashes`` and, in the same run, the bare chain of as many blake2b-16 digests over the same
u32 bytes (a ``hashlib`` loop with the tokens already converted). The ratio is our overhead: token
conversion and range checks (for a list, building an ``array('I')`` of 128K ints) and argument
handling; the hash loop itself is the same as the baseline's. The target is
5 ms for the whole prompt at 256 tokens per block. Prints a rich table and the same table in
Markdown for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.report import Settings, Table, medians_s, print_tables
from kvstore.core.keys import DIGEST_BYTES, ModelSpec, block_hashes, root_hash, tokens_to_u32

NUM_TOKENS = 131072
VOCAB_SIZE = 152064  # Qwen2's vocabulary, one of the largest in use
BLOCK_TOKENS = (16, 64, 256)
TARGET_BLOCK_TOKENS = 256
TARGET_MS = 5.0
SEED = 0

HEADERS = ("block_tokens", "input type", "ms median", "ms baseline", "ratio", "target met")
TEXT_COLUMNS = frozenset({"input type", "target met"})

FULL = Settings(repeats=15, warmup=3, min_sample_s=0.02)
QUICK = Settings(repeats=5, warmup=1, min_sample_s=0.005)


def bare_chain(root: bytes, raw: bytes, block_tokens: int) -> bytes:
    """The baseline: the same chain of blake2b-16 digests, nothing else."""
    view = memoryview(raw)
    step = 4 * block_tokens
    h = root
    for i in range(len(raw) // step):
        d = hashlib.blake2b(h, digest_size=DIGEST_BYTES)
        d.update(view[i * step : (i + 1) * step])
        h = d.digest()
    return h


def run(settings: Settings) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(SEED)
    tokens_np = rng.integers(0, VOCAB_SIZE, NUM_TOKENS, dtype=np.int64)
    inputs: dict[str, Sequence[int] | np.ndarray[Any, Any] | torch.Tensor] = {
        "list[int]": tokens_np.tolist(),
        "numpy int64": tokens_np,
        "torch int64": torch.from_numpy(tokens_np.copy()),
    }
    raw = tokens_to_u32(tokens_np)
    rows: list[tuple[str, ...]] = []
    for block_tokens in BLOCK_TOKENS:
        spec = ModelSpec(
            model_id="bench/hashing",
            num_layers=28,
            num_kv_heads=4,
            head_dim=128,
            dtype="bfloat16",
            block_tokens=block_tokens,
        )
        root = root_hash(spec)
        # The benchmark is only meaningful if both sides compute the same chain.
        expected = bare_chain(root, raw, block_tokens)
        fns: dict[str, Callable[[], object]] = {
            "baseline": functools.partial(bare_chain, root, raw, block_tokens)
        }
        for label, tokens in inputs.items():
            hashes = block_hashes(spec, tokens)
            if len(hashes) != NUM_TOKENS // block_tokens or hashes[-1] != expected:
                raise AssertionError(f"block_hashes disagrees with the bare chain for {label}")
            fns[label] = functools.partial(block_hashes, spec, tokens)
        times_ms = {name: 1e3 * s for name, s in medians_s(fns, settings).items()}
        baseline_ms = times_ms["baseline"]
        for label in inputs:
            ms = times_ms[label]
            if block_tokens == TARGET_BLOCK_TOKENS:
                met = f"{'yes' if ms <= TARGET_MS else 'NO'} (≤ {TARGET_MS:g} ms)"
            else:
                met = "—"
            rows.append(
                (
                    str(block_tokens),
                    label,
                    f"{ms:.3f}",
                    f"{baseline_ms:.3f}",
                    f"{ms / baseline_ms:.2f}x",
                    met,
                )
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hashing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    rows = run(settings)
    title = (
        f"block_hashes over {NUM_TOKENS} tokens (ids < {VOCAB_SIZE}, seed {SEED}); "
        f"baseline: bare blake2b-16 chain over the same u32 bytes; "
        f"median of {settings.repeats}{' (quick)' if args.quick else ''}"
    )
    print_tables([Table(title, HEADERS, rows, TEXT_COLUMNS, group_columns=1)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
