"""The load generator behind ``kvstore bench``: worker threads that fetch and put random prompts
sharing a prefix through one ``Client``, and check every block they get back bit for bit.

Imported by the command when it runs (it needs torch for the prompt buffers).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from client import Client
from kvstore.cli.options import one_line
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import KVStoreError
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes

__all__ = ["Bench", "bench_doc", "shared_prefix"]

# Part of the iterations fetch a recent prompt again instead of a new one: new prompts measure
# the shared-prefix path (hit the prefix, put the rest), revisits fetch back whole prompts that
# were put, so suffix blocks are verified too.
_REVISIT_FRACTION = 0.25
_MAX_ERRORS_KEPT = 5
_POOL_BYTES = 64 << 20
_POOL_STEP = 16  # block offsets into the pool: aligned for every dtype's view


def shared_prefix(seed: int, num_tokens: int) -> list[int]:
    """The tokens every prompt of a bench run with this seed starts with."""
    rng = random.Random(seed)
    return [rng.randrange(1 << 31) for _ in range(num_tokens)]


@dataclass(slots=True)
class _Op:
    latencies_s: list[float] = field(default_factory=list)
    num_errors: int = 0
    nbytes: int = 0

    def doc(self, seconds: float) -> dict[str, Any]:
        lat = np.array(self.latencies_s) if self.latencies_s else None
        return {
            "count": len(self.latencies_s),
            "errors": self.num_errors,
            "bytes": self.nbytes,
            "gb_per_s": self.nbytes / seconds / 1e9 if seconds > 0 else 0.0,
            "p50_ms": None if lat is None else float(np.percentile(lat, 50) * 1e3),
            "p99_ms": None if lat is None else float(np.percentile(lat, 99) * 1e3),
        }


class Bench:
    """Workers that fetch and put random prompts sharing a prefix, verifying every block.

    The bytes of a block are a deterministic function of its *unsalted* chain hash, computed
    here, which depends only on the tokens up to the block, exactly like the server's (salted)
    name for it. So whichever worker, or earlier run, stored a block, what comes back under a
    prompt's leading tokens must equal the bytes derived here, bit for bit.

    Why a window into one random pool rather than fresh random bytes per block: generating 8 MiB
    of random bytes takes about as long as storing them, and the bench would measure itself.
    Each block is the window of the pool at an offset taken from its hash: a copy, no generation.
    Two blocks share bytes only if their offsets collide (1 in millions: the pool is at least
    64 MiB, offsets step by 16 bytes), so a wrong block is caught all the same.
    """

    def __init__(
        self, kv: Client, spec: ModelSpec, prompt_tokens: int, prefix_tokens: int, seed: int
    ) -> None:
        self.kv = kv
        self.spec = spec
        self.prompt_tokens = prompt_tokens
        self.prefix = shared_prefix(seed, prefix_tokens)
        self.seed = seed
        self.ops = {"fetch": _Op(), "put": _Op()}
        self.hit_tokens = 0
        self.asked_tokens = 0
        self.mismatched_blocks = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self._recent: deque[list[int]] = deque(maxlen=64)
        # The pool depends on the namespace only: blocks stored by an earlier run (with the same
        # --seed) still hold the bytes this run expects.
        pool_bytes = max(2 * spec.block_nbytes, _POOL_BYTES)
        rng = np.random.default_rng(int.from_bytes(spec.fingerprint[:8], "little"))
        self._pool = torch.frombuffer(bytearray(rng.bytes(pool_bytes)), dtype=torch.uint8)
        self._num_offsets = (pool_bytes - spec.block_nbytes) // _POOL_STEP + 1
        # A block's bytes as [layers, 2, block_tokens, kv_heads, head_dim * itemsize]: the
        # shape of a block's slice of a prompt tensor viewed as bytes.
        self._byte_shape = (*spec.block_shape[:-1], spec.head_dim * spec.itemsize)

    @property
    def num_ops(self) -> int:
        return sum(len(op.latencies_s) for op in self.ops.values())

    @property
    def num_errors(self) -> int:
        return sum(op.num_errors for op in self.ops.values()) + self.mismatched_blocks

    def block_bytes(self, key: bytes) -> torch.Tensor:
        offset = int.from_bytes(key[:8], "little") % self._num_offsets * _POOL_STEP
        return self._pool[offset : offset + self.spec.block_nbytes].view(self._byte_shape)

    def prompt_buffer(self) -> torch.Tensor:
        spec = self.spec
        shape = (spec.num_layers, 2, self.prompt_tokens, spec.num_kv_heads, spec.head_dim)
        return torch.empty(shape, dtype=torch_dtype(spec.dtype))

    def fill(self, kv: torch.Tensor, keys: list[BlockHash]) -> torch.Tensor:
        """The K/V of a prompt's full blocks, written into ``kv`` (a prompt buffer)."""
        bt = self.spec.block_tokens
        raw = kv.view(torch.uint8)
        for i, key in enumerate(keys):
            raw[:, :, i * bt : (i + 1) * bt] = self.block_bytes(key)
        return kv[:, :, : len(keys) * bt]

    def warm_up(self) -> None:
        """Store the shared prefix once; an error here ends the bench (the server refuses this
        namespace, or is full) instead of running a benchmark of errors."""
        keys = block_hashes(self.spec, self.prefix)
        if keys:
            tokens = self.prefix[: len(keys) * self.spec.block_tokens]
            self.kv.put(self.spec, tokens, self.fill(self.prompt_buffer(), keys))

    def _failed(self, op: str, exc: KVStoreError) -> None:
        with self.lock:
            self.ops[op].num_errors += 1
            if len(self.errors) < _MAX_ERRORS_KEPT:
                self.errors.append(f"{op}: {type(exc).__name__}: {one_line(str(exc))}")

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        spec, bt = self.spec, self.spec.block_tokens
        # Reused from one iteration to the next: fresh 100 MiB tensors would cost page faults
        # on every call, which is client overhead, not store speed.
        fetched, prompt = self.prompt_buffer(), self.prompt_buffer()
        while not self.stop.is_set():
            with self.lock:
                revisit = self._recent[rng.randrange(len(self._recent))] if self._recent else None
            if revisit is not None and rng.random() < _REVISIT_FRACTION:
                tokens = revisit
            else:
                suffix = self.prompt_tokens - len(self.prefix)
                tokens = self.prefix + [rng.randrange(1 << 31) for _ in range(suffix)]
            keys = block_hashes(spec, tokens)
            t0 = time.perf_counter()
            try:
                got, hit = self.kv.get_prefix(spec, tokens, out=fetched)
            except KVStoreError as exc:
                self._failed("fetch", exc)
                continue
            seconds = time.perf_counter() - t0
            raw = got.view(torch.uint8)
            bad = sum(
                not torch.equal(raw[:, :, i * bt : (i + 1) * bt], self.block_bytes(key))
                for i, key in enumerate(keys[: hit // bt])
            )
            with self.lock:
                fetch = self.ops["fetch"]
                fetch.latencies_s.append(seconds)
                fetch.nbytes += hit // bt * spec.block_nbytes
                self.hit_tokens += hit
                self.asked_tokens += len(keys) * bt
                self.mismatched_blocks += bad
                if bad and len(self.errors) < _MAX_ERRORS_KEPT:
                    self.errors.append(f"fetch: {bad} blocks differ from what was put")
            if hit >= len(keys) * bt or self.stop.is_set():
                continue
            kv = self.fill(prompt, keys)
            t0 = time.perf_counter()
            try:
                self.kv.put(spec, tokens, kv)
            except KVStoreError as exc:
                self._failed("put", exc)
                continue
            seconds = time.perf_counter() - t0
            with self.lock:
                put = self.ops["put"]
                put.latencies_s.append(seconds)
                put.nbytes += len(keys) * spec.block_nbytes
                self._recent.append(tokens)


def bench_doc(bench: Bench, seconds: float, concurrency: int) -> dict[str, Any]:
    return {
        "namespace": bench.spec.to_dict(),
        "block_bytes": bench.spec.block_nbytes,
        "duration_s": seconds,
        "concurrency": concurrency,
        "prompt_tokens": bench.prompt_tokens,
        "shared_prefix_tokens": len(bench.prefix),
        "ops": bench.num_ops,
        "errors": bench.num_errors,
        "mismatched_blocks": bench.mismatched_blocks,
        "hit_rate": bench.hit_tokens / bench.asked_tokens if bench.asked_tokens else None,
        "by_op": {name: op.doc(seconds) for name, op in bench.ops.items()},
        "first_errors": bench.errors,
    }
