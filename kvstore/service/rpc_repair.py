"""Repair: computing missing blocks of a prompt with a model worker. The Repair RPC (and Fetch
with ``repair_holes``, through ``ServicerBase._repair``) asks the worker pool; the Work RPC is
where model worker processes attach to that pool (an admin stream: a hello with the namespace the
worker runs, then tasks out and answers in, see kvstore/service/remote_worker.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from kvstore.core.errors import InvalidArgumentError
from kvstore.service.calls import Call, stream_rpc, unary_rpc
from kvstore.service.remote_worker import RemoteWorker
from kvstore.service.servicer_base import ServicerBase
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.convert import spec_of

__all__ = ["RepairRpcs"]


class RepairRpcs(ServicerBase):
    @unary_rpc("Repair")
    async def Repair(self, request: Any, call: Call) -> Any:
        p = await self._prompt(request.prompt, call.who, "prompt")
        result = await self._repair(request.prompt, p, call.who, exact=request.exact)
        return pb.RepairResponse(
            repaired=result.repaired,
            hit_blocks=result.hit_blocks_after,
            hit_blocks_before=result.hit_blocks_before,
            kept=result.kept,
            worker=result.worker,
        )

    @stream_rpc("Work", admin=True)
    async def Work(self, requests: AsyncIterator[Any], call: Call) -> AsyncGenerator[Any, None]:
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
        spec = spec_of(hello.namespace, "hello.namespace")
        self._check_block_fits(spec)
        if self.stopping:
            return  # the worker reconnects to the next server
        worker = RemoteWorker(
            spec,
            hello.name or call.peer,
            self.server_config.max_chunk_bytes,
            self.server_config.worker_timeout_s,
        )
        worker_id = self.pool.attach(worker, call.peer)
        self._remote_workers[worker_id] = worker
        reader = asyncio.create_task(worker.read_answers(stream))
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

    def close_workers(self) -> None:
        """End every Work stream (at shutdown): workers reconnect to the next server."""
        for worker in list(self._remote_workers.values()):
            worker.lose("the server is shutting down")
