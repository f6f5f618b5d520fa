"""The connection side of the Redis tier (G4): the client (standalone or cluster), the key layout,
pipelined round trips bounded by ``timeout_ms``, the fan-out to cluster shards and the
bookkeeping of lost shards, error mapping, SCAN. ``RedisTier`` (redis_store.py) builds the
tier contract on it; the module docstring there says how lost shards behave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvstore.core.errors import (
    InvalidArgumentError,
    KVStoreError,
    TierError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.core.keys import DIGEST_BYTES, BlockHash
from tiers.redis_config import (
    _REDISCOVERY_INTERVAL_S,
    _SCAN_COUNT,
    _SMALL_COMMANDS_PER_TRIP,
    RedisTierConfig,
    _redact,
)

__all__ = ["RedisLinks"]

log = logging.getLogger("tiers.redis_store")

_T = TypeVar("_T")


def _groups(items: Sequence[_T], size_of: Callable[[_T], int], budget: int) -> Iterator[list[_T]]:
    """Consecutive runs of ``items`` whose sizes add up to at most ``budget`` (at least one)."""
    group: list[_T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(item)
        used += size
    if group:
        yield group


@dataclass(frozen=True, slots=True)
class _LostShard:
    """The reply a command gets when its cluster shard cannot be reached."""

    node: str
    reason: str


def _is_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says that no Redis serves the address: refused, reset or closed
    connections, or a server still loading its data. Not authentication failures or our own
    connection limit (subclasses of ConnectionError too), and not timeouts: a server that
    accepted the connection but does not answer may be busy, stopped or failing over."""
    return type(exc) is RedisConnectionError or isinstance(exc, BusyLoadingError)


class RedisLinks:
    """The client and the round trips of one Redis tier; ``name`` is set by the tier."""

    name: str

    def __init__(self, config: RedisTierConfig) -> None:
        self.config = config
        self._where = _redact(config.url) + (" (cluster)" if config.cluster else "")
        self._timeout_s = config.timeout_ms / 1000
        self._ttl_ms = None if config.ttl_s is None else max(1, round(config.ttl_s * 1000))
        self._key_base = f"{config.key_prefix}:{config.namespace}:"
        # Redis Cluster nodes raise MaxConnectionsError instead of waiting for a free
        # connection, and a plain pool does the same; a semaphore makes callers queue instead.
        # Each round trip holds at most one connection per server, so this bound is exact.
        self._in_flight = asyncio.Semaphore(config.max_connections)
        # One retry, on connection errors only: it replaces a pooled connection that the
        # server closed while idle. Timeouts are not retried: a server that did not answer in
        # timeout_ms will not answer in the same budget either, and the caller decides.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        self._client: Redis | RedisCluster
        if config.cluster:
            self._client = RedisCluster.from_url(
                config.url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                max_connections=config.max_connections,
                # No retries inside redis-py: on a connection error its cluster pipeline closes
                # every connection of the client (breaking other calls in flight on healthy
                # shards) and sleeps 0.25 s. _fan_out retries the one shard that failed instead.
                retry=Retry(NoBackoff(), 0),
            )
        else:
            self._client = Redis.from_url(
                config.url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                max_connections=config.max_connections,
                retry=retry,
            )
        self._num_unreachable = 0
        self._lost_since: dict[str, float] = {}  # shard (host:port) -> when it was lost
        self._next_discovery = 0.0

    # -- key layout ---------------------------------------------------------------------------

    def head_key(self, key: bytes) -> str:
        """The Redis key of a block's head (the block itself, or its chunk manifest)."""
        if len(key) != DIGEST_BYTES:
            raise InvalidArgumentError(f"a block hash is {DIGEST_BYTES} bytes, got {len(key)}")
        return f"{self._key_base}{{{bytes(key).hex()}}}"

    def chunk_key(self, key: bytes, i: int) -> str:
        """The Redis key of chunk ``i`` (0-based) of a chunked block."""
        return f"{self.head_key(key)}:{i}"

    def _key_of_head(self, name: bytes) -> BlockHash | None:
        """The block hash named by a head key found by SCAN; ``None`` for anything else."""
        text = name.decode("utf-8", errors="replace")
        inner = text[len(self._key_base) :]
        if not (text.startswith(self._key_base) and inner[:1] == "{" and inner[-1:] == "}"):
            return None
        hex_digits = inner[1:-1]
        if len(hex_digits) != 2 * DIGEST_BYTES:
            return None
        try:
            return BlockHash(bytes.fromhex(hex_digits))
        except ValueError:
            return None

    # -- plumbing -----------------------------------------------------------------------------

    def _block_keys(self, key: BlockHash, num_chunks: int) -> list[str]:
        return [self.head_key(key), *(self.chunk_key(key, c) for c in range(num_chunks))]

    async def _unlink(self, names: list[str]) -> list[int]:
        replies: list[int] = []
        for start in range(0, len(names), _SMALL_COMMANDS_PER_TRIP):
            # One key per UNLINK: a cluster pipeline sends each command to one slot's node.
            got = await self._pipeline(
                [("UNLINK", name) for name in names[start : start + _SMALL_COMMANDS_PER_TRIP]],
                "deleting blocks",
            )
            replies.extend(int(n) for n in got)
        return replies

    async def _unlink_best_effort(self, names: list[str]) -> None:
        try:
            await self._unlink(names)
        except KVStoreError as exc:
            log.warning(
                "%s: could not undo %d key(s) of a failed put (they expire with the TTL, if "
                "any): %s",
                self.name,
                len(names),
                exc,
            )

    async def _pipeline(
        self,
        commands: Sequence[tuple[Any, ...]],
        what: str,
        *,
        check: bool = True,
        lost_ok: bool = False,
    ) -> list[Any]:
        """Send ``commands`` in one pipelined round trip; their replies in order.

        Per-command errors come back as exception objects (``raise_on_error=False``), so a
        batch that failed half-way still tells which commands landed; ``check`` raises for
        them. In cluster mode the commands of a lost shard get a ``_LostShard`` reply, which
        ``check`` raises for unless ``lost_ok``.
        """
        async with self._bounded(what):
            client = self._client
            if isinstance(client, RedisCluster):
                replies = await self._fan_out(client, commands)
            else:
                replies = await self._send(client, commands)
        if any(isinstance(r, _LostShard) for r in replies):
            await self._rediscover(what, required=all(isinstance(r, _LostShard) for r in replies))
        if check:
            await self._check(replies, what, lost_ok=lost_ok)
        return replies

    @staticmethod
    async def _send(client: Redis | RedisCluster, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """One pipeline, unbounded (the caller bounds it); errors come back as replies."""
        pipe = client.pipeline(transaction=False)
        for command in commands:
            # execute_command rather than pipe.get/set/...: on a cluster pipeline some of
            # those helpers are coroutines that would silently queue nothing.
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _fan_out(
        self, client: RedisCluster, commands: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """One pipeline per shard, all at once; a lost shard's commands reply ``_LostShard``.

        Why not one cluster pipeline for the batch, as redis-py offers: it fails the whole batch
        when one shard refuses connections, so a dead shard would hide every other shard's
        blocks. A shard whose connection fails is asked once more on a fresh connection (a
        pooled connection may have been closed while idle, or the shard just came back), and
        only then taken for lost. A shard that hangs still ends the batch with ``_bounded``'s
        timeout: one timeout per batch, whatever the number of keys.
        """
        if not commands:
            return []
        await client.initialize()  # a no-op once the slot map is known
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, command in enumerate(commands):
            node = client.get_node_from_key(command[1])
            if node is None:  # not for primaries (replica=False); keeps mypy honest
                raise RedisClusterException(f"no node serves key {command[1]!r}")
            by_node.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(commands)

        async def one_shard(node: ClusterNode, positions: list[int]) -> None:
            reason = ""
            for attempt in range(2):
                if attempt:
                    # Stale pooled connections would each fail once more: drop them first (a
                    # call in flight on one of them gets its own second try).
                    with contextlib.suppress(RedisError, OSError):
                        await node.disconnect()
                try:
                    got = await self._send(client, [commands[i] for i in positions])
                except (RedisError, RedisClusterException, OSError) as exc:
                    if not _is_lost(exc):
                        raise
                    reason = f"{type(exc).__name__}: {exc}"
                    continue
                failed = []
                for i, reply in zip(positions, got, strict=True):
                    if isinstance(reply, BaseException) and _is_lost(reply):
                        # The connection broke mid-pipeline; the replies before it stand.
                        failed.append(i)
                        reason = f"{type(reply).__name__}: {reply}"
                    else:
                        replies[i] = reply
                if not failed:
                    self._shard_answered(node.name)
                    return
                positions = failed
            self._shard_lost(node.name, reason)
            for i in positions:
                replies[i] = _LostShard(node.name, reason)

        # Every shard finishes before an error is raised: none is left running unbounded.
        done = await asyncio.gather(
            *(one_shard(node, pos) for node, pos in by_node.values()), return_exceptions=True
        )
        for result in done:
            if isinstance(result, BaseException):
                raise result
        return replies

    def _shard_lost(self, node: str, reason: str) -> None:
        if node not in self._lost_since:
            self._lost_since[node] = time.monotonic()
            log.warning(
                "%s: shard %s of %s cannot be reached (%s); its blocks are reported missing, "
                "and writes to it fail, until it answers again",
                self.name,
                node,
                self._where,
                reason,
            )

    def _shard_answered(self, node: str) -> None:
        since = self._lost_since.pop(node, None)
        if since is not None:
            log.warning(
                "%s: shard %s of %s answers again after %.1f s",
                self.name,
                node,
                self._where,
                time.monotonic() - since,
            )

    def _count_unreachable(self, replies: list[Any]) -> None:
        self._num_unreachable += sum(1 for r in replies if isinstance(r, _LostShard))

    async def _rediscover(self, what: str, *, required: bool) -> None:
        """Read the slot map again after a shard was lost (at most once a second), so that a
        replica promoted in its place gets its commands. ``required``: no shard of the batch
        answered, so unless some node of the cluster does, the whole tier is unavailable
        (``TierUnavailableError``) rather than those blocks missing."""
        client = self._client
        now = time.monotonic()
        if not isinstance(client, RedisCluster) or now < self._next_discovery:
            return
        self._next_discovery = now + _REDISCOVERY_INTERVAL_S
        try:
            # The nodes manager keeps its nodes' connection pools across the refresh, unlike
            # client.aclose(), which would break the calls in flight on the healthy shards.
            async with self._bounded(f"reading the slot map after a lost shard while {what}"):
                await client.nodes_manager.initialize()
        except TierUnavailableError as exc:
            if required:
                raise
            log.info("%s: the slot map could not be read again: %s", self.name, exc)

    async def _check(self, replies: list[Any], what: str, *, lost_ok: bool = False) -> None:
        for reply in replies:
            if isinstance(reply, _LostShard):
                if lost_ok:
                    continue
                raise TierUnavailableError(
                    self.name,
                    f"Redis at {reply.node} (a shard of {self._where}) cannot be reached while "
                    f"{what}: {reply.reason}",
                )
            if isinstance(reply, BaseException):
                raise await self._failed(self._error(reply, what)) from reply

    async def _failed(self, error: TierError) -> TierError:
        """Hook run on every failure before it is raised; returns ``error``."""
        if isinstance(error, TierUnavailableError) and isinstance(self._client, RedisCluster):
            # redis-py re-reads the slot map when a node refuses connections, but not when one
            # hangs: timeouts come back as pipeline replies or cancellations, and a master that
            # hangs until its replica takes over would be asked forever. Dropping the
            # connections makes the next call rediscover the cluster (tested: without this the
            # tier never follows such a failover).
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._client.aclose()
            except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
                log.debug("%s: closing cluster connections after a failure: %s", self.name, exc)
        return error

    def _error(self, exc: BaseException, what: str) -> TierError:
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OutOfMemoryError) or (
            isinstance(exc, ResponseError) and str(exc).startswith("OOM")
        ):
            return TierFullError(
                self.name,
                f"Redis at {self._where} is out of memory (maxmemory reached, eviction off) "
                f"while {what}; nothing of this batch was kept: {detail}",
            )
        if isinstance(
            exc,
            RedisConnectionError
            | RedisTimeoutError
            | ClusterError
            | RedisClusterException
            | TryAgainError
            | ReadOnlyError
            | OSError,
        ):
            return TierUnavailableError(
                self.name, f"Redis at {self._where} is unavailable while {what}: {detail}"
            )
        return TierError(
            self.name, f"Redis at {self._where} refused a command while {what}: {detail}"
        )

    async def _scan_heads(self, *, lost_ok: bool) -> AsyncIterator[list[bytes]]:
        """Pages of names matching the head pattern, from every primary in cluster mode; with
        ``lost_ok`` a lost primary is left out (and its pages so far stand)."""
        # '{' and '}' are literal in Redis glob patterns, and the config refuses glob
        # characters in the prefix and namespace; the closing brace leaves chunk keys out.
        pattern = f"{self._key_base}{{*}}"
        client = self._client
        if isinstance(client, RedisCluster):
            async with self._bounded("discovering cluster nodes"):
                await client.initialize()
            for node in client.get_primaries():
                cursor = 0
                while True:
                    async with self._bounded("scanning keys"):
                        # The cluster client answers SCAN with ({node name: cursor}, names).
                        reply: Any = await self._scan_node(client, node, cursor, pattern)
                    if isinstance(reply, _LostShard):
                        await self._check([reply], "scanning keys", lost_ok=lost_ok)
                        break
                    yield list(reply[1])
                    cursor = int(reply[0][node.name])
                    if cursor == 0:
                        break
        else:
            cursor = 0
            while True:
                async with self._bounded("scanning keys"):
                    cursor, names = await client.scan(cursor, match=pattern, count=_SCAN_COUNT)
                # decode_responses is off: names are bytes.
                yield [name for name in names if isinstance(name, bytes)]
                if cursor == 0:
                    break

    async def _scan_node(
        self, client: RedisCluster, node: ClusterNode, cursor: int, pattern: str
    ) -> Any:
        """One SCAN page of one primary, asked twice like ``_fan_out`` asks a shard;
        ``_LostShard`` if it cannot be reached."""
        reason = ""
        for attempt in range(2):
            if attempt:
                with contextlib.suppress(RedisError, OSError):
                    await node.disconnect()
            try:
                reply = await client.execute_command(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT, target_nodes=node
                )
            except (RedisError, RedisClusterException, OSError) as exc:
                if not _is_lost(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                continue
            self._shard_answered(node.name)
            return reply
        self._shard_lost(node.name, reason)
        return _LostShard(node.name, reason)

    @asynccontextmanager
    async def _bounded(self, what: str) -> AsyncIterator[None]:
        """One round trip: a connection slot, at most ``timeout_ms``, errors mapped to ours."""
        async with self._in_flight:
            try:
                # redis-py bounds each socket read and write by socket_timeout; this bounds the
                # whole round trip, connecting and cluster slot discovery included.
                async with asyncio.timeout(self._timeout_s):
                    yield
                    # redis-py shields commands from cancellation (so that a cancelled read
                    # cannot leave a reply on a pooled connection) and then returns normally:
                    # both an outside cancel and our own timeout would be lost. Measured with
                    # redis-py 8.1: a cancelled pipeline completes with cancelling() == 1.
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError
            except TimeoutError:
                raise await self._failed(
                    TierUnavailableError(
                        self.name,
                        f"Redis at {self._where} did not answer within "
                        f"{self.config.timeout_ms} ms while {what}",
                    )
                ) from None
            except (RedisError, RedisClusterException, OSError) as exc:
                raise await self._failed(self._error(exc, what)) from exc
