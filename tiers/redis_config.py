"""The settings of the Redis tier (G4), their checks, and the manifest a chunked block's head
holds. The key layout and the tier's behaviour are described in ``tiers.redis_store``."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from kvstore.core.block_format import Codec
from kvstore.core.errors import ConfigError
from tiers.base import check_capacity

__all__ = ["MANIFEST_MAGIC", "RedisTierConfig", "parse_manifest"]

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
                f"RedisTierConfig.codec must be a block_format.Codec, got {self.codec!r}"
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
