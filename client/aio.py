"""``AsyncClient``: the kvstore service from asyncio, with torch tensors in and out.

Operations, in the order an inference engine uses them::

    async with AsyncClient("127.0.0.1:50051", token=TOKEN) as store:
        found = await store.lookup(spec, tokens)          # where each block is; holds nothing
        past, n = await store.get_prefix(spec, tokens)    # the leading hit: [layers, 2, n, ...]
        ...                                               # prefill tokens[n:] only
        await store.put(spec, tokens, kv)                 # store the prompt's full blocks
        async with store.reserve(spec, tokens) as lease:  # hold blocks while loading them
            ...

and, for operators: ``pin`` / ``unpin`` / ``evict`` / ``flush``, ``stats``, ``list_blocks``,
``inspect``, ``watch`` (a resumable stream of store events) and ``health``.

How bytes move. Across hosts, block payloads stream as chunks of at most ``max_chunk_bytes``.
On the same host (``same_host="auto"``: the target is localhost, 127.x, [::1] or a unix socket)
nothing bulky goes through gRPC. The client asks the server for a shared-memory segment
(``OpenSegment``: a sealed memfd the server creates and owns, handed over by file descriptor on a
unix socket with a one-time ticket, see kvstore/segments.py). A put writes the blocks into it and
sends only slot references; a fetch has the server copy the verified blocks into it and copies
them from there into the result. Segments are reused from call to call (one per call in flight),
grown when a call needs more, and closed with the client; one the server closed for idleness is
replaced on the spot. If no segment can be had (another host or container, segments off) the
client falls back to bytes for good; when the tenant's segment bytes are used up, for that call.

Failures. UNAVAILABLE is retried ``retries`` times with exponential backoff and jitter
(``backoff_s``, ``2 * backoff_s``, ...), for every call: each is safe to repeat. Lookups, fetches,
stats and listings change nothing; puts are content-addressed, so a repeated put stores nothing
twice; release, pin, unpin, evict and flush converge to the same state; a repeated Reserve can
leave one extra lease, which holds its blocks only until its TTL runs out. Every other status
is raised at once as the typed exception of ``client.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import mmap
import os
import random
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterator,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.convert import (
    BlockSink,
    BlockSource,
    ExtraKeys,
    Tokens,
    block_info_of,
    check_out,
    event_of,
    lookup_of,
    namespace_of,
    prompt_of,
    put_result_of,
    repair_of,
    stats_of,
    tier_value,
)
from client.errors import NotFoundError, error_from_rpc
from client.results import BlockInfo, Event, Lease, Lookup, PutResult, Repair, Stats
from kvstore.block_format import torch_dtype
from kvstore.errors import ConfigError, CorruptBlockError, InvalidArgumentError, KVStoreError
from kvstore.keys import BlockHash, ModelSpec
from kvstore.segments import receive_segment_fd
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

__all__ = ["AsyncClient"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Pem = str | os.PathLike[str] | bytes  # a PEM file's path, or its contents
MiB = 1 << 20
# The server refuses chunks above its own max_message_bytes / 2 (64 MiB by default).
_MAX_CHUNK_BYTES = 32 * MiB


class _SegmentUnusable(Exception):
    """Shared memory cannot be used with this server (segments off, handing over failed)."""


class _SegmentBusy(Exception):
    """No segment for this call (the tenant's segment bytes are used up): send bytes."""


class _SegmentGone(Exception):
    """The server closed the segment a call named (idle too long): open another and retry."""


class AsyncClient:
    """One channel to a kvstore server; see the module docstring. Use as ``async with``.

    ``target`` is ``host:port`` or ``unix:/path``. ``token`` is sent as ``authorization: Bearer
    <token>``. ``tls_ca`` (a PEM file path, or the PEM bytes) turns on TLS, verifying the server
    against that CA; ``tls_cert`` and ``tls_key`` (the same forms) add a client certificate, for
    servers that require one (``server.tls_client_ca``). ``timeout_s`` bounds each attempt of
    each call (``watch`` excepted).
    ``same_host`` is ``"auto"``, True (try shared memory whatever the target) or False.
    """

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
        if not target:
            raise ConfigError("AsyncClient needs a target (host:port or unix:/path)")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
        if retries < 0 or backoff_s < 0:
            raise ConfigError("retries and backoff_s must be >= 0")
        if not 4096 <= max_chunk_bytes <= _MAX_CHUNK_BYTES:
            raise ConfigError(f"max_chunk_bytes must be in [4096, {_MAX_CHUNK_BYTES}]")
        if same_host not in (True, False, "auto"):
            raise ConfigError(f"same_host must be True, False or 'auto', got {same_host!r}")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_chunk_bytes = max_chunk_bytes
        local = _is_local(target) if same_host == "auto" else bool(same_host)
        self._shm_fetch = local
        self._shm_put = local
        self._metadata = auth_metadata(token)
        self._credentials: Any = channel_credentials(tls_ca, tls_cert, tls_key)
        self._channel: Any = None
        self._stub: Any = None
        self._segments = _Segments(self)
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close this client's segments (on the server too), then the channel."""
        if self._closed:
            return
        await self._segments.close()
        self._closed = True
        if self._channel is not None:
            await self._channel.close()

    def _connect(self) -> Any:
        # Made on first use, inside the event loop that will run it: a grpc.aio channel belongs
        # to the loop it was created in (the sync Client builds us in one thread and runs us in
        # another).
        if self._closed:
            raise RuntimeError("this client is closed")
        if self._stub is None:
            # Keep gRPC's own reconnect backoff (1 s at first, up to 120 s, by default) near ours:
            # while it waits, every call fails fast with UNAVAILABLE, so a server that comes up
            # 0.2 s later would otherwise stay unreachable for all of our retries.
            reconnect_ms = max(20, int(self.backoff_s * 1000))
            options = [
                ("grpc.max_receive_message_length", 2 * self.max_chunk_bytes + MiB),
                ("grpc.max_send_message_length", 2 * self.max_chunk_bytes + MiB),
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

    # -- calls -----------------------------------------------------------------------------------

    async def lookup(
        self, spec: ModelSpec, tokens: Tokens, *, extra_keys: ExtraKeys = None
    ) -> Lookup:
        """Where every full block of ``tokens`` is (``"G1"``..``"G4"`` or None), the leading hit
        and the holes. Holds nothing: take a lease (``reserve``) to load safely."""
        request = pb.LookupRequest(prompt=prompt_of(spec, tokens, extra_keys))
        return lookup_of(await self._unary("Lookup", request))

    async def put(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        kv: torch.Tensor,
        *,
        durable: bool = False,
        extra_keys: ExtraKeys = None,
    ) -> PutResult:
        """Store the full blocks of a prompt's K/V ``[layers, 2, tokens, kv_heads, head_dim]``.

        ``kv`` must have the namespace's dtype and shape (``SpecMismatchError`` otherwise) and
        may cover fewer tokens than ``tokens`` (then only its full blocks are stored), never
        more. ``durable=True`` returns only once the server's write-through copies (G3, G4)
        exist. A trailing partial block is not stored.
        """
        source = BlockSource(spec, kv)
        prompt = prompt_of(spec, tokens, extra_keys)
        num_tokens = len(prompt.tokens_u32le) // 4
        if kv.shape[2] > num_tokens:
            raise InvalidArgumentError(
                f"K/V has {kv.shape[2]} tokens but the prompt only {num_tokens}: pass the tokens "
                "the K/V was computed from"
            )
        num_blocks = source.num_blocks
        if num_blocks == 0:
            return PutResult([], 0, 0)
        header = pb.PutHeader(prompt=prompt, durable=durable, num_blocks=num_blocks)
        if self._shm_put:
            try:
                return await self._put_shared(header, source)
            except _SegmentUnusable as exc:
                log.info("%s: same-host put unavailable, sending bytes: %s", self.target, exc)
                self._shm_put = False

        def requests() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=header)
            for chunk in source.chunks(num_blocks, self.max_chunk_bytes):
                yield pb.PutRequest(chunk=chunk)

        stub = self._connect()
        reply = await self._retrying(
            lambda: stub.Put(requests(), timeout=self.timeout_s, metadata=self._metadata)
        )
        return put_result_of(reply)

    async def _put_shared(self, header: pb.PutHeader, source: BlockSource) -> PutResult:
        return await self._with_segment(
            header.num_blocks * source.block_nbytes,
            lambda segment: self._put_into(header, source, segment),
        )

    async def _put_into(
        self, header: pb.PutHeader, source: BlockSource, segment: _Segment
    ) -> PutResult:
        n, size = header.num_blocks, source.block_nbytes
        with memoryview(segment.mapping) as view:
            source.copy_into(n, view)
        shared = pb.PutHeader()
        shared.CopyFrom(header)
        shared.segment_id = segment.segment_id

        def requests() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=shared)
            for i in range(n):
                yield pb.PutRequest(slot=pb.SlotRef(block_index=i, offset=i * size, length=size))

        stub = self._connect()
        reply = await self._retrying(
            lambda: stub.Put(requests(), timeout=self.timeout_s, metadata=self._metadata),
            raw=True,
        )
        return put_result_of(reply)

    async def _with_segment(self, nbytes: int, use: Callable[[_Segment], Awaitable[T]]) -> T:
        """Run one same-host call on a segment of at least ``nbytes``; a segment the server
        closed meanwhile (idle) is replaced once. Other failures are typed."""
        for attempt in range(2):
            segment = await self._segments.acquire(nbytes)
            try:
                return await use(segment)
            except grpc.aio.AioRpcError as exc:
                if not _segment_gone(exc):
                    raise error_from_rpc(exc, self.target) from None
                await self._segments.discard(segment)
                if attempt:
                    raise _SegmentUnusable(exc.details()) from None
            finally:
                self._segments.release(segment)  # a no-op for a discarded one
        raise AssertionError("unreachable")

    async def get_prefix(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        *,
        max_blocks: int = 0,
        out: torch.Tensor | None = None,
        extra_keys: ExtraKeys = None,
        repair_holes: bool = False,
    ) -> tuple[torch.Tensor, int]:
        """The K/V of the leading hit of ``tokens`` and its number of tokens.

        The tensor is ``[layers, 2, hit_tokens, kv_heads, head_dim]``; with no hit, ``hit_tokens``
        is 0 and the tensor is empty. ``max_blocks`` caps the blocks fetched (0: all of the hit).
        ``out`` (namespace dtype, ``[layers, 2, >= tokens, kv_heads, head_dim]``) receives the
        blocks in its leading tokens, and also caps how many are fetched; the result is then a
        view of it. Blocks after a hole are not returned: ``lookup`` shows them, and
        ``repair_holes=True`` has the server's model worker recompute the holes first (as
        ``repair``), so that the hit reaches past them; that call may take as long as the model
        needs, and raises ``NoWorkerError`` when no worker of the namespace is attached.
        """
        if max_blocks < 0:
            raise InvalidArgumentError(f"max_blocks must be >= 0, got {max_blocks}")
        if out is not None:
            room = check_out(spec, out)
            max_blocks = room if max_blocks == 0 else min(max_blocks, room)
            if max_blocks == 0:
                return out[:, :, :0], 0
        request = pb.FetchRequest(
            prompt=prompt_of(spec, tokens, extra_keys),
            max_blocks=max_blocks,
            max_chunk_bytes=self.max_chunk_bytes,
            repair_holes=repair_holes,
        )
        shared = await self._fetch_shared(
            spec, request, lambda req, segment: self._fetch(spec, req, out, segment)
        )
        kv = shared if shared is not None else await self._retrying(
            lambda: self._fetch(spec, request, out)
        )
        return kv, kv.shape[2]

    async def _fetch_shared(
        self,
        spec: ModelSpec,
        request: pb.FetchRequest,
        fetch: Callable[[pb.FetchRequest, _Segment], Awaitable[T]],
    ) -> T | None:
        """``fetch`` (one attempt of ``request`` into a segment, retried) through this client's
        shared segment, or None where the same-host path is not to be used: the caller then
        receives bytes."""
        # At most every full block of the prompt comes back: a segment that size holds any hit,
        # so one call suffices.
        most = len(request.prompt.tokens_u32le) // 4 // spec.block_tokens
        most = min(most, request.max_blocks) if request.max_blocks else most
        if not self._shm_fetch or not most:
            return None

        def attempt(segment: _Segment) -> Awaitable[T]:
            shared = pb.FetchRequest()
            shared.CopyFrom(request)
            shared.segment_id = segment.segment_id
            return self._retrying(lambda: fetch(shared, segment), raw=True)

        try:
            return await self._with_segment(most * spec.block_nbytes, attempt)
        except _SegmentUnusable as exc:
            log.info("%s: same-host fetch unavailable, receiving bytes: %s", self.target, exc)
            self._shm_fetch = False
        except _SegmentBusy as exc:
            log.info("%s: no segment for this fetch, receiving bytes: %s", self.target, exc)
        return None

    async def _fetch(
        self,
        spec: ModelSpec,
        request: pb.FetchRequest,
        out: torch.Tensor | None,
        segment: _Segment | None = None,
    ) -> torch.Tensor:
        """One attempt of a Fetch stream: every reply message written into its place (chunks,
        or the slots of ``segment`` that the server copied the blocks into)."""
        call = self._connect().Fetch(request, timeout=self.timeout_s, metadata=self._metadata)
        sink: BlockSink | None = None
        try:
            async for reply in call:
                kind = reply.WhichOneof("msg")
                if kind == "header":
                    header = reply.header
                    _check_block_bytes(spec, header)
                    sink = BlockSink(spec, len(header.block_hashes), out)
                    if header.slots and segment is None:
                        raise CorruptBlockError("the server sent slots for a fetch of bytes")
                    for slot in header.slots:
                        assert segment is not None
                        _copy_slot(sink, segment.mapping, slot)
                elif sink is None:
                    raise CorruptBlockError("the server's reply did not start with a header")
                elif kind == "chunk":
                    sink.write(reply.chunk.block_index, reply.chunk.offset, reply.chunk.data)
                else:
                    raise CorruptBlockError(f"unexpected {kind} message in a Fetch reply")
            if sink is None:
                raise CorruptBlockError("the server's reply had no header")
            return sink.result()
        finally:
            call.cancel()  # a no-op once the stream is done; else stops the server sending

    async def get_prefix_by_layer(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        on_layer: Callable[[int, torch.Tensor], None],
        *,
        max_blocks: int = 0,
        extra_keys: ExtraKeys = None,
    ) -> int:
        """The leading hit of ``tokens``, handed over layer by layer; returns its verified length
        in tokens.

        ``on_layer(layer, kv)`` is called once per layer, in order, as soon as that layer is
        here: ``kv`` is ``[2, tokens, kv_heads, head_dim]`` and valid only during the call (on the
        same host it is a view of this client's shared segment, which the server fills with the
        next layers meanwhile; copy out what you keep). Its ``tokens`` can exceed the returned
        length: a block that failed its checksum ends the hit, and bytes from there on must not
        be used. Where the same-host path is not available, the whole hit is fetched first and
        then handed over layer by layer. ``on_layer`` runs in the client's event loop (the
        ``Client``'s thread); a call may be repeated for a layer when the fetch is retried."""
        if max_blocks < 0:
            raise InvalidArgumentError(f"max_blocks must be >= 0, got {max_blocks}")
        request = pb.FetchRequest(
            prompt=prompt_of(spec, tokens, extra_keys),
            max_blocks=max_blocks,
            max_chunk_bytes=self.max_chunk_bytes,
            by_layer=True,
        )
        shared = await self._fetch_shared(
            spec, request, lambda req, segment: self._fetch_layers(spec, req, segment, on_layer)
        )
        if shared is not None:
            return shared
        kv, hit = await self.get_prefix(spec, tokens, max_blocks=max_blocks, extra_keys=extra_keys)
        for layer in range(kv.shape[0]):
            on_layer(layer, kv[layer])
        return hit

    async def _fetch_layers(
        self,
        spec: ModelSpec,
        request: pb.FetchRequest,
        segment: _Segment,
        on_layer: Callable[[int, torch.Tensor], None],
    ) -> int:
        """One attempt of a layer-by-layer Fetch into ``segment``; the verified tokens."""
        call = self._connect().Fetch(request, timeout=self.timeout_s, metadata=self._metadata)
        kv: torch.Tensor | None = None
        done, layers = 0, spec.num_layers
        try:
            async for reply in call:
                kind = reply.WhichOneof("msg")
                if kind == "header":
                    header = reply.header
                    if kv is not None or not header.by_layer:
                        raise CorruptBlockError("the server did not answer layer by layer")
                    _check_block_bytes(spec, header)
                    kv = _segment_kv(spec, segment, len(header.block_hashes))
                    continue
                if kind != "progress" or kv is None:
                    raise CorruptBlockError(f"unexpected {kind} message in a layer-by-layer Fetch")
                progress = reply.progress
                upto = min(progress.layers_done, layers)
                for layer in range(done, upto):
                    on_layer(layer, kv[layer])
                done = max(done, upto)
                if progress.done:
                    if done != layers:
                        raise CorruptBlockError(f"the Fetch ended after {done} of {layers} layers")
                    blocks = kv.shape[2] // spec.block_tokens
                    return int(min(progress.verified_blocks, blocks)) * spec.block_tokens
            raise CorruptBlockError("the layer-by-layer Fetch ended before its last message")
        finally:
            del kv  # the segment can be closed only when no view of it is left
            call.cancel()

    def reserve(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        *,
        num_blocks: int = 0,
        ttl_s: float = 0.0,
        extra_keys: ExtraKeys = None,
    ) -> _Reservation:
        """Hold the first ``num_blocks`` full blocks of ``tokens`` (0: all) that the server has,
        for ``ttl_s`` seconds (0: the server's default).

        ``async with client.reserve(...) as lease:`` releases on exit; ``lease = await
        client.reserve(...)`` leaves releasing to you (``release(lease.lease_id)``, or ``async
        with lease``) or to the TTL.
        """
        request = pb.ReserveRequest(
            prompt=prompt_of(spec, tokens, extra_keys), num_blocks=num_blocks, ttl_s=ttl_s
        )

        async def make() -> Lease:
            reply = await self._unary("Reserve", request)
            return Lease(
                reply.lease_id,
                [BlockHash(h) for h in reply.block_hashes],
                reply.ttl_s,
                _release_async=self.release,
            )

        return _Reservation(make)

    async def release(self, lease_id: int) -> bool:
        """Let a lease's blocks go; False if it was released or had expired already."""
        try:
            reply = await self._unary("Release", pb.ReleaseRequest(lease_id=lease_id))
        except NotFoundError:
            return False
        return bool(reply.released)

    async def repair(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        *,
        exact: bool = False,
        extra_keys: ExtraKeys = None,
        timeout_s: float | None = None,
    ) -> Repair:
        """Have the server's model worker recompute the holes of ``tokens``' stored prefix
        (missing blocks with a present block after them) and store them; the blocks after each
        hole are reused. ``exact=True`` recomputes from the first hole to the last present block
        instead (bit-identical to a prefill from scratch). A missing tail is left alone.

        ``NoWorkerError`` when no worker of ``spec`` is attached; a worker lost mid-repair is
        retried like any UNAVAILABLE answer (nothing of the failed attempt was stored).
        ``timeout_s`` (default: the client's) bounds each attempt: the model's time counts.
        """
        request = pb.RepairRequest(prompt=prompt_of(spec, tokens, extra_keys), exact=exact)
        call = self._connect().Repair
        timeout = self.timeout_s if timeout_s is None else timeout_s
        reply = await self._retrying(
            lambda: call(request, timeout=timeout, metadata=self._metadata)
        )
        return repair_of(reply)

    async def pin(self, spec: ModelSpec, hashes: list[BlockHash], *, ttl_s: float = 0.0) -> int:
        """Keep blocks in their tiers (``ttl_s=0``: until unpinned); returns blocks pinned."""
        request = pb.BlocksRequest(namespace=namespace_of(spec), block_hashes=hashes, ttl_s=ttl_s)
        return int((await self._unary("Pin", request)).count)

    async def unpin(self, spec: ModelSpec, hashes: list[BlockHash]) -> int:
        request = pb.BlocksRequest(namespace=namespace_of(spec), block_hashes=hashes)
        return int((await self._unary("Unpin", request)).count)

    async def evict(
        self, spec: ModelSpec, hashes: list[BlockHash], *, tier: str | None = None
    ) -> int:
        """Remove blocks from one tier (demoting them as placement says) or, with ``tier=None``,
        from every tier; leased and pinned blocks stay. Returns blocks removed."""
        request = pb.BlocksRequest(
            namespace=namespace_of(spec), block_hashes=hashes, tier=tier_value(tier)
        )
        return int((await self._unary("Evict", request)).count)

    async def flush(self, tier: str | None = None) -> int:
        """Remove every block that is not leased or pinned, from one tier or all of them."""
        return int((await self._unary("Flush", pb.FlushRequest(tier=tier_value(tier)))).count)

    async def stats(self) -> Stats:
        return stats_of(await self._unary("Stats", pb.StatsRequest()))

    async def list_blocks(
        self, tier: str | None = None, *, page_size: int = 0
    ) -> AsyncIterator[BlockInfo]:
        """Every block the server knows (in one tier, or all), fetched a page at a time."""
        after = b""
        while True:
            request = pb.ListBlocksRequest(tier=tier_value(tier), limit=page_size, after=after)
            reply = await self._unary("ListBlocks", request)
            for info in reply.blocks:
                yield block_info_of(info)
            if not reply.next_after:
                return
            after = reply.next_after

    async def inspect(self, block_hash: bytes) -> BlockInfo | None:
        """One block's residency and header; None if the server does not know it."""
        try:
            reply = await self._unary("Inspect", pb.InspectRequest(block_hash=bytes(block_hash)))
        except NotFoundError:
            return None
        return block_info_of(reply.block, reply)

    async def watch(self, after_seq: int = 0) -> AsyncIterator[Event]:
        """Store events as they happen; ``after_seq=0`` starts with a snapshot of what is
        stored (events with ``snapshot=True``). A dropped stream is resumed after the last
        event seen (UNAVAILABLE is retried as for every call); the stream has no deadline."""
        last = after_seq
        failures = 0
        while True:
            call = self._connect().Watch(pb.WatchRequest(after_seq=last), metadata=self._metadata)
            try:
                async for reply in call:
                    failures = 0
                    last = max(last, reply.seq)
                    yield event_of(reply)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise error_from_rpc(exc, self.target) from None
                await asyncio.sleep(self._backoff(failures))
                failures += 1
            finally:
                call.cancel()

    async def health(self, service: str = "") -> str:
        """The standard gRPC health status: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        self._connect()
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._retrying(
            lambda: stub.Check(request, timeout=self.timeout_s, metadata=self._metadata)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # -- retries ---------------------------------------------------------------------------------

    async def _unary(self, method: str, request: Any) -> Any:
        call = getattr(self._connect(), method)
        return await self._retrying(
            lambda: call(request, timeout=self.timeout_s, metadata=self._metadata)
        )

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], *, raw: bool = False) -> T:
        """Run ``attempt`` until it succeeds, retrying UNAVAILABLE; other errors are typed
        (``raw=True``: left as ``AioRpcError`` for the caller to look at)."""
        failures = 0
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    if raw:
                        raise
                    raise error_from_rpc(exc, self.target) from None
                delay = self._backoff(failures)
                log.debug("%s unavailable, retry %d in %.2f s", self.target, failures + 1, delay)
                await asyncio.sleep(delay)
                failures += 1

    def _backoff(self, failures: int) -> float:
        # Jitter in [0.5, 1] of the exponential step: clients that failed together do not come
        # back together.
        return self.backoff_s * (1 << failures) * (0.5 + random.random() / 2)


class _Reservation:
    """What ``AsyncClient.reserve`` returns: await it for a ``Lease``, or ``async with`` it."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, Lease]]) -> None:
        self._make = make
        self._lease: Lease | None = None

    def __await__(self) -> Generator[Any, None, Lease]:
        return self._make().__await__()

    async def __aenter__(self) -> Lease:
        self._lease = await self._make()
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lease is not None:
            await self._lease.__aexit__(exc_type, exc, tb)


@dataclass(slots=True, eq=False)
class _Segment:
    segment_id: int
    size: int
    mapping: mmap.mmap


class _Segments:
    """The server-issued segments of one client, reused from one same-host call to the next.

    One segment per call in flight (so concurrent calls do not share bytes); when no free segment
    is large enough, the largest free one is closed and one at least twice its size is opened.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._free: list[_Segment] = []
        self._all: set[_Segment] = set()

    async def acquire(self, nbytes: int) -> _Segment:
        for i, segment in enumerate(self._free):
            if segment.size >= nbytes:
                return self._free.pop(i)
        size = 1 * MiB
        if self._free:
            biggest = max(self._free, key=lambda s: s.size)
            self._free.remove(biggest)
            size = 2 * biggest.size
            await self._close(biggest)
        need = -(-nbytes // MiB) * MiB
        try:
            return await self._open(max(size, need))
        except _SegmentBusy:
            if size <= need:
                raise
            return await self._open(need)  # the doubled size passed the bound; the need may not

    def release(self, segment: _Segment) -> None:
        if segment in self._all:
            self._free.append(segment)

    async def discard(self, segment: _Segment) -> None:
        """Forget a segment the server no longer knows (it was closed for idleness)."""
        self._all.discard(segment)
        _unmap(segment)

    async def close(self) -> None:
        self._free.clear()
        for segment in list(self._all):
            await self._close(segment)

    async def _open(self, size: int) -> _Segment:
        client = self._client
        stub = client._connect()
        request = pb.OpenSegmentRequest(size_bytes=size)
        try:
            reply = await client._retrying(
                lambda: stub.OpenSegment(
                    request, timeout=client.timeout_s, metadata=client._metadata
                ),
                raw=True,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _SegmentBusy(exc.details()) from None
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise _SegmentUnusable(exc.details()) from None
            raise error_from_rpc(exc, client.target) from None
        try:
            fd = await asyncio.to_thread(receive_segment_fd, reply.socket, reply.ticket)
        except OSError as exc:
            # Another host or network namespace: the socket is not reachable from here.
            await self._close_remote(reply.segment_id)
            raise _SegmentUnusable(f"cannot receive the segment: {exc}") from None
        try:
            mapping = mmap.mmap(fd, reply.size_bytes)
        except (OSError, ValueError) as exc:
            await self._close_remote(reply.segment_id)
            raise _SegmentUnusable(f"cannot map the segment: {exc}") from None
        finally:
            os.close(fd)
        segment = _Segment(reply.segment_id, reply.size_bytes, mapping)
        self._all.add(segment)
        return segment

    async def _close(self, segment: _Segment) -> None:
        self._all.discard(segment)
        _unmap(segment)
        await self._close_remote(segment.segment_id)

    async def _close_remote(self, segment_id: int) -> None:
        # Best effort: a segment the server never hears about is closed when idle.
        client = self._client
        if client._closed or client._stub is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, KVStoreError):
            await client._stub.CloseSegment(
                pb.CloseSegmentRequest(segment_id=segment_id),
                timeout=client.timeout_s,
                metadata=client._metadata,
            )


def _unmap(segment: _Segment) -> None:
    with contextlib.suppress(BufferError):  # a tensor over it is still referenced
        segment.mapping.close()


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


def _segment_gone(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a same-host call failed because the server closed the segment it named."""
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "is not open for this tenant" in (
        exc.details() or ""
    )


def _check_block_bytes(spec: ModelSpec, header: pb.FetchHeader) -> None:
    if header.block_bytes and header.block_bytes != spec.block_nbytes:
        raise CorruptBlockError(
            f"the server sends blocks of {header.block_bytes} bytes, namespace {spec.name} has "
            f"{spec.block_nbytes}"
        )


def _segment_kv(spec: ModelSpec, segment: _Segment, num_blocks: int) -> torch.Tensor:
    """The leading bytes of ``segment`` as ``[layers, 2, tokens, kv_heads, head_dim]``."""
    tokens = num_blocks * spec.block_tokens
    shape = (spec.num_layers, 2, tokens, spec.num_kv_heads, spec.head_dim)
    if num_blocks * spec.block_nbytes > segment.size:
        raise CorruptBlockError(
            f"{num_blocks} blocks of {spec.block_nbytes} bytes do not fit the {segment.size}-byte "
            "shared segment"
        )
    dtype = torch_dtype(spec.dtype)
    if not num_blocks:
        return torch.empty(shape, dtype=dtype)
    count = num_blocks * spec.block_nbytes // dtype.itemsize
    return torch.frombuffer(segment.mapping, dtype=dtype, count=count).view(shape)


def _copy_slot(sink: BlockSink, segment: mmap.mmap, slot: Any) -> None:
    """Copy one block out of this client's segment into its place in the result."""
    if slot.offset + slot.length > len(segment):
        raise CorruptBlockError(
            f"slot [{slot.offset}, +{slot.length}) is outside the shared segment"
        )
    with memoryview(segment) as view:
        sink.write(slot.block_index, 0, view[slot.offset : slot.offset + slot.length])


def _is_local(target: str) -> bool:
    """Whether a gRPC target is this host: localhost, a loopback address or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host = target[1 : target.find("]")]
    else:
        host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
