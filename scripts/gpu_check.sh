#!/usr/bin/env bash
# The prepared GPU check (issue #20, docs/gpu-check.md): on a bare H100/H200 with torch and Triton, install the
# carried wheels (.whl/, built by scripts/build_gpu_wheels.sh), record the versions, run the `gpu` test tier and
# the fast GPU benchmarks (benchmarks/gpu_check.py), and write ONE Markdown block to $OUT/gpu_check.md (printed too).
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run: the same steps on CPU at tiny sizes (CI runs it): the wheels are built here into a temporary folder and
# installed into a temporary --target, what needs CUDA is reported as skipped. --out DIR: where gpu_check.md and the
# step logs go (default $OUT if set, else a new temporary folder). Every step has a timeout; a failing or timed-out
# step is recorded and the next one runs; the exit status is 1 if any step failed. Budget on the GPU: the steps'
# timeouts add up to 6.75 minutes (the device call allows 10, the issue asks for under 7).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY_RUN=0
OUT_DIR="${OUT:-}"
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out)
      if (($# < 2)); then echo "error: --out needs a folder; fix: --out DIR" >&2; exit 2; fi
      OUT_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1'; fix: use [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [[ -z "$OUT_DIR" ]]; then OUT_DIR="$(mktemp -d -t gpu-check-out-XXXXXX)"; fi
mkdir -p "$OUT_DIR"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d -t gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# Per-step timeouts (seconds). GPU: 45 + 30 + 160 + 170 = 405 s at most, plus the report (under 7 minutes).
if ((DRY_RUN)); then
  T_INSTALL=240; T_VERSIONS=60; T_TESTS=300; T_BENCH=240
else
  T_INSTALL=45; T_VERSIONS=30; T_TESTS=160; T_BENCH=170
fi

STEPS=()      # Markdown rows: | step | status | seconds |
FAILED=0

# run_step NAME TIMEOUT LOG COMMAND...: runs COMMAND with a timeout, its output to LOG (and to the terminal),
# and records the outcome. Never exits the script.
run_step() {
  local name="$1" limit="$2" log="$3"; shift 3
  local start rc status
  start=$(date +%s)
  echo "== $name (timeout ${limit} s)"
  set +e
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  case "$rc" in
    0) status="ok" ;;
    124|137) status="TIMED OUT after ${limit} s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  STEPS+=("| $name | $status | $(( $(date +%s) - start )) |")
  echo "== $name: $status"
}

# --- 1. install the wheels --------------------------------------------------------------------------------------
SITE="$WORK/site"
install_wheels() {
  local wheels_dir="$1"
  shopt -s nullglob
  local wheels=("$wheels_dir"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in $wheels_dir; fix: run bash scripts/build_gpu_wheels.sh here and carry .whl"
    return 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}"
  # Import from outside the repository, so the installed copies (not the checkout) are what is imported.
  (cd "$WORK" && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c '
import sys
import megatron.core, megatron_moe_ext
site = sys.argv[1]
for module in (megatron.core, megatron_moe_ext):
    print(module.__name__, "from", module.__file__)
    assert module.__file__.startswith(site), f"{module.__name__} was not imported from {site}"
' "$SITE")
}
install_step() {
  if ((DRY_RUN)); then
    bash "$REPO/scripts/build_gpu_wheels.sh" "$WORK/whl"
    install_wheels "$WORK/whl"
  else
    install_wheels "$REPO/.whl"
  fi
}
export -f install_wheels install_step
export DRY_RUN PYTHON SITE WORK REPO
run_step "install wheels (megatron-core, megatron-moe-ext)" "$T_INSTALL" "$OUT_DIR/install.log" bash -c install_step
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# --- 2. versions --------------------------------------------------------------------------------------------------
VERSIONS="$WORK/versions.md"
run_step "versions" "$T_VERSIONS" "$VERSIONS" "$PYTHON" benchmarks/gpu_check.py --versions

# --- 3. the gpu test tier -----------------------------------------------------------------------------------------
# The files that hold gpu-marked tests (on CPU, tests/conftest.py skips them: the dry run checks they collect).
mapfile -t GPU_TEST_FILES < <(grep -rl --include='test_*.py' -e 'mark\.gpu' tests | sort)
run_step "gpu test tier (pytest -m gpu, ${#GPU_TEST_FILES[@]} files)" "$T_TESTS" "$OUT_DIR/tests.log" \
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" "${GPU_TEST_FILES[@]}"
TEST_SUMMARY="$(grep -E '([0-9]+ (passed|failed|skipped|error|deselected))|no tests ran' "$OUT_DIR/tests.log" | tail -n1 || true)"

# --- 4. benchmarks ------------------------------------------------------------------------------------------------
BENCH_MD="$WORK/bench.md"
BENCH_ARGS=(--markdown "$BENCH_MD")
if ((DRY_RUN)); then BENCH_ARGS+=(--dry-run); fi
run_step "benchmarks (benchmarks/gpu_check.py)" "$T_BENCH" "$OUT_DIR/bench.log" \
  "$PYTHON" benchmarks/gpu_check.py "${BENCH_ARGS[@]}"

# --- 5. the report --------------------------------------------------------------------------------------------------
REPORT="$WORK/gpu_check.md"
{
  echo "## GPU check ($(if ((DRY_RUN)); then echo "dry run on CPU"; else echo "GPU"; fi), $(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "Command: \`bash scripts/gpu_check.sh$(if ((DRY_RUN)); then echo " --dry-run"; fi)\`"
  echo
  echo "Versions:"
  echo
  if [[ -s "$VERSIONS" ]]; then grep '^- ' "$VERSIONS" || echo "- (versions step printed nothing)"; else echo "- (versions step failed)"; fi
  echo
  echo "Steps:"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "gpu test tier: ${TEST_SUMMARY:-no summary line (see tests.log)}"
  echo
  if [[ -s "$BENCH_MD" ]]; then cat "$BENCH_MD"; else echo "Benchmarks: no table (the step failed or timed out; see bench.log)"; fi
  echo
  echo "Overall: $(if ((FAILED)); then echo "FAILED (a step failed or timed out)"; else echo "all steps ok"; fi)"
} > "$REPORT"
cp "$REPORT" "$OUT_DIR/.gpu_check.md.tmp"
mv -f "$OUT_DIR/.gpu_check.md.tmp" "$OUT_DIR/gpu_check.md"
echo
cat "$OUT_DIR/gpu_check.md"
echo "report: $OUT_DIR/gpu_check.md"
exit "$FAILED"
