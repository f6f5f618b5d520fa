"""``RedisTier`` (G4): encoded blocks in a Redis server or Redis Cluster that every node shares.

Operations, in the order a caller uses them (the contract is ``tiers.base.Tier``):

1. ``RedisTier(RedisTierConfig(url=..., capacity_bytes=...))`` — no connection yet; the first
   operation connects (and, in cluster mode, discovers the slot map).
2. ``put`` — skip blocks whose head already exists, write the chunks of large blocks, then the
   heads with ``SET NX``; an ``OOM`` reply undoes the batch and raises ``TierFullError``.
3. ``exists`` / ``get`` / ``get_into`` — one pipelined round trip for the heads, one more for
   the chunks of chunked blocks (``get_into`` copies them straight into the caller's buffer);
   the base class verifies every block returned.
4. ``delete`` / ``iter_keys`` / ``stats`` / ``close``.

Key layout (``<hash>`` is the 32 hex digits of the block hash; the braces are literal)::

    <key_prefix>:<namespace>:{<hash>}       head: the encoded block (magic b"KVBK"), or for a
                                            block larger than chunk_bytes a 16-byte manifest:
                                            b"KVCM", u32 number of chunks, u64 total bytes (LE)
    <key_prefix>:<namespace>:{<hash>}:<i>   chunk i (0-based) of a chunked block

The braces around the hash are a Redis Cluster hash tag: a block's head and chunks share one slot
(one shard, one pipeline per shard), while the blocks of a chain hash to different slots and
spread over the shards. Every Redis round trip is bounded by ``timeout_ms``; a server that is
down, stopped or overloaded raises ``TierUnavailableError`` and never hangs the caller.

Lost shards (cluster mode): a round trip goes to every shard it touches at once, one pipeline per
shard. A shard that refuses or drops connections (twice: the second try is on a fresh connection)
is *lost*: ``get``, ``get_into`` and ``exists`` report its blocks missing while the other shards'
blocks come back, counted in ``stats().num_unreachable``, with one warning when a shard is lost
and one when it answers again. Writes and deletes that touch a lost shard raise
``TierUnavailableError`` and ``put`` writes nothing of such a batch. A shard that is connected but
does not answer within ``timeout_ms`` (hung, or a failover under way) still fails the whole call:
its blocks are probably still there. After a loss the slot map is read again (at most once a
second), so a replica promoted in its place is followed, and a shard that comes back on the same
address is used again, without recreating the tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

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

from kvstore.block_format import HEADER_BYTES, Codec, transcode_block
from kvstore.errors import (
    ConfigError,
    CorruptBlockError,
    InvalidArgumentError,
    KVStoreError,
    TierError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.keys import DIGEST_BYTES, BlockHash
from tiers.base import (
    BlockBytes,
    Buffer,
    CorruptionCallback,
    Read,
    Tier,
    TierStats,
    check_capacity,
    check_fits,
)

__all__ = ["MANIFEST_MAGIC", "RedisTier", "RedisTierConfig", "RedisTierStats", "parse_manifest"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TIER_NAME = "G4"

MANIFEST_MAGIC = b"KVCM"
_MANIFEST = struct.Struct("<4sIQ")

# Redis refuses bulk strings above proto-max-bulk-len (512 MiB by default).
_MAX_CHUNK_BYTES = 512 * 1024 * 1024
_MIN_CHUNK_BYTES = 1024
# Sanity bounds for manifests read back, so that a garbled one cannot make us fetch or unlink
# billions of keys: 64 GiB is far above any block (a 4 GB block is already fp32 K/V of 256
# tokens of a 128-layer, 128-head model), and every chunk but the last is >= _MIN_CHUNK_BYTES.
_MAX_MANIFEST_BYTES = 1 << 36
# One pipelined round trip carries at most this much payload. timeout_ms bounds each round
# trip, so an unbounded batch (hundreds of MiB) would time out on a slow link even though the
# server answers fine; 64 MiB needs only 32 MB/s at the default 2 s, and measured here redis-py
# moves about 1 GB/s on loopback, so splitting costs a few round trips and nothing else.
# Parallel pipelines were measured too: no faster, redis-py's reply parsing is CPU-bound.
_ROUND_TRIP_BYTES = 64 * 1024 * 1024
# Writes go in smaller round trips: redis-py's asyncio pipeline copies its whole command buffer
# (twice, on Python 3.11) before sending, so a 64 MiB write spends more time copying than
# sending; measured here, 32 MiB puts went from 0.91 to 1.74 GB/s with 8 MiB per write trip.
_WRITE_ROUND_TRIP_BYTES = 8 * 1024 * 1024
# Commands per round trip when replies are small (EXISTS, STRLEN, UNLINK, GETRANGE of 16 bytes).
_SMALL_COMMANDS_PER_TRIP = 4096
_SCAN_COUNT = 1000
# Batches smaller than this compress inline: a few small blocks are not worth a thread hop.
_TRANSCODE_INLINE_BYTES = 1024 * 1024
# After a shard was lost, the slot map is read again at most this often: each reading makes
# redis-py reconnect to every node, so once per failed batch would churn connections under load.
_REDISCOVERY_INTERVAL_S = 1.0
# Characters that would break the key layout: braces move the cluster hash tag, glob characters
# break the SCAN pattern, whitespace and control characters make keys unreadable in redis-cli.
_FORBIDDEN_KEY_CHARS = frozenset("{}*?[]\\")


@dataclass(frozen=True, slots=True)
class RedisTierConfig:
    """Settings of the G4 tier; validated at construction (``ConfigError``)."""

    url: str
    """``redis://[user:password@]host:port/db``, ``rediss://...`` or ``unix:///path/to.sock``."""
    capacity_bytes: int
    """The operator's budget for this namespace; reported in stats. Redis' own ``maxmemory``
    is what actually refuses writes (``TierFullError``)."""
    cluster: bool = False
    key_prefix: str = "kvstore"
    namespace: str = "default"
    ttl_s: float | None = None
    timeout_ms: int = 2000
    chunk_bytes: int = 2 * 1024 * 1024
    codec: Codec = Codec.RAW
    zstd_level: int = 1
    max_connections: int = 32

    def __post_init__(self) -> None:
        check_capacity("RedisTierConfig", self.capacity_bytes)
        _check_url(self.url, self.cluster)
        _check_key_part("key_prefix", self.key_prefix, allow_colon=True)
        # The namespace may not contain ':' so that "prefix:namespace:{hash}" splits one way only.
        _check_key_part("namespace", self.namespace, allow_colon=False)
        if self.ttl_s is not None and (
            isinstance(self.ttl_s, bool)
            or not isinstance(self.ttl_s, int | float)
            or not math.isfinite(self.ttl_s)
            or self.ttl_s < 0.001
        ):
            raise ConfigError(
                f"RedisTierConfig.ttl_s must be None (no expiry) or a number of seconds >= 0.001, "
                f"got {self.ttl_s!r}"
            )
        _check_int("timeout_ms", self.timeout_ms, 1, 3_600_000)
        _check_int("chunk_bytes", self.chunk_bytes, _MIN_CHUNK_BYTES, _MAX_CHUNK_BYTES)
        if not isinstance(self.codec, Codec):
            raise ConfigError(
                f"RedisTierConfig.codec must be a kvstore.block_format.Codec, got {self.codec!r}"
            )
        _check_int("zstd_level", self.zstd_level, 1, 22)
        _check_int("max_connections", self.max_connections, 1, 65_536)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(
            f"RedisTierConfig.{name} must be an integer in [{lo}, {hi}], got {value!r}"
        )


def _check_url(url: object, cluster: bool) -> None:
    if not isinstance(url, str) or not url:
        raise ConfigError(f"RedisTierConfig.url must be a non-empty string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigError(f"RedisTierConfig.url {_redact(url)!r} names no host")
        try:
            parts.port  # noqa: B018 - urlsplit only validates the port when it is read
        except ValueError:
            raise ConfigError(f"RedisTierConfig.url {_redact(url)!r} has a bad port") from None
    elif parts.scheme == "unix":
        if cluster:
            raise ConfigError(
                "RedisTierConfig.url: Redis Cluster needs redis:// or rediss:// addresses, "
                "not a unix socket"
            )
        if not parts.path:
            raise ConfigError(f"RedisTierConfig.url {url!r} names no socket path")
    else:
        raise ConfigError(
            f"RedisTierConfig.url {_redact(url)!r} must start with redis://, rediss:// or unix://"
        )


def _check_key_part(name: str, value: object, *, allow_colon: bool) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"RedisTierConfig.{name} must be a non-empty string, got {value!r}")
    bad = sorted(
        {c for c in value if c in _FORBIDDEN_KEY_CHARS or not c.isprintable() or c.isspace()}
        | ({":"} if not allow_colon and ":" in value else set())
    )
    if bad:
        raise ConfigError(
            f"RedisTierConfig.{name} {value!r} contains {''.join(bad)!r}; "
            f"braces, glob characters, whitespace{'' if allow_colon else ' and colons'} "
            f"would break the key layout"
        )


def _redact(url: str) -> str:
    """The url without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def parse_manifest(value: bytes) -> tuple[int, int] | None:
    """``(num_chunks, total_bytes)`` if ``value`` is a well-formed manifest, else ``None``."""
    if len(value) != _MANIFEST.size or value[:4] != MANIFEST_MAGIC:
        return None
    _, num_chunks, total = _MANIFEST.unpack(value)
    if not (total <= _MAX_MANIFEST_BYTES and 2 <= num_chunks <= -(-total // _MIN_CHUNK_BYTES)):
        return None
    return num_chunks, total


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


def _byte_view(value: Buffer) -> memoryview:
    view = memoryview(value)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass(frozen=True, slots=True)
class RedisTierStats(TierStats):
    num_unreachable: int = 0
    """Blocks that ``get``/``get_into``/``exists`` reported missing because their cluster shard
    could not be reached (they may still be stored there); always 0 for a standalone server."""


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


class RedisTier(Tier):
    """G4: one class for a standalone server and for Redis Cluster (``config.cluster``)."""

    verify_reads = True

    def __init__(
        self, config: RedisTierConfig, on_corrupt: CorruptionCallback | None = None
    ) -> None:
        super().__init__(TIER_NAME, config.capacity_bytes, on_corrupt)
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

    # -- the contract -------------------------------------------------------------------------

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        out, manifests = await self._read_heads(keys)
        if manifests:
            parts: dict[int, list[bytes]] = {i: [] for i, _, _ in manifests}
            missing = await self._read_chunks(
                keys, manifests, lambda i, chunk: parts[i].append(chunk)
            )
            for i, _, _ in manifests:
                if i not in missing:
                    # One allocation and one copy of each chunk, as filling a preallocated
                    # bytearray would cost; the chunks themselves are freed right after.
                    out[i] = b"".join(parts.pop(i))
        return out

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        # Chunks go straight into the caller's buffer: no joined copy of the block in between.
        heads, manifests = await self._read_heads(keys)
        reads: list[Read | None] = [None] * len(keys)
        for i, value in enumerate(heads):
            if value is not None:
                check_fits(keys[i], len(value), views[i])
                views[i][: len(value)] = value
                reads[i] = Read(len(value))
        if not manifests:
            return reads
        filled = {i: 0 for i, _, _ in manifests}
        totals = {i: total for i, _, total in manifests}
        for i, _, total in manifests:
            check_fits(keys[i], total, views[i])

        def take(i: int, chunk: bytes) -> None:
            start, end = filled[i], filled[i] + len(chunk)
            if end <= totals[i]:
                views[i][start:end] = chunk
            filled[i] = end

        missing = await self._read_chunks(keys, manifests, take)
        garbled: list[BlockHash] = []
        for i, _, total in manifests:
            if i in missing:
                continue
            if filled[i] == total:
                reads[i] = Read(total)
            else:
                # get() hands the joined bytes to the base class, whose length check catches
                # this; here the buffer would hide it, so it is reported the same way here.
                garbled.append(keys[i])
                self._report_corrupt(
                    keys[i], f"chunks add up to {filled[i]} bytes, the manifest says {total}"
                )
        if garbled:
            await self._delete(garbled)
        return reads

    async def _read_heads(
        self, keys: list[BlockHash]
    ) -> tuple[list[BlockBytes | None], list[tuple[int, int, int]]]:
        """The values of small blocks, and ``(position, num_chunks, total)`` of chunked ones."""
        out: list[BlockBytes | None] = [None] * len(keys)
        manifests: list[tuple[int, int, int]] = []
        # A head holds at most chunk_bytes (more only if another node wrote it with a larger
        # setting, which then merely stretches the round-trip budget).
        per_trip = max(1, _ROUND_TRIP_BYTES // self.config.chunk_bytes)
        for start in range(0, len(keys), per_trip):
            positions = range(start, min(start + per_trip, len(keys)))
            replies = await self._pipeline(
                [("GET", self.head_key(keys[i])) for i in positions],
                "reading block heads",
                lost_ok=True,
            )
            self._count_unreachable(replies)
            for i, value in zip(positions, replies, strict=True):
                if value is None or isinstance(value, _LostShard):
                    continue
                manifest = parse_manifest(value)
                if manifest is None:
                    # A block, or a garbled manifest that the base class then reports as corrupt.
                    out[i] = value
                else:
                    manifests.append((i, *manifest))
        return out, manifests

    async def _read_chunks(
        self,
        keys: list[BlockHash],
        manifests: list[tuple[int, int, int]],
        take: Callable[[int, bytes], None],
    ) -> set[int]:
        """Hand every chunk to ``take(position, chunk)`` in order; the positions whose block
        lost a chunk (those blocks are removed) or whose shard was lost since its head was read
        (those are only missing)."""
        # (position, chunk index, approximate size): the size only splits the round trips.
        wanted = [(i, c, -(-total // num)) for i, num, total in manifests for c in range(num)]
        missing: set[int] = set()
        unreachable: set[int] = set()
        for group in _groups(wanted, lambda w: w[2], _ROUND_TRIP_BYTES):
            replies = await self._pipeline(
                [("GET", self.chunk_key(keys[i], c)) for i, c, _ in group],
                "reading block chunks",
                lost_ok=True,
            )
            for (i, _, _), value in zip(group, replies, strict=True):
                if isinstance(value, _LostShard):
                    unreachable.add(i)
                elif value is None:
                    missing.add(i)
                elif i not in missing and i not in unreachable:
                    take(i, value)
        # A block's chunks share its head's shard, so a block is either lost or unreachable.
        missing -= unreachable
        self._num_unreachable += len(unreachable)
        if missing:
            # A chunk expired or was evicted (allkeys-* maxmemory policies evict chunks one by
            # one): the block is gone, so drop its head and the chunks left behind.
            lost = [m for m in manifests if m[0] in missing]
            log.info("%s: %d chunked block(s) lost a chunk; removing them", self.name, len(lost))
            await self._unlink([k for i, num, _ in lost for k in self._block_keys(keys[i], num)])
        return missing | unreachable

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        # A lost shard fails the batch here, before anything is written: the contract is all or
        # nothing, and the engine writes G4 one block per put, so only that shard's blocks fail.
        present = await self._heads_exist([key for key, _ in items], lost_ok=False)
        new = [item for item, there in zip(items, present, strict=True) if not there]
        if not new:
            return 0
        values = await self._encode([value for _, value in new])
        chunks: list[tuple[str, Buffer]] = []
        heads: list[tuple[str, Buffer]] = []
        cb = self.config.chunk_bytes
        for (key, _), value in zip(new, values, strict=True):
            view = _byte_view(value)
            # The header does not count: a block whose payload fits chunk_bytes stays whole
            # (a 2 MiB block would otherwise be a 2 MiB chunk, a 128-byte chunk and a manifest:
            # three round trips' worth of keys for one block).
            if len(view) <= cb + HEADER_BYTES:
                heads.append((self.head_key(key), view))
                continue
            # Equal parts, each at most chunk_bytes; slices of a memoryview, which redis-py
            # writes to the socket without copying.
            num = -(-len(view) // cb)
            size = -(-len(view) // num)
            chunks.extend(
                (self.chunk_key(key, c), view[c * size : (c + 1) * size]) for c in range(num)
            )
            heads.append((self.head_key(key), _MANIFEST.pack(MANIFEST_MAGIC, num, len(view))))
        written: list[str] = []
        try:
            # Every chunk of the batch lands before any head that points at it, so a reader
            # never follows a manifest to a chunk that is still on its way.
            await self._write(chunks, nx=False, written=written)
            # NX keeps puts idempotent when another node stores the same block concurrently;
            # only the heads this call created count as newly stored.
            return await self._write(heads, nx=True, written=written)
        except TierFullError:
            # All-or-nothing: undo what this batch wrote. Redis accepts deletes when it is out
            # of memory.
            await self._unlink_best_effort(written)
            raise

    async def _encode(self, values: list[Buffer]) -> list[Buffer]:
        codec, level = self.config.codec, self.config.zstd_level
        if codec is Codec.RAW:
            return values

        def one(value: Buffer) -> bytes:
            try:
                return transcode_block(value, codec, level=level)
            except CorruptBlockError as exc:
                raise InvalidArgumentError(f"value is not an intact block: {exc}") from None

        if sum(len(_byte_view(v)) for v in values) < _TRANSCODE_INLINE_BYTES:
            return [one(v) for v in values]
        # zstd releases the GIL, so blocks compress in parallel threads and the event loop
        # keeps serving other requests meanwhile.
        return list(await asyncio.gather(*(asyncio.to_thread(one, v) for v in values)))

    async def _write(self, pairs: list[tuple[str, Buffer]], *, nx: bool, written: list[str]) -> int:
        """SET every pair (``NX`` if asked) with the TTL; the names set go into ``written``."""
        options: tuple[str | int, ...] = ("NX",) if nx else ()
        if self._ttl_ms is not None:
            options += ("PX", self._ttl_ms)
        num_set = 0
        for group in _groups(pairs, lambda p: len(p[1]), _WRITE_ROUND_TRIP_BYTES):
            replies = await self._pipeline(
                [("SET", name, value, *options) for name, value in group],
                "writing blocks",
                check=False,
            )
            # Record what landed before raising for what did not, so it can be undone.
            for (name, _), reply in zip(group, replies, strict=True):
                if reply is True:
                    written.append(name)
                    num_set += 1
            await self._check(replies, "writing blocks")
        return num_set

    async def _delete(self, keys: list[BlockHash]) -> int:
        removed = 0
        for start in range(0, len(keys), _SMALL_COMMANDS_PER_TRIP):
            group = keys[start : start + _SMALL_COMMANDS_PER_TRIP]
            # The head says whether chunks go with it; GETRANGE reads 16 bytes of it, whatever
            # the size of the block.
            prefixes = await self._pipeline(
                [("GETRANGE", self.head_key(k), 0, _MANIFEST.size - 1) for k in group],
                "reading block heads to delete",
            )
            names: list[str] = []
            for key, prefix in zip(group, prefixes, strict=True):
                manifest = parse_manifest(prefix) if prefix else None
                # The head goes first: once it is gone no reader looks for the chunks.
                names.extend(self._block_keys(key, manifest[0] if manifest else 0))
            replies = await self._unlink(names)
            heads = {self.head_key(key) for key in group}
            removed += sum(1 for name, n in zip(names, replies, strict=True) if n and name in heads)
        return removed

    async def _exists(self, keys: list[BlockHash]) -> list[bool]:
        return await self._heads_exist(keys, lost_ok=True)

    async def _heads_exist(self, keys: list[BlockHash], *, lost_ok: bool) -> list[bool]:
        """Whether each block's head is stored; with ``lost_ok`` a lost shard's are False."""
        out: list[bool] = []
        for start in range(0, len(keys), _SMALL_COMMANDS_PER_TRIP):
            group = keys[start : start + _SMALL_COMMANDS_PER_TRIP]
            replies = await self._pipeline(
                [("EXISTS", self.head_key(key)) for key in group],
                "checking block heads",
                lost_ok=lost_ok,
            )
            self._count_unreachable(replies)
            out.extend(not isinstance(n, _LostShard) and bool(n) for n in replies)
        return out

    def _keys(self) -> AsyncIterator[BlockHash]:
        return self._scanned_keys(lost_ok=False)

    async def _scanned_keys(self, *, lost_ok: bool) -> AsyncIterator[BlockHash]:
        # SCAN may return a key more than once; the set keeps each block once.
        seen: set[BlockHash] = set()
        async for page in self._scan_heads(lost_ok=lost_ok):
            for name in page:
                key = self._key_of_head(name)
                if key is not None and key not in seen:
                    seen.add(key)
                    yield key

    async def _usage(self) -> tuple[int, int]:
        # Stats count what the reachable shards hold: a lost shard must not hide the others'
        # numbers, nor num_unreachable, which says why they are lower.
        heads = [self.head_key(key) async for key in self._scanned_keys(lost_ok=True)]
        used = num = 0
        for start in range(0, len(heads), _SMALL_COMMANDS_PER_TRIP):
            group = heads[start : start + _SMALL_COMMANDS_PER_TRIP]
            replies = await self._pipeline(
                [
                    cmd
                    for name in group
                    for cmd in (("STRLEN", name), ("GETRANGE", name, 0, _MANIFEST.size - 1))
                ],
                "measuring blocks",
                lost_ok=True,
            )
            for length, prefix in zip(replies[0::2], replies[1::2], strict=True):
                if not length or isinstance(length, _LostShard) or isinstance(prefix, _LostShard):
                    continue  # expired or deleted since the scan, or its shard was lost since
                manifest = parse_manifest(prefix)
                used += manifest[1] if manifest else length
                num += 1
        return used, num

    async def stats(self) -> RedisTierStats:
        base = await super().stats()
        fields = {name: getattr(base, name) for name in TierStats.__dataclass_fields__}
        return RedisTierStats(**fields, num_unreachable=self._num_unreachable)

    async def close(self) -> None:
        await self._client.aclose()

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
