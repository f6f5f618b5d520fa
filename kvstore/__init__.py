"""kvstore: a tiered KV-cache store for LLM inference.

The public surface of the storage layer: the namespace (``ModelSpec``), block hashing, the block
format and the error tree. Tiers live in the ``tiers`` package, clients in ``client``.

The block format's names are loaded on first use (PEP 562): every ``import kvstore.x`` runs this
file first, and most callers (the config loader, the CLI's option modules) need only the keys and
errors. ``kvstore.core.block_format`` itself imports torch only inside the functions that make or
read a tensor (about a second, which ``kvstore ls`` and the tiers must not pay).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore.core.errors import (
    BlockTooLargeError,
    ConfigError,
    CorruptBlockError,
    InvalidArgumentError,
    InvalidTokenError,
    KVStoreError,
    SpecMismatchError,
    TierError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.core.keys import BlockHash, ModelSpec, block_hashes, root_hash

if TYPE_CHECKING:
    from kvstore.core.block_format import (
        BlockHeader,
        Codec,
        decode_block,
        encode_block,
        read_header,
    )

_BLOCK_FORMAT = frozenset({"BlockHeader", "Codec", "decode_block", "encode_block", "read_header"})

__all__ = [
    "BlockHash",
    "BlockHeader",
    "BlockTooLargeError",
    "Codec",
    "ConfigError",
    "CorruptBlockError",
    "InvalidArgumentError",
    "InvalidTokenError",
    "KVStoreError",
    "ModelSpec",
    "SpecMismatchError",
    "TierError",
    "TierFullError",
    "TierUnavailableError",
    "block_hashes",
    "decode_block",
    "encode_block",
    "read_header",
    "root_hash",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _BLOCK_FORMAT:
        from kvstore.core import block_format

        return getattr(block_format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
