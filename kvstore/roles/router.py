"""KV-aware routing: send a prompt to the node that holds the longest stored prefix of it.

Operations, in the order a router uses them:

1. ``PrefixRouter({"node-a": AsyncClient(...), ...})`` — one client per kvstore service, each
   with an admin token where the services have tenants (Watch is an admin call).
2. ``await router.start()`` — one Watch stream per node: a snapshot of what the node stores, then
   every stored / moved / removed / corrupt event as it happens. The router keeps, per node, the
   tiers each block is in; nothing is polled.
3. ``router.route(spec, tokens, salt=...)`` — hash the prompt as the services do (the salt is the
   tenant's, ``b""`` without tenants or for shared models) and pick the node whose leading run of
   present blocks is longest; ties go to the node holding more of it in memory tiers (G1/G2),
   then to the order the nodes were given. Blocks only in the shared G4 tier count for every node
   (any node can fetch them), so they never decide between nodes by themselves.
4. ``await router.close()``.

The view is as fresh as the event streams: a block evicted a moment ago may still be counted,
which costs a shorter hit on the chosen node, never a wrong block (the node itself looks up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.core.errors import ConfigError, KVStoreError
from kvstore.core.keys import BlockHash, ExtraKey, ModelSpec, block_hashes

if TYPE_CHECKING:
    from client.aio import AsyncClient

__all__ = ["PrefixRouter", "Route"]

log = logging.getLogger(__name__)

_LOCAL = ("G1", "G2", "G3")
_MEMORY = ("G1", "G2")
_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Route:
    node: str  # the chosen node
    hit_blocks: dict[str, int]  # per node: the leading run of blocks it holds (or can reach in G4)
    block_tokens: int

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks[self.node] * self.block_tokens


@dataclass(slots=True)
class _NodeView:
    blocks: dict[BlockHash, set[str]] = field(default_factory=dict)
    last_seq: int = 0
    events: int = 0


class PrefixRouter:
    """Routes prompts by the Watch streams of several kvstore services; see the module doc."""

    def __init__(self, nodes: Mapping[str, AsyncClient]) -> None:
        if not nodes:
            raise ConfigError("a router needs at least one node")
        self.nodes = dict(nodes)
        self._views = {name: _NodeView() for name in self.nodes}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the Watch streams. Each node's view fills as its snapshot arrives (a node that
        does not answer is routed to as if empty until it does; its stream is retried)."""
        for name in self.nodes:
            self._tasks.append(asyncio.create_task(self._follow(name), name=f"watch {name}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def __aenter__(self) -> PrefixRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def seen(self, node: str) -> int:
        """The sequence number of the last event applied from ``node``."""
        return self._views[node].last_seq

    def num_blocks(self, node: str) -> int:
        """Blocks the router believes ``node`` holds (in any tier)."""
        return len(self._views[node].blocks)

    async def _follow(self, name: str) -> None:
        view = self._views[name]
        client = self.nodes[name]
        while True:
            try:
                # after_seq=0 starts with a snapshot; later, resume after the last event seen
                # (a server that restarted or lost our place sends a snapshot again).
                async for event in client.watch(view.last_seq):
                    if event.snapshot and event.seq != view.last_seq and view.events:
                        # A new snapshot (the server restarted, or we fell behind its log):
                        # it replaces what we knew.
                        view.blocks.clear()
                    self._apply(view, event.kind, event.block_hash, event.tier)
                    view.last_seq = max(view.last_seq, event.seq)
                    view.events += 1
                return
            except asyncio.CancelledError:
                raise
            except KVStoreError as exc:
                log.warning("router: watch of %s failed (%s); retrying", name, exc)
                await asyncio.sleep(_RETRY_S)

    @staticmethod
    def _apply(view: _NodeView, kind: str, key: BlockHash, tier: str | None) -> None:
        if kind in ("stored", "moved"):
            if tier is not None:
                view.blocks.setdefault(key, set()).add(tier)
            return
        # removed, corrupt: gone from that tier (from every tier when none is named)
        tiers = view.blocks.get(key)
        if tiers is None:
            return
        if tier is None:
            tiers.clear()
        else:
            tiers.discard(tier)
        if not tiers:
            del view.blocks[key]

    def route(
        self,
        spec: ModelSpec,
        tokens: Sequence[int] | Any,
        *,
        salt: bytes = b"",
        extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    ) -> Route:
        """The node with the longest stored prefix of ``tokens`` (see the module docstring)."""
        hashes = block_hashes(spec, tokens, salt=salt, extra_keys=extra_keys)
        in_g4: set[BlockHash] = set()
        for view in self._views.values():
            in_g4.update(h for h in hashes if "G4" in view.blocks.get(h, ()))
        best: tuple[int, int, int] | None = None
        chosen = next(iter(self.nodes))
        hits: dict[str, int] = {}
        for order, (name, view) in enumerate(self._views.items()):
            hit = memory = 0
            for h in hashes:
                tiers = view.blocks.get(h)
                if tiers and any(t in _LOCAL for t in tiers):
                    memory += any(t in _MEMORY for t in tiers)
                elif h not in in_g4:
                    break
                hit += 1
            hits[name] = hit
            score = (hit, memory, -order)
            if best is None or score > best:
                best, chosen = score, name
        return Route(chosen, hits, spec.block_tokens)
