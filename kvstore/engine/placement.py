"""Placement: which tier a block goes to, when a tier must shed blocks, and where they go. Pure.

Decisions, in the order the engine asks for them:

1. ``top`` — where puts land: the hottest configured tier (G2, or G1 when the engine shares the
   GPU).
2. ``write_through`` — the lower tiers that get a copy right after a put (the others receive
   blocks only when evicted from above: write-back).
3. ``bytes_to_free(tier, used, incoming)`` — eviction starts when a tier would pass its high
   watermark and goes down to its low watermark, so a busy tier does not evict on every put.
4. ``demote_to(tier, resident)`` — an evicted block is copied to the next tier down unless it
   is already there; from the bottom tier it is dropped.
5. ``promote_to(hit_tier)`` — a hit in a lower tier is copied up to the top tier.

The victims themselves (LRU, leaf-first, skipping leased and pinned blocks) come from the index,
which has the structure to find them without a scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvstore.core.errors import ConfigError

__all__ = ["Placement", "PlacementConfig", "WriteMode"]

WriteMode = Literal["through", "back"]


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    promote_on_hit: bool = True
    # How each tier below the top receives blocks. G2 only matters when G1 is on.
    g2_write: WriteMode = "back"
    g3_write: WriteMode = "through"
    g4_write: WriteMode = "through"

    def __post_init__(self) -> None:
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ConfigError(
                "placement watermarks need 0 < low_watermark < high_watermark <= 1, got "
                f"{self.low_watermark} and {self.high_watermark}"
            )
        for name in ("g2_write", "g3_write", "g4_write"):
            if getattr(self, name) not in ("through", "back"):
                raise ConfigError(f"placement.{name} must be 'through' or 'back'")

    def write_mode(self, tier: str) -> WriteMode:
        mode: WriteMode = getattr(self, f"{tier.lower()}_write")
        return mode


class Placement:
    def __init__(self, config: PlacementConfig, tiers: Sequence[tuple[str, int]]) -> None:
        """``tiers``: ``(name, capacity_bytes)`` of the configured tiers, hottest first."""
        if not tiers:
            raise ConfigError("placement needs at least one tier")
        self.config = config
        self.order = [name for name, _ in tiers]
        self.capacity = dict(tiers)

    @property
    def top(self) -> str:
        return self.order[0]

    def below(self, tier: str) -> str | None:
        i = self.order.index(tier)
        return self.order[i + 1] if i + 1 < len(self.order) else None

    def write_through(self) -> list[str]:
        return [t for t in self.order[1:] if self.config.write_mode(t) == "through"]

    def high_bytes(self, tier: str) -> int:
        return int(self.capacity[tier] * self.config.high_watermark)

    def bytes_to_free(self, tier: str, used: int, incoming: int = 0) -> int:
        """0 while ``used + incoming`` stays under the high watermark, else enough to reach the
        low watermark with ``incoming`` admitted."""
        if used + incoming <= self.high_bytes(tier):
            return 0
        low = int(self.capacity[tier] * self.config.low_watermark)
        return max(0, used + incoming - low)

    def demote_to(self, tier: str, resident: Sequence[str]) -> str | None:
        nxt = self.below(tier)
        if nxt is None or nxt in resident:
            return None
        return nxt

    def promote_to(self, hit_tier: str) -> str | None:
        if not self.config.promote_on_hit or hit_tier == self.top:
            return None
        return self.top
