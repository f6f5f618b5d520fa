"""Model worker processes attached through the Work stream, as the engine's ``HoleFiller``.

A worker process opens a Work stream (an admin RPC, kvstore/service/rpc_repair.py) and says hello
with the namespace it runs; the server wraps the stream in a ``RemoteWorker`` and attaches it to
the ``WorkerPool``. Then, per repair task: ``fill`` puts the task and its given blocks in
``outbox`` (the Work handler sends them) and waits for the answer; ``read_answers`` (a task of
the handler) reads the worker's chunks and done messages into the oldest outstanding task
(``receive``, which assembles blocks with ``PutAssembler``); ``lose`` fails what is outstanding
when the stream ends, breaks, times out or the server stops, and the pool retries elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from kvstore.core.errors import InvalidArgumentError
from kvstore.core.keys import ModelSpec
from kvstore.engine.repair import WorkerGoneError
from kvstore.service.errors import WorkerFailedError
from kvstore.service.put_assembly import PutAssembler
from kvstore.v1 import kvstore_pb2 as pb

__all__ = ["RemoteWorker", "WorkerProtocolError"]

log = logging.getLogger(__name__)


class WorkerProtocolError(Exception):
    """A worker broke the Work stream's rules; its stream is closed with INVALID_ARGUMENT."""


@dataclass(slots=True)
class _Task:
    task_id: int
    assembler: PutAssembler
    future: asyncio.Future[list[torch.Tensor]]
    blocks: list[torch.Tensor] = field(default_factory=list)
    abandoned: bool = False  # the repair was cancelled: its answer is read and dropped


class RemoteWorker:
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
            PutAssembler(self._spec, len(targets), None),
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
        """One message of the worker's answers; ``WorkerProtocolError`` if it breaks the rules."""
        kind = message.WhichOneof("msg")
        if kind not in ("chunk", "done"):
            raise WorkerProtocolError(
                f"after its hello a worker sends chunk and done messages; got {kind or 'nothing'}"
            )
        if not self._sent:
            raise WorkerProtocolError(f"the worker sent a {kind} message with no task given")
        task = self._sent[0]
        if kind == "chunk":
            try:
                tensor = task.assembler.chunk(message.chunk)
            except InvalidArgumentError as exc:
                raise WorkerProtocolError(f"task {task.task_id}: {exc}") from None
            if tensor is not None and not task.abandoned:
                task.blocks.append(tensor)
            return
        done = message.done
        if done.task_id != task.task_id:
            raise WorkerProtocolError(
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
                task.future.set_exception(WorkerFailedError(text))
            return
        try:
            task.assembler.finish()
        except InvalidArgumentError as exc:
            raise WorkerProtocolError(f"task {task.task_id}: {exc}") from None
        task.future.set_result(task.blocks)

    async def read_answers(self, stream: AsyncIterator[Any]) -> None:
        """Feed the worker's side of its Work stream to ``receive`` until it ends; then the
        worker is lost (``lose``), with the reason logged."""
        why = "the worker closed its Work stream"
        try:
            async for message in stream:
                self.receive(message)
        except WorkerProtocolError as exc:
            self.protocol_error = why = f"the worker broke the Work protocol: {exc}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: the worker died or the network went
            why = f"its Work stream broke ({type(exc).__name__}: {exc})"
        log.warning("model worker %s: %s", self.name, why)
        self.lose(why)

    def lose(self, why: str) -> None:
        """The stream is over: fail what is outstanding (the pool retries elsewhere)."""
        if self.gone is None:
            self.gone = why
        for task in self._sent:
            if not task.future.done():
                task.future.set_exception(WorkerGoneError(why))
        self._sent.clear()
        self.outbox.put_nowait(None)
