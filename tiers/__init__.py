"""Storage tiers: batched async stores of block hash -> encoded block bytes.

G1 ``GpuMemoryTier``, G2 ``PinnedMemoryTier``, G3 ``LmdbTier``, G4 ``RedisTier``, and ``DictTier``
for tests. They share one contract (``tiers.base.Tier``); tiers import nothing of kvstore but its
block identity (keys, block format) and its errors.
"""

from tiers.base import Tier, TierStats
from tiers.dict_store import DictTier, DictTierConfig
from tiers.gpu_memory import GpuMemoryTier, GpuTierConfig
from tiers.lmdb_store import LmdbTier, LmdbTierConfig
from tiers.pinned_memory import PinnedMemoryTier, PinnedTierConfig
from tiers.redis_store import RedisTier, RedisTierConfig

__all__ = [
    "DictTier",
    "DictTierConfig",
    "GpuMemoryTier",
    "GpuTierConfig",
    "LmdbTier",
    "LmdbTierConfig",
    "PinnedMemoryTier",
    "PinnedTierConfig",
    "RedisTier",
    "RedisTierConfig",
    "Tier",
    "TierStats",
]
