"""The engine's own settings (``EngineConfig``) and the shape of the configuration it opens
(``StoreLayout``): which tiers run with which settings, the placement policy, the engine's
settings. ``kvstore.config.StoreConfig`` composes every layer's config and satisfies this protocol;
the engine never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kvstore.core.errors import ConfigError
from kvstore.engine.placement import PlacementConfig
from tiers.gpu_memory import GpuTierConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

__all__ = ["EngineConfig", "StoreLayout"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    move_queue_blocks: int = 4096  # pending background copies; puts wait when it is full
    num_movers: int = 2
    admit_timeout_ms: int = 2000  # how long a put waits for room before OverloadedError
    default_lease_ttl_s: float = 30.0
    max_lease_ttl_s: float = 600.0
    reaper_interval_s: float = 0.5  # expired leases and pins are reclaimed this often
    event_log_size: int = 65536
    g4_probe: bool = True  # lookups ask G4 for blocks this node does not know
    # After a copy into a tier fails because the tier is down (Redis unreachable, a disk
    # error), durable puts that need the tier are refused at once with TierUnavailableError, and
    # background copies into it are skipped, for this long; then the next copy tries again.
    tier_retry_s: float = 5.0

    def __post_init__(self) -> None:
        if self.move_queue_blocks < 1 or self.num_movers < 1:
            raise ConfigError("engine.move_queue_blocks and engine.num_movers must be >= 1")
        if not 0 < self.default_lease_ttl_s <= self.max_lease_ttl_s:
            raise ConfigError("engine lease ttls need 0 < default_lease_ttl_s <= max_lease_ttl_s")
        if self.admit_timeout_ms < 0 or self.reaper_interval_s <= 0:
            raise ConfigError("engine.admit_timeout_ms >= 0 and reaper_interval_s > 0 required")
        if not self.tier_retry_s >= 0:
            raise ConfigError("engine.tier_retry_s must be >= 0")



class StoreLayout(Protocol):
    """What ``Engine.open`` reads of a configuration: G2 always, the other tiers where enabled."""

    @property
    def g1(self) -> GpuTierConfig | None: ...
    @property
    def g2(self) -> PinnedTierConfig: ...
    @property
    def g3(self) -> LmdbTierConfig | None: ...
    @property
    def g4(self) -> RedisTierConfig | None: ...
    @property
    def placement(self) -> PlacementConfig: ...
    @property
    def engine(self) -> EngineConfig: ...
    def tiers(self) -> list[tuple[str, Any]]: ...
