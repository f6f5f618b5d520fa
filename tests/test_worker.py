"""The model worker on real, small, randomly initialised transformers and a real engine (G2 shared
memory + G3 LMDB in a temporary directory).

Two model shapes run through everything: the default (Llama, grouped-query attention: 4 query
heads on 2 K/V heads) and its multi-head variant (4 K/V heads). Other families (Qwen2, Mistral
with a sliding window, GPT-2) are saved to a directory and loaded the way a deployment loads them.

Tolerance: K/V computed over a past cache is compared with K/V computed over the whole prompt
(``TOLERANCE``, as assert_close's atol and rtol). The two paths do the same arithmetic on the same
inputs, but attention over a past cache runs with another query length, so its kernels may split
and sum the dot products in another order; the last bits differ and grow through the layers.
float32: atol = rtol = 1e-5 (about 80 eps); measured at most 4.5e-6 with |K/V| up to 5.7 (the
largest error relative to the bound was 0.4, over 30 prompts and 6 spans). 16-bit dtypes: atol =
16 eps, rtol = 4 eps; the model computes in that dtype, every hidden state is rounded to 8 (bf16)
or 11 (fp16) significant bits, and a one-ulp difference in an early layer grows to up to 8 eps
by the last (0.5 of the bound). A wrong past (a block's tokens after another prefix) moves the
same K/V by more than 5, far outside every bound (``test_tolerance_catches_a_wrong_past``).
Generation is compared exactly: greedy tokens must be identical, and a test checks that a wrong
past does change them (the default model is initialised so that its output depends on context).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, read_header
from kvstore.core.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidTokenError,
    SpecMismatchError,
)
from kvstore.core.keys import BlockHash, root_hash
from kvstore.engine.engine import Engine, EngineConfig
from kvstore.worker.model import (
    DEFAULT_MODEL_ID,
    ModelWorker,
    WorkerConfig,
    default_config,
    default_mha_config,
)
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

transformers: Any = pytest.importorskip("transformers")

BT = 16  # block tokens (the WorkerConfig default)
SLOT = 1 << 17  # one float32 block of the MHA model is 64 KiB + header
# dtype -> (atol, rtol); see the module docstring.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (16 * 2**-7, 4 * 2**-7),
    torch.float16: (16 * 2**-10, 4 * 2**-10),
}
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gqa() -> ModelWorker:
    return ModelWorker(WorkerConfig())


@pytest.fixture(scope="module")
def mha() -> ModelWorker:
    return ModelWorker(WorkerConfig(), model_config=default_mha_config())


@pytest.fixture(params=["gqa", "mha"])
def worker(request: pytest.FixtureRequest) -> ModelWorker:
    w: ModelWorker = request.getfixturevalue(request.param)
    return w


def store_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(
        g2=PinnedTierConfig(64 * SLOT, pin="never", segment_prefix="kvstore-wtest"),
        g3=LmdbTierConfig(str(tmp_path / "g3"), 256 * SLOT),
        engine=EngineConfig(reaper_interval_s=0.05),
    )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    e = await Engine.open(store_config(tmp_path))
    yield e
    await e.close()


def prompt(num_blocks: int, seed: int, tail: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(num_blocks * BT + tail)]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


async def stored(
    engine: Engine, w: ModelWorker, tokens: list[int], salt: bytes = b""
) -> torch.Tensor:
    """The prompt's full blocks as loaded from the engine, concatenated as past K/V."""
    blocks = await engine.get(w.spec, engine.hashes(w.spec, tokens, salt=salt))
    assert all(b is not None for b in blocks)
    return torch.cat([b for b in blocks if b is not None], dim=2)


async def put_prompt(engine: Engine, w: ModelWorker, tokens: list[int]) -> torch.Tensor:
    kv = w.prefill(tokens)
    await engine.put(w.spec, tokens, kv)
    return kv


def corrupt_in_g3(cfg: StoreConfig, keys: list[BlockHash]) -> None:
    """Flip a payload bit of each block in LMDB itself (the engine must be closed)."""
    assert cfg.g3 is not None
    env = lmdb.open(cfg.g3.path, max_dbs=4, map_size=cfg.g3.map_size)
    with env.begin(db=env.open_db(b"blocks"), write=True) as txn:
        for key in keys:
            raw = txn.get(key)
            assert raw is not None
            value = bytearray(raw)
            value[HEADER_BYTES + 10] ^= 0x40
            txn.put(key, value)
    env.close()


# -- conversions ---------------------------------------------------------------------------------


def test_cache_round_trip_is_exact(worker: ModelWorker) -> None:
    kv = worker.prefill(prompt(3, seed=1, tail=5))
    assert kv.shape == (worker.spec.num_layers, 2, 3 * BT + 5, worker.spec.num_kv_heads, 32)
    assert torch.equal(worker.kv_from_cache(worker.cache_from_kv(kv)), kv)
    # Any values, not only a model's: the conversion is a pure relayout.
    noise = torch.randn(kv.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(worker.kv_from_cache(worker.cache_from_kv(noise)), noise)


def test_prefill_equals_the_models_own_cache(worker: ModelWorker) -> None:
    tokens = prompt(2, seed=3, tail=3)
    kv = worker.prefill(tokens)
    with torch.no_grad():
        cache = worker.model(torch.tensor([tokens]), use_cache=True).past_key_values
    for layer, own in enumerate(cache.layers):
        # The model's layout is [batch, kv_heads, tokens, head_dim]; the store's puts tokens first.
        assert torch.equal(kv[layer, 0], own.keys[0].transpose(0, 1))
        assert torch.equal(kv[layer, 1], own.values[0].transpose(0, 1))


@pytest.mark.parametrize("span", [(0, 16), (16, 48), (40, 57), (112, 128)])
def test_compute_over_a_past_matches_prefill(worker: ModelWorker, span: tuple[int, int]) -> None:
    tokens = prompt(8, seed=4)
    kv = worker.prefill(tokens)
    start, end = span
    got = worker.compute(tokens, kv[:, :, :start], start, end)
    assert got.shape == kv[:, :, start:end].shape
    assert_close(got, kv[:, :, start:end])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compute_matches_prefill_in_16_bit_dtypes(dtype: str) -> None:
    w = ModelWorker(WorkerConfig(dtype=dtype))
    assert w.spec.dtype == dtype
    tokens = prompt(6, seed=5)
    kv = w.prefill(tokens)
    assert kv.dtype == getattr(torch, dtype)
    assert_close(w.compute(tokens, kv[:, :, :40], 40, 96), kv[:, :, 40:96])


def test_tolerance_catches_a_wrong_past(gqa: ModelWorker) -> None:
    tokens = prompt(3, seed=6)
    kv = gqa.prefill(tokens)
    # Block 2's tokens with block 0 as their past instead of blocks 0 and 1.
    skipped = tokens[:BT] + tokens[2 * BT :]
    wrong = gqa.compute(skipped, kv[:, :, :BT], BT, 2 * BT)
    assert (wrong - kv[:, :, 2 * BT :]).abs().max() > 1e4 * TOLERANCE[torch.float32][0]


# -- generation ----------------------------------------------------------------------------------


async def test_generation_is_identical_from_scratch_from_the_store_and_after_repair(
    worker: ModelWorker, tmp_path: Path
) -> None:
    spec = worker.spec
    # (blocks, trailing tokens, blocks evicted, block corrupted in G3). A corrupt block is found
    # when it is read, so each sits before the prompt's last hole, where repair reads.
    cases = [(5, 0, [1, 3], 2), (6, 7, [4], 0), (8, 3, [1, 2, 6], 4)]
    prompts = [prompt(n, seed=10 + i, tail=tail) for i, (n, tail, _, _) in enumerate(cases)]
    scratch = [worker.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]

    cfg = store_config(tmp_path)
    e = await Engine.open(cfg)
    originals = []
    try:
        for p, want in zip(prompts, scratch, strict=True):
            originals.append(await put_prompt(e, worker, p))
            loaded = await stored(e, worker, p)
            assert torch.equal(loaded, originals[-1][:, :, : loaded.shape[2]])
            assert worker.generate(p, loaded, max_new_tokens=NEW_TOKENS) == want
        for p, (_, _, evicted, _) in zip(prompts, cases, strict=True):
            hashes = e.hashes(spec, p)
            assert await e.evict([hashes[i] for i in evicted]) == len(evicted)
        await e.drain()
    finally:
        await e.close()
    corrupt_in_g3(cfg, [e.hashes(spec, p)[c[3]] for p, c in zip(prompts, cases, strict=True)])

    e = await Engine.open(cfg)  # G2 starts empty: G3 holds the only copy of each block
    try:
        for p, (n, _, evicted, corrupt), kv, want in zip(
            prompts, cases, originals, scratch, strict=True
        ):
            found = await e.lookup(spec, p)
            assert found.holes == evicted  # the corrupt block is not known to be bad yet
            result = await worker.repair(e, p)
            assert result.repaired == sorted([*evicted, corrupt])
            assert result.hit_blocks_before == evicted[0]  # as the lookup saw it
            assert result.hit_blocks_after == n
            found = await e.lookup(spec, p)
            assert found.holes == []
            assert found.hit_blocks == n
            loaded = await stored(e, worker, p)
            for i in range(n):
                block, original = (
                    loaded[:, :, i * BT : (i + 1) * BT],
                    kv[:, :, i * BT : (i + 1) * BT],
                )
                if i in result.repaired:
                    assert_close(block, original)
                else:  # reused as stored
                    assert torch.equal(block, original)
            assert worker.generate(p, loaded, max_new_tokens=NEW_TOKENS) == want
            # The comparison can fail: the same past with a repaired block zeroed does not match.
            wrong = loaded.clone()
            wrong[:, :, evicted[0] * BT : (evicted[0] + 1) * BT] = 0
            assert worker.generate(p, wrong, max_new_tokens=NEW_TOKENS) != want
    finally:
        await e.close()


def test_generate_accepts_a_past_covering_the_whole_prompt(gqa: ModelWorker) -> None:
    tokens = prompt(4, seed=7)
    kv = gqa.prefill(tokens)
    want = gqa.generate(tokens, max_new_tokens=NEW_TOKENS)
    assert gqa.generate(tokens, kv, max_new_tokens=NEW_TOKENS) == want
    assert gqa.generate(tokens, kv[:, :, :0], max_new_tokens=NEW_TOKENS) == want
    assert gqa.generate(tokens, kv, max_new_tokens=0) == []


# -- repair --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evicted", "repaired", "hit_after"),
    [
        ([0], [0], 8),  # a hole at block 0 has no past
        ([2, 3, 4], [2, 3, 4], 8),  # adjacent holes: one forward pass
        ([1, 3, 5], [1, 3, 5], 8),  # several holes
        ([0, 1, 5], [0, 1, 5], 8),
        ([2, 6, 7], [2], 6),  # a missing tail is not a hole and stays missing
    ],
)
async def test_repair_fills_holes_and_reuses_the_rest(
    gqa: ModelWorker,
    engine: Engine,
    evicted: list[int],
    repaired: list[int],
    hit_after: int,
) -> None:
    tokens = prompt(8, seed=20)
    kv = await put_prompt(engine, gqa, tokens)
    hashes = engine.hashes(gqa.spec, tokens)
    await engine.evict([hashes[i] for i in evicted])
    result = await gqa.repair(engine, tokens)
    assert result.repaired == repaired
    assert result.hit_blocks_before == evicted[0]
    assert result.hit_blocks_after == hit_after
    assert result.kept == []
    found = await engine.lookup(gqa.spec, tokens)
    assert found.holes == []
    assert found.hit_blocks == hit_after
    blocks = await engine.get(gqa.spec, hashes[:hit_after])
    for i, block in enumerate(blocks):
        assert block is not None
        original = kv[:, :, i * BT : (i + 1) * BT]
        if i in repaired:
            assert_close(block, original)
        else:
            assert torch.equal(block, original)


async def test_repair_without_holes_changes_nothing(gqa: ModelWorker, engine: Engine) -> None:
    tokens = prompt(4, seed=21)
    assert (await gqa.repair(engine, tokens)).repaired == []  # nothing stored: no holes either
    await put_prompt(engine, gqa, tokens)
    before = (await engine.stats()).counters.get("stored", 0)
    result = await gqa.repair(engine, tokens + prompt(2, seed=22))  # a missing tail only
    assert (result.repaired, result.hit_blocks_before, result.hit_blocks_after) == ([], 4, 4)
    assert (await engine.stats()).counters.get("stored", 0) == before


async def test_exact_repair_replaces_the_blocks_after_the_hole(
    gqa: ModelWorker, engine: Engine
) -> None:
    spec = gqa.spec
    tokens = prompt(6, seed=23)
    kv = await put_prompt(engine, gqa, tokens)
    hashes = engine.hashes(spec, tokens)
    # Block 4 holds wrong K/V under its right name (what exact mode is for).
    stale = torch.zeros(spec.block_shape)
    await engine.evict([hashes[4]])
    await engine.put_blocks(spec, [(hashes[4], hashes[3], stale)])
    await engine.evict([hashes[2]])

    plain = await gqa.repair(engine, tokens)
    assert plain.repaired == [2]
    (block4,) = await engine.get(spec, [hashes[4]])
    assert block4 is not None
    assert torch.equal(block4, stale)  # reused as it is

    await engine.evict([hashes[2]])
    exact = await gqa.repair(engine, tokens, exact=True)
    assert exact.repaired == [2, 3, 4, 5]
    assert (exact.hit_blocks_before, exact.hit_blocks_after) == (2, 6)
    assert_close(await stored(engine, gqa, tokens), kv[:, :, : 6 * BT])


async def test_exact_repair_keeps_blocks_another_client_holds(
    gqa: ModelWorker, engine: Engine
) -> None:
    spec = gqa.spec
    tokens = prompt(5, seed=24)
    await put_prompt(engine, gqa, tokens)
    hashes = engine.hashes(spec, tokens)
    stale = torch.zeros(spec.block_shape)
    await engine.evict([hashes[3]])
    await engine.put_blocks(spec, [(hashes[3], hashes[2], stale)])
    await engine.evict([hashes[1]])
    lease = engine.reserve([hashes[3]])
    result = await gqa.repair(engine, tokens, exact=True)
    engine.release(lease.lease_id)
    assert result.repaired == [1, 2, 4]
    assert result.kept == [3]
    (block3,) = await engine.get(spec, [hashes[3]])
    assert block3 is not None
    assert torch.equal(block3, stale)


async def test_repair_uses_the_salt_and_chains_parents(gqa: ModelWorker, engine: Engine) -> None:
    spec = gqa.spec
    tokens = prompt(3, seed=25)
    kv = gqa.prefill(tokens)
    salt = b"tenant-a"
    await engine.put(spec, tokens, kv, salt=salt)
    hashes = engine.hashes(spec, tokens, salt=salt)
    await engine.evict([hashes[0]])
    assert (await gqa.repair(engine, tokens)).repaired == []  # unsalted: another chain
    result = await gqa.repair(engine, tokens, salt=salt)
    assert result.repaired == [0]
    # The header names the same parent as engine.put writes: the root of the salted chain.
    (data,) = await engine.read(spec, [hashes[0]])
    assert data is not None
    assert read_header(bytes(data)).parent_hash == root_hash(spec, salt)
    assert_close(await stored(engine, gqa, tokens, salt=salt), kv)


async def test_repair_rejects_another_namespace(
    gqa: ModelWorker, mha: ModelWorker, engine: Engine
) -> None:
    tokens = prompt(3, seed=26)
    await put_prompt(engine, gqa, tokens)
    await engine.evict([engine.hashes(gqa.spec, tokens)[1]])
    other = dataclasses.replace(gqa.spec, revision="another-checkpoint")
    with pytest.raises(InvalidArgumentError, match="revision"):
        await gqa.repair(engine, tokens, spec=other)
    with pytest.raises(InvalidArgumentError, match="num_kv_heads"):
        await gqa.repair(engine, tokens, spec=mha.spec)
    assert (await engine.lookup(gqa.spec, tokens)).holes == [1]  # nothing was stored
    assert (await gqa.repair(engine, tokens, spec=gqa.spec)).repaired == [1]


# -- namespace and loading -----------------------------------------------------------------------


def test_spec_follows_the_model_and_its_weights(gqa: ModelWorker, mha: ModelWorker) -> None:
    assert (gqa.spec.model_id, gqa.spec.num_layers, gqa.spec.num_kv_heads) == (
        DEFAULT_MODEL_ID,
        4,
        2,
    )
    assert (gqa.spec.head_dim, gqa.spec.dtype, gqa.spec.block_tokens) == (32, "float32", BT)
    assert mha.spec.num_kv_heads == 4
    # Deterministic for the same weights; other weights, another namespace.
    assert ModelWorker(WorkerConfig()).spec == gqa.spec
    reseeded = ModelWorker(WorkerConfig(seed=1)).spec
    assert reseeded.revision != gqa.spec.revision
    assert reseeded.fingerprint != gqa.spec.fingerprint


def native_greedy(model: Any, tokens: list[int], steps: int) -> list[int]:
    """Greedy decoding the way the model runs itself: its own cache type, its own positions."""
    ids, cache, out = torch.tensor([tokens]), None, []
    with torch.no_grad():
        for _ in range(steps):
            output = model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = output.past_key_values
            out.append(int(output.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


FAMILIES = {
    "llama": lambda: default_config(),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
    # A window shorter than the prompts: the model's own cache would keep only its last tokens.
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        sliding_window=24,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=1024,
        n_positions=512,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_models_load_from_a_directory(family: str, tmp_path: Path) -> None:
    built = ModelWorker(WorkerConfig(seed=3), model_config=FAMILIES[family]())
    model_dir = tmp_path / f"tiny-{family}"
    built.model.save_pretrained(model_dir)
    w = ModelWorker(WorkerConfig(model_dir=str(model_dir)))
    assert w.spec.model_id == f"tiny-{family}"
    assert w.spec.block_shape == built.spec.block_shape
    # Same weights, same revision, whether built or loaded (save_pretrained adds its class
    # name and dtype to the config; neither changes the K/V).
    assert w.spec.revision == built.spec.revision
    tokens = prompt(4, seed=30, tail=3)
    kv = w.prefill(tokens)
    assert torch.equal(kv, built.prefill(tokens))
    assert_close(w.compute(tokens, kv[:, :, :24], 24, 56), kv[:, :, 24:56])
    want = native_greedy(w.model, tokens, NEW_TOKENS)
    if family == "mistral":
        # The model's own cache keeps only the window; the worker's keeps every token.
        with torch.no_grad():
            own = w.model(torch.tensor([tokens]), use_cache=True).past_key_values
        with pytest.raises(InvalidArgumentError, match="sliding-window"):
            w.kv_from_cache(own)
    assert w.generate(tokens, max_new_tokens=NEW_TOKENS) == want
    assert w.generate(tokens, kv[:, :, : 3 * BT], max_new_tokens=NEW_TOKENS) == want


def test_a_hugging_face_cache_snapshot_is_named_after_its_repository(
    gqa: ModelWorker, tmp_path: Path
) -> None:
    snapshot = tmp_path / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    gqa.model.save_pretrained(snapshot)
    w = ModelWorker(WorkerConfig(model_dir=str(snapshot)))
    assert w.spec.model_id == "acme/tiny-llama"
    assert torch.equal(w.prefill([5, 6, 7]), gqa.prefill([5, 6, 7]))


# -- validation ----------------------------------------------------------------------------------


def test_bad_configs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compute dtype"):
        WorkerConfig(dtype="float8_e4m3fn")
    with pytest.raises(ConfigError, match="not a directory"):
        WorkerConfig(model_dir=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="block_tokens"):
        WorkerConfig(block_tokens=0)
    with pytest.raises(ConfigError, match="cannot load"):
        ModelWorker(WorkerConfig(model_dir=str(tmp_path)))  # a directory without a model


def test_bad_arguments_are_rejected(gqa: ModelWorker) -> None:
    tokens = prompt(2, seed=31)
    kv = gqa.prefill(tokens)
    with pytest.raises(InvalidTokenError, match="vocabulary"):
        gqa.prefill([5, 1024])
    with pytest.raises(InvalidTokenError):
        gqa.prefill([5, -1])
    with pytest.raises(InvalidArgumentError, match="covers 16 tokens"):
        gqa.compute(tokens, kv[:, :, :16], 20, 32)
    with pytest.raises(InvalidArgumentError, match="start < end"):
        gqa.compute(tokens, kv[:, :, :16], 16, 16)
    with pytest.raises(SpecMismatchError, match="kv_heads=2"):
        gqa.cache_from_kv(torch.zeros(4, 2, 3, 4, 32))
    with pytest.raises(SpecMismatchError, match="float16"):
        gqa.cache_from_kv(kv.half())
    with pytest.raises(InvalidArgumentError, match="max_position_embeddings"):
        gqa.generate(tokens, max_new_tokens=4096)
