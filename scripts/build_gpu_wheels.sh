#!/usr/bin/env bash
# Build .whl/, the wheels that scripts/gpu_check.sh installs on a bare GPU machine (docs/gpu-check.md).
#
# The GPU machine has Python 3.12, torch, Triton, numpy, packaging, psutil, safetensors, scipy, pytest and
# nvidia-ml-py, but no megatron-core and no network: it gets megatron-core's wheel (downloaded for CPython 3.12 on
# manylinux x86_64, without dependencies: its runtime requirements torch, numpy and packaging are there) and this
# package's wheel (built here, without dependencies: all of ours are there). The folder travels as `carry: [".whl"]`,
# inside the 64 MiB a device call may carry; this script fails above LIMIT_MIB to leave room for the working tree.
#
# Usage: bash scripts/build_gpu_wheels.sh [DIR]   (default DIR: .whl in the repository root; PYTHON overrides the
# interpreter, default the repository's .venv or python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
MEGATRON_CORE_VERSION="${MEGATRON_CORE_VERSION:-0.19.2}"
LIMIT_MIB=60
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

mkdir -p "$DEST"
# One version of each distribution: a stale wheel next to a new one would stop the whole install there.
rm -f "$DEST"/megatron_core-*.whl "$DEST"/megatron_moe_ext-*.whl

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "megatron-core==$MEGATRON_CORE_VERSION"

# Build in a copy of the sources: the build writes build/ and *.egg-info next to setup.cfg, and other work may be
# running in this checkout.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar -C "$REPO" --exclude=./.venv --exclude=./.whl --exclude=./.git --exclude=./runs --exclude=./build \
  --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$WORK" -xf -
# Without build isolation where setuptools and wheel are already installed (no download); else pip's default.
ISOLATION=()
if "$PYTHON" -c 'import setuptools, wheel' 2>/dev/null; then ISOLATION=(--no-build-isolation); fi
"$PYTHON" -m pip wheel -q --no-deps "${ISOLATION[@]}" -w "$DEST" "$WORK"

total_bytes=$(du -cb "$DEST"/*.whl | tail -n1 | cut -f1)
total_mib=$(awk -v b="$total_bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
ls -l "$DEST"/*.whl
echo "wheels in $DEST: ${total_mib} MiB in all (limit ${LIMIT_MIB} MiB; a device call carries at most 64 MiB)"
if (( total_bytes > LIMIT_MIB * 1048576 )); then
  echo "error: ${total_mib} MiB of wheels exceed ${LIMIT_MIB} MiB; fix: remove other wheels from $DEST" >&2
  exit 1
fi
