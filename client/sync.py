"""``Client``: the same calls as ``AsyncClient``, for code without an event loop.

::

    with Client("127.0.0.1:50051") as store:
        store.put(spec, tokens, kv)                 # kv: [layers, 2, tokens, kv_heads, head_dim]
        past, n = store.get_prefix(spec, tokens)
        with store.reserve(spec, tokens) as lease:
            ...

Each ``Client`` runs one ``AsyncClient`` on a private event loop in a background thread and
hands it every call; every method here is a one-line forward, so the two clients cannot drift
apart (no second copy of the retry, shared-memory or conversion logic). The client is safe to
share between threads: their calls run concurrently on that loop. Iterators (``list_blocks``,
``watch``) pull one item per round trip to the loop; close them (or run them out) to end the
underlying stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
)
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch

from client.aio import AsyncClient, Pem
from client.convert import ExtraKeys, Tokens
from client.results import BlockInfo, Event, Lease, Lookup, PutResult, Repair, Stats
from kvstore.keys import BlockHash, ModelSpec

__all__ = ["Client"]

T = TypeVar("T")
MiB = 1 << 20


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


class Client:
    """A blocking client; the arguments are those of ``AsyncClient``. Use as ``with``."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        same_host: bool | Literal["auto"] = "auto",
        max_chunk_bytes: int = 1 * MiB,
    ) -> None:
        self._aio = AsyncClient(
            target,
            token=token,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            same_host=same_host,
            max_chunk_bytes=max_chunk_bytes,
        )
        self.target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"kvstore-client-{target}", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    def _run(self, awaitable: Awaitable[T]) -> T:
        future = self._start(awaitable)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (KeyboardInterrupt): stop the call on the loop too
            raise

    def _start(self, awaitable: Awaitable[T]) -> Future[T]:
        problem = None
        if self._closed:
            problem = "this client is closed"
        elif threading.current_thread() is self._thread:
            problem = "a Client must not be called from its own event loop thread"
        if problem is not None:
            if isinstance(awaitable, Coroutine):
                awaitable.close()  # made by the caller's method call; never to run
            raise RuntimeError(problem)
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._loop)

    def _iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self._run(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            # Ends the server stream too. Skipped when the generator is collected on the loop
            # thread, or after close (the channel is gone, and the stream with it).
            if (
                isinstance(items, AsyncGenerator)
                and not self._closed
                and threading.current_thread() is not self._thread
            ):
                self._run(_close_when_idle(items))

    def close(self) -> None:
        """Close the async client (channel, shared memory), then stop the loop thread."""
        with self._lock:
            if self._closed:
                return
            try:
                self._run(self._aio.aclose())
            finally:
                self._closed = True
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the calls of AsyncClient, one line each -------------------------------------------------

    def lookup(self, spec: ModelSpec, tokens: Tokens, *, extra_keys: ExtraKeys = None) -> Lookup:
        return self._run(self._aio.lookup(spec, tokens, extra_keys=extra_keys))

    def put(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        kv: torch.Tensor,
        *,
        durable: bool = False,
        extra_keys: ExtraKeys = None,
    ) -> PutResult:
        return self._run(self._aio.put(spec, tokens, kv, durable=durable, extra_keys=extra_keys))

    def start_put(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        kv: torch.Tensor,
        *,
        durable: bool = False,
        extra_keys: ExtraKeys = None,
    ) -> Future[PutResult]:
        """``put`` without waiting; ``kv`` must stay unchanged until the future is done."""
        return self._start(self._aio.put(spec, tokens, kv, durable=durable, extra_keys=extra_keys))

    def get_prefix(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        *,
        max_blocks: int = 0,
        out: torch.Tensor | None = None,
        extra_keys: ExtraKeys = None,
        repair_holes: bool = False,
    ) -> tuple[torch.Tensor, int]:
        return self._run(
            self._aio.get_prefix(
                spec,
                tokens,
                max_blocks=max_blocks,
                out=out,
                extra_keys=extra_keys,
                repair_holes=repair_holes,
            )
        )

    def get_prefix_by_layer(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        on_layer: Callable[[int, torch.Tensor], None],
        *,
        max_blocks: int = 0,
        extra_keys: ExtraKeys = None,
    ) -> int:
        """As ``AsyncClient.get_prefix_by_layer``; ``on_layer`` runs on this client's thread."""
        return self._run(
            self._aio.get_prefix_by_layer(
                spec, tokens, on_layer, max_blocks=max_blocks, extra_keys=extra_keys
            )
        )

    def start_get_prefix_by_layer(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        on_layer: Callable[[int, torch.Tensor], None],
        *,
        max_blocks: int = 0,
        extra_keys: ExtraKeys = None,
    ) -> Future[int]:
        """``get_prefix_by_layer`` without waiting: the caller goes on (computing layer 0, say)
        while the layers arrive; the future holds the verified hit in tokens."""
        return self._start(
            self._aio.get_prefix_by_layer(
                spec, tokens, on_layer, max_blocks=max_blocks, extra_keys=extra_keys
            )
        )

    def repair(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        *,
        exact: bool = False,
        extra_keys: ExtraKeys = None,
        timeout_s: float | None = None,
    ) -> Repair:
        return self._run(
            self._aio.repair(spec, tokens, exact=exact, extra_keys=extra_keys, timeout_s=timeout_s)
        )

    def reserve(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        *,
        num_blocks: int = 0,
        ttl_s: float = 0.0,
        extra_keys: ExtraKeys = None,
    ) -> Lease:
        """The lease is taken now; ``with client.reserve(...) as lease:`` releases it on exit."""
        lease = self._run(
            self._aio.reserve(
                spec, tokens, num_blocks=num_blocks, ttl_s=ttl_s, extra_keys=extra_keys
            )
        )
        return dataclasses.replace(lease, _release_async=None, _release_sync=self.release)

    def release(self, lease_id: int) -> bool:
        return self._run(self._aio.release(lease_id))

    def pin(self, spec: ModelSpec, hashes: list[BlockHash], *, ttl_s: float = 0.0) -> int:
        return self._run(self._aio.pin(spec, hashes, ttl_s=ttl_s))

    def unpin(self, spec: ModelSpec, hashes: list[BlockHash]) -> int:
        return self._run(self._aio.unpin(spec, hashes))

    def evict(self, spec: ModelSpec, hashes: list[BlockHash], *, tier: str | None = None) -> int:
        return self._run(self._aio.evict(spec, hashes, tier=tier))

    def flush(self, tier: str | None = None) -> int:
        return self._run(self._aio.flush(tier))

    def stats(self) -> Stats:
        return self._run(self._aio.stats())

    def list_blocks(self, tier: str | None = None, *, page_size: int = 0) -> Iterator[BlockInfo]:
        return self._iterate(self._aio.list_blocks(tier, page_size=page_size))

    def inspect(self, block_hash: bytes) -> BlockInfo | None:
        return self._run(self._aio.inspect(block_hash))

    def watch(self, after_seq: int = 0) -> Iterator[Event]:
        return self._iterate(self._aio.watch(after_seq))

    def health(self, service: str = "") -> str:
        return self._run(self._aio.health(service))


async def _close_when_idle(items: AsyncGenerator[Any, None]) -> None:
    """``aclose`` once a cancelled ``anext`` has finished unwinding: after Ctrl-C the cancelled
    step may still be running on the loop, and closing it then raises "asynchronous generator
    is already running"."""
    # Yield to the loop until the step is done; there is no event to wait on for that.
    while getattr(items, "ag_running", False):  # noqa: ASYNC110  # no completion event exists
        await asyncio.sleep(0)
    await items.aclose()
