# The two commands of the README, and the checks CI runs.
.PHONY: install run test lint bench test-vllm

install:
	bash scripts/install.sh

# The service with embedded defaults: G2 shared memory + G3 LMDB in ./kvstore-data, no Redis.
run: install
	.venv/bin/kvstore serve

# Every install step, then the whole suite. .ci/run calls exactly this.
test: install
	.venv/bin/python -m pytest -q
	.venv/bin/ruff check .
	.venv/bin/mypy

lint: install
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: install
	.venv/bin/python -m pip install -q -e ".[dev,bench]"
	.venv/bin/python -m benchmarks.hashing
	.venv/bin/python -m benchmarks.codec
	.venv/bin/python -m benchmarks.tiers
	.venv/bin/python -m benchmarks.engine
	.venv/bin/python -m benchmarks.service
	.venv/bin/python -m benchmarks.worker
	.venv/bin/python -m benchmarks.disaggregated

# The vLLM connector against vLLM itself (tests_vllm/), in a vLLM environment outside the repo
# (scripts/vllm_env.sh: built once in about 2-3 minutes, then reused); the tests take about
# 2.5-3 minutes on two CPU cores.
test-vllm:
	bash scripts/test_vllm.sh
