"""What every RPC shares, around its handler: the per-call record, the request id, the bearer
token, the log line and metrics, the exception -> status mapping, and refusing request bytes
that do not decode.

In the order a call goes through them:

1. ``safe_deserializer`` — wraps each generated request deserializer (see
   ``WireAdjusted`` in kvstore/service/fetch_wire.py): undecodable bytes become ``Undecodable``.
2. ``unary_rpc`` / ``stream_rpc`` — the decorators every servicer method wears; both run the
   handler between the same steps (``_running``, which ``unary_rpc`` writes out): ``_begin``
   (request id, metrics), ``_authorize`` (the tenant, from ``bearer``), ``decoded`` (an
   ``Undecodable`` is refused with INVALID_ARGUMENT), the handler, then on failure ``failure``
   (the status code from ``kvstore.service.errors.status_of``; INTERNAL and a logged traceback
   for anything else) and ``_abort`` (after ``_drain`` of a client stream), and ``_end`` (log
   line, metrics) always.

The servicer provides ``_begin``, ``_authorize`` and ``_end`` (``CallHooks``), because they need
its tenants and metrics; everything else here is plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from kvstore.core.errors import InvalidArgumentError
from kvstore.service.auth import Tenant
from kvstore.service.errors import status_of

__all__ = [
    "Call",
    "CallHooks",
    "Undecodable",
    "bearer",
    "decoded",
    "failure",
    "request_id",
    "safe_deserializer",
    "stream_rpc",
    "unary_rpc",
]

log = logging.getLogger(__name__)

_MAX_REQUEST_ID = 128
# Request ids this process makes: a random prefix (apart from other processes and restarts) and a
# count, 32 hex digits as a uuid4's; a uuid4 per call cost a few microseconds (os.urandom).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNT = itertools.count()


@dataclass(slots=True)
class Call:
    method: str
    request_id: str
    metadata: Any = ()  # the invocation metadata, read once for the request id and the token
    context: Any = None  # the call's grpc context: ``peer`` asks it
    tenant: Tenant | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def who(self) -> Tenant:
        assert self.tenant is not None  # set before any handler runs
        return self.tenant

    @property
    def peer(self) -> str:
        """The client's address, asked of gRPC when wanted (the Work stream names its worker
        after it) rather than on every call. Only while the call runs: the context is gone
        after it (reading it then crashes the process)."""
        return "" if self.context is None else str(self.context.peer())


def request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if (
            key == "x-request-id"
            and isinstance(value, str)
            and 0 < len(value) <= _MAX_REQUEST_ID
            and value.isascii()
            and value.isprintable()
            and " " not in value
        ):
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


def bearer(metadata: Any) -> str | None:
    """The token of ``authorization: Bearer <token>``; "" when the header is malformed."""
    for key, value in metadata or ():
        if key == "authorization":
            if not isinstance(value, str):
                return ""
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class CallHooks(Protocol):
    """What the RPC wrappers call on the servicer."""

    def _begin(self, method: str, context: Any) -> Call: ...
    def _authorize(self, context: Any, call: Call, admin: bool) -> Tenant: ...
    def _end(self, call: Call, code: str) -> None: ...


def failure(exc: Exception, call: Call) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call ends with."""
    code = status_of(exc)
    if code is not None:
        return code, str(exc)
    log.error("rpc method=%s request_id=%s failed", call.method, call.request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, (
        f"internal error ({type(exc).__name__}); the server log has the traceback under "
        f"request id {call.request_id}"
    )


Handler = Callable[[Any, Any, Call], Awaitable[Any]]
StreamHandler = Callable[[Any, Any, Call], AsyncGenerator[Any, None]]


@contextlib.asynccontextmanager
async def _running(
    hooks: CallHooks, method: str, admin: bool, request: Any, context: Any, *, drain: bool
) -> AsyncIterator[Call]:
    """One call, around its handler: begin, authorize, then on failure the status (after
    ``_drain`` of a client stream when ``drain``), and the log line and metrics always."""
    call = hooks._begin(method, context)
    code = "OK"
    try:
        call.tenant = hooks._authorize(context, call, admin)
        yield call
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"
        raise
    except Exception as exc:
        status, message = failure(exc, call)
        code = str(status.name)
        await _abort(status, message, call, request, context, drain=drain)
    finally:
        hooks._end(call, code)


async def _abort(
    status: grpc.StatusCode, message: str, call: Call, request: Any, context: Any, *, drain: bool
) -> None:
    """End a failed call with ``status`` (raises), after ``_drain`` of a client stream when
    ``drain``."""
    if drain and hasattr(request, "__aiter__"):
        await _drain(request)
    await context.abort(status, message, trailing_metadata=(("x-request-id", call.request_id),))


def unary_rpc(method: str, *, admin: bool = False) -> Callable[[Handler], Any]:
    """Wrap a unary-response handler (unary or client-streaming request)."""

    def wrap(fn: Handler) -> Any:
        # ``_running`` written out: its context manager (an async generator driven through
        # ``__aenter__`` and ``__aexit__``) cost a tenth of a small Lookup's time on the server.
        async def handler(self: CallHooks, request: Any, context: Any) -> Any:
            call = self._begin(method, context)
            code = "OK"
            try:
                call.tenant = self._authorize(context, call, admin)
                return await fn(self, decoded(request, method), call)
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception as exc:
                status, message = failure(exc, call)
                code = str(status.name)
                await _abort(status, message, call, request, context, drain=True)
            finally:
                self._end(call, code)

        handler.__name__ = handler.__qualname__ = method
        return handler

    return wrap


def stream_rpc(method: str, *, admin: bool = False) -> Callable[[StreamHandler], Any]:
    """Wrap a server-streaming handler (an async generator). A bidirectional stream (Work) is
    not drained on failure: its client reads replies as it writes."""

    def wrap(fn: StreamHandler) -> Any:
        async def handler(self: CallHooks, request: Any, context: Any) -> AsyncIterator[Any]:
            async with (
                _running(self, method, admin, request, context, drain=False) as call,
                contextlib.aclosing(fn(self, decoded(request, method), call)) as messages,
            ):
                async for message in messages:
                    yield message

        handler.__name__ = handler.__qualname__ = method
        return handler

    return wrap


# How long a failed client-streaming call reads on what the client still sends (see ``_drain``).
_DRAIN_S = 2.0


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Read and drop the rest of a client stream whose call has failed, before the status goes
    out. A grpc aio client that is still writing when the status arrives reports ``INTERNAL:
    Internal error from Core`` instead of it (grpc/grpc#36066): the caller would not learn
    what was wrong. Bounded by ``_DRAIN_S``: a client that never ends its stream gets the
    status then all the same."""

    async def rest() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(rest(), _DRAIN_S)


# -- request parsing ----------------------------------------------------------------------------


class Undecodable:
    """What a request deserializer returns for bytes that are no valid message of its type.

    gRPC answers an exception in a deserializer with UNKNOWN (unary) or INTERNAL (streams) and a
    traceback in the log; returning this instead lets the RPC wrappers refuse the request with
    INVALID_ARGUMENT like any other malformed input."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, and whatever else malformed bytes raise
            return Undecodable(f"{len(raw)} bytes that do not decode: {exc}")

    return run


def _refuse_undecodable(message: Any, method: str) -> Any:
    if isinstance(message, Undecodable):
        raise InvalidArgumentError(f"{method}: the request message is malformed ({message.why})")
    return message


async def _checked_stream(messages: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for message in messages:
        yield _refuse_undecodable(message, method)


def decoded(request: Any, method: str) -> Any:
    """The request, or its stream, with undecodable messages refused (INVALID_ARGUMENT)."""
    kind = type(request)
    stream = _IS_STREAM.get(kind)
    if stream is None:
        stream = _IS_STREAM[kind] = hasattr(kind, "__aiter__")
    if stream:
        return _checked_stream(request, method)
    return _refuse_undecodable(request, method)


# Whether requests of a type are streams, by type: ``hasattr`` on a message (an AttributeError
# raised and caught inside) cost a microsecond per call. Message types and gRPC's request
# iterator types: a few dozen at most.
_IS_STREAM: dict[type, bool] = {}
