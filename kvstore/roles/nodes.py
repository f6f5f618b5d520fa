"""Disaggregated prefill and decode: one node computes a prompt's K/V, another continues from it.

Operations, in the order a deployment uses them:

1. ``await prefill(worker, client, tokens)`` — on a prefill node: run the model over the prompt
   (``ModelWorker.prefill``) and store its full blocks through ``client`` with ``durable=True``,
   so that the call returns only once the blocks are in the service's write-through tiers. Two
   ways to reach the decode node:
   - **shared G4**: ``client`` is the prefill node's own service; its G4 is the Redis both nodes
     use, and the decode node's service finds the blocks there (its lookup probes G4 for blocks it
     does not know);
   - **direct**: ``client`` is the decode node's service itself; the blocks land in its G2.
2. ``await decode(worker, client, tokens, max_new_tokens=...)`` — on the decode node: fetch the
   longest stored prefix from its own service (``get_prefix``; ``repair_holes=True`` has the
   service repair holes first), run the model over the tokens after it only, and decode greedily.
   ``DecodeResult.computed_tokens`` says how many prompt tokens went through the model here:
   with the whole prefix stored, only the trailing partial block (or the last token, whose logits
   pick the first new token).

Both take the ``ModelWorker`` of the same model on both nodes (the namespace includes a digest of
the weights, so a decode node with another model sees no blocks at all, never wrong ones).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstore.core.errors import InvalidArgumentError

if TYPE_CHECKING:
    from client.aio import AsyncClient
    from kvstore.worker.model import ModelWorker, Tokens

__all__ = ["DecodeResult", "PrefillResult", "decode", "prefill"]


@dataclass(frozen=True, slots=True)
class PrefillResult:
    num_tokens: int
    stored_blocks: int  # newly written by the service
    already_blocks: int  # the service had them
    compute_s: float  # the model's prefill
    store_s: float  # the put, until durable


@dataclass(frozen=True, slots=True)
class DecodeResult:
    tokens: list[int]  # the generated tokens
    hit_tokens: int  # prompt tokens whose K/V came from kvstore
    computed_tokens: int  # prompt tokens the model ran over on this node
    fetch_s: float
    generate_s: float  # the rest of the prompt and every new token


async def prefill(
    worker: ModelWorker, client: AsyncClient, tokens: Tokens, *, durable: bool = True
) -> PrefillResult:
    """Compute ``tokens``' K/V with ``worker`` and store its full blocks through ``client``."""
    started = time.perf_counter()
    kv = await asyncio.to_thread(worker.prefill, tokens)
    computed = time.perf_counter()
    put = await client.put(worker.spec, tokens, kv, durable=durable)
    return PrefillResult(
        num_tokens=int(kv.shape[2]),
        stored_blocks=put.stored,
        already_blocks=put.already,
        compute_s=computed - started,
        store_s=time.perf_counter() - computed,
    )


async def decode(
    worker: ModelWorker,
    client: AsyncClient,
    tokens: Tokens,
    *,
    max_new_tokens: int = 16,
    repair_holes: bool = False,
) -> DecodeResult:
    """Continue ``tokens`` from the longest prefix ``client``'s service holds."""
    ids = worker.token_ids(tokens)
    if ids.numel() == 0:
        raise InvalidArgumentError("cannot decode from an empty prompt")
    started = time.perf_counter()
    past: Any
    past, hit = await client.get_prefix(worker.spec, ids.numpy(), repair_holes=repair_holes)
    fetched = time.perf_counter()
    out = await asyncio.to_thread(
        worker.generate, ids, past if hit else None, max_new_tokens=max_new_tokens
    )
    # generate gives up the last stored token when the hit covers the whole prompt.
    computed = ids.numel() - min(hit, ids.numel() - 1)
    return DecodeResult(
        tokens=out,
        hit_tokens=hit,
        computed_tokens=computed,
        fetch_s=fetched - started,
        generate_s=time.perf_counter() - fetched,
    )
