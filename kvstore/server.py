"""The gRPC service: wire messages in, engine calls, wire messages out.

Operations, in the order a deployment uses them:

1. ``KVStoreServer(config)`` — tenants from ``config.tenants`` + ``server.secret`` +
   ``server.shared_models``; metrics in a registry of its own.
2. ``await server.start(progress=None)`` — open the engine (``Engine.open``: the index is rebuilt
   from G3), bind ``server.listen`` (``host:0`` picks a free port; TLS when ``server.tls_cert`` is
   set), mark the standard health service SERVING, export ``/metrics`` when
   ``server.metrics_listen`` is set. Returns the port.
3. RPCs: Lookup, Reserve/Release, Put (client stream), Fetch (server stream), Pin/Unpin/Evict,
   Repair (and Fetch with ``repair_holes``), OpenSegment/CloseSegment (same-host shared memory,
   kvstore/segments.py), Stats for every tenant; ListBlocks, Inspect, Watch,
   Flush and Work (model workers attach there) for admin tenants.
4. ``await server.stop(grace_s)`` — health NOT_SERVING, refuse new RPCs, let running ones finish
   within the grace period, cancel the rest, close the engine.

Layout, as in the gRPC examples: ``_Servicer`` only turns messages into plain engine calls and
results back into messages. Everything that every RPC shares — authentication, the request id,
the log line, metrics, and the one mapping from exceptions to status codes (``_STATUS_OF``) —
lives in two wrappers (``_unary`` and ``_stream``), so no handler picks a status code itself.

Validation happens before anything is stored: a request with a malformed field is refused with
INVALID_ARGUMENT and a message that names the field, what was expected and what came. Put
streams store blocks in batches as they complete; a stream that fails or breaks off removes the
blocks its earlier batches stored new (``_roll_back``), so a refused Put stores nothing, except
blocks another Put stored too meanwhile (``_claim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kvstore.auth import Tenant, Tenants
from kvstore.block_format import HEADER_BYTES, Codec, read_header, torch_dtype, transcode_block
from kvstore.data_folder import DataFolderLock
from kvstore.engine import Engine, ProgressCallback
from kvstore.errors import (
    BlockTooLargeError,
    ConfigError,
    CorruptBlockError,
    InvalidArgumentError,
    KVStoreError,
    OverloadedError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.events import Event
from kvstore.index import BlockEntry
from kvstore.keys import DIGEST_BYTES, BlockHash, ExtraKey, ModelSpec, root_hash
from kvstore.metrics import ServerMetrics
from kvstore.repair import (
    HoleFiller,
    NoWorkerError,
    WorkerGoneError,
    WorkerLostError,
    WorkerPool,
    repair_prompt,
)
from kvstore.segments import (
    Segment,
    SegmentClosedError,
    SegmentLimitError,
    SegmentRegistry,
    SegmentsOffError,
)
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kvstore.config import StoreConfig

__all__ = [
    "SERVICE_NAME",
    "KVStoreServer",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "ServerConfig",
    "UnauthenticatedError",
    "UnimplementedError",
]

log = logging.getLogger(__name__)

MiB = 1 << 20
SERVICE_NAME = "kvstore.v1.KVStore"
# Put streams hand complete blocks to the engine in batches of about this many bytes: large
# enough that a batch is one tier write, small enough that a stream holds little memory.
_PUT_BATCH_BYTES = 16 * MiB
_LIST_DEFAULT = 1000
_LIST_MAX = 10000
# Watch streams look at the server's stop flag this often while no event arrives.
_WATCH_POLL_S = 0.25
_MAX_REQUEST_ID = 128

_TIER_ENUM = {"G1": pb.TIER_G1, "G2": pb.TIER_G2, "G3": pb.TIER_G3, "G4": pb.TIER_G4}
_TIER_NAME = {value: name for name, value in _TIER_ENUM.items()}
_EVENT_ENUM = {
    "stored": pb.EVENT_KIND_STORED,
    "removed": pb.EVENT_KIND_REMOVED,
    "moved": pb.EVENT_KIND_MOVED,
    "corrupt": pb.EVENT_KIND_CORRUPT,
}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = ""  # host:port for Prometheus /metrics; empty: off
    tls_cert: str = ""  # PEM files; both set: TLS on
    tls_key: str = ""
    tls_client_ca: str = ""  # set: clients must present a certificate signed by this CA
    secret: str = ""  # derives tenant salts (tenants without an explicit salt)
    shared_models: tuple[str, ...] = ()  # model ids whose blocks every tenant shares
    max_chunk_bytes: int = 1 * MiB
    max_message_bytes: int = 64 * MiB
    max_prompt_tokens: int = 1 << 21
    shutdown_grace_s: float = 5.0
    # A model worker that has not answered a repair task by then is taken for hung: its stream
    # is closed (it reconnects afresh) and the task goes to another worker.
    worker_timeout_s: float = 300.0
    # Keepalive, both ways. The server pings a connection idle for keepalive_s and drops it when
    # no answer comes within keepalive_timeout_s (a worker host that vanished). It accepts client
    # pings as often as every min_ping_interval_s even with no call carrying data: a model
    # worker waits for tasks on an idle stream and pings every 30 s (`kvstore worker
    # --keepalive`); gRPC's own default (5 min) answers such pings with GOAWAY too_many_pings,
    # which detached every idle worker every few minutes.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 10.0
    # Same-host segments (OpenSegment): sealed memfds handed to one tenant by descriptor.
    same_host: bool = True
    tenant_segment_bytes: int = 2 << 30
    segment_idle_s: float = 300.0
    # What one tenant may hold against eviction (admins are not bounded): pinned blocks, and
    # blocks under its Reserve leases, as counts and as bytes. The byte bounds are a share of G2's
    # capacity, so that no tenant can pin or lease all of it away from the others.
    max_pinned_blocks_per_tenant: int = 65536
    pin_share: float = 0.25
    max_leased_blocks_per_tenant: int = 65536
    lease_share: float = 0.5
    # Prompts longer than this are hashed off the event loop, at most max_heavy_requests at once
    # (the others wait their turn without holding up small requests).
    heavy_prompt_tokens: int = 65536
    max_heavy_requests: int = 1

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key")
        if not 4096 <= self.max_chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError("server.max_chunk_bytes must be in [4096, max_message_bytes / 2]")
        if self.max_prompt_tokens < 1:
            raise ConfigError("server.max_prompt_tokens must be >= 1")
        if not self.worker_timeout_s > 0:
            raise ConfigError("server.worker_timeout_s must be positive")
        if ":" not in self.listen:
            raise ConfigError(f"server.listen must be host:port, got {self.listen!r}")
        if not (self.keepalive_s > 0 and self.keepalive_timeout_s > 0):
            raise ConfigError("server.keepalive_s and server.keepalive_timeout_s must be positive")
        if not self.min_ping_interval_s >= 0:
            raise ConfigError("server.min_ping_interval_s must be >= 0")
        if self.tenant_segment_bytes < 0:
            raise ConfigError("server.tenant_segment_bytes must be >= 0")
        if not self.segment_idle_s > 0:
            raise ConfigError("server.segment_idle_s must be positive")
        if self.max_pinned_blocks_per_tenant < 1 or self.max_leased_blocks_per_tenant < 1:
            raise ConfigError(
                "server.max_pinned_blocks_per_tenant and max_leased_blocks_per_tenant must be >= 1"
            )
        if self.heavy_prompt_tokens < 0 or self.max_heavy_requests < 1:
            raise ConfigError(
                "server.heavy_prompt_tokens must be >= 0 and server.max_heavy_requests >= 1"
            )
        if not (0 < self.pin_share <= 1 and 0 < self.lease_share <= 1):
            raise ConfigError("server.pin_share and server.lease_share must be in (0, 1]")


# -- errors -> status codes ---------------------------------------------------------------------
# The service's own refusals, beside the tree of kvstore/errors.py (all are KVStoreErrors).


class UnauthenticatedError(KVStoreError):
    """No token, a malformed ``authorization`` header, or a token no tenant has."""


class PermissionDeniedError(KVStoreError):
    """The tenant is known but may not call this method."""


class NotFoundError(KVStoreError):
    """An unknown lease or block."""


class QuotaExceededError(KVStoreError):
    """Storing the blocks would put the tenant over its byte quota."""


class UnimplementedError(KVStoreError):
    """The method exists on the wire but not in this release."""


class _WorkerFailedError(KVStoreError):
    """A model worker could not compute a task for a reason of its own (it said why)."""


# The only place where exceptions become status codes; the first matching row wins. Anything
# not listed is a bug on our side: INTERNAL, with the request id and a logged traceback.
_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    # InvalidTokenError, SpecMismatchError and BlockTooLargeError are InvalidArgumentErrors.
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # a namespace that is no valid ModelSpec
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (NoWorkerError, grpc.StatusCode.FAILED_PRECONDITION),
    (SegmentsOffError, grpc.StatusCode.FAILED_PRECONDITION),
    (SegmentClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (SegmentLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerLostError, grpc.StatusCode.UNAVAILABLE),
    (_WorkerFailedError, grpc.StatusCode.INTERNAL),
)


def _status_of(exc: BaseException) -> grpc.StatusCode | None:
    for kind, code in _STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


# -- per-call context ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    method: str
    request_id: str
    tenant: Tenant | None = None
    started: float = field(default_factory=time.perf_counter)
    peer: str = ""

    @property
    def who(self) -> Tenant:
        assert self.tenant is not None  # set before any handler runs
        return self.tenant


def _request_id(metadata: Any) -> str:
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
    return uuid.uuid4().hex


def _bearer(metadata: Any) -> str | None:
    """The token of ``authorization: Bearer <token>``; "" when the header is malformed."""
    for key, value in metadata or ():
        if key == "authorization":
            if not isinstance(value, str):
                return ""
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


Handler = Callable[[Any, Any, _Call], Awaitable[Any]]
StreamHandler = Callable[[Any, Any, _Call], AsyncGenerator[Any, None]]


def _unary(method: str, *, admin: bool = False) -> Callable[[Handler], Any]:
    """Wrap a unary-response handler (unary or client-streaming request)."""

    def wrap(fn: Handler) -> Any:
        async def handler(self: _Servicer, request: Any, context: Any) -> Any:
            call = self._begin(method, context)
            code = "OK"
            try:
                call.tenant = self._authorize(context, call, admin)
                return await fn(self, _decoded(request, method), call)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                status, message = self._status(exc, call)
                code = str(status.name)
                if hasattr(request, "__aiter__"):
                    await _drain(request)
                await context.abort(
                    status, message, trailing_metadata=(("x-request-id", call.request_id),)
                )
            finally:
                self._end(call, code)

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


def _stream(method: str, *, admin: bool = False) -> Callable[[StreamHandler], Any]:
    """Wrap a server-streaming handler (an async generator)."""

    def wrap(fn: StreamHandler) -> Any:
        async def handler(self: _Servicer, request: Any, context: Any) -> AsyncIterator[Any]:
            call = self._begin(method, context)
            code = "OK"
            try:
                call.tenant = self._authorize(context, call, admin)
                async with contextlib.aclosing(
                    fn(self, _decoded(request, method), call)
                ) as messages:
                    async for message in messages:
                        yield message
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception as exc:
                status, message = self._status(exc, call)
                code = str(status.name)
                await context.abort(
                    status, message, trailing_metadata=(("x-request-id", call.request_id),)
                )
            finally:
                self._end(call, code)

        handler.__name__ = handler.__qualname__ = method
        return handler

    return wrap


# -- request parsing ----------------------------------------------------------------------------


class _Undecodable:
    """What a request deserializer returns for bytes that are no valid message of its type.

    gRPC answers an exception in a deserializer with UNKNOWN (unary) or INTERNAL (streams) and a
    traceback in the log; returning this instead lets the RPC wrappers refuse the request with
    INVALID_ARGUMENT like any other malformed input."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, and whatever else malformed bytes raise
            return _Undecodable(f"{len(raw)} bytes that do not decode: {exc}")

    return run


def _refuse_undecodable(message: Any, method: str) -> Any:
    if isinstance(message, _Undecodable):
        raise InvalidArgumentError(f"{method}: the request message is malformed ({message.why})")
    return message


async def _checked_stream(messages: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for message in messages:
        yield _refuse_undecodable(message, method)


def _decoded(request: Any, method: str) -> Any:
    """The request, or its stream, with undecodable messages refused (INVALID_ARGUMENT)."""
    if hasattr(request, "__aiter__"):
        return _checked_stream(request, method)
    return _refuse_undecodable(request, method)


@dataclass(frozen=True, slots=True)
class _Prompt:
    spec: ModelSpec
    salt: bytes
    hashes: list[BlockHash]


def _spec_of(namespace: Any, where: str) -> ModelSpec:
    try:
        return ModelSpec(
            model_id=namespace.model_id,
            num_layers=namespace.num_layers,
            num_kv_heads=namespace.num_kv_heads,
            head_dim=namespace.head_dim,
            dtype=namespace.dtype,
            block_tokens=namespace.block_tokens,
            revision=namespace.revision,
            tokenizer_id=namespace.tokenizer_id,
        )
    except ConfigError as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from None


def _namespace_message(spec: ModelSpec) -> Any:
    return pb.Namespace(
        model_id=spec.model_id,
        revision=spec.revision,
        tokenizer_id=spec.tokenizer_id,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_tokens=spec.block_tokens,
    )


def _extra_key(key: Any, where: str) -> ExtraKey:
    kind = key.WhichOneof("value")
    if kind == "bytes_value":
        return bytes(key.bytes_value)
    if kind == "string_value":
        return str(key.string_value)
    if kind == "int_value":
        return int(key.int_value)
    raise InvalidArgumentError(f"{where} has no value: set bytes_value, string_value or int_value")


def _check_hash(value: bytes, where: str) -> BlockHash:
    if len(value) != DIGEST_BYTES:
        raise InvalidArgumentError(
            f"{where} is {len(value)} bytes; block hashes are {DIGEST_BYTES} bytes"
        )
    return BlockHash(bytes(value))


def _seconds(value: float, where: str, zero_means: str) -> float | None:
    """A TTL field: None for 0, else a positive finite number of seconds."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(
            f"{where} must be a finite number of seconds >= 0 (0: {zero_means}), got {value}"
        )
    return None if value == 0 else float(value)


def _tier_of(value: int, where: str) -> str | None:
    if value == pb.TIER_UNSPECIFIED:
        return None
    name = _TIER_NAME.get(value)
    if name is None:
        raise InvalidArgumentError(
            f"{where} is {value}, not a tier (TIER_G1..TIER_G4, or TIER_UNSPECIFIED for all)"
        )
    return name


def _raw_block(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """The block with a raw payload (G4 may hand back compressed blocks)."""
    if read_header(data).codec is Codec.RAW:
        return data
    return transcode_block(data, Codec.RAW)


def _block_info(entry: BlockEntry) -> Any:
    return pb.BlockInfo(
        block_hash=entry.key,
        parent_hash=entry.parent or b"",
        namespace_fingerprint=entry.namespace,
        tiers=[_TIER_ENUM[t] for t in entry.tiers()],
        nbytes=entry.nbytes,
        hits=entry.hits,
        pinned=entry.pins > 0,
        leases=entry.leases,
    )


def _event_message(event: Event) -> Any:
    return pb.WatchEvent(
        seq=event.seq,
        kind=_EVENT_ENUM[event.kind],
        block_hash=event.key,
        tier=_TIER_ENUM.get(event.tier, pb.TIER_UNSPECIFIED),
        from_tier=_TIER_ENUM.get(event.from_tier or "", pb.TIER_UNSPECIFIED),
        parent_hash=event.parent or b"",
        namespace_fingerprint=event.namespace,
        time_s=event.time_s,
    )


class _PutAssembler:
    """Turns a Put stream's BlockChunk / SlotRef messages into whole block tensors, in order."""

    def __init__(self, spec: ModelSpec, num_blocks: int, segment: Segment | None) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.segment = segment
        self.next_block = 0
        self.nbytes = spec.block_nbytes
        self._dtype = torch_dtype(spec.dtype)
        self._buf: bytearray | None = None
        self._filled = 0

    def _expect_block(self, index: int, what: str) -> int:
        i = self.next_block
        if i >= self.num_blocks:
            raise InvalidArgumentError(
                f"{what} of block {index} after all {self.num_blocks} blocks the header "
                "announced (header.num_blocks, 0: every full block of the prompt)"
            )
        return i

    def _tensor(self, buffer: bytearray | memoryview) -> torch.Tensor:
        return torch.frombuffer(buffer, dtype=self._dtype).view(self.spec.block_shape)

    def chunk(self, chunk: Any) -> torch.Tensor | None:
        if self.segment is not None:
            raise InvalidArgumentError(
                "this stream named header.segment_id, so blocks come as SlotRef messages, "
                "not BlockChunk"
            )
        i = self._expect_block(chunk.block_index, "a chunk")
        if chunk.block_index != i or chunk.offset != self._filled:
            raise InvalidArgumentError(
                f"expected a chunk of block {i} at offset {self._filled}, got block "
                f"{chunk.block_index} at offset {chunk.offset}: blocks come in order, each as "
                "chunks with contiguous offsets from 0"
            )
        size = len(chunk.data)
        if size == 0:
            raise InvalidArgumentError(f"chunk of block {i} at offset {chunk.offset} has no data")
        end = self._filled + size
        if end > self.nbytes:
            raise InvalidArgumentError(
                f"chunk of block {i} at offset {chunk.offset} with {size} bytes ends at {end}, "
                f"past the block payload of {self.nbytes} bytes ({self.spec.dtype} "
                f"{list(self.spec.block_shape)} of namespace {self.spec.name})"
            )
        if self._buf is None:
            self._buf = bytearray(self.nbytes)
        self._buf[self._filled : end] = chunk.data
        self._filled = end
        if end < self.nbytes:
            return None
        tensor = self._tensor(self._buf)
        self._buf, self._filled = None, 0
        self.next_block += 1
        return tensor

    def slot(self, slot: Any) -> torch.Tensor:
        if self.segment is None:
            raise InvalidArgumentError(
                "SlotRef messages need header.segment_id (a segment this tenant opened with "
                "OpenSegment); without it, send BlockChunk messages"
            )
        i = self._expect_block(slot.block_index, "a SlotRef")
        if slot.block_index != i:
            raise InvalidArgumentError(
                f"expected the SlotRef of block {i}, got block {slot.block_index}: blocks come "
                "in order"
            )
        if slot.length != self.nbytes:
            raise InvalidArgumentError(
                f"SlotRef of block {i} has length {slot.length}; a block payload of namespace "
                f"{self.spec.name} is {self.nbytes} bytes"
            )
        self.segment.check_range(slot.offset, slot.length, f"SlotRef of block {i}")
        self.next_block += 1
        return self._tensor(self.segment.view(slot.offset, slot.length))

    def finish(self) -> None:
        if self._filled:
            raise InvalidArgumentError(
                f"the stream ended inside block {self.next_block} ({self._filled} of "
                f"{self.nbytes} bytes); that block is not stored"
            )
        if self.next_block < self.num_blocks:
            raise InvalidArgumentError(
                f"the stream ended after {self.next_block} of the {self.num_blocks} blocks "
                "the header announced"
            )


# -- model workers attached through the Work stream ------------------------------------------------


class _WorkerProtocolError(Exception):
    """A worker broke the Work stream's rules; its stream is closed with INVALID_ARGUMENT."""


@dataclass(slots=True)
class _Task:
    task_id: int
    assembler: _PutAssembler
    future: asyncio.Future[list[torch.Tensor]]
    blocks: list[torch.Tensor] = field(default_factory=list)
    abandoned: bool = False  # the repair was cancelled: its answer is read and dropped


class _RemoteWorker:
    """The worker process at the other end of a Work stream, as a ``HoleFiller``.

    Tasks go out in order through ``outbox`` (the Work handler sends them), and the worker
    answers them in the same order, so the answer being read always belongs to the oldest task
    not yet done (``_sent[0]``): chunks need no task id.
    """

    def __init__(self, spec: ModelSpec, name: str, chunk_bytes: int, timeout_s: float) -> None:
        self._spec = spec
        self._name = name
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        # An iterator of one task's messages, or None: end the stream.
        self.outbox: asyncio.Queue[Iterator[Any] | None] = asyncio.Queue()
        self._sent: deque[_Task] = deque()
        self._task_ids = itertools.count(1)
        self.gone: str | None = None
        self.protocol_error: str | None = None

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def name(self) -> str:
        return self._name

    async def fill(
        self, tokens: np.ndarray[Any, Any], blocks: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        if self.gone is not None:
            raise WorkerGoneError(self.gone)
        targets = [i for i, b in enumerate(blocks) if b is None]
        task = _Task(
            next(self._task_ids),
            _PutAssembler(self._spec, len(targets), None),
            asyncio.get_running_loop().create_future(),
        )
        self._sent.append(task)
        self.outbox.put_nowait(self._messages(task.task_id, tokens, blocks, targets))
        try:
            return await asyncio.wait_for(task.future, self.timeout_s)
        except TimeoutError:
            why = f"it did not answer task {task.task_id} within {self.timeout_s:g} s"
            self.lose(why)
            raise WorkerGoneError(why) from None
        finally:
            task.abandoned = True

    def _messages(
        self,
        task_id: int,
        tokens: np.ndarray[Any, Any],
        blocks: Sequence[torch.Tensor | None],
        targets: list[int],
    ) -> Iterator[Any]:
        """The task and its given blocks, made as they are sent (not all held at once)."""
        yield pb.WorkResponse(
            task=pb.WorkTask(
                task_id=task_id,
                tokens_u32le=np.ascontiguousarray(tokens, dtype="<u4").tobytes(),
                num_blocks=len(blocks),
                targets=targets,
                block_bytes=self._spec.block_nbytes,
            )
        )
        for i, block in enumerate(blocks):
            if block is None:
                continue
            payload = block.contiguous().reshape(-1).view(torch.uint8).numpy()
            for offset in range(0, len(payload), self.chunk_bytes):
                yield pb.WorkResponse(
                    chunk=pb.BlockChunk(
                        block_index=i,
                        offset=offset,
                        data=payload[offset : offset + self.chunk_bytes].tobytes(),
                    )
                )

    def receive(self, message: Any) -> None:
        """One message of the worker's answers; ``_WorkerProtocolError`` if it breaks the rules."""
        kind = message.WhichOneof("msg")
        if kind not in ("chunk", "done"):
            raise _WorkerProtocolError(
                f"after its hello a worker sends chunk and done messages; got {kind or 'nothing'}"
            )
        if not self._sent:
            raise _WorkerProtocolError(f"the worker sent a {kind} message with no task given")
        task = self._sent[0]
        if kind == "chunk":
            try:
                tensor = task.assembler.chunk(message.chunk)
            except InvalidArgumentError as exc:
                raise _WorkerProtocolError(f"task {task.task_id}: {exc}") from None
            if tensor is not None and not task.abandoned:
                task.blocks.append(tensor)
            return
        done = message.done
        if done.task_id != task.task_id:
            raise _WorkerProtocolError(
                f"the worker finished task {done.task_id}; task {task.task_id} was due first"
            )
        self._sent.popleft()
        if task.abandoned or task.future.done():
            return
        if done.error:
            text = f"model worker {self._name!r}: {done.error}"
            if done.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                task.future.set_exception(InvalidArgumentError(text))
            else:
                task.future.set_exception(_WorkerFailedError(text))
            return
        try:
            task.assembler.finish()
        except InvalidArgumentError as exc:
            raise _WorkerProtocolError(f"task {task.task_id}: {exc}") from None
        task.future.set_result(task.blocks)

    def lose(self, why: str) -> None:
        """The stream is over: fail what is outstanding (the pool retries elsewhere)."""
        if self.gone is None:
            self.gone = why
        for task in self._sent:
            if not task.future.done():
                task.future.set_exception(WorkerGoneError(why))
        self._sent.clear()
        self.outbox.put_nowait(None)


# -- the servicer ----------------------------------------------------------------------------------


class _Servicer(pb_grpc.KVStoreServicer):  # type: ignore[misc]  # generated: Any to mypy
    def __init__(
        self,
        engine: Engine,
        config: StoreConfig,
        tenants: Tenants,
        metrics: ServerMetrics,
        pool: WorkerPool,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self._remote_workers: dict[int, _RemoteWorker] = {}
        self.config = config
        self.server_config: ServerConfig = config.server
        self.tenants = tenants
        self.metrics = metrics
        self.stopping = False
        self._lease_owner: dict[int, str] = {}
        cfg = config.server
        self._pinned_by: dict[str, set[BlockHash]] = {}
        self._new_by_put: dict[BlockHash, set[BlockHash]] = {}
        self._heavy = asyncio.Semaphore(cfg.max_heavy_requests)
        self._max_pinned_bytes = int(cfg.pin_share * config.g2.capacity_bytes)
        self._max_leased_bytes = int(cfg.lease_share * config.g2.capacity_bytes)
        self.segments = SegmentRegistry(
            enabled=cfg.same_host,
            max_bytes_per_tenant=cfg.tenant_segment_bytes,
            idle_s=cfg.segment_idle_s,
        )
        slots = [config.g2.slot_bytes] + ([config.g1.slot_bytes] if config.g1 else [])
        self._max_block_bytes = min(slots)

    # -- shared by every RPC (see _unary / _stream) --------------------------------------------

    def _begin(self, method: str, context: Any) -> _Call:
        call = _Call(method, _request_id(context.invocation_metadata()), peer=context.peer())
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        self.metrics.rpc_started(method)
        return call

    def _authorize(self, context: Any, call: _Call, admin: bool) -> Tenant:
        if not self.tenants.enabled:
            tenant = self.tenants.authenticate(None)
            assert tenant is not None
            return tenant
        token = _bearer(context.invocation_metadata())
        if token is None:
            raise UnauthenticatedError(
                "missing `authorization: Bearer <token>` metadata; this server has tenants"
            )
        if not token:
            raise UnauthenticatedError("the authorization metadata must read `Bearer <token>`")
        tenant = self.tenants.authenticate(token)
        if tenant is None:
            raise UnauthenticatedError("the bearer token belongs to no tenant of this server")
        if admin and not tenant.admin:
            raise PermissionDeniedError(
                f"{call.method} needs an admin tenant; tenant {tenant.name!r} is not one"
            )
        return tenant

    def _status(self, exc: Exception, call: _Call) -> tuple[grpc.StatusCode, str]:
        code = _status_of(exc)
        if code is not None:
            return code, str(exc)
        log.error("rpc method=%s request_id=%s failed", call.method, call.request_id, exc_info=exc)
        return grpc.StatusCode.INTERNAL, (
            f"internal error ({type(exc).__name__}); the server log has the traceback under "
            f"request id {call.request_id}"
        )

    def _end(self, call: _Call, code: str) -> None:
        seconds = time.perf_counter() - call.started
        self.metrics.rpc_finished(call.method, code, seconds)
        log.info(
            "rpc method=%s status=%s tenant=%s request_id=%s duration_ms=%.2f",
            call.method,
            code,
            call.tenant.name if call.tenant is not None else "-",
            call.request_id,
            seconds * 1000,
        )

    # -- parsing -------------------------------------------------------------------------------

    async def _prompt(self, prompt: Any, tenant: Tenant, where: str) -> _Prompt:
        if not prompt.HasField("namespace"):
            raise InvalidArgumentError(f"{where}.namespace is missing")
        spec = _spec_of(prompt.namespace, f"{where}.namespace")
        raw = prompt.tokens_u32le
        if not raw:
            raise InvalidArgumentError(
                f"{where}.tokens_u32le is empty: send the token ids as u32 little-endian bytes"
            )
        if len(raw) % 4:
            raise InvalidArgumentError(
                f"{where}.tokens_u32le is {len(raw)} bytes, not a multiple of 4 (one u32 "
                "little-endian per token)"
            )
        num_tokens = len(raw) // 4
        if num_tokens > self.server_config.max_prompt_tokens:
            raise InvalidArgumentError(
                f"{where} has {num_tokens} tokens, more than server.max_prompt_tokens "
                f"({self.server_config.max_prompt_tokens})"
            )
        num_full = num_tokens // spec.block_tokens
        extra: list[list[ExtraKey]] | None = None
        if prompt.extra_keys:
            if len(prompt.extra_keys) != num_full:
                raise InvalidArgumentError(
                    f"{where}.extra_keys has {len(prompt.extra_keys)} entries; send none, or one "
                    f"per full block ({num_full} blocks of {spec.block_tokens} tokens)"
                )
            extra = [
                [_extra_key(k, f"{where}.extra_keys[{i}].keys[{j}]") for j, k in enumerate(b.keys)]
                for i, b in enumerate(prompt.extra_keys)
            ]
        salt = self.tenants.salt_for(tenant, spec)
        tokens = np.frombuffer(raw, dtype="<u4")
        if num_tokens <= self.server_config.heavy_prompt_tokens:
            hashes = self.engine.hashes(spec, tokens, salt=salt, extra_keys=extra)
            return _Prompt(spec, salt, hashes)
        # A huge prompt is hashed on a thread, a bounded number at a time, so that the event loop
        # keeps serving small requests meanwhile (a 2M-token prompt hashes for ~0.25 s here).
        async with self._heavy:
            hashes = await asyncio.to_thread(
                self.engine.hashes, spec, tokens, salt=salt, extra_keys=extra
            )
        return _Prompt(spec, salt, hashes)

    @staticmethod
    def _num_blocks(value: int, prompt: _Prompt, where: str) -> int:
        full = len(prompt.hashes)
        if value > full:
            raise InvalidArgumentError(
                f"{where} is {value}, but the prompt has {full} full blocks of "
                f"{prompt.spec.block_tokens} tokens (0: all of them)"
            )
        return value or full

    def _chunk_bytes(self, value: int) -> int:
        if value == 0:
            return self.server_config.max_chunk_bytes
        top = self.server_config.max_message_bytes // 2
        if not 4096 <= value <= top:
            raise InvalidArgumentError(
                f"max_chunk_bytes is {value}; use 0 (server default, "
                f"{self.server_config.max_chunk_bytes}) or a value in [4096, {top}]"
            )
        return value

    def _check_block_fits(self, spec: ModelSpec) -> None:
        total = HEADER_BYTES + spec.block_nbytes
        if total > self._max_block_bytes:
            raise BlockTooLargeError(
                f"a block of namespace {spec.name} ({spec.dtype} {list(spec.block_shape)}) is "
                f"{total} bytes with its header, more than the {self._max_block_bytes}-byte "
                "slots of this server (g2.slot_bytes): use fewer tokens per block"
            )

    def _check_quota(self, tenant: Tenant, spec: ModelSpec, hashes: list[BlockHash]) -> None:
        if not tenant.quota_bytes:
            return
        new = sum(1 for h in dict.fromkeys(hashes) if h not in self.engine.index)
        incoming = new * (HEADER_BYTES + spec.block_nbytes)
        used = self.engine.usage_of(tenant.name)
        if used + incoming > tenant.quota_bytes:
            raise QuotaExceededError(
                f"tenant {tenant.name!r} holds {used} bytes; {new} new blocks ({incoming} bytes) "
                f"would pass its quota of {tenant.quota_bytes} bytes"
            )

    def _own_blocks(self, request: Any, tenant: Tenant) -> list[BlockHash]:
        """The requested blocks this tenant may act on: of the namespace if one is given; for
        tenants that are not admins, only blocks they stored."""
        fingerprint = (
            _spec_of(request.namespace, "namespace").fingerprint
            if request.HasField("namespace")
            else None
        )
        keys = [_check_hash(h, f"block_hashes[{i}]") for i, h in enumerate(request.block_hashes)]
        out = []
        for key in keys:
            entry = self.engine.index.get(key)
            if entry is None:
                continue
            if fingerprint is not None and entry.namespace != fingerprint:
                continue
            if not tenant.admin and entry.owner != tenant.name:
                continue
            out.append(key)
        return out

    def _segment(self, segment_id: int, tenant: Tenant) -> Segment:
        self.segments.unmap_pending()
        return self.segments.get(segment_id, tenant.name)

    def _own_lease(self, lease_id: int, tenant: Tenant) -> None:
        self._lease_owner[lease_id] = tenant.name
        if len(self._lease_owner) > 2 * self.engine.index.num_leases + 1024:
            # Expired leases vanish from the engine without a Release: forget them here too.
            index = self.engine.index
            self._lease_owner = {
                i: owner for i, owner in self._lease_owner.items() if index.lease(i) is not None
            }

    # -- lookup, leases ------------------------------------------------------------------------

    @_unary("Lookup")
    async def Lookup(self, request: Any, call: _Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        found = await self.engine.lookup_hashes(p.spec, p.hashes)
        hit = found.hit_blocks
        self.metrics.lookup([t for t in found.tiers[:hit] if t], p.spec.block_tokens)

        def reply() -> Any:
            return pb.LookupResponse(
                block_hashes=found.hashes,
                tiers=[_TIER_ENUM[t] if t else pb.TIER_UNSPECIFIED for t in found.tiers],
                hit_blocks=hit,
                hit_tokens=found.hit_tokens,
                holes=found.holes,
                block_tokens=p.spec.block_tokens,
            )

        if len(found.hashes) * p.spec.block_tokens <= self.server_config.heavy_prompt_tokens:
            return reply()
        async with self._heavy:  # a reply of ~10 MiB: built off the event loop too
            return await asyncio.to_thread(reply)

    @_unary("Reserve")
    async def Reserve(self, request: Any, call: _Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        n = self._num_blocks(request.num_blocks, p, "num_blocks")
        ttl = _seconds(request.ttl_s, "ttl_s", "the server default")
        found = await self.engine.lookup_hashes(p.spec, p.hashes[:n])
        present = [h for h, t in zip(found.hashes, found.tiers, strict=True) if t is not None]
        tenant = call.who
        if not tenant.admin:
            index = self.engine.index
            blocks, nbytes = self._leases_of(tenant.name)
            held = list(dict.fromkeys(present))
            self._check_bound(
                "lease",
                tenant,
                blocks + len(held),
                nbytes + sum(e.nbytes for k in held if (e := index.get(k)) is not None),
                self.server_config.max_leased_blocks_per_tenant,
                self._max_leased_bytes,
                "server.max_leased_blocks_per_tenant / server.lease_share",
            )
        lease = self.engine.reserve(present, ttl)
        self._own_lease(lease.lease_id, call.who)
        return pb.ReserveResponse(
            lease_id=lease.lease_id,
            block_hashes=list(lease.keys),
            ttl_s=self.engine.engine_config.default_lease_ttl_s if ttl is None else ttl,
        )

    @_unary("Release")
    async def Release(self, request: Any, call: _Call) -> Any:
        lease_id = request.lease_id
        if self._lease_owner.get(lease_id) != call.who.name:
            raise NotFoundError(
                f"lease {lease_id} is not held: it was released, it expired, or this tenant "
                "never took it"
            )
        del self._lease_owner[lease_id]
        if not self.engine.release(lease_id):
            raise NotFoundError(f"lease {lease_id} is not held: it expired")
        return pb.ReleaseResponse(released=True)

    # -- put -----------------------------------------------------------------------------------

    @_unary("Put")
    async def Put(self, requests: AsyncIterator[Any], call: _Call) -> Any:
        stream = aiter(requests)
        first = await anext(stream, None)
        kind = None if first is None else first.WhichOneof("msg")
        if kind != "header":
            got = (
                "an empty stream"
                if first is None
                else "an empty message"
                if kind is None
                else f"a {kind} message"
            )
            raise InvalidArgumentError(f"a Put stream starts with a PutHeader; got {got}")
        assert first is not None
        header = first.header
        tenant = call.who
        p = await self._prompt(header.prompt, tenant, "header.prompt")
        n = self._num_blocks(header.num_blocks, p, "header.num_blocks")
        spec = p.spec
        self._check_block_fits(spec)
        torch_dtype(spec.dtype)  # a dtype this torch build lacks is refused before any data
        hashes = p.hashes[:n]
        parents: list[bytes] = [root_hash(spec, p.salt), *hashes[:-1]]
        self._check_quota(tenant, spec, hashes)
        segment = self._segment(header.segment_id, tenant) if header.segment_id else None
        path = "stream" if segment is None else "shm"
        assembler = _PutAssembler(spec, n, segment)
        batch: list[tuple[BlockHash, bytes | None, torch.Tensor]] = []
        stored = already = 0
        mine: set[BlockHash] = set()  # what this put stored new: removed again if it fails

        async def store() -> None:
            nonlocal stored, already
            if not batch:
                return
            keys = [h for h, _, _ in batch]
            self._check_quota(tenant, spec, keys)
            self._claim(keys, mine)
            result = await self.engine.put_blocks(
                spec, batch, durable=header.durable, owner=tenant.name
            )
            self.metrics.bytes_in(path, len(batch) * spec.block_nbytes)
            stored += result.stored
            already += result.already
            batch.clear()

        try:
            async for message in stream:
                kind = message.WhichOneof("msg")
                if kind == "chunk":
                    tensor = assembler.chunk(message.chunk)
                elif kind == "slot":
                    tensor = assembler.slot(message.slot)
                else:
                    raise InvalidArgumentError(
                        f"after the header a Put stream carries chunk or slot messages; got "
                        f"{kind or 'an empty message'}"
                    )
                if tensor is None:
                    continue
                i = assembler.next_block - 1
                batch.append((hashes[i], parents[i], tensor))
                if len(batch) * spec.block_nbytes >= _PUT_BATCH_BYTES:
                    await store()
            assembler.finish()
            await store()
        except BaseException:
            # A refused or broken-off Put stores nothing: the batches it stored go again.
            batch.clear()
            tensor = None
            await self._roll_back(mine)
            raise
        finally:
            # Tensors over the segment must be gone before it can be unmapped.
            batch.clear()
            tensor = None
            self._unclaim(mine)
        return pb.PutResponse(block_hashes=hashes, stored=stored, already=already)

    def _claim(self, keys: list[BlockHash], mine: set[BlockHash]) -> None:
        """Note which of a Put batch's blocks it stores new (``mine``, undone if the Put fails).
        A block that another running Put stored new and this one stores too is no longer that
        Put's to undo: this one may be acknowledged with it."""
        for key in keys:
            owner = self._new_by_put.get(key)
            if owner is not None and owner is not mine:
                owner.discard(key)
                del self._new_by_put[key]
            elif owner is None and key not in self.engine.index:
                mine.add(key)
                self._new_by_put[key] = mine

    def _unclaim(self, mine: set[BlockHash]) -> None:
        for key in mine:
            if self._new_by_put.get(key) is mine:
                del self._new_by_put[key]

    async def _roll_back(self, mine: set[BlockHash]) -> None:
        if not mine:
            return
        keys = list(mine)
        self._unclaim(mine)
        mine.clear()
        # Shielded: a Put cancelled by its client still removes what it stored.
        undo = asyncio.ensure_future(self.engine.evict(keys))
        with contextlib.suppress(asyncio.CancelledError):
            removed = await asyncio.shield(undo)
            self.engine.counters.add("put_rollbacks")
            self.engine.counters.add("put_rollback_blocks", removed)

    # -- fetch ---------------------------------------------------------------------------------

    @_stream("Fetch")
    async def Fetch(self, request: Any, call: _Call) -> AsyncGenerator[Any, None]:
        p = await self._prompt(request.prompt, call.who, "prompt")
        chunk_bytes = self._chunk_bytes(request.max_chunk_bytes)
        if request.repair_holes:
            await self._repair(request.prompt, p, call.who, exact=False)
        chunk_bytes = self._chunk_bytes(request.max_chunk_bytes)
        spec = p.spec
        found = await self.engine.lookup_hashes(spec, p.hashes)
        hit = found.hit_blocks
        if request.max_blocks:
            hit = min(hit, request.max_blocks)
        self.metrics.lookup([t for t in found.tiers[:hit] if t], spec.block_tokens)
        hashes = p.hashes[:hit]
        if request.segment_id:
            segment = self._segment(request.segment_id, call.who)
            if request.by_layer:
                async for message in self._fetch_by_layer(
                    spec, hashes, segment, request.segment_offset
                ):
                    yield message
                return
            yield await self._fetch_into(spec, hashes, segment, request.segment_offset)
            return
        # Read first, then send: the header lists exactly the blocks that follow, so a block
        # that vanished between lookup and read ends the hit there. G2 blocks are sent from
        # their slots (no copy), under a lease that lasts until the last chunk has gone.
        lease = self.engine.reserve(hashes) if hashes else None
        try:
            async for message in self._fetch_bytes(spec, hashes, chunk_bytes):
                yield message
        finally:
            if lease is not None:
                self.engine.release(lease.lease_id)

    async def _fetch_bytes(
        self, spec: ModelSpec, hashes: list[BlockHash], chunk_bytes: int
    ) -> AsyncIterator[Any]:
        blocks: list[bytes | bytearray | memoryview] = []
        for data in await self.engine.read(spec, hashes, in_place=True) if hashes else []:
            if data is None:
                break
            raw = _raw_block(data)
            if len(raw) != HEADER_BYTES + spec.block_nbytes:
                log.warning("block %s has an unexpected size; hit ends there", hashes[len(blocks)])
                break
            blocks.append(raw)
        yield pb.FetchResponse(
            header=pb.FetchHeader(
                block_hashes=hashes[: len(blocks)],
                block_tokens=spec.block_tokens,
                block_bytes=spec.block_nbytes,
            )
        )
        for i, block in enumerate(blocks):
            payload = memoryview(block)[HEADER_BYTES:]
            for offset in range(0, len(payload), chunk_bytes):
                # Encoded by hand: one copy of the payload slice into the message gRPC sends.
                yield _chunk_message(i, offset, payload[offset : offset + chunk_bytes])
            self.metrics.bytes_out("stream", len(payload))

    async def _fetch_into(
        self, spec: ModelSpec, hashes: list[BlockHash], segment: Segment, offset: int
    ) -> Any:
        """Copy the verified payloads of the hit into the caller's segment, from ``offset`` on,
        as many as fit; the reply lists their slots. Nothing of another tenant's, nor any
        memory of the server's, is handed out: the client reads only its own segment."""
        size = spec.block_nbytes
        segment.check_range(offset, 0, "segment_offset")
        hashes = hashes[: (segment.size - offset) // size]
        # Held while copied: no block can be evicted from under the copy.
        lease = self.engine.reserve(hashes) if hashes else None
        try:
            with memoryview(segment.mapping) as whole:
                views = [
                    whole[offset + i * size : offset + (i + 1) * size] for i in range(len(hashes))
                ]
                try:
                    n = await self.engine.read_payloads_into(spec, hashes, views) if hashes else 0
                finally:
                    for view in views:
                        view.release()
        finally:
            if lease is not None:
                self.engine.release(lease.lease_id)
        slots = [pb.SlotRef(block_index=i, offset=offset + i * size, length=size) for i in range(n)]
        self.metrics.bytes_out("shm", len(slots) * size)
        return pb.FetchResponse(
            header=pb.FetchHeader(
                block_hashes=hashes[: len(slots)],
                block_tokens=spec.block_tokens,
                block_bytes=size,
                slots=slots,
            )
        )

    async def _fetch_by_layer(
        self, spec: ModelSpec, hashes: list[BlockHash], segment: Segment, offset: int
    ) -> AsyncIterator[Any]:
        """Copy the hit into the caller's segment layer by layer, as ``[layers, 2, tokens,
        kv_heads, head_dim]`` from ``offset`` on, with a ``FetchProgress`` after each layer: the
        client puts layer ``l`` in place while the server copies the next ones. Each G2 block's
        checksum is taken over the bytes that landed, in payload order as the layers go by; the
        last message says how many leading blocks passed (a block that did not is dropped from
        G2 as corrupt). Blocks from lower tiers were verified as they were read."""
        size = spec.block_nbytes
        segment.check_range(offset, 0, "segment_offset")
        hashes = hashes[: (segment.size - offset) // size]
        piece = size // (2 * spec.num_layers)  # the K (or V) of one layer of one block
        lease = self.engine.reserve(hashes) if hashes else None
        sources: list[tuple[BlockHash, memoryview, int | None]] = []
        try:
            sources = await self.engine.payload_sources(spec, hashes) if hashes else []
            n = len(sources)
            yield pb.FetchResponse(
                header=pb.FetchHeader(
                    block_hashes=[key for key, _, _ in sources],
                    block_tokens=spec.block_tokens,
                    block_bytes=size,
                    by_layer=True,
                )
            )
            hashers = [None if want is None else xxhash.xxh3_64() for _, _, want in sources]
            with memoryview(segment.mapping) as whole:
                dst = np.frombuffer(
                    whole, dtype=np.uint8, count=2 * spec.num_layers * n * piece, offset=offset
                ).reshape(2 * spec.num_layers, n, piece)
                src = [np.frombuffer(payload, dtype=np.uint8) for _, payload, _ in sources]
                try:
                    for layer in range(spec.num_layers):
                        for row in (2 * layer, 2 * layer + 1):
                            at = row * piece
                            for i, hasher in enumerate(hashers):
                                dst[row, i] = src[i][at : at + piece]
                                if hasher is not None:
                                    hasher.update(dst[row, i])
                        if layer + 1 < spec.num_layers:
                            yield pb.FetchResponse(progress=pb.FetchProgress(layers_done=layer + 1))
                finally:
                    del dst, src
            verified = n
            hits: list[BlockHash] = []
            mismatched: list[tuple[BlockHash, memoryview, int]] = []
            for i, ((key, payload, want), hasher) in enumerate(
                zip(sources, hashers, strict=True)
            ):
                if hasher is None or want is None:
                    continue
                if hasher.intdigest() == want:
                    hits.append(key)
                else:
                    verified = min(verified, i)
                    mismatched.append((key, payload, want))
            sources = []
            await self.engine.settle_payloads(hits, mismatched)
            mismatched = []
            self.metrics.bytes_out("shm", verified * size)
            yield pb.FetchResponse(
                progress=pb.FetchProgress(
                    layers_done=spec.num_layers, done=True, verified_blocks=verified
                )
            )
        finally:
            sources = []
            if lease is not None:
                self.engine.release(lease.lease_id)

    # -- same-host segments --------------------------------------------------------------------

    @_unary("OpenSegment")
    async def OpenSegment(self, request: Any, call: _Call) -> Any:
        segment = self.segments.open(call.who.name, request.size_bytes)
        return pb.OpenSegmentResponse(
            segment_id=segment.segment_id,
            size_bytes=segment.size,
            socket=self.segments.socket_name,
            ticket=segment.ticket,
            idle_s=self.segments.idle_s,
        )

    @_unary("CloseSegment")
    async def CloseSegment(self, request: Any, call: _Call) -> Any:
        return pb.CloseSegmentResponse(
            closed=self.segments.close(request.segment_id, call.who.name)
        )

    # -- repair, and the workers that do it -----------------------------------------------------

    @_unary("Repair")
    async def Repair(self, request: Any, call: _Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        result = await self._repair(request.prompt, p, call.who, exact=request.exact)
        return pb.RepairResponse(
            repaired=result.repaired,
            hit_blocks=result.hit_blocks_after,
            hit_blocks_before=result.hit_blocks_before,
            kept=result.kept,
            worker=result.worker,
        )

    async def _repair(self, prompt: Any, p: _Prompt, tenant: Tenant, *, exact: bool) -> Any:
        self._check_block_fits(p.spec)
        tokens = np.frombuffer(prompt.tokens_u32le, dtype="<u4")
        result = await repair_prompt(
            self.engine,
            self.pool.fill,
            p.spec,
            p.hashes,
            tokens,
            root=BlockHash(root_hash(p.spec, p.salt)),
            exact=exact,
            owner=tenant.name,
        )
        if result.repaired:
            self.engine.counters.add("repairs")
            self.engine.counters.add("repaired_blocks", len(result.repaired))
        return result

    @_stream("Work", admin=True)
    async def Work(self, requests: AsyncIterator[Any], call: _Call) -> AsyncGenerator[Any, None]:
        stream = aiter(requests)
        first = await anext(stream, None)
        kind = None if first is None else first.WhichOneof("msg")
        if kind != "hello":
            raise InvalidArgumentError(
                f"a Work stream starts with a WorkerHello; got {kind or 'nothing'}"
            )
        assert first is not None
        hello = first.hello
        if not hello.HasField("namespace"):
            raise InvalidArgumentError("hello.namespace is missing: the model the worker runs")
        spec = _spec_of(hello.namespace, "hello.namespace")
        self._check_block_fits(spec)
        if self.stopping:
            return  # the worker reconnects to the next server
        worker = _RemoteWorker(
            spec,
            hello.name or call.peer,
            self.server_config.max_chunk_bytes,
            self.server_config.worker_timeout_s,
        )
        worker_id = self.pool.attach(worker, call.peer)
        self._remote_workers[worker_id] = worker
        reader = asyncio.create_task(self._read_worker(stream, worker))
        try:
            yield pb.WorkResponse(welcome=pb.WorkerWelcome(worker_id=worker_id))
            while (messages := await worker.outbox.get()) is not None:
                for message in messages:
                    yield message
        finally:
            self.pool.detach(worker_id)
            self._remote_workers.pop(worker_id, None)
            worker.lose("its Work stream ended")
            reader.cancel()
        if worker.protocol_error is not None:
            raise InvalidArgumentError(worker.protocol_error)

    @staticmethod
    async def _read_worker(stream: AsyncIterator[Any], worker: _RemoteWorker) -> None:
        why = "the worker closed its Work stream"
        try:
            async for message in stream:
                worker.receive(message)
        except _WorkerProtocolError as exc:
            worker.protocol_error = why = f"the worker broke the Work protocol: {exc}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: the worker died or the network went
            why = f"its Work stream broke ({type(exc).__name__}: {exc})"
        log.warning("model worker %s: %s", worker.name, why)
        worker.lose(why)

    def close_workers(self) -> None:
        """End every Work stream (at shutdown): workers reconnect to the next server."""
        for worker in list(self._remote_workers.values()):
            worker.lose("the server is shutting down")

    # -- pins, eviction ------------------------------------------------------------------------

    def _usage(self, tenant: Tenant) -> Any:
        segments, segment_bytes = self.segments.usage().get(tenant.name, (0, 0))
        pinned, pinned_bytes = self._pins_of(tenant.name)
        leased, leased_bytes = self._leases_of(tenant.name)
        bounded = not tenant.admin
        cfg = self.server_config
        return pb.TenantUsage(
            name=tenant.name,
            stored_bytes=self.engine.usage_of(tenant.name),
            quota_bytes=tenant.quota_bytes,
            segments=segments,
            segment_bytes=segment_bytes,
            max_segment_bytes=self.segments.max_bytes_per_tenant,
            pinned_blocks=pinned,
            pinned_bytes=pinned_bytes,
            max_pinned_blocks=cfg.max_pinned_blocks_per_tenant if bounded else 0,
            max_pinned_bytes=self._max_pinned_bytes if bounded else 0,
            leased_blocks=leased,
            leased_bytes=leased_bytes,
            max_leased_blocks=cfg.max_leased_blocks_per_tenant if bounded else 0,
            max_leased_bytes=self._max_leased_bytes if bounded else 0,
        )

    @_unary("Pin")
    async def Pin(self, request: Any, call: _Call) -> Any:
        ttl = _seconds(request.ttl_s, "ttl_s", "pinned until Unpin")
        tenant = call.who
        keys = self._own_blocks(request, tenant)
        if not tenant.admin:
            index = self.engine.index
            entries = [index.get(k) for k in dict.fromkeys(keys)]
            new = [e for e in entries if e is not None and not e.pins]
            blocks, nbytes = self._pins_of(tenant.name)
            self._check_bound(
                "pin",
                tenant,
                blocks + len(new),
                nbytes + sum(e.nbytes for e in new),
                self.server_config.max_pinned_blocks_per_tenant,
                self._max_pinned_bytes,
                "server.max_pinned_blocks_per_tenant / server.pin_share",
            )
            self._pinned_by.setdefault(tenant.name, set()).update(keys)
        return pb.CountResponse(count=self.engine.pin(keys, ttl))

    def _pins_of(self, name: str) -> tuple[int, int]:
        """``(blocks, bytes)`` that tenant ``name`` holds pinned (pins expire in the engine, so
        the set is pruned as it is counted)."""
        mine = self._pinned_by.get(name)
        if not mine:
            return 0, 0
        index = self.engine.index
        live = {e.key: e for k in mine if (e := index.get(k)) is not None and e.pins}
        self._pinned_by[name] = set(live)
        return len(live), sum(e.nbytes for e in live.values())

    def _leases_of(self, name: str) -> tuple[int, int]:
        """``(blocks, bytes)`` under the live Reserve leases of tenant ``name``."""
        index = self.engine.index
        blocks = nbytes = 0
        for lease_id, owner in self._lease_owner.items():
            lease = index.lease(lease_id) if owner == name else None
            if lease is not None:
                blocks += len(lease.keys)
                nbytes += sum(e.nbytes for k in lease.keys if (e := index.get(k)) is not None)
        return blocks, nbytes

    @staticmethod
    def _check_bound(
        what: str,
        tenant: Tenant,
        blocks: int,
        nbytes: int,
        max_blocks: int,
        max_bytes: int,
        settings: str,
    ) -> None:
        if blocks > max_blocks or nbytes > max_bytes:
            advice = "unpin blocks first" if what == "pin" else "release leases first"
            raise QuotaExceededError(
                f"tenant {tenant.name!r} would {what} {blocks} blocks ({nbytes} bytes), past its "
                f"bound of {max_blocks} blocks and {max_bytes} bytes ({settings}); nothing "
                f"changed: {advice}"
            )

    @_unary("Unpin")
    async def Unpin(self, request: Any, call: _Call) -> Any:
        keys = self._own_blocks(request, call.who)
        return pb.CountResponse(count=self.engine.unpin(keys))

    @_unary("Evict")
    async def Evict(self, request: Any, call: _Call) -> Any:
        tier = _tier_of(request.tier, "tier")
        keys = self._own_blocks(request, call.who)
        return pb.CountResponse(count=await self.engine.evict(keys, tier))

    @_unary("Flush", admin=True)
    async def Flush(self, request: Any, call: _Call) -> Any:
        tier = _tier_of(request.tier, "tier")
        return pb.CountResponse(count=await self.engine.flush(tier))

    # -- inspection ----------------------------------------------------------------------------

    @_unary("Stats")
    async def Stats(self, request: Any, call: _Call) -> Any:
        tenant = call.who
        self.segments.expire()
        if not tenant.admin:
            # Server-wide numbers are for admins; a tenant sees its own.
            mine = [e for e in self.engine.index.entries() if e.owner == tenant.name]
            leases = [i for i, who in self._lease_owner.items() if who == tenant.name]
            return pb.StatsResponse(
                num_blocks=len(mine),
                num_leases=sum(self.engine.index.lease(i) is not None for i in leases),
                counters={
                    "usage_bytes": self.engine.usage_of(tenant.name),
                    "quota_bytes": tenant.quota_bytes,
                },
                tenant=self._usage(tenant),
            )
        stats = await self.engine.stats()
        return pb.StatsResponse(
            tenant=self._usage(tenant),
            tenants=[self._usage(t) for t in self.tenants.all()],
            tiers=[
                pb.TierStats(
                    tier=_TIER_ENUM.get(name.split("/")[0], pb.TIER_UNSPECIFIED),
                    name=name,
                    capacity_bytes=t.capacity_bytes,
                    used_bytes=t.used_bytes,
                    num_blocks=t.num_blocks,
                    num_hits=t.num_hits,
                    num_misses=t.num_misses,
                    num_corrupt=t.num_corrupt,
                )
                for name, t in stats.tiers.items()
            ],
            num_blocks=stats.num_blocks,
            num_leases=stats.num_leases,
            queue_depth=stats.queue_depth,
            counters={k: v for k, v in stats.counters.items() if v >= 0},
            workers=[
                pb.WorkerInfo(
                    worker_id=w.worker_id,
                    name=w.name,
                    namespace=_namespace_message(w.spec),
                    tasks_done=w.tasks_done,
                    blocks_computed=w.blocks_computed,
                    busy=w.busy,
                    address=w.address,
                )
                for w in self.pool.workers()
            ],
        )

    @_unary("ListBlocks", admin=True)
    async def ListBlocks(self, request: Any, call: _Call) -> Any:
        tier = _tier_of(request.tier, "tier")
        if tier is not None and tier not in self.engine.tier_names:
            raise InvalidArgumentError(
                f"tier {tier} is not configured on this server ({self.engine.tier_names})"
            )
        after = _check_hash(request.after, "after") if request.after else None
        limit = min(request.limit or _LIST_DEFAULT, _LIST_MAX)
        candidates = (
            e
            for e in self.engine.index.entries()
            if e.resident
            and (after is None or e.key > after)
            and (tier is None or tier in e.tiers())
        )
        # One more than the page: whether another page follows, without sorting everything.
        page = heapq.nsmallest(limit + 1, candidates, key=lambda e: e.key)
        more = len(page) > limit
        page = page[:limit]
        return pb.ListBlocksResponse(
            blocks=[_block_info(e) for e in page],
            next_after=page[-1].key if more else b"",
        )

    @_unary("Inspect", admin=True)
    async def Inspect(self, request: Any, call: _Call) -> Any:
        key = _check_hash(request.block_hash, "block_hash")
        entry = self.engine.index.get(key)
        for tier in entry.tiers() if entry is not None else []:
            assert entry is not None
            try:
                (data,) = await self.engine.tier(tier, entry.namespace).get([key])
                header = read_header(data) if data is not None else None
            except (CorruptBlockError, TierUnavailableError) as exc:
                log.warning("inspect %s: %s unreadable: %s", key.hex(), tier, exc)
                continue
            if header is None:
                continue
            return pb.InspectResponse(
                block=_block_info(entry),
                dtype=header.dtype,
                shape=list(header.shape),
                codec=header.codec.name,
                raw_xxh3=header.raw_xxh3,
                payload_xxh3=header.payload_xxh3,
            )
        raise NotFoundError(f"block {key.hex()} is not stored on this node")

    @_stream("Watch", admin=True)
    async def Watch(self, request: Any, call: _Call) -> AsyncGenerator[Any, None]:
        events = self.engine.events
        cursor = request.after_seq
        # A seq from the future (a client of an earlier run of this server: seqs restart at 1)
        # is as unknown as one that fell off the ring: start from a snapshot.
        pending = None if cursor == 0 or cursor > events.last_seq else events.since(cursor)
        while True:
            if pending is None:
                cursor = events.last_seq
                for message in self._snapshot(cursor):
                    yield message
                pending = []
            for event in pending:
                yield _event_message(event)
                cursor = event.seq
            if self.stopping:
                return
            await events.wait(cursor, _WATCH_POLL_S)
            pending = events.since(cursor)

    def _snapshot(self, seq: int) -> Iterator[Any]:
        now = time.time()
        for entry in self.engine.index.entries():
            for tier in entry.tiers():
                yield pb.WatchEvent(
                    seq=seq,
                    kind=pb.EVENT_KIND_STORED,
                    block_hash=entry.key,
                    tier=_TIER_ENUM[tier],
                    parent_hash=entry.parent or b"",
                    namespace_fingerprint=entry.namespace,
                    time_s=now,
                    snapshot=True,
                )


# -- the server ----------------------------------------------------------------------------------


def _read_pem(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def _host_port(value: str, setting: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)
    except ValueError:
        raise ConfigError(f"{setting} must be host:port, got {value!r}") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _chunk_message(block_index: int, offset: int, data: memoryview) -> bytes:
    """``FetchResponse(chunk=BlockChunk(block_index, offset, data))`` in protobuf wire format.

    Building the message object costs three copies of the data (into ``bytes``, into the message,
    into its serialization); this is one, and a 2 MiB-block Fetch spends most of its time there.
    Field numbers as in kvstore.proto: FetchResponse.chunk = 2; BlockChunk.block_index = 1,
    offset = 2, data = 3. A test decodes these with the generated classes.
    """
    inner = (
        b"\x08" + _varint(block_index) + b"\x10" + _varint(offset) + b"\x1a" + _varint(len(data))
    )
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


def _serialize_fetch(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class _WireAdjusted:
    """What ``add_KVStoreServicer_to_server`` registers with: the real server, except that every
    request deserializer turns undecodable bytes into ``_Undecodable`` (refused with
    INVALID_ARGUMENT by the RPC wrappers) and Fetch replies may be bytes already in wire format
    (``_chunk_message``). The generated code cannot be edited (a test regenerates it), so the
    handler table is adjusted on its way to the server."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        # Registered handlers are looked up before generic ones, so this table is the one used.
        adjusted = {}
        for name, handler in handlers.items():
            handler = handler._replace(
                request_deserializer=_safe_deserializer(handler.request_deserializer)
            )
            if name == "Fetch":
                handler = handler._replace(response_serializer=_serialize_fetch)
            adjusted[name] = handler
        self._server.add_registered_method_handlers(service, adjusted)


class KVStoreServer:
    """The kvstore gRPC service over one engine; ``start`` opens both, ``stop`` closes both."""

    def __init__(self, config: StoreConfig, *, workers: Sequence[HoleFiller] = ()) -> None:
        """``workers``: model workers that run in this process (``ModelWorker``); worker
        processes attach through the Work stream instead."""
        self.config = config
        self.pool = WorkerPool()
        for worker in workers:
            self.pool.attach(worker)
        self.metrics = ServerMetrics()
        self.tenants = Tenants(
            config.tenants,
            secret=config.server.secret,
            shared_models=config.server.shared_models,
        )
        self.metrics_port: int | None = None
        self._engine: Engine | None = None
        self._server: Any = None
        self._servicer: _Servicer | None = None
        self._health: Any = None
        self._port: int | None = None
        self._stopped = False
        self._data_lock: DataFolderLock | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the server is not started")
        return self._engine

    @property
    def segments(self) -> SegmentRegistry:
        """The same-host segments this server has handed out."""
        if self._servicer is None:
            raise RuntimeError("the server is not started")
        return self._servicer.segments

    async def start(self, *, progress: ProgressCallback | None = None) -> int:
        """Open the engine, bind ``server.listen`` and serve; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        cfg = self.config.server
        credentials = None
        if cfg.tls_cert:
            ca = _read_pem(cfg.tls_client_ca, "server.tls_client_ca") if cfg.tls_client_ca else None
            key = _read_pem(cfg.tls_key, "server.tls_key")
            credentials = grpc.ssl_server_credentials(
                [(key, _read_pem(cfg.tls_cert, "server.tls_cert"))],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
        lock = None
        if self.config.g3 is not None:
            # One service per data folder: a second one would keep an index of its own.
            lock = DataFolderLock(self.config.g3.path)
            lock.acquire("kvstore serve")
        try:
            engine = await Engine.open(self.config, progress=progress)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            server = grpc.aio.server(
                options=[
                    ("grpc.max_send_message_length", cfg.max_message_bytes),
                    ("grpc.max_receive_message_length", cfg.max_message_bytes),
                    # Two servers must not share a port silently.
                    ("grpc.so_reuseport", 0),
                    ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
                    ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
                    ("grpc.keepalive_permit_without_calls", 1),
                    # The server's bound on client pings (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_
                    # WITHOUT_DATA_MS); pings more frequent than this still count as strikes.
                    (
                        "grpc.http2.min_ping_interval_without_data_ms",
                        int(cfg.min_ping_interval_s * 1000),
                    ),
                ]
            )
            servicer = _Servicer(engine, self.config, self.tenants, self.metrics, self.pool)
            pb_grpc.add_KVStoreServicer_to_server(servicer, _WireAdjusted(server))
            health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            try:
                if credentials is None:
                    port = server.add_insecure_port(cfg.listen)
                else:
                    port = server.add_secure_port(cfg.listen, credentials)
            except RuntimeError as exc:
                raise ConfigError(f"server.listen: cannot bind {cfg.listen}: {exc}") from None
            if not port:
                raise ConfigError(f"server.listen: cannot bind {cfg.listen}")
            await server.start()
            for service in ("", SERVICE_NAME):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.metrics.watch_engine(engine, asyncio.get_running_loop())
            if cfg.metrics_listen:
                host, metrics_port = _host_port(cfg.metrics_listen, "server.metrics_listen")
                try:
                    self.metrics_port = self.metrics.serve_http(host, metrics_port)
                except OSError as exc:
                    await server.stop(None)
                    raise ConfigError(
                        f"server.metrics_listen: cannot bind {cfg.metrics_listen}: {exc.strerror}"
                    ) from None
        except BaseException:
            await engine.close()
            if lock is not None:
                lock.release()
            raise
        self._engine, self._server, self._servicer, self._health = engine, server, servicer, health
        self._data_lock = lock
        self._port = int(port)
        log.info("kvstore serving on %s (port %d)", cfg.listen, self._port)
        return self._port

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new RPCs, give running ones ``grace_s`` (default ``server.shutdown_grace_s``)
        to finish, cancel the rest, close the engine. Idempotent."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        grace = self.config.server.shutdown_grace_s if grace_s is None else grace_s
        assert self._servicer is not None
        self._servicer.stopping = True
        self._servicer.close_workers()
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        try:
            await self._server.stop(grace)
        finally:
            self._servicer.segments.shutdown()
            self.metrics.close()
            await self.engine.close()
            if self._data_lock is not None:
                self._data_lock.release()

    async def wait_for_termination(self) -> None:
        if self._server is None:
            raise RuntimeError("the server is not started")
        await self._server.wait_for_termination()

    async def __aenter__(self) -> KVStoreServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
