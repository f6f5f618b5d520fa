"""kvstore: a tiered KV-cache store for LLM inference.

The public surface of the storage layer: the namespace (``ModelSpec``), block hashing, the block
format and the error tree. Tiers live in the ``tiers`` package, clients in ``client``.
"""

from kvstore.block_format import BlockHeader, Codec, decode_block, encode_block, read_header
from kvstore.errors import (
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
from kvstore.keys import BlockHash, ModelSpec, block_hashes, root_hash

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
