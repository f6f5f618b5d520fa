#!/usr/bin/env bash
# `make test-vllm`: the vLLM connector's tests (tests_vllm/) in the vLLM environment that
# scripts/vllm_env.sh builds outside the repository (or reuses). Everything runs offline on a CPU:
# the tests build a tiny Llama and its tokenizer, and start their own kvstore service, vLLM
# engines and model worker as subprocesses. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/vllm_env.sh)
export HF_HUB_OFFLINE=1
# This checkout's code, whichever checkout the venv's editable install points at.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# vLLM's CPU backend pins its OpenMP threads to cores; two engines never run at once here.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_vllm "$@"
