#!/usr/bin/env bash
# Regenerate kvstore/v1/ from proto/kvstore/v1/kvstore.proto with the pinned grpcio-tools.
# tests/test_proto.py runs the same generation into a temporary directory and compares.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/kvstore/v1/kvstore.proto
