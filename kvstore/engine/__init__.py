"""The storage engine: the block index, placement decisions, the event log, hole-repair planning
and the engine that moves blocks between the tiers. Imports ``kvstore.core`` and ``tiers`` only."""
