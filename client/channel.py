"""``Channel``: the gRPC plumbing under one ``AsyncClient``, apart from what the calls mean.

It holds the call metadata (the tenant's token), the TLS credentials, the ``grpc.aio`` channel
(made on first use, inside the event loop that runs it) and the retry policy: UNAVAILABLE is
retried ``retries`` times with exponential backoff and jitter, every other status becomes the
typed exception of ``client.errors`` at once. ``auth_metadata`` and ``channel_credentials`` are
also what the model worker's own channel uses (kvstore/worker/link.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from client.errors import error_from_rpc
from kvstore.core.errors import ConfigError
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

__all__ = ["Channel", "MiB", "Pem", "auth_metadata", "channel_credentials"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Pem = str | os.PathLike[str] | bytes  # a PEM file's path, or its contents
MiB = 1 << 20


class Channel:
    """One lazily made channel to ``target`` and the retries of every call made through it.

    ``max_message_bytes`` bounds each message either way; ``timeout_s`` is the deadline of
    each attempt (``call`` takes another for the calls that need one)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        credentials: Any,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_message_bytes: int,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.metadata = auth_metadata(token)
        self._credentials = credentials
        self._max_message_bytes = max_message_bytes
        self._channel: Any = None
        self._stub: Any = None
        self.closed = False

    def stub(self) -> Any:
        """The service's stub, connecting on first use."""
        # Made on first use, inside the event loop that will run it: a grpc.aio channel belongs
        # to the loop it was created in (the sync Client builds the client in one thread and
        # runs it in another).
        if self.closed:
            raise RuntimeError("this client is closed")
        if self._stub is None:
            # Keep gRPC's own reconnect backoff (1 s at first, up to 120 s, by default) near ours:
            # while it waits, every call fails fast with UNAVAILABLE, so a server that comes up
            # 0.2 s later would otherwise stay unreachable for all of our retries.
            reconnect_ms = max(20, int(self.backoff_s * 1000))
            options = [
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
                ("grpc.min_reconnect_backoff_ms", reconnect_ms),
                (
                    "grpc.max_reconnect_backoff_ms",
                    min(120_000, max(1000, reconnect_ms << self.retries)),
                ),
            ]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=options
                )
            self._stub = pb_grpc.KVStoreStub(self._channel)
        return self._stub

    def connected_stub(self) -> Any:
        """The stub if a channel is open, else None (nothing to tell the server then)."""
        return None if self.closed else self._stub

    def grpc_channel(self) -> Any:
        """The underlying ``grpc.aio`` channel, for the stubs of other services (health)."""
        self.stub()
        return self._channel

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """One attempt of ``method``: a unary call's awaitable, or a stream's call object."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return getattr(self.stub(), method)(request, timeout=timeout, metadata=self.metadata)

    async def unary(
        self, method: str, request: Any, *, timeout_s: float | None = None, raw: bool = False
    ) -> Any:
        """A unary call, retried (see ``retrying``)."""
        return await self.retrying(lambda: self.call(method, request, timeout_s=timeout_s), raw=raw)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], *, raw: bool = False) -> T:
        """Run ``attempt`` until it succeeds, retrying UNAVAILABLE; other errors are typed
        (``raw=True``: left as ``AioRpcError`` for the caller to look at)."""
        failures = 0
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                if not self.retryable(exc, failures):
                    if raw:
                        raise
                    raise error_from_rpc(exc, self.target) from None
                delay = self.backoff(failures)
                log.debug("%s unavailable, retry %d in %.2f s", self.target, failures + 1, delay)
                await asyncio.sleep(delay)
                failures += 1

    def retryable(self, exc: grpc.aio.AioRpcError, failures: int) -> bool:
        """Whether an attempt that failed after ``failures`` others is to be tried again."""
        return exc.code() == grpc.StatusCode.UNAVAILABLE and failures < self.retries

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the next attempt."""
        # Jitter in [0.5, 1] of the exponential step: clients that failed together do not come
        # back together.
        return self.backoff_s * (1 << failures) * (0.5 + random.random() / 2)

    async def close(self) -> None:
        self.closed = True
        if self._channel is not None:
            await self._channel.close()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a tenant's token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_credentials(tls_ca: Pem | None, tls_cert: Pem | None, tls_key: Pem | None) -> Any:
    """TLS credentials for a channel (None: plaintext): the server's CA, and a client
    certificate for servers that require one. Shared by the clients and the model worker."""
    if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
        raise ConfigError("tls_cert and tls_key go together, and need tls_ca")
    if tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "tls_ca"),
        private_key=None if tls_key is None else _pem(tls_key, "tls_key"),
        certificate_chain=None if tls_cert is None else _pem(tls_cert, "tls_cert"),
    )


def _pem(value: Pem, setting: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {value}: {exc.strerror}") from None
