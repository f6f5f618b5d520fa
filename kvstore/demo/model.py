"""The model, the scenario and the store of ``kvstore demo``: the Llama built from a config (or a
local checkpoint), the seeded token ids, the embedded store's configuration, and ``Runner``,
which runs the model's forward passes over a transformers cache.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES
from kvstore.core.errors import ConfigError
from kvstore.core.keys import ModelSpec
from kvstore.demo.results import FIRST_TOKEN, HEAD_DIM, VOCAB_SIZE, DemoOptions, Scenario
from kvstore.worker.model import ModelWorker, WorkerConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

__all__ = [
    "Runner",
    "build_worker",
    "demo_model_config",
    "describe_model",
    "describe_tiers",
    "make_scenario",
    "store_config",
]

_PAGE = 4096


def _transformers() -> Any:
    # By name, as kvstore/worker/model.py does: mypy would otherwise analyse all of transformers.
    return importlib.import_module("transformers")


def demo_model_config(options: DemoOptions) -> Any:
    """A Llama with grouped-query attention (64-dim heads, four query heads per K/V head)."""
    heads = options.hidden // HEAD_DIM
    return _transformers().LlamaConfig(
        hidden_size=options.hidden,
        intermediate_size=3 * options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max(8192, options.total_tokens),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # As worker.default_config explains: wider than transformers' 0.02, so that the answer
        # depends on the context and comparing answers with and without kvstore tests something.
        initializer_range=0.1,
    )


def build_worker(options: DemoOptions) -> ModelWorker:
    config = WorkerConfig(
        model_dir=options.model_dir, seed=options.seed, block_tokens=options.block_tokens
    )
    if options.model_dir:
        worker = ModelWorker(config)
    else:
        worker = ModelWorker(config, model_config=demo_model_config(options))
    limit = getattr(worker.model.config, "max_position_embeddings", None)
    if limit is not None and options.total_tokens > limit:
        raise ConfigError(
            f"the demo needs {options.total_tokens} positions, the model has {limit}: "
            "use fewer --doc-tokens or --turns"
        )
    return worker


def describe_model(worker: ModelWorker, options: DemoOptions) -> str:
    cfg = worker.model.config
    params = sum(p.numel() for p in worker.model.parameters())
    spec = worker.spec
    kv_heads = f"{spec.num_kv_heads} K/V head{'s' if spec.num_kv_heads > 1 else ''}"
    shape = (
        f"{cfg.model_type}, {spec.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} query heads on {kv_heads} of {spec.head_dim}, "
        f"vocabulary {cfg.vocab_size}, {params / 1e6:.1f} M parameters, {spec.dtype}"
    )
    if options.model_dir:
        return f"{spec.model_id} from {options.model_dir} ({shape})"
    return f"{shape}, random weights (seed {options.seed})"


def make_scenario(options: DemoOptions, vocab_size: int) -> Scenario:
    """The document and the questions: token ids from a seeded generator."""
    rng = np.random.default_rng(options.seed)
    low = FIRST_TOKEN if vocab_size > FIRST_TOKEN else 0

    def draw(n: int) -> list[int]:
        return [int(t) for t in rng.integers(low, vocab_size, size=n)]

    document = draw(options.doc_tokens)
    questions = [draw(options.question_tokens) for _ in range(options.turns + int(options.repair))]
    return Scenario(document, questions)


def store_config(options: DemoOptions, spec: ModelSpec, data_dir: Path) -> StoreConfig:
    """G2 sized for every block of the demo (twice over, so nothing is evicted), G3 in
    ``data_dir/g3``, and G4 when a Redis URL is given."""
    slot = (HEADER_BYTES + spec.block_nbytes + _PAGE - 1) // _PAGE * _PAGE
    blocks = math.ceil(options.total_tokens / options.block_tokens)
    g4 = None
    if options.redis_url:
        g4 = RedisTierConfig(options.redis_url, capacity_bytes=4 << 30, namespace="kvstore-demo")
    return StoreConfig(
        g2=PinnedTierConfig(
            capacity_bytes=max(64, 2 * blocks) * slot,
            segment_prefix="kvstore-demo",
        ),
        g3=LmdbTierConfig(str(data_dir / "g3"), capacity_bytes=4 << 30),
        g4=g4,
    )


def describe_tiers(config: StoreConfig) -> list[str]:
    out = []
    for name, cfg in config.tiers():
        where = getattr(cfg, "path", None) or getattr(cfg, "url", None) or "shared memory"
        out.append(f"{name} ({where})")
    return out


# -- the forward passes -------------------------------------------------------------------------


class Runner:
    """Forward passes of one worker's model over a transformers cache, in a worker thread.

    The keyword the cache is passed under is read from the model's signature: transformers 5
    renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker
        params = inspect.signature(worker.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params

    def new_cache(self) -> Any:
        return _transformers().DynamicCache()

    @torch.no_grad()
    def first_token(self, ids: torch.Tensor, cache: Any, start: int) -> int:
        """Run ``ids`` at positions ``start...`` over ``cache`` (which holds exactly ``start``
        tokens) and return the greedy next token. Grad mode is per thread: set here."""
        return self._step(ids, cache, start)

    @torch.no_grad()
    def decode(self, first: int, cache: Any, start: int, n: int) -> list[int]:
        """``n`` greedy tokens from ``first`` (included), which goes in at position ``start``."""
        out = [first]
        while len(out) < n:
            out.append(self._step(torch.tensor([out[-1]]), cache, start + len(out) - 1))
        return out

    def _step(self, ids: torch.Tensor, cache: Any, start: int) -> int:
        worker = self.worker
        positions = torch.arange(start, start + ids.numel(), device=worker.device)
        kwargs: dict[str, Any] = {self._cache_kw: cache}
        if self._keep_last:
            # Only the last position's logits: for a 3K-token prompt the full [tokens, vocab]
            # logits cost as much as a few layers, and both paths would pay for nothing.
            kwargs["logits_to_keep"] = 1
        output = worker.model(
            input_ids=ids.to(worker.device)[None],
            position_ids=positions[None],
            cache_position=positions,
            use_cache=True,
            **kwargs,
        )
        return int(output.logits[0, -1].argmax())


