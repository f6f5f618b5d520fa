"""Block identity: the namespace of a model's cache (``ModelSpec``) and the chained block hashes.

Operations, in the order a caller uses them:

1. ``ModelSpec(...)`` — describe the model's cache; ``spec.fingerprint`` is a 16-byte digest of its
   canonical encoding.
2. ``root_hash(spec, salt)`` — ``h[-1]``, derived from the fingerprint and the tenant's salt.
3. ``block_hashes(spec, tokens, salt=..., extra_keys=...)`` — ``h[i] = H(h[i-1] || tokens of block i
   as u32 little-endian || extra keys of block i)`` for every *full* block of the prompt.

``H`` is blake2b with a 16-byte digest. Everything here is deterministic across processes, hosts
and languages: no ``hash()``, no pickle, no dependence on ``PYTHONHASHSEED``. The exact byte layouts
are written next to each function, and ``tests/test_keys.py`` freezes test vectors for them.
"""

from __future__ import annotations

import array
import functools
import hashlib
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NewType, TypeGuard, cast

import numpy as np

from kvstore.core.errors import ConfigError, InvalidArgumentError, InvalidTokenError

__all__ = [
    "DIGEST_BYTES",
    "DTYPES",
    "BlockHash",
    "ExtraKey",
    "ModelSpec",
    "block_hashes",
    "encode_extra_keys",
    "next_hash",
    "root_hash",
    "tokens_to_u32",
]

DIGEST_BYTES = 16

BlockHash = NewType("BlockHash", bytes)
"""A 16-byte blake2b digest naming one block of one prompt prefix in one namespace."""

ExtraKey = bytes | str | int
"""One extra key of a block (a LoRA adapter id, an image hash, ...)."""

# Stable codes: they are written into block headers, so a code is never reused or renumbered.
# name -> (code, itemsize in bytes). The float8 types are accepted wherever torch has them.
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (1, 4),
    "float16": (2, 2),
    "bfloat16": (3, 2),
    "float8_e4m3fn": (4, 1),
    "float8_e5m2": (5, 1),
    "float8_e4m3fnuz": (6, 1),
    "float8_e5m2fnuz": (7, 1),
}

_NAMESPACE_TAG = b"kvstore.namespace.v1\x00"
_ROOT_TAG = b"kvstore.root.v1\x00"
_U32_MAX = 0xFFFFFFFF
_U32LE = np.dtype("<u4")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The namespace of a model's KV cache. Blocks of different specs can never share a hash."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int = 256
    revision: str = ""
    tokenizer_id: str = ""
    fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("ModelSpec.model_id must not be empty")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelSpec.{name} must be an integer >= 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"ModelSpec.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}"
            )
        if self.block_nbytes >= 1 << 63:  # no uint64 field of the wire could state its size
            raise ConfigError(
                f"a block of ModelSpec {self.model_id!r} would be {self.block_nbytes} bytes "
                "(layers x 2 x block_tokens x kv_heads x head_dim x itemsize); no tier stores that"
            )
        digest = hashlib.blake2b(
            _NAMESPACE_TAG + self.canonical_encoding(), digest_size=DIGEST_BYTES
        ).digest()
        object.__setattr__(self, "fingerprint", digest)

    def canonical_encoding(self) -> bytes:
        """Compact JSON with sorted keys, ASCII only: reproducible in any language."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {
            "model_id",
            "num_layers",
            "num_kv_heads",
            "head_dim",
            "dtype",
            "block_tokens",
            "revision",
            "tokenizer_id",
        }
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown ModelSpec fields: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``[layers, 2 (K,V), block_tokens, kv_heads, head_dim]``."""
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block's raw payload (without the header)."""
        n = self.itemsize
        for dim in self.block_shape:
            n *= dim
        return n

    @property
    def name(self) -> str:
        """A short human-readable id: the model id and the first 8 hex digits of the fingerprint."""
        return f"{self.model_id}@{self.fingerprint.hex()[:8]}"


def root_hash(spec: ModelSpec, salt: bytes = b"") -> BlockHash:
    """``h[-1] = blake2b16("kvstore.root.v1\\0" || fingerprint || salt)``."""
    return _root_of(spec.fingerprint, bytes(salt))


# Every lookup of a prompt starts its chain here, for one of a few (namespace, tenant salt) pairs:
# a blake2b and its concatenations per call were ~5 us of a one-block Lookup's ~100 us in the
# server. Bounded, so that many namespaces cannot fill memory through it.
@functools.lru_cache(maxsize=1024)
def _root_of(fingerprint: bytes, salt: bytes) -> BlockHash:
    return BlockHash(
        hashlib.blake2b(_ROOT_TAG + fingerprint + salt, digest_size=DIGEST_BYTES).digest()
    )


def encode_extra_keys(keys: Sequence[ExtraKey]) -> bytes:
    """Canonical bytes of one block's extra keys.

    Each key is a tag byte (``b`` bytes, ``s`` UTF-8 string, ``i`` signed 64-bit integer)
    followed by a u32 little-endian length and the value; an ``i`` value is 8 bytes
    little-endian. The tags keep ``"7"``, ``b"7"`` and ``7`` apart.
    """
    out = bytearray()
    for key in keys:
        if isinstance(key, bool):
            raise InvalidArgumentError("extra keys must be bytes, str or int, not bool")
        if isinstance(key, bytes | bytearray | memoryview):
            tag, value = b"b", bytes(key)
        elif isinstance(key, str):
            tag, value = b"s", key.encode("utf-8")
        elif isinstance(key, int):
            if not -(2**63) <= key < 2**63:
                raise InvalidArgumentError(f"integer extra key {key} does not fit in 64 bits")
            tag, value = b"i", struct.pack("<q", key)
        else:
            raise InvalidArgumentError(
                f"extra keys must be bytes, str or int, got {type(key).__name__}"
            )
        out += tag + struct.pack("<I", len(value)) + value
    return bytes(out)


def next_hash(
    parent: bytes, block_tokens_u32le: bytes | memoryview, extra: bytes = b""
) -> BlockHash:
    """``blake2b16(parent || tokens as u32 LE || encoded extra keys)``.

    The parent is always 16 bytes and a block always has ``block_tokens`` tokens, so the fields
    need no length prefixes to stay unambiguous.
    """
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(block_tokens_u32le)
    if extra:
        h.update(extra)
    return BlockHash(h.digest())


def tokens_to_u32(tokens: Sequence[int] | np.ndarray[Any, Any] | Any) -> bytes:
    """Token ids as u32 little-endian bytes; a clear ``InvalidTokenError`` names the first bad one.

    Lists go through ``array('I')`` (C speed, range-checked); arrays and tensors through numpy.
    """
    if isinstance(tokens, list | tuple):
        try:
            arr = array.array("I", tokens)
        except (OverflowError, TypeError):
            _raise_bad_token(tokens)
        if arr.itemsize != 4:  # pragma: no cover - every platform we run on has 32-bit unsigned int
            return np.asarray(tokens, dtype="<u4").tobytes()
        if sys.byteorder == "big":  # pragma: no cover
            arr.byteswap()
        return arr.tobytes()
    if _is_u32le(tokens):
        # The server's tokens (np.frombuffer of the wire's u32 LE bytes): every value of the
        # type is a valid id, so the torch test and the checks below have nothing to find.
        return tokens.tobytes()
    if hasattr(tokens, "numpy") and hasattr(tokens, "detach"):  # a torch tensor
        tokens = tokens.detach().cpu().numpy()
    np_tokens = np.asarray(tokens)
    if np_tokens.ndim != 1:
        raise InvalidTokenError(f"tokens must be one-dimensional, got shape {np_tokens.shape}")
    if np_tokens.size == 0:
        return b""
    if np_tokens.dtype.kind not in "iu":
        raise InvalidTokenError(f"token ids must be integers, got an array of {np_tokens.dtype}")
    # Unsigned ids of at most 32 bits (the server's u32 tokens from the wire) are all in range.
    if np_tokens.dtype.kind == "i" or np_tokens.dtype.itemsize > 4:
        lo, hi = int(np_tokens.min()), int(np_tokens.max())
        if lo < 0 or hi > _U32_MAX:
            _raise_bad_token(np_tokens.tolist())
    return np_tokens.astype("<u4", copy=False).tobytes()


def _raise_bad_token(tokens: Sequence[Any]) -> None:
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InvalidTokenError(
                f"token {i} is {t!r} ({type(t).__name__}); token ids are integers"
            )
        if not 0 <= int(t) <= _U32_MAX:
            raise InvalidTokenError(f"token {i} is {t}; token ids must be in [0, 2**32)")
    raise InvalidTokenError("token ids must be integers in [0, 2**32)")  # pragma: no cover


def block_hashes(
    spec: ModelSpec,
    tokens: Sequence[int] | np.ndarray[Any, Any] | Any,
    *,
    salt: bytes = b"",
    extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    parent: bytes | None = None,
) -> list[BlockHash]:
    """The chained hash of every full block of ``tokens``; a trailing partial block is ignored.

    ``extra_keys[i]`` are the extra keys of block ``i`` (one entry per full block, or ``None``).
    ``parent`` continues a chain (the hash of the block before ``tokens[0]``) instead of starting
    at the namespace root.
    """
    view = _u32_view(tokens)
    step = 4 * spec.block_tokens
    num_blocks = len(view) // step
    if extra_keys is not None and len(extra_keys) < num_blocks:
        raise InvalidArgumentError(
            f"extra_keys has {len(extra_keys)} entries but the prompt has {num_blocks} full blocks"
        )
    h: bytes
    if parent is None:
        h = root_hash(spec, salt)
    else:
        if len(parent) != DIGEST_BYTES:
            raise InvalidArgumentError(
                f"parent hash must be {DIGEST_BYTES} bytes, got {len(parent)}"
            )
        h = bytes(parent)
    # The loop is ``next_hash`` written out: at 16 tokens per block a 128K-token prompt is 8192
    # blocks, and a function call, a ``BlockHash`` wrapper and an extra-keys test per block cost
    # 40% on top of blake2b itself (5.7 against 4.1 ms). ``BlockHash`` is a NewType, so the plain
    # digests are already what it would return.
    blake2b = hashlib.blake2b
    digests: list[bytes] = []
    append = digests.append
    if extra_keys is None:
        for start in range(0, num_blocks * step, step):
            hasher = blake2b(h, digest_size=DIGEST_BYTES)
            hasher.update(view[start : start + step])
            h = hasher.digest()
            append(h)
    else:
        for i in range(num_blocks):
            hasher = blake2b(h, digest_size=DIGEST_BYTES)
            hasher.update(view[i * step : (i + 1) * step])
            if extra_keys[i]:
                hasher.update(encode_extra_keys(extra_keys[i]))
            h = hasher.digest()
            append(h)
    return cast(list[BlockHash], digests)


def _u32_view(tokens: Sequence[int] | np.ndarray[Any, Any] | Any) -> memoryview:
    """The bytes of ``tokens_to_u32(tokens)``, without a copy of a contiguous u32 LE array (the
    server's tokens, read from the wire)."""
    if _is_u32le(tokens):
        try:
            return tokens.data.cast("B")
        except (TypeError, ValueError):  # not contiguous, or not in this machine's byte order
            pass
    return memoryview(tokens_to_u32(tokens))


def _is_u32le(tokens: object) -> TypeGuard[np.ndarray[Any, Any]]:
    """A 1-D numpy array of u32 LE: token ids as the wire carries them, each one valid."""
    return type(tokens) is np.ndarray and tokens.ndim == 1 and tokens.dtype == _U32LE
