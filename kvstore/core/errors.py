"""The exception tree of kvstore: every error that crosses a module boundary is one of these.

::

    KVStoreError
     ├── ConfigError              a setting is missing, out of range or inconsistent
     ├── InvalidArgumentError     the caller sent something malformed (also a ValueError)
     │    ├── InvalidTokenError   a token id is not an integer in [0, 2**32)
     │    ├── SpecMismatchError   a tensor's dtype or shape does not match the namespace
     │    └── BlockTooLargeError  a block does not fit a tier's slot
     ├── CorruptBlockError        stored bytes fail verification (checksum, header, hash, namespace)
     ├── OverloadedError          background moves are behind; a put could not be admitted in time
     └── TierError                a tier could not do what was asked
          ├── TierFullError       no room; the tier never evicts by itself, placement decides
          └── TierUnavailableError  the backing store is down or did not answer in time

A miss is never an error: tiers return ``None`` for absent blocks.
"""

from __future__ import annotations

__all__ = [
    "BlockTooLargeError",
    "ConfigError",
    "CorruptBlockError",
    "InvalidArgumentError",
    "InvalidTokenError",
    "KVStoreError",
    "OverloadedError",
    "SpecMismatchError",
    "TierError",
    "TierFullError",
    "TierUnavailableError",
]


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""


class ConfigError(KVStoreError):
    """A configuration value is missing, out of range, or contradicts another one."""


class InvalidArgumentError(KVStoreError, ValueError):
    """The caller passed something malformed; nothing was changed."""


class InvalidTokenError(InvalidArgumentError):
    """A token id is not an integer in ``[0, 2**32)``."""


class SpecMismatchError(InvalidArgumentError):
    """A tensor's dtype or shape does not match the namespace (``ModelSpec``)."""


class BlockTooLargeError(InvalidArgumentError):
    """A block is larger than the slot size of a slotted tier (G1, G2)."""


class CorruptBlockError(KVStoreError):
    """Stored bytes failed verification; the block must be treated as missing."""


class OverloadedError(KVStoreError):
    """Background copies are behind and a put could not be admitted within its timeout."""


class TierError(KVStoreError):
    """A tier could not carry out an operation."""

    def __init__(self, tier: str, message: str) -> None:
        super().__init__(f"{tier}: {message}")
        self.tier = tier


class TierFullError(TierError):
    """The tier has no room left for the blocks being put."""


class TierUnavailableError(TierError):
    """The backing store is down or did not answer within the configured timeout."""
