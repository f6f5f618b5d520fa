"""What ``kvstore demo`` runs with and what it finds: its options, the scenario, and the results
per turn and of the hole section. Plain data, importable without torch or a model: the command
builds its options (and its ``--help``) from ``DemoOptions`` before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.core.errors import ConfigError
from kvstore.core.keys import ModelSpec

__all__ = [
    "FIRST_TOKEN",
    "HEAD_DIM",
    "VOCAB_SIZE",
    "DemoOptions",
    "DemoResult",
    "HoleRepair",
    "Progress",
    "Scenario",
    "TurnResult",
]

Progress = Callable[[str], None]

HEAD_DIM = 64
VOCAB_SIZE = 8192
# Ids 0-2 are pad, bos and eos in the default config: the made-up text stays clear of them.
FIRST_TOKEN = 3


@dataclass(frozen=True, slots=True)
class DemoOptions:
    turns: int = 4
    doc_tokens: int = 3072
    question_tokens: int = 48
    answer_tokens: int = 32
    block_tokens: int = 32
    seed: int = 0  # the weights of the built model and the token ids of the scenario
    layers: int = 8  # the built model's shape (ignored with model_dir)
    hidden: int = 512  # hidden size; query heads of 64 dims, a quarter as many K/V heads
    model_dir: str = ""  # a local transformers checkpoint instead of the built model
    data_dir: str = ""  # G3 lives in <data_dir>/g3 and is kept; empty: a temporary directory
    redis_url: str = ""  # adds G4
    repair: bool = True  # the hole section after the turns

    def __post_init__(self) -> None:
        for name in ("turns", "doc_tokens", "question_tokens", "answer_tokens", "block_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"demo seed must be >= 0, got {self.seed}")
        if self.layers < 1 or self.hidden < HEAD_DIM or self.hidden % HEAD_DIM:
            raise ConfigError(
                f"demo model: need layers >= 1 and hidden a multiple of {HEAD_DIM}, got "
                f"layers={self.layers}, hidden={self.hidden}"
            )

    @property
    def total_tokens(self) -> int:
        """Positions the longest prompt and its answer take (the hole section adds a turn)."""
        turns = self.turns + (1 if self.repair else 0)
        return self.doc_tokens + turns * (self.question_tokens + self.answer_tokens)


@dataclass(frozen=True, slots=True)
class Scenario:
    document: list[int]
    questions: list[list[int]]  # one per turn, then the hole section's


@dataclass(frozen=True, slots=True)
class TurnResult:
    turn: int  # from 1
    prompt: list[int]
    hit_tokens: int  # the stored prefix kvstore served
    prefill_ms_without: float  # whole prompt from scratch, up to the first token
    prefill_ms_with: float  # lookup, read, the rest of the prompt, up to the first token
    load_ms: float  # the lookup and read part of prefill_ms_with
    stored_blocks: int  # new blocks of prompt + answer stored after the turn
    answer_without: list[int]
    answer_with: list[int]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / len(self.prompt)

    @property
    def speedup(self) -> float:
        return self.prefill_ms_without / self.prefill_ms_with

    @property
    def identical(self) -> bool:
        return self.answer_without == self.answer_with


@dataclass(frozen=True, slots=True)
class HoleRepair:
    prompt: list[int]
    block_tokens: int
    stored_blocks: int  # the stored run before the eviction
    hole: int  # the block evicted
    holes_reported: list[int]  # by the lookup after the eviction
    hit_tokens_with_hole: int  # the leading run the lookup then reports
    scratch_ms: float  # prefill of the whole prompt without kvstore
    recompute_ms: float  # lookup, read up to the hole, prefill from the hole
    repair_ms: float  # ModelWorker.repair: lookup, read, compute the hole, store it
    repaired: list[int]  # blocks repair computed and stored
    after_repair_ms: float  # then: lookup, read the whole stored run, prefill the rest
    hit_tokens_after_repair: int
    answer_scratch: list[int]
    answer_recompute: list[int]
    answer_repaired: list[int]

    @property
    def recompute_tokens(self) -> int:
        return len(self.prompt) - self.hit_tokens_with_hole

    @property
    def repaired_tokens(self) -> int:
        """Tokens through the model on the repair path: the hole, then the unstored rest."""
        return len(self.repaired) * self.block_tokens + (
            len(self.prompt) - self.hit_tokens_after_repair
        )

    @property
    def identical(self) -> bool:
        return self.answer_scratch == self.answer_recompute == self.answer_repaired


@dataclass(slots=True)
class DemoResult:
    options: DemoOptions
    model: str  # a description of the model
    spec: ModelSpec
    tiers: list[str]  # "G2 (shared memory)", ...
    blocks_at_open: int  # found in G3 when the store opened (a kept data_dir)
    turns: list[TurnResult] = field(default_factory=list)
    repair: HoleRepair | None = None
    tier_blocks: dict[str, int] = field(default_factory=dict)  # at the end
    elapsed_s: float = 0.0

    @property
    def identical(self) -> bool:
        """Every answer with kvstore (and after the repair) equals the one without."""
        turns_ok = all(t.identical for t in self.turns)
        return turns_ok and (self.repair is None or self.repair.identical)


