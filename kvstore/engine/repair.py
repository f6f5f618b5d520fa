"""Hole repair over the engine, and the pool of model workers that compute the holes.

Operations, in the order the service uses them:

1. ``WorkerPool()`` — the workers attached to this process: ``ModelWorker``s built in-process
   and worker processes attached through the Work stream (``kvstore.service.remote_worker``).
   Each is a ``HoleFiller``: a namespace, a name and ``fill``.
2. ``pool.attach(filler, address)`` / ``pool.detach(worker_id)`` — a worker comes and goes.
3. ``await repair_prompt(engine, pool.fill, spec, hashes, tokens)`` — find the holes of a
   prompt's stored prefix, load the blocks around them under a lease, have one worker compute
   the missing blocks, and store them all in one ``put_blocks``.

What the worker gets is the prompt's tokens up to the last block to compute and every other
block of that range (the past it attends to); what it returns is the K/V of the blocks to compute.
The engine is only touched here, before and after: a worker that dies or answers garbage leaves
nothing stored, and the pool gives the task to another worker of the same namespace.

``exact=True`` computes from the first hole to the last present block, replacing the stored
blocks after the hole with K/V computed over the repaired prefix: bit-identical to a prefill
from scratch, for users who cannot accept the few ULPs that a hole's recomputation may differ by.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import KVStoreError, SpecMismatchError
from kvstore.core.keys import BlockHash, ModelSpec

if TYPE_CHECKING:
    from kvstore.engine.engine import Engine

__all__ = [
    "HoleFiller",
    "NoWorkerError",
    "RepairResult",
    "WorkerGoneError",
    "WorkerLostError",
    "WorkerPool",
    "WorkerStatus",
    "repair_prompt",
]

log = logging.getLogger(__name__)

# How many workers one repair tries before it gives up (each one that went away mid-task counts).
_MAX_ATTEMPTS = 8


class NoWorkerError(KVStoreError):
    """No model worker of the prompt's namespace is attached (FAILED_PRECONDITION)."""


class WorkerLostError(KVStoreError):
    """Every worker that took the repair went away before answering; nothing was stored
    (UNAVAILABLE: retrying is safe)."""


class WorkerGoneError(Exception):
    """Raised by a ``HoleFiller`` whose worker went away mid-task: the pool tries another."""


class HoleFiller(Protocol):
    """A model that computes missing blocks from the blocks around them."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def name(self) -> str: ...

    async def fill(
        self, tokens: np.ndarray[Any, Any], blocks: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """``tokens`` are the first ``len(blocks) * block_tokens`` tokens (u32); ``blocks`` the
        K/V of each block, None for those to compute. Returns the computed blocks, in order."""
        ...


@dataclass(frozen=True, slots=True)
class RepairResult:
    repaired: list[int]  # blocks computed and stored, in prompt order
    # The usable prefix (leading run of present blocks) as the lookup before repair saw it: a
    # block found corrupt while loading counted as present there.
    hit_blocks_before: int
    hit_blocks_after: int
    # exact=True only: present blocks that could not be replaced because another client holds
    # them (leased or pinned); they keep their stored K/V.
    kept: list[int] = field(default_factory=list)
    worker: str = ""  # the worker that computed the blocks; "" when nothing was computed


@dataclass(slots=True)
class WorkerStatus:
    worker_id: int
    name: str
    spec: ModelSpec
    address: str
    tasks_done: int = 0
    blocks_computed: int = 0
    busy: bool = False


@dataclass(slots=True)
class _Entry:
    filler: HoleFiller
    status: WorkerStatus
    # One task at a time per worker: a model computes one forward at a time, and a remote
    # worker's stream carries one task's blocks at a time.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    gone: bool = False


Fill = Callable[
    [ModelSpec, np.ndarray[Any, Any], Sequence[torch.Tensor | None]],
    Awaitable[tuple[list[torch.Tensor], str]],
]


class WorkerPool:
    """The attached workers, by namespace; ``fill`` spreads tasks over them."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count(1)

    def attach(self, filler: HoleFiller, address: str = "in-process") -> int:
        worker_id = next(self._ids)
        status = WorkerStatus(worker_id, filler.name, filler.spec, address)
        self._entries[worker_id] = _Entry(filler, status)
        log.info(
            "model worker %d (%s, %s) attached for %s",
            worker_id,
            filler.name,
            address,
            filler.spec.name,
        )
        return worker_id

    def detach(self, worker_id: int) -> None:
        entry = self._entries.pop(worker_id, None)
        if entry is not None:
            entry.gone = True
            log.info("model worker %d (%s) detached", worker_id, entry.status.name)

    def workers(self) -> list[WorkerStatus]:
        return [e.status for e in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    async def fill(
        self, spec: ModelSpec, tokens: np.ndarray[Any, Any], blocks: Sequence[torch.Tensor | None]
    ) -> tuple[list[torch.Tensor], str]:
        """Compute the None entries of ``blocks`` on a worker of ``spec``; returns the blocks and
        the worker's name. ``NoWorkerError`` when none is attached, ``WorkerLostError`` when
        every one tried went away mid-task."""
        lost: list[str] = []
        reasons: list[str] = []
        while True:
            candidates = [
                e
                for e in self._entries.values()
                if e.filler.spec == spec and e.status.worker_id not in _ids_of(lost)
            ]
            if not candidates or len(lost) >= _MAX_ATTEMPTS:
                if lost:
                    raise WorkerLostError(
                        f"the model worker(s) of namespace {spec.name} that took the repair "
                        f"went away ({'; '.join(reasons) or ', '.join(lost)}); nothing of it "
                        "was stored. Retry once a worker is attached again"
                    )
                raise NoWorkerError(self._none_for(spec))
            # The least busy worker; among equals the one that did least so far.
            entry = min(candidates, key=lambda e: (e.waiting, e.status.tasks_done))
            entry.waiting += 1
            try:
                async with entry.lock:
                    if entry.gone:
                        lost.append(_label(entry))
                        continue
                    entry.status.busy = True
                    try:
                        out = await entry.filler.fill(tokens, blocks)
                    finally:
                        entry.status.busy = False
            except WorkerGoneError as exc:
                log.warning("model worker %s went away mid-repair: %s", _label(entry), exc)
                self.detach(entry.status.worker_id)
                lost.append(_label(entry))
                reasons.append(f"{_label(entry)}: {exc}")
                continue
            finally:
                entry.waiting -= 1
            entry.status.tasks_done += 1
            entry.status.blocks_computed += len(out)
            return out, entry.status.name

    def _none_for(self, spec: ModelSpec) -> str:
        if not self._entries:
            return (
                f"no model worker is attached to this server, so the holes of namespace "
                f"{spec.name} cannot be repaired: start one with `kvstore worker --server "
                "HOST:PORT --model DIR` (or without --model for the default model)"
            )
        ours = spec.to_dict()
        lines = []
        for entry in self._entries.values():
            theirs = entry.filler.spec.to_dict()
            differ = ", ".join(
                f"{k}={theirs[k]!r} (asked: {ours[k]!r})" for k in ours if ours[k] != theirs[k]
            )
            lines.append(f"{entry.status.name}: {differ}")
        return (
            f"no attached model worker runs namespace {spec.name}; the attached ones differ: "
            + "; ".join(lines)
        )


def _label(entry: _Entry) -> str:
    return f"{entry.status.worker_id}:{entry.status.name}"


def _ids_of(labels: list[str]) -> set[int]:
    return {int(label.split(":", 1)[0]) for label in labels}


async def repair_prompt(
    engine: Engine,
    fill: Fill,
    spec: ModelSpec,
    hashes: Sequence[BlockHash],
    tokens: np.ndarray[Any, Any],
    *,
    root: BlockHash,
    exact: bool = False,
    owner: str = "",
) -> RepairResult:
    """Fill the holes of a prompt whose full blocks are ``hashes`` (``tokens``: u32 ids of at
    least ``len(hashes) * block_tokens`` tokens; ``root``: the chain's root, the parent of block
    0). A missing tail (no present block after it) is not a hole and stays missing. A block that
    fails to load (corrupt, or evicted since the lookup) is computed like a hole."""
    found = await engine.lookup_hashes(spec, list(hashes))
    before = found.hit_blocks
    if not found.holes:
        return RepairResult([], before, before)
    last_present = max(i for i, t in enumerate(found.tiers) if t is not None)
    end = last_present + 1 if exact else found.holes[-1] + 1
    targets = set(range(found.holes[0], end)) if exact else set(found.holes)
    loads = [i for i in range(end) if i not in targets]
    # The lease closes the race between the lookup and the loads: eviction skips leased blocks.
    # The loaded blocks are copies, so it ends with the loads (exact mode may evict some of them).
    blocks: list[torch.Tensor | None] = [None] * end
    if loads:
        lease = engine.reserve([hashes[i] for i in loads])
        try:
            got = await engine.get(spec, [hashes[i] for i in loads])
        finally:
            engine.release(lease.lease_id)
        for i, block in zip(loads, got, strict=True):
            if block is None:
                targets.add(i)  # corrupt or gone since the lookup: compute it too
            blocks[i] = block
    if exact:
        targets = set(range(min(targets), end))
    for i in targets:
        blocks[i] = None
    order = sorted(targets)
    bt = spec.block_tokens
    computed, worker = await fill(spec, np.ascontiguousarray(tokens[: end * bt]), blocks)
    _check_computed(spec, computed, len(order), worker)
    kept = await _evict_for_replacement(engine, spec, hashes, order) if exact else []
    store = [(i, t) for i, t in zip(order, computed, strict=True) if i not in kept]
    await engine.put_blocks(
        spec,
        [(hashes[i], root if i == 0 else hashes[i - 1], t) for i, t in store],
        owner=owner,
    )
    after = (await engine.lookup_hashes(spec, list(hashes))).hit_blocks
    return RepairResult([i for i, _ in store], before, after, kept, worker)


def _check_computed(spec: ModelSpec, blocks: list[torch.Tensor], n: int, worker: str) -> None:
    if len(blocks) != n:
        raise SpecMismatchError(f"model worker {worker} returned {len(blocks)} blocks, not {n}")
    dtype = torch_dtype(spec.dtype)
    for block in blocks:
        if block.dtype != dtype or tuple(block.shape) != spec.block_shape:
            raise SpecMismatchError(
                f"model worker {worker} returned a {block.dtype} block of shape "
                f"{list(block.shape)}; namespace {spec.name} has {spec.dtype} "
                f"{list(spec.block_shape)}"
            )


async def _evict_for_replacement(
    engine: Engine, spec: ModelSpec, hashes: Sequence[BlockHash], run: list[int]
) -> list[int]:
    """Evict the present blocks of ``run`` so that the puts that follow replace them (puts skip
    present blocks); returns those that stayed because another client leases or pins them."""
    present = await engine.lookup_hashes(spec, [hashes[i] for i in run])
    there = [i for i, t in zip(run, present.tiers, strict=True) if t is not None]
    if not there:
        return []
    await engine.evict([hashes[i] for i in there])
    still = await engine.lookup_hashes(spec, [hashes[i] for i in there])
    kept = [i for i, t in zip(there, still.tiers, strict=True) if t is not None]
    if kept:
        log.warning("exact repair: blocks %s are leased or pinned and keep their K/V", kept)
    return kept
