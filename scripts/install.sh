#!/usr/bin/env bash
# Every install step kvstore needs on a fresh Debian/Ubuntu machine, idempotent:
#   Debian's redis-server and openssl (tests start their own servers, make TLS certificates), a virtual environment in .venv,
#   torch 2.13.0 (pinned: an unpinned torch pulls gigabytes of CUDA packages onto CPU machines),
#   and kvstore itself with the test and benchmark extras.
# A stamp in .venv skips the pip steps while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the tests start their own servers; openssl: the TLS tests make certificates.
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server redis-tools"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing" >&2
    sudo_cmd=""
    if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
    $sudo_cmd apt-get update -q
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q $missing
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.kvstore-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
