# The two commands of the README, and the checks CI runs.
.PHONY: install run test lint bench

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
