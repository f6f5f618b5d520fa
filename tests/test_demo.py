"""``kvstore demo`` in-process on a tiny model (2 layers, hidden 128) with a real engine: G2
shared memory + G3 LMDB in a temporary directory, G4 on the session's ``redis-server``.

The timings are not asserted (they depend on the machine); what is: the prefix served from the
store grows turn over turn by exactly the blocks the model ran, the answers with and without the
store are identical and equal ``ModelWorker.generate``'s, the hole section repairs exactly the
evicted block, and a kept data directory serves the next run from G3.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from redis_servers import RedisServer

from kvstore.demo.demo import demo
from kvstore.demo.model import build_worker
from kvstore.demo.results import DemoOptions, DemoResult
from kvstore.demo.run import run_demo
from kvstore.worker.model import ModelWorker

BT = 16
TINY = DemoOptions(
    turns=3,
    doc_tokens=96,
    question_tokens=16,
    answer_tokens=8,
    block_tokens=BT,
    layers=2,
    hidden=128,
)
TINY_ARGS = [
    "--turns=2",
    "--doc-tokens=64",
    "--question-tokens=16",
    "--answer-tokens=8",
    f"--block-tokens={BT}",
    "--layers=2",
    "--hidden=128",
]


@pytest.fixture(scope="module")
def worker() -> ModelWorker:
    return build_worker(TINY)


def check_turns(result: DemoResult, worker: ModelWorker) -> None:
    opts = result.options
    turns = result.turns
    assert [t.turn for t in turns] == list(range(1, opts.turns + 1))
    assert turns[0].prompt_tokens == opts.doc_tokens + opts.question_tokens
    for prev, turn in itertools.pairwise(turns):
        # Each prompt is the previous one, its answer and a new question ...
        assert turn.prompt[: prev.prompt_tokens + opts.answer_tokens] == (
            prev.prompt + prev.answer_with
        )
        assert turn.prompt_tokens == prev.prompt_tokens + opts.answer_tokens + opts.question_tokens
        # ... and hits every full block the model ran: the prompt and the answer but its last
        # token.
        ran = prev.prompt_tokens + opts.answer_tokens - 1
        assert turn.hit_tokens == ran // BT * BT
        assert turn.hit_tokens > prev.hit_tokens
        assert turn.hit_rate == turn.hit_tokens / turn.prompt_tokens
    for turn in turns:
        assert turn.identical
        assert len(turn.answer_with) == opts.answer_tokens
        # The demo's decoding is the worker's greedy decoding.
        assert worker.generate(turn.prompt, max_new_tokens=opts.answer_tokens) == turn.answer_with
        assert turn.prefill_ms_without > 0
        assert 0 <= turn.load_ms <= turn.prefill_ms_with
    # The model reads its context: the answers are not one repeated sequence.
    assert len({tuple(t.answer_with) for t in turns}) == len(turns)


async def test_turns_hit_a_growing_prefix_and_answer_the_same(worker: ModelWorker) -> None:
    result = await run_demo(TINY, worker=worker)
    check_turns(result, worker)
    assert result.turns[0].hit_tokens == 0  # a fresh temporary store
    assert result.blocks_at_open == 0
    assert result.identical
    stored = sum(t.stored_blocks for t in result.turns)
    last = result.turns[-1]
    assert stored == (last.prompt_tokens + TINY.answer_tokens - 1) // BT  # the model ran those
    assert result.tier_blocks == {"G2": stored, "G3": stored}
    assert [t.split(" ")[0] for t in result.tiers] == ["G2", "G3"]


async def test_the_hole_section_repairs_exactly_the_evicted_block(worker: ModelWorker) -> None:
    result = await run_demo(TINY, worker=worker)
    r = result.repair
    assert r is not None
    last = result.turns[-1]
    assert r.prompt[: last.prompt_tokens + TINY.answer_tokens] == last.prompt + last.answer_with
    assert r.stored_blocks == (last.prompt_tokens + TINY.answer_tokens - 1) // BT
    assert r.hole == r.stored_blocks // 2
    assert 0 < r.hole < r.stored_blocks - 1  # a middle block: present blocks after it
    assert r.holes_reported == [r.hole]
    assert r.hit_tokens_with_hole == r.hole * BT
    assert r.recompute_tokens == len(r.prompt) - r.hole * BT
    assert r.repaired == [r.hole]
    assert r.hit_tokens_after_repair == r.stored_blocks * BT
    assert r.repaired_tokens == BT + len(r.prompt) - r.stored_blocks * BT
    assert r.identical
    assert r.answer_scratch == worker.generate(r.prompt, max_new_tokens=TINY.answer_tokens)


async def test_no_hole_section_with_too_few_blocks(worker: ModelWorker) -> None:
    options = dataclasses.replace(TINY, turns=1, doc_tokens=8, question_tokens=8, answer_tokens=4)
    result = await run_demo(options, worker=worker)
    assert result.repair is None  # 8 + 8 + 3 tokens ran: one block, no middle
    assert [t.hit_tokens for t in result.turns] == [0]
    assert result.identical


async def test_a_kept_data_dir_serves_the_next_run_from_g3(
    worker: ModelWorker, tmp_path: Path
) -> None:
    # 12-token questions: the prompts end inside a block, and the block their answer completes
    # is stored already in the second run, in G3 only.
    options = dataclasses.replace(TINY, data_dir=str(tmp_path), question_tokens=12)
    first = await run_demo(options, worker=worker)
    second = await run_demo(options, worker=worker)
    assert second.blocks_at_open == first.tier_blocks["G3"] > 0
    # The same seed: the same conversation, now stored from the first turn on (G2 starts
    # empty, so these blocks come from LMDB). The whole prompt is stored: the model still runs
    # its last token for the first answer token.
    turn = second.turns[0]
    assert turn.prompt == first.turns[0].prompt
    assert turn.hit_tokens == turn.prompt_tokens // BT * BT > 0
    assert turn.prompt_tokens % BT != 0
    assert [t.stored_blocks for t in second.turns] == [0] * TINY.turns  # nothing new
    assert [t.answer_with for t in second.turns] == [t.answer_with for t in first.turns]
    assert second.identical


async def test_redis_adds_g4(worker: ModelWorker, redis_server: RedisServer) -> None:
    result = await run_demo(dataclasses.replace(TINY, redis_url=redis_server.url), worker=worker)
    assert [t.split(" ")[0] for t in result.tiers] == ["G2", "G3", "G4"]
    stored = result.tier_blocks["G2"]
    assert result.tier_blocks == {"G2": stored, "G3": stored, "G4": stored}
    check_turns(result, worker)
    assert result.identical


async def test_a_checkpoint_folder_answers_as_the_model_it_was_saved_from(
    worker: ModelWorker, tmp_path: Path
) -> None:
    # A model of its own: save_pretrained writes into the model's config.
    build_worker(TINY).model.save_pretrained(tmp_path / "tiny-llama")
    options = dataclasses.replace(TINY, model_dir=str(tmp_path / "tiny-llama"), repair=False)
    loaded = await run_demo(options)
    built = await run_demo(dataclasses.replace(TINY, repair=False), worker=worker)
    assert loaded.spec.model_id == "tiny-llama"
    assert str(tmp_path / "tiny-llama") in loaded.model
    assert [t.answer_with for t in loaded.turns] == [t.answer_with for t in built.turns]
    check_turns(loaded, worker)


def test_the_command_prints_the_tables() -> None:
    result = CliRunner().invoke(demo, TINY_ARGS)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Prefill per turn" in out
    for header in ("prompt", "hit", "hit %", "without", "with", "speedup", "same"):
        assert header in out
    # turn, prompt tokens, hit tokens, hit %, then timings; the answers are the same.
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*[12]\s+\d+\s+\d+\s", line)]
    assert [row[:4] for row in rows] == [["1", "80", "0", "0.0"], ["2", "104", "80", "76.9"]]
    assert [row[-1] for row in rows] == ["yes", "yes"]
    assert "no tokenizer" in out
    assert "A hole at block" in out
    assert "recompute from the hole" in out
    assert "repair the hole, then read" in out
    assert "Generated tokens are identical with and without kvstore." in out
    assert "NO" not in out


def test_the_command_refuses_a_bad_model_shape() -> None:
    result = CliRunner().invoke(demo, [*TINY_ARGS, "--hidden=96"])
    assert result.exit_code == 1
    assert "multiple of 64" in result.output
