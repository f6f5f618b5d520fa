"""A model worker process attached to a kvstore server: the worker's side of the Work stream.

Operations, in the order ``kvstore worker`` uses them:

1. ``WorkerLink(worker, target, token=..., tls_ca=...)`` — a ``ModelWorker`` and the server
   it serves (``host:port`` or ``unix:/path``; the token of an admin tenant when the server has
   tenants).
2. ``await link.run(stop)`` — attach (``WorkerHello`` with the worker's namespace), then compute
   each task the server sends and answer with the computed blocks, until ``stop`` is set. A
   server that goes away (restart, network) is retried every ``reconnect_s``; a refusal that a
   retry cannot fix (bad token, a namespace the server refuses) raises.

The protocol is in proto/kvstore/v1/kvstore.proto (the Work stream): the server sends a task
and the blocks the worker must attend to, the worker answers with the blocks it computed, in
order, then ``WorkDone``. Tasks are computed one at a time in a thread, so the event loop keeps
the stream alive (gRPC keepalives, the next task's bytes) while the model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from client.channel import Pem, auth_metadata, channel_credentials
from client.convert import namespace_of
from client.errors import error_from_rpc
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import ConfigError, InvalidArgumentError, KVStoreError
from kvstore.core.keys import ModelSpec
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.worker.model import ModelWorker

__all__ = ["WorkerLink"]

log = logging.getLogger(__name__)

MiB = 1 << 20
# A refusal with one of these codes does not go away by reconnecting.
_FATAL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(slots=True)
class _Incoming:
    """A task whose given blocks are arriving."""

    task: Any
    given: list[int]  # block indices that come as chunks, in order
    blocks: list[torch.Tensor | None]
    spec: ModelSpec
    next: int = 0  # position in ``given`` of the block being filled
    buf: bytearray = field(default_factory=bytearray)

    @property
    def complete(self) -> bool:
        return self.next == len(self.given)

    def add(self, chunk: Any) -> None:
        if self.complete:
            raise InvalidArgumentError(
                f"task {self.task.task_id}: a chunk of block {chunk.block_index} after every "
                "given block"
            )
        i = self.given[self.next]
        if chunk.block_index != i or chunk.offset != len(self.buf):
            raise InvalidArgumentError(
                f"task {self.task.task_id}: expected block {i} at offset {len(self.buf)}, got "
                f"block {chunk.block_index} at offset {chunk.offset}"
            )
        self.buf += chunk.data
        nbytes = self.spec.block_nbytes
        if len(self.buf) > nbytes:
            raise InvalidArgumentError(
                f"task {self.task.task_id}: block {i} has more than {nbytes} bytes"
            )
        if len(self.buf) == nbytes:
            dtype = torch_dtype(self.spec.dtype)
            self.blocks[i] = torch.frombuffer(self.buf, dtype=dtype).view(self.spec.block_shape)
            self.buf = bytearray()
            self.next += 1


class WorkerLink:
    """One ``ModelWorker`` serving the repairs of one kvstore server; see the module docstring."""

    def __init__(
        self,
        worker: ModelWorker,
        target: str,
        *,
        token: str | None = None,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        name: str = "",
        reconnect_s: float = 1.0,
        keepalive_s: float = 30.0,
        max_chunk_bytes: int = 1 * MiB,
        max_message_bytes: int = 64 * MiB,
    ) -> None:
        if not target:
            raise ConfigError("the worker needs the server's address (host:port or unix:/path)")
        if reconnect_s <= 0:
            raise ConfigError(f"reconnect_s must be positive, got {reconnect_s}")
        if keepalive_s <= 0:
            raise ConfigError(f"keepalive_s must be positive, got {keepalive_s}")
        self.worker = worker
        self.target = target
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.reconnect_s = reconnect_s
        self.keepalive_s = keepalive_s
        self.max_chunk_bytes = max_chunk_bytes
        self.max_message_bytes = max_message_bytes
        self._metadata = auth_metadata(token)
        self._credentials: Any = channel_credentials(tls_ca, tls_cert, tls_key)
        self.attached = asyncio.Event()  # set while a stream is open and welcomed
        self.worker_id = 0
        self.tasks_done = 0
        self.blocks_computed = 0
        self.attachments = 0  # how many times the server welcomed us

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (forever when None); reconnect when the server goes."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            session = asyncio.create_task(self._session())
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({session, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                session.cancel()  # a no-op once it is done
                await asyncio.wait({session})  # (does not raise what the session raised)
                self.attached.clear()
            if stop.is_set():
                return
            exc = None if session.cancelled() else session.exception()
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _FATAL:
                raise error_from_rpc(exc, self.target) from None
            if exc is not None and not isinstance(exc, grpc.aio.AioRpcError):
                raise exc
            why = "the server ended the stream" if exc is None else exc.details()
            log.warning(
                "worker %s: detached from %s (%s); reconnecting in %.1f s",
                self.name,
                self.target,
                why,
                self.reconnect_s,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.reconnect_s)

    def _channel(self) -> Any:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # A worker waits for tasks for hours: keepalives find a dead server (or a dead
            # network path) without waiting for the next task. The server must permit pings
            # this often (server.min_ping_interval_s, 10 s by default) or it answers GOAWAY
            # too_many_pings and the worker detaches.
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(max(10.0, self.keepalive_s) * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Keep pinging on a stream that carries no data for hours (gRPC stops after 2).
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=options)

    async def _session(self) -> None:
        """One Work stream, from hello to its end."""
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        outbox.put_nowait(
            pb.WorkRequest(
                hello=pb.WorkerHello(namespace=namespace_of(self.worker.spec), name=self.name)
            )
        )

        async def requests() -> AsyncIterator[Any]:
            while (message := await outbox.get()) is not None:
                yield message

        async with self._channel() as channel:
            call = pb_grpc.KVStoreStub(channel).Work(requests(), metadata=self._metadata)
            incoming: _Incoming | None = None
            try:
                async for reply in call:
                    kind = reply.WhichOneof("msg")
                    if kind == "welcome":
                        self.worker_id = reply.welcome.worker_id
                        self.attachments += 1
                        self.attached.set()
                        log.info(
                            "worker %s attached to %s as worker %d for %s",
                            self.name,
                            self.target,
                            self.worker_id,
                            self.worker.spec.name,
                        )
                        continue
                    if kind == "task":
                        incoming = self._start(reply.task)
                    elif kind == "chunk" and incoming is not None:
                        incoming.add(reply.chunk)
                    else:
                        raise InvalidArgumentError(f"the server sent an unexpected {kind} message")
                    if incoming.complete:
                        for message in await self._compute(incoming):
                            outbox.put_nowait(message)
                        incoming = None
            finally:
                outbox.put_nowait(None)
                call.cancel()

    def _start(self, task: Any) -> _Incoming:
        spec = self.worker.spec
        if task.block_bytes != spec.block_nbytes:
            raise InvalidArgumentError(
                f"task {task.task_id} has blocks of {task.block_bytes} bytes; this worker's "
                f"namespace {spec.name} has {spec.block_nbytes}"
            )
        targets = set(task.targets)
        if any(t >= task.num_blocks for t in targets):
            raise InvalidArgumentError(f"task {task.task_id} names targets past its blocks")
        given = [i for i in range(task.num_blocks) if i not in targets]
        return _Incoming(task, given, [None] * task.num_blocks, spec)

    async def _compute(self, incoming: _Incoming) -> list[Any]:
        """The answer to one task: the computed blocks as chunks, then WorkDone."""
        task = incoming.task
        tokens = np.frombuffer(task.tokens_u32le, dtype="<u4")
        try:
            blocks = await asyncio.to_thread(self.worker.fill_holes, tokens, incoming.blocks)
        except KVStoreError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            if not isinstance(exc, InvalidArgumentError):
                code = grpc.StatusCode.INTERNAL
            log.warning("worker %s: task %d refused: %s", self.name, task.task_id, exc)
            return [_done(task.task_id, str(exc), code)]
        except Exception as exc:
            log.exception("worker %s: task %d failed", self.name, task.task_id)
            return [_done(task.task_id, f"{type(exc).__name__}: {exc}", grpc.StatusCode.INTERNAL)]
        out = []
        for k, block in enumerate(blocks):
            payload = block.contiguous().reshape(-1).view(torch.uint8).numpy()
            for offset in range(0, len(payload), self.max_chunk_bytes):
                out.append(
                    pb.WorkRequest(
                        chunk=pb.BlockChunk(
                            block_index=k,
                            offset=offset,
                            data=payload[offset : offset + self.max_chunk_bytes].tobytes(),
                        )
                    )
                )
        out.append(pb.WorkRequest(done=pb.WorkDone(task_id=task.task_id)))
        self.tasks_done += 1
        self.blocks_computed += len(blocks)
        log.info("worker %s: task %d: computed %d blocks", self.name, task.task_id, len(blocks))
        return out


def _done(task_id: int, error: str, code: grpc.StatusCode) -> Any:
    return pb.WorkRequest(done=pb.WorkDone(task_id=task_id, error=error, status_code=code.value[0]))
