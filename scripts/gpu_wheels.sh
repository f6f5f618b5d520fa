#!/usr/bin/env bash
# Download here, where there is a network, the wheels that scripts/gpu_check.sh needs on a lent GPU
# machine (which has no network), into ${KVSTORE_WHEELS:-.whl}: CPython 3.12, manylinux x86_64.
#
# The GPU machines' image ('cuda'; /work/.library/device/KINDS.md, "Python packages already there")
# has torch 2.11+cu130, cupy-cuda13x, numpy, xxhash, rich, click, prometheus-client, pyyaml,
# pytest, pytest-timeout, hypothesis and transformers. Of pyproject's dependencies and dev extras it
# lacks lmdb, redis, zstandard, grpcio-health-checking and pytest-asyncio; and its grpcio and
# protobuf may be older than the generated code in kvstore/v1 accepts (grpcio >= 1.85.1, protobuf
# >= 7.35.1: it refuses to import otherwise), so those two come as well. pytest-asyncio 1.x needs
# pytest >= 8.4, and the image's pytest version is not recorded: pytest itself comes too, with
# pluggy, iniconfig and pytest-timeout, so that the runner there is the one that runs here.
# grpcio-tools, ruff and mypy are not needed there (no test marked cuda uses them).
#
# Versions: those of this checkout's .venv where it has the package (what the tests run with
# here), else the defaults below. One version of each package: two would stop the install there.
# Then, on the device machine (the folder travels with the tree; name it in `carry` if git ignores
# it): bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${KVSTORE_WHEELS:-.whl}
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

declare -A DEFAULT=(
    [lmdb]=3.0.0
    [redis]=8.2.0
    [zstandard]=0.25.0
    [grpcio]=1.85.4
    [grpcio-health-checking]=1.85.1
    [protobuf]=7.36.2
    [pytest-asyncio]=1.5.0
    [pytest]=9.2.0
    [pluggy]=1.7.0
    [iniconfig]=2.3.1
    [pytest-timeout]=2.4.0
)
specs=()
for name in "${!DEFAULT[@]}"; do
    have=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" \
        2>/dev/null || true)
    specs+=("$name==${have:-${DEFAULT[$name]}}")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
echo "downloading into $DEST: ${specs[*]}"
# pip matches each manylinux_2_N tag exactly: name the ones these packages publish.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"

echo
echo "wheels ($(du -sh "$DEST" | cut -f1) in all; a device call carries at most 64 MiB of tree):"
for wheel in "$DEST"/*.whl; do
    needs=$(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/^Requires-Dist: //' | paste -sd ';' - || true)
    echo "  $(basename "$wheel")    needs: ${needs:-nothing}"
done
count=$(find "$DEST" -mindepth 1 -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" != "${#specs[@]}" ]; then
    echo "expected ${#specs[@]} wheels, found $count" >&2
    exit 1
fi
if ! git check-ignore -q "$DEST/x.whl" 2>/dev/null; then
    echo "note: git does not ignore $DEST; do not commit it (add it to .gitignore or" \
        ".git/info/exclude)" >&2
fi
