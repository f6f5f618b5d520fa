"""``Client``: the same calls as ``AsyncClient``, for code without an event loop.

::

    with Client("127.0.0.1:50051") as store:
        store.put(spec, tokens, kv)                 # kv: [layers, 2, tokens, kv_heads, head_dim]
        past, n = store.get_prefix(spec, tokens)
        with store.reserve(spec, tokens) as lease:
            ...

Each ``Client`` runs one ``AsyncClient`` on a private event loop in a background thread and
hands it every call. Every method here is made from the ``AsyncClient`` method of the same name
by one helper (``_forward``: the same arguments and docstring, the result waited for), so the
two clients cannot drift apart (no second copy of the retry, shared-memory or conversion logic).
The client is safe to share between threads: their calls run concurrently on that loop.
Iterators (``list_blocks``, ``watch``) pull one item per round trip to the loop; close them (or
run them out) to end the underlying stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, Concatenate, ParamSpec, TypeVar, Unpack

from client.aio import AsyncClient, ClientOptions
from client.results import Lease
from client.same_host import Segment

__all__ = ["Client"]

P = ParamSpec("P")
A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")

# The docstrings of the calls that differ from their AsyncClient method's.
_START_PUT = "``put`` without waiting; ``kv`` must stay unchanged until the future is done."
_START_BY_LAYER = """``get_prefix_by_layer`` without waiting: the caller goes on (computing layer 0,
say) while the layers arrive; the future holds the verified hit in tokens."""
_RESERVE = "The lease is taken now; ``with client.reserve(...) as lease:`` releases it on exit."


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _forward(
    method: Callable[Concatenate[AsyncClient, P], A],
    through: Callable[[Client, A], R],
    name: str = "",
    doc: str = "",
) -> Callable[Concatenate[Client, P], R]:
    """A ``Client`` method: ``method`` of its ``AsyncClient``, with the same arguments, handed
    to ``through`` (``_run``: waited for; ``_start``: a future; ``_iterate``: an iterator)."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return through(self, method(self._aio, *args, **kwargs))

    call.__name__ = name or method.__name__
    call.__qualname__ = f"Client.{call.__name__}"
    call.__doc__ = doc or method.__doc__
    return call


class Client:
    """A blocking client; the arguments are those of ``AsyncClient``. Use as ``with``."""

    def __init__(self, target: str, **options: Unpack[ClientOptions]) -> None:
        self._aio = AsyncClient(target, **options)
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

    def _leased(self, lease: Awaitable[Lease]) -> Lease:
        # The async client's lease releases through the async call; this one through ours.
        taken = self._run(lease)
        return dataclasses.replace(taken, _release_async=None, _release_sync=self.release)

    @property
    def same_host_segments(self) -> list[Segment]:
        """``AsyncClient.same_host_segments``; stable only on this client's loop thread (a
        callback of ``start_get_prefix_by_layer``, for instance)."""
        return self._aio.same_host_segments

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

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the calls of AsyncClient, one line each -------------------------------------------------

    lookup = _forward(AsyncClient.lookup, _run)
    kv_buffer = _forward(AsyncClient.kv_buffer, _run)
    free_kv_buffer = _forward(AsyncClient.free_kv_buffer, _run)
    put = _forward(AsyncClient.put, _run)
    start_put = _forward(AsyncClient.put, _start, "start_put", _START_PUT)
    get_prefix = _forward(AsyncClient.get_prefix, _run)
    get_prefix_by_layer = _forward(AsyncClient.get_prefix_by_layer, _run)
    get_prefix_from_g1 = _forward(AsyncClient.get_prefix_from_g1, _run)
    start_get_prefix_by_layer = _forward(
        AsyncClient.get_prefix_by_layer, _start, "start_get_prefix_by_layer", _START_BY_LAYER
    )
    repair = _forward(AsyncClient.repair, _run)
    reserve = _forward(AsyncClient.reserve, _leased, doc=_RESERVE)
    release = _forward(AsyncClient.release, _run)
    pin = _forward(AsyncClient.pin, _run)
    unpin = _forward(AsyncClient.unpin, _run)
    evict = _forward(AsyncClient.evict, _run)
    flush = _forward(AsyncClient.flush, _run)
    stats = _forward(AsyncClient.stats, _run)
    list_blocks = _forward(AsyncClient.list_blocks, _iterate)
    inspect = _forward(AsyncClient.inspect, _run)
    watch = _forward(AsyncClient.watch, _iterate)
    health = _forward(AsyncClient.health, _run)


async def _close_when_idle(items: AsyncGenerator[Any, None]) -> None:
    """``aclose`` once a cancelled ``anext`` has finished unwinding: after Ctrl-C the cancelled
    step may still be running on the loop, and closing it then raises "asynchronous generator
    is already running"."""
    # Yield to the loop until the step is done; there is no event to wait on for that.
    while getattr(items, "ag_running", False):  # noqa: ASYNC110  # no completion event exists
        await asyncio.sleep(0)
    await items.aclose()
