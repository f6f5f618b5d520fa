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
nothing bulky goes through gRPC: puts and fetches go through shared-memory segments the server
hands over (client/same_host.py), reused from call to call (a region of one per call in flight),
grown when a call needs more, and closed with the client. If no segment can be had (another host or
container, segments off) the client falls back to bytes for good; when the tenant's segment
bytes are used up, for that call. A tensor from ``kv_buffer`` lives in a region of its own: a
put of it, or a ``get_prefix`` into it, is one copy (by the server) instead of two. The Fetch
stream is read in client/fetch.py, and the channel and its retries are client/channel.py.

Failures. UNAVAILABLE is retried ``retries`` times with exponential backoff and jitter
(``backoff_s``, ``2 * backoff_s``, ...), for every call: each is safe to repeat. Lookups, fetches,
stats and listings change nothing; puts are content-addressed, so a repeated put stores nothing
twice; release, pin, unpin, evict and flush converge to the same state; a repeated Reserve can
leave one extra lease, which holds its blocks only until its TTL runs out. Every other status
is raised at once as the typed exception of ``client.errors``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import Channel, MiB, Pem, channel_credentials
from client.convert import (
    BlockSource,
    ExtraKeys,
    Tokens,
    block_info_of,
    check_out,
    event_of,
    lookup_of,
    lookup_request,
    namespace_of,
    prompt_of,
    put_result_of,
    repair_of,
    stats_of,
    tier_value,
)
from client.errors import NotFoundError, error_from_rpc
from client.fetch import (
    fetch_blocks,
    fetch_into_buffer,
    fetch_into_segment,
    fetch_layers,
    fetch_request,
    fetch_shared,
)
from client.results import BlockInfo, Event, Lease, Lookup, PutResult, Repair, Stats
from client.same_host import (
    Segment,
    SegmentBusy,
    Segments,
    SegmentUnusable,
    put_from_buffer,
    put_into,
    segment_gone,
)
from client.same_host import is_local as _is_local
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import ConfigError, InvalidArgumentError
from kvstore.core.keys import BlockHash, ModelSpec
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    import torch

    from client.g1_ipc import G1Peer

__all__ = ["AsyncClient", "ClientOptions"]

log = logging.getLogger(__name__)
T = TypeVar("T")
# The server refuses chunks above its own max_message_bytes / 2 (64 MiB by default).
_MAX_CHUNK_BYTES = 32 * MiB


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of ``AsyncClient`` (the defaults are there), which ``Client`` takes
    too and hands on."""

    token: str | None
    tls_ca: Pem | None
    tls_cert: Pem | None
    tls_key: Pem | None
    timeout_s: float
    retries: int
    backoff_s: float
    same_host: bool | Literal["auto"]
    max_chunk_bytes: int


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
        self._rpc = Channel(
            target,
            token=token,
            credentials=channel_credentials(tls_ca, tls_cert, tls_key),
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            max_message_bytes=2 * max_chunk_bytes + MiB,
        )
        local = _is_local(target) if same_host == "auto" else bool(same_host)
        self._segments = Segments(self._rpc, enabled=local)
        self._g1: G1Peer | None = None  # the server's G1 slabs opened here (same-GPU hand-off)

    # -- life cycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def same_host_segments(self) -> list[Segment]:
        """The shared-memory segments this client has open with a same-host server (where its
        puts are written and its fetches land); empty over a network. Read it on the thread that
        runs this client's loop: segments are opened and closed there."""
        return self._segments.segments

    async def aclose(self) -> None:
        """Close this client's segments (on the server too), then the channel."""
        if self._rpc.closed:
            return
        if self._g1 is not None:
            self._g1.close()
        await self._segments.close()
        await self._rpc.close()

    # -- calls -----------------------------------------------------------------------------------

    async def lookup(
        self, spec: ModelSpec, tokens: Tokens, *, extra_keys: ExtraKeys = None
    ) -> Lookup:
        """Where every full block of ``tokens`` is (``"G1"``..``"G4"`` or None), the leading hit
        and the holes. Holds nothing: take a lease (``reserve``) to load safely."""
        request = lookup_request(spec, tokens, extra_keys)
        return lookup_of(await self._rpc.unary("Lookup", request))

    async def kv_buffer(self, spec: ModelSpec, num_tokens: int) -> torch.Tensor:
        """A K/V tensor ``[layers, 2, num_tokens, kv_heads, head_dim]`` of ``spec``'s dtype
        (zeroed) for ``put`` and ``get_prefix(out=...)`` to move in one copy instead of two.

        On the same host it lives in a shared-memory segment the server issued to this client:
        a ``put`` of it (or of a slice along the tokens) sends no bytes, the server reads the
        blocks out of the segment; a ``get_prefix`` into it has the server write the verified
        blocks straight into their places. It stays valid while the client is open, and after
        (as plain memory, no longer shared). Allocate it once and reuse it: it holds its bytes of
        the tenant's segment bound (``server.tenant_segment_bytes``) until the client closes, or
        until ``free_kv_buffer``.
        Where no segment can be had (another host, segments off, the bound reached) it is an
        ordinary tensor, and the calls move it as they move any other."""
        import torch  # here, not at the top: see the package docstring

        if num_tokens < 0:
            raise InvalidArgumentError(f"num_tokens must be >= 0, got {num_tokens}")
        kv = None
        if num_tokens:
            try:
                kv = await self._segments.kv_buffer(spec, num_tokens)
            except (SegmentUnusable, SegmentBusy) as exc:
                log.info("%s: K/V buffer in ordinary memory: %s", self.target, exc)
        if kv is None:
            shape = (spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim)
            kv = torch.zeros(shape, dtype=torch_dtype(spec.dtype))
        return kv

    async def free_kv_buffer(self, kv: torch.Tensor) -> bool:
        """Give back the shared memory of a tensor that ``kv_buffer`` returned, for other calls
        and buffers to use; False (and nothing done) for any other tensor. ``kv``, and every
        view of it, must not be used after that: its bytes are this client's next calls'."""
        return self._segments.free_kv_buffer(kv)

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
        located = self._segments.locate(spec, kv)
        if located is not None:
            segment, layout = located[0].segment, located[1]
            result = await self._on_buffer(
                segment, lambda: put_from_buffer(self._rpc, header, segment, layout)
            )
            if result is not None:
                return result
        if self._segments.for_put:
            try:
                return await self._segments.use(
                    num_blocks * source.block_nbytes,
                    lambda region: put_into(self._rpc, header, source, region),
                )
            except SegmentUnusable as exc:
                log.info("%s: same-host put unavailable, sending bytes: %s", self.target, exc)
                self._segments.for_put = False

        def requests() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=header)
            for chunk in source.chunks(num_blocks, self.max_chunk_bytes):
                yield pb.PutRequest(chunk=chunk)

        return put_result_of(await self._rpc.retrying(lambda: self._rpc.call("Put", requests())))

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
        view of it (a ``kv_buffer`` tensor, or a slice of one, is written by the server itself).
        Blocks after a hole are not returned: ``lookup`` shows them, and ``repair_holes=True``
        has the server's model worker recompute the holes first (as ``repair``), so that the hit
        reaches past them; that call may take as long as the model needs, and raises
        ``NoWorkerError`` when no worker of the namespace is attached.
        """
        if out is not None:
            room = check_out(spec, out)
            max_blocks = room if max_blocks == 0 else min(max_blocks, room)
            if max_blocks == 0:
                return out[:, :, :0], 0
        request = fetch_request(
            spec, tokens, extra_keys, max_blocks, self.max_chunk_bytes, repair_holes=repair_holes
        )
        rpc = self._rpc
        located = None if out is None else self._segments.locate(spec, out)
        if located is not None:
            assert out is not None
            segment, layout = located[0].segment, located[1]
            into = out
            kv = await self._on_buffer(
                segment, lambda: fetch_into_buffer(rpc, spec, request, segment, layout, into)
            )
            if kv is not None:
                return kv, kv.shape[2]
        shared = await fetch_shared(
            rpc,
            self._segments,
            spec,
            request,
            lambda r, seg: fetch_into_segment(rpc, spec, r, seg, out),
        )
        if shared is not None:
            return shared, shared.shape[2]
        kv = await rpc.retrying(lambda: fetch_blocks(rpc, spec, request, out))
        return kv, kv.shape[2]

    async def get_prefix_from_g1(
        self,
        spec: ModelSpec,
        tokens: Tokens,
        out: torch.Tensor,
        *,
        max_blocks: int = 0,
        extra_keys: ExtraKeys = None,
    ) -> int:
        """Same GPU as the server's G1: copy the leading blocks of ``tokens`` that G1 holds into
        ``out`` (a CUDA tensor ``[layers, 2, >= tokens, kv_heads, head_dim]`` of the namespace's
        dtype) device-to-device, through a CUDA IPC handle of G1 (``HandOffG1``); returns the
        tokens copied (0: no leading block is in G1). The copy has finished on return.

        Raises ``HandOffUnavailableError`` where there is no such path (G1 off or not on CUDA,
        another GPU or host, a server with several tenants, cupy missing): ``get_prefix`` then.
        Blocks past the G1 run are not fetched: call ``get_prefix`` with ``out`` sliced after
        them for the rest."""
        from client.g1_ipc import G1Peer, hand_off  # torch: not at import time

        if self._g1 is None:
            self._g1 = G1Peer()
        return await hand_off(
            self._rpc,
            self._segments,
            self._g1,
            spec,
            prompt_of(spec, tokens, extra_keys),
            out,
            max_blocks,
        )

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
        request = fetch_request(
            spec, tokens, extra_keys, max_blocks, self.max_chunk_bytes, by_layer=True
        )
        rpc = self._rpc
        into = functools.partial(fetch_layers, rpc, spec, on_layer=on_layer)
        shared = await fetch_shared(rpc, self._segments, spec, request, into)
        if shared is not None:
            return shared
        kv, hit = await self.get_prefix(spec, tokens, max_blocks=max_blocks, extra_keys=extra_keys)
        for layer in range(kv.shape[0]):
            on_layer(layer, kv[layer])
        return hit

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
            reply = await self._rpc.unary("Reserve", request)
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
            reply = await self._rpc.unary("Release", pb.ReleaseRequest(lease_id=lease_id))
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
        return repair_of(await self._rpc.unary("Repair", request, timeout_s=timeout_s))

    async def pin(self, spec: ModelSpec, hashes: list[BlockHash], *, ttl_s: float = 0.0) -> int:
        """Keep blocks in their tiers (``ttl_s=0``: until unpinned); returns blocks pinned."""
        request = pb.BlocksRequest(namespace=namespace_of(spec), block_hashes=hashes, ttl_s=ttl_s)
        return int((await self._rpc.unary("Pin", request)).count)

    async def unpin(self, spec: ModelSpec, hashes: list[BlockHash]) -> int:
        request = pb.BlocksRequest(namespace=namespace_of(spec), block_hashes=hashes)
        return int((await self._rpc.unary("Unpin", request)).count)

    async def evict(
        self, spec: ModelSpec, hashes: list[BlockHash], *, tier: str | None = None
    ) -> int:
        """Remove blocks from one tier (demoting them as placement says) or, with ``tier=None``,
        from every tier; leased and pinned blocks stay. Returns blocks removed."""
        request = pb.BlocksRequest(
            namespace=namespace_of(spec), block_hashes=hashes, tier=tier_value(tier)
        )
        return int((await self._rpc.unary("Evict", request)).count)

    async def flush(self, tier: str | None = None) -> int:
        """Remove every block that is not leased or pinned, from one tier or all of them."""
        return int((await self._rpc.unary("Flush", pb.FlushRequest(tier=tier_value(tier)))).count)

    async def stats(self) -> Stats:
        return stats_of(await self._rpc.unary("Stats", pb.StatsRequest()))

    async def list_blocks(
        self, tier: str | None = None, *, page_size: int = 0
    ) -> AsyncIterator[BlockInfo]:
        """Every block the server knows (in one tier, or all), fetched a page at a time."""
        after = b""
        while True:
            request = pb.ListBlocksRequest(tier=tier_value(tier), limit=page_size, after=after)
            reply = await self._rpc.unary("ListBlocks", request)
            for info in reply.blocks:
                yield block_info_of(info)
            if not reply.next_after:
                return
            after = reply.next_after

    async def inspect(self, block_hash: bytes) -> BlockInfo | None:
        """One block's residency and header; None if the server does not know it."""
        try:
            request = pb.InspectRequest(block_hash=bytes(block_hash))
            reply = await self._rpc.unary("Inspect", request)
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
            request = pb.WatchRequest(after_seq=last)
            call = self._rpc.stub().Watch(request, metadata=self._rpc.metadata)
            try:
                async for reply in call:
                    failures = 0
                    last = max(last, reply.seq)
                    yield event_of(reply)
                return
            except grpc.aio.AioRpcError as exc:
                if not self._rpc.retryable(exc, failures):
                    raise error_from_rpc(exc, self.target) from None
                await asyncio.sleep(self._rpc.backoff(failures))
                failures += 1
            finally:
                call.cancel()

    async def health(self, service: str = "") -> str:
        """The standard gRPC health status: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        stub = health_pb2_grpc.HealthStub(self._rpc.grpc_channel())
        request = health_pb2.HealthCheckRequest(service=service)
        rpc = self._rpc
        reply = await rpc.retrying(
            lambda: stub.Check(request, timeout=rpc.timeout_s, metadata=rpc.metadata)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def _on_buffer(self, segment: Segment, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call`` (one attempt of a put or fetch of a K/V buffer, retried); None when the
        server closed the buffer's segment (idle): the buffer then goes the ordinary way."""
        try:
            return await self._rpc.retrying(call, raw=True)
        except grpc.aio.AioRpcError as exc:
            if not segment_gone(exc):
                raise error_from_rpc(exc, self.target) from None
        log.info("%s: K/V buffer's segment closed by the server; copying it", self.target)
        self._segments.forget(segment)
        return None


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

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lease is not None:
            await self._lease.__aexit__(*exc_info)
