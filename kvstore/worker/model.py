"""The model worker: a transformers causal LM next to the store, the exact conversion between the
model's cache and kvstore blocks, and the repair of holes in a stored prefix.

Operations, in the order a caller uses them:

1. ``ModelWorker(WorkerConfig(...))`` — load a causal LM from a local directory, or build the
   small default one from a config with a fixed seed; ``worker.spec`` is its namespace.
2. ``prefill(tokens)`` — the K/V ``[layers, 2, tokens, kv_heads, head_dim]`` of a prompt, computed
   from scratch.
3. ``cache_from_kv(kv)`` / ``kv_from_cache(cache)`` — a transformers ``DynamicCache`` (batch 1,
   per layer ``[1, kv_heads, tokens, head_dim]``) and the store's layout, both ways, exactly.
4. ``compute(tokens, past_kv, start, end)`` — the K/V of ``tokens[start:end]`` given the K/V of
   ``tokens[:start]``: the step that fills a hole.
5. ``generate(tokens, past_kv, max_new_tokens)`` — greedy decoding continuing from a stored prefix.
6. ``await repair(engine, tokens)`` — find the holes of a prompt's stored prefix and fill them.

Why repair costs O(hole): a token's K/V depends only on the tokens before it, never on how those
were stored, so the blocks after a hole are still right and are kept; only the hole's own tokens
go through the model, with the blocks before it as past K/V. ``exact=True`` instead recomputes
from the first hole to the last present block (what systems that truncate at the first hole do),
for when the stored suffix itself is in doubt.

The forward passes of ``repair`` run in a thread (``asyncio.to_thread``): torch releases the GIL,
so the engine's event loop keeps serving while the model runs. That is also why the methods
that run the model enter ``torch.no_grad()`` themselves: grad mode is per thread.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

from client.convert import from_dynamic_cache
from kvstore.core.block_format import torch_dtype
from kvstore.core.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidTokenError,
    SpecMismatchError,
)
from kvstore.core.keys import ExtraKey, ModelSpec, root_hash, tokens_to_u32
from kvstore.engine.repair import RepairResult, repair_prompt

if TYPE_CHECKING:
    from kvstore.engine.engine import Engine

__all__ = [
    "DEFAULT_MODEL_ID",
    "ModelWorker",
    "RepairResult",
    "WorkerConfig",
    "default_config",
    "default_mha_config",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "kvstore/default-llama"
# Dtypes a model can run in; the float8 types of kvstore.core.keys.DTYPES are storage formats only.
_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# Config entries that say nothing about the weights or the K/V they produce: where the config was
# read from, which transformers wrote it, and what save_pretrained adds to a built model's config
# (its class name, its dtype: the weights' own dtype is hashed with them). Left out of the
# revision so that the same model, built or loaded from any copy of its directory, shares one
# namespace.
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path",
    "transformers_version",
    "_commit_hash",
    "architectures",
    "dtype",
    "torch_dtype",
)

Tokens = Sequence[int] | np.ndarray[Any, Any] | torch.Tensor


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_dir: str = ""  # a local directory with a transformers causal LM; empty: the default
    seed: int = 0  # initialises the default model's weights (ignored when loading a directory)
    dtype: str = "float32"  # the model's compute dtype, and the namespace's stored dtype
    block_tokens: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in _COMPUTE_DTYPES:
            raise ConfigError(
                f"worker.dtype {self.dtype!r} is not a compute dtype; use one of {_COMPUTE_DTYPES}"
            )
        if self.block_tokens < 1:
            raise ConfigError(f"worker.block_tokens must be >= 1, got {self.block_tokens}")
        if self.seed < 0:
            raise ConfigError(f"worker.seed must be >= 0, got {self.seed}")
        if self.model_dir and not Path(self.model_dir).is_dir():
            raise ConfigError(f"worker.model_dir {self.model_dir!r} is not a directory")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"worker.device {self.device!r}: {exc}") from None


def _transformers() -> Any:
    # Imported by name, as client/convert.py does: transformers is slow to import and ships
    # inline types that would make mypy analyse all of it for the few calls made here.
    return importlib.import_module("transformers")


def default_config() -> Any:
    """The small default model: a 4-layer Llama with grouped-query attention (4 query heads
    sharing 2 K/V heads of 32 dims), 1024 tokens of vocabulary; 0.85 M parameters, so that
    everything runs offline on a CPU in milliseconds per block."""
    return _transformers().LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Wider than transformers' 0.02, so that the output depends on the context: at 0.02,
        # zeroing a whole middle block of the past left the 8 greedy tokens unchanged for 6 to 8
        # of 20 prompts, and the tokens looped over 2 to 4 values; at 0.1 every prompt changed
        # and nearly all 8 tokens differ. Generation equivalence then tests something.
        initializer_range=0.1,
    )


def default_mha_config() -> Any:
    """The default model with plain multi-head attention (one K/V head per query head)."""
    config = default_config()
    config.num_key_value_heads = config.num_attention_heads
    return config


class ModelWorker:
    """One causal LM in eval mode and its kvstore namespace; see the module docstring."""

    def __init__(self, config: WorkerConfig, *, model_config: Any = None) -> None:
        """``model_config`` (a transformers config) is built with ``config.seed`` instead of
        ``default_config()``: tests and benchmarks use it for other shapes."""
        if config.model_dir and model_config is not None:
            raise ConfigError("give either worker.model_dir or a model_config to build, not both")
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        transformers = _transformers()
        model_id = DEFAULT_MODEL_ID
        if config.model_dir:
            model = _load(transformers, config.model_dir, self.dtype)
            model_id = _model_id_of(Path(config.model_dir).resolve())
        else:
            if model_config is not None:
                model_id = f"kvstore/default-{model_config.model_type}"
            # fork_rng: seeding here must not change the random stream of the caller.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = transformers.AutoModelForCausalLM.from_config(
                    default_config() if model_config is None else model_config
                )
            model = model.to(self.dtype)
        model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        self.model: Any = model
        # transformers 5 renamed forward's past_key_values to cache (the old name warns, and goes
        # in 5.40); older releases know only past_key_values.
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._vocab_size = int(model.config.vocab_size)
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._spec = self._make_spec(model_id)
        self._check_cache_shape()

    # -- namespace -----------------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        """The namespace of this model's blocks."""
        return self._spec

    def _make_spec(self, model_id: str) -> ModelSpec:
        cfg = self.model.config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        return ModelSpec(
            model_id,
            num_layers=int(cfg.num_hidden_layers),
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=self.config.dtype,
            block_tokens=self.config.block_tokens,
            revision=self._revision(),
        )

    def _revision(self) -> str:
        """A digest of the model config and every weight (the config too: rotary base, norm
        epsilon or window change the K/V of the same weights).

        Two workers share a namespace exactly when their blocks are interchangeable, and that
        takes the same weights, not the same name: a fine-tune saved under the same directory
        name, or the default model built by another torch version (whose initialisation may
        draw differently from the same seed), computes other K/V for the same tokens, and a
        shared namespace would serve them as hits. Hashing config + seed would miss the second
        case; hashing the weights catches both. xxh3-128 rather than blake2b: this guards
        against accidents, not adversaries (no client chooses the weights), and it runs at memory
        speed (29 GB/s here, blake2b 1.2 GB/s: a 7B float16 model's 14 GB take about 0.5 s of
        hashing instead of 12 s at every start; copying GPU weights out costs more).
        """
        cfg = {
            k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS
        }
        h = xxhash.xxh3_128()
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(f"\x00{name}:{tensor.dtype}:{list(tensor.shape)}\x00".encode())
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().data)
        return h.hexdigest()

    def _check_cache_shape(self) -> None:
        # The spec comes from config names that families spell differently (GPT-2's n_head,
        # Gemma's head_dim that is not hidden/heads): one token through the model settles it.
        kv = self.prefill([0])
        if tuple(kv.shape) != (*self._spec.block_shape[:2], 1, *self._spec.block_shape[3:]):
            raise ConfigError(
                f"the model's cache is {list(kv.shape)} per token, but its config says "
                f"[layers={self._spec.num_layers}, 2, 1, kv_heads={self._spec.num_kv_heads}, "
                f"head_dim={self._spec.head_dim}]"
            )

    def check_namespace(self, spec: ModelSpec) -> None:
        """``InvalidArgumentError`` unless ``spec`` is this worker's namespace."""
        if spec == self._spec:
            return
        ours, theirs = self._spec.to_dict(), spec.to_dict()
        differ = ", ".join(
            f"{k}={theirs[k]!r} (worker: {ours[k]!r})" for k in ours if ours[k] != theirs[k]
        )
        raise InvalidArgumentError(
            f"the prompt's namespace {spec.name} is not this worker's {self._spec.name}: {differ}"
        )

    # -- cache <-> kvstore layout ----------------------------------------------------------------

    def cache_from_kv(self, kv: torch.Tensor) -> Any:
        """A ``DynamicCache`` (batch 1) holding ``kv`` ``[layers, 2, tokens, kv_heads, head_dim]``,
        on the model's device; the cache holds copies, so ``kv`` can be reused."""
        self._check_kv(kv, "past K/V")
        # A plain DynamicCache, not DynamicCache(config=...): a sliding-window model (Mistral)
        # would get layers that keep only the last window of tokens, whose K/V no longer lines
        # up with the prompt's blocks. With every token kept, the model's attention mask still
        # applies the window, so the logits are the same (tests/test_worker.py checks it).
        cache = _transformers().DynamicCache()
        kv = kv.to(self.device)
        for layer in range(kv.shape[0]):
            cache.update(
                kv[layer, 0].transpose(0, 1).unsqueeze(0),
                kv[layer, 1].transpose(0, 1).unsqueeze(0),
                layer,
            )
        return cache

    def kv_from_cache(self, cache: Any) -> torch.Tensor:
        """All of a cache's K/V as one tensor ``[layers, 2, tokens, kv_heads, head_dim]``."""
        return _kv_of(cache, None)

    def _check_kv(self, kv: torch.Tensor, what: str) -> None:
        spec = self._spec
        if kv.dtype != self.dtype:
            raise SpecMismatchError(f"{what} is {kv.dtype}, the model runs in {self.dtype}")
        expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != expected:
            raise SpecMismatchError(
                f"{what} is {list(kv.shape)}, not [layers={spec.num_layers}, 2, tokens, "
                f"kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}] of {spec.name}"
            )

    # -- the model -------------------------------------------------------------------------------

    def token_ids(self, tokens: Tokens) -> torch.Tensor:
        """Token ids as a 1-D int64 tensor on the CPU; ``InvalidTokenError`` for ids outside the
        vocabulary (the embedding would raise an opaque IndexError)."""
        ids = torch.from_numpy(np.frombuffer(tokens_to_u32(tokens), dtype="<u4").astype(np.int64))
        if ids.numel() and int(ids.max()) >= self._vocab_size:
            bad = int((ids >= self._vocab_size).nonzero()[0, 0])
            raise InvalidTokenError(
                f"token {bad} is {int(ids[bad])}; the model's vocabulary has {self._vocab_size}"
            )
        return ids

    def _check_positions(self, n: int) -> None:
        if self._max_positions is not None and n > self._max_positions:
            raise InvalidArgumentError(
                f"{n} positions exceed the model's max_position_embeddings ({self._max_positions})"
            )

    @torch.no_grad()
    def prefill(self, tokens: Tokens) -> torch.Tensor:
        """The K/V ``[layers, 2, tokens, kv_heads, head_dim]`` of a prompt, from scratch."""
        ids = self.token_ids(tokens)
        if ids.numel() == 0:
            raise InvalidArgumentError("cannot prefill an empty prompt")
        self._check_positions(ids.numel())
        cache = _transformers().DynamicCache()
        self.model(input_ids=ids.to(self.device)[None], use_cache=True, **{self._cache_arg: cache})
        return _kv_of(cache, None)

    @torch.no_grad()
    def compute(
        self, tokens: Tokens, past_kv: torch.Tensor | None, start: int, end: int
    ) -> torch.Tensor:
        """The K/V ``[layers, 2, end - start, kv_heads, head_dim]`` of ``tokens[start:end]``,
        given ``past_kv``, the K/V of exactly ``tokens[:start]`` (None or empty when start is 0).
        """
        ids = self.token_ids(tokens)
        if not 0 <= start < end <= ids.numel():
            raise InvalidArgumentError(
                f"need 0 <= start < end <= {ids.numel()} tokens, got start={start}, end={end}"
            )
        past_len = 0 if past_kv is None else past_kv.shape[2]
        if past_len != start:
            raise InvalidArgumentError(
                f"past K/V covers {past_len} tokens, but the run starts at token {start}"
            )
        self._check_positions(end)
        cache = self._cache_for(past_kv)
        self._forward(ids[start:end], cache, start)
        return _kv_of(cache, end - start)

    @torch.no_grad()
    def generate(
        self, tokens: Tokens, past_kv: torch.Tensor | None = None, *, max_new_tokens: int = 16
    ) -> list[int]:
        """Greedy decoding of exactly ``max_new_tokens`` tokens (no stop at end-of-sequence: a
        fixed length keeps runs comparable).

        ``past_kv`` is the K/V of a prefix of ``tokens`` (a stored prefix); the rest of the prompt
        is prefilled first. A past that covers the whole prompt gives up its last token, whose
        logits are needed to pick the first new token.
        """
        ids = self.token_ids(tokens)
        if ids.numel() == 0:
            raise InvalidArgumentError("cannot generate from an empty prompt")
        if max_new_tokens < 0:
            raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        past_len = 0 if past_kv is None else past_kv.shape[2]
        if past_len > ids.numel():
            raise InvalidArgumentError(
                f"past K/V covers {past_len} tokens, more than the prompt's {ids.numel()}"
            )
        self._check_positions(ids.numel() + max_new_tokens)
        if past_kv is not None and past_len == ids.numel():
            past_len -= 1
            past_kv = past_kv[:, :, :past_len]
        cache = self._cache_for(past_kv)
        step, position = ids[past_len:], past_len
        out: list[int] = []
        while len(out) < max_new_tokens:
            logits = self._forward(step, cache, position)
            position += step.numel()
            out.append(int(logits.argmax()))
            step = torch.tensor([out[-1]])
        return out

    def _cache_for(self, past_kv: torch.Tensor | None) -> Any:
        if past_kv is None or past_kv.shape[2] == 0:
            return _transformers().DynamicCache()
        return self.cache_from_kv(past_kv)

    def _forward(self, ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        """Run ``ids`` at positions ``start, start + 1, ...`` over ``cache`` (which it extends);
        returns the logits of the last one ``[vocab]`` (only those are computed where the model
        allows: a real vocabulary's head over every prompt token costs as much as layers)."""
        # Positions continue at ``start``: rotary models take them from cache_position, GPT-2's
        # learned positions from position_ids; both are given so no family has to infer them.
        positions = torch.arange(start, start + ids.numel(), device=self.device)
        output = self.model(
            input_ids=ids.to(self.device)[None],
            position_ids=positions[None],
            cache_position=positions,
            use_cache=True,
            **{self._cache_arg: cache},
            **self._last_logits,
        )
        logits: torch.Tensor = output.logits[0, -1]
        return logits

    # -- repair ----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """How the pool and logs call this worker: the model id."""
        return self._spec.model_id

    @torch.no_grad()
    def fill_holes(
        self, tokens: Tokens, blocks: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """The K/V of the None entries of ``blocks``, in order, given the others as past.

        ``tokens`` are the first ``len(blocks) * block_tokens`` tokens of the prompt (more are
        ignored). Runs of missing blocks are computed in one forward each, over the K/V of
        everything before them: the blocks given and the runs already computed.
        """
        spec = self._spec
        bt = spec.block_tokens
        end = len(blocks)
        ids = self.token_ids(tokens)
        if ids.numel() < end * bt:
            raise InvalidArgumentError(
                f"{end} blocks of {bt} tokens need {end * bt} tokens, got {ids.numel()}"
            )
        ids = ids[: end * bt]
        # One buffer for the past: appending by torch.cat would copy the prefix once per hole.
        past = torch.empty(
            (spec.num_layers, 2, end * bt, spec.num_kv_heads, spec.head_dim), dtype=self.dtype
        )
        out: list[torch.Tensor] = []
        pos = 0
        while pos < end:
            block = blocks[pos]
            if block is not None:
                if block.dtype != self.dtype or tuple(block.shape) != spec.block_shape:
                    raise SpecMismatchError(
                        f"block {pos} is {block.dtype} {list(block.shape)}, not {self.dtype} "
                        f"{list(spec.block_shape)} of {spec.name}"
                    )
                past[:, :, pos * bt : (pos + 1) * bt] = block
                pos += 1
                continue
            stop = next((i for i in range(pos, end) if blocks[i] is not None), end)
            new = self.compute(ids, past[:, :, : pos * bt], pos * bt, stop * bt).to("cpu")
            past[:, :, pos * bt : stop * bt] = new
            out += [past[:, :, i * bt : (i + 1) * bt].clone() for i in range(pos, stop)]
            pos = stop
        return out

    async def fill(
        self, tokens: np.ndarray[Any, Any], blocks: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """``fill_holes`` in a thread (``HoleFiller`` of ``engine.repair``): torch frees the GIL,
        so the event loop keeps serving while the model runs."""
        return await asyncio.to_thread(self.fill_holes, tokens, blocks)

    async def repair(
        self,
        engine: Engine,
        tokens: Tokens,
        *,
        exact: bool = False,
        spec: ModelSpec | None = None,
        salt: bytes = b"",
        extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    ) -> RepairResult:
        """Fill the holes of ``tokens``' stored prefix in ``engine`` with this worker (see
        ``kvstore.engine.repair.repair_prompt``); blocks after the last present one (a missing tail)
        are not holes and stay missing.

        ``spec`` is the namespace the request named (``InvalidArgumentError`` unless it is this
        worker's); ``salt`` and ``extra_keys`` name the blocks as ``Engine.lookup`` does.
        """
        if spec is not None:
            self.check_namespace(spec)
        spec = self._spec
        ids = np.frombuffer(tokens_to_u32(tokens), dtype="<u4")
        self.token_ids(ids)  # refuse tokens outside the vocabulary before touching the engine
        hashes = engine.hashes(spec, ids, salt=salt, extra_keys=extra_keys)

        async def fill(
            _: ModelSpec, toks: np.ndarray[Any, Any], blocks: Sequence[torch.Tensor | None]
        ) -> tuple[list[torch.Tensor], str]:
            return await self.fill(toks, blocks), self.name

        return await repair_prompt(
            engine, fill, spec, hashes, ids, root=root_hash(spec, salt), exact=exact
        )


def _model_id_of(model_dir: Path) -> str:
    """The directory's name, or ``org/name`` for a snapshot in the Hugging Face cache
    (``models--org--name/snapshots/<commit>``), whose own name is only a commit hash."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent.name.removeprefix("models--").replace("--", "/")
    return model_dir.name


def _load(transformers: Any, model_dir: str, dtype: torch.dtype) -> Any:
    # local_files_only: a model directory never reaches for the hub, and this is the only
    # guarantee that holds without changing HF_HUB_OFFLINE for the whole process (huggingface_hub
    # reads that once, when it is first imported, possibly before this runs).
    # transformers 5 renamed torch_dtype to dtype (the old name still warns).
    major = int(str(transformers.__version__).split(".", 1)[0])
    dtype_arg = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, **dtype_arg
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a causal LM from {model_dir!r}: {exc}") from exc


def _kv_of(cache: Any, last: int | None) -> torch.Tensor:
    """The K/V of a batch-1 cache as ``[layers, 2, tokens, kv_heads, head_dim]``: all of it, or
    the ``last`` tokens (those a forward pass just added)."""
    return from_dynamic_cache(cache, last=last)
