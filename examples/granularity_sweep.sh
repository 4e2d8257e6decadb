#!/usr/bin/env bash
# Compute-matched granularity sweep (Krajewski et al. 2024, "Scaling Laws for Fine-Grained MoE"):
# G = 1, 4, 16 at expansion rate E = 4 on the embedded demo data, EP=2, CPU.
# G splits each expert of the dense FFN size (--ffn-hidden-size 256) into G experts of 256/G and
# routes to G x base-top-k of them, so the active parameters and FLOPs per token stay those of
# --moe-base-topk dense-sized experts (2 here; Megatron wants --moe-router-pre-softmax for top-1)
# while the number of experts grows to E x G:
#   G=1: 4 experts x 256, top-2;  G=4: 16 x 64, top-8;  G=16: 64 x 16, top-32.
# A dense model of equal compute (one FFN of base-top-k x 256 = 512, every layer dense) is trained next
# to them, and `megatron-moe-ext compare` then runs all four on the same tokens (four standard-library
# packages, one label each) and writes $OUT/compare/report.md: load balance, path diversity,
# specialisation by package, and the linear CKA of every pair of models' hidden states layer by layer.
# Compare the lm loss columns of the logs too (or `megatron-moe-ext flops` for the cost of each).
# This is a fixed, hand-written comparison of three models. For a compute-matched grid (budgets x model sizes x
# G x seeds, dense baselines of equal compute and of equal parameters), resumable runs and one results table, use
# `megatron-moe-ext sweep plan | run | collect` (docs/sweeps.md).
#
#   bash examples/granularity_sweep.sh          # 300 iterations each
#   TINY=1 bash examples/granularity_sweep.sh   # 3 iterations each, a small comparison (tests/e2e/test_analysis.py)
set -euo pipefail
CMD=${MEGATRON_MOE_EXT:-megatron-moe-ext}
ITERS=300
TOKENS=32768
[[ "${TINY:-0}" == 1 ]] && ITERS=3 && TOKENS=2048
OUT=${OUT:-runs/granularity_sweep}
mkdir -p "$OUT"
for G in 1 4 16; do
  echo "=== granularity G=$G (E=4, base top-k 2) ==="
  $CMD train --moe-granularity "$G" --moe-expansion-rate 4 --moe-base-topk 2 \
      --train-iters "$ITERS" --lr-warmup-iters 1 --eval-interval 100 --eval-iters 1 \
      --save-interval "$ITERS" --save "$OUT/G$G" "$@" 2>&1 | tee "$OUT/G$G.log"
done
echo "=== dense, equal compute (FFN 512 = 2 x 256) ==="
$CMD train --moe-layer-freq "([0]*2)" --ffn-hidden-size 512 \
    --train-iters "$ITERS" --lr-warmup-iters 1 --eval-interval 100 --eval-iters 1 \
    --save-interval "$ITERS" --save "$OUT/dense" "$@" 2>&1 | tee "$OUT/dense.log"
echo "=== comparison ==="
REPORT="$OUT/compare"
[[ -e "$REPORT" ]] && REPORT="$OUT/compare-$(date +%Y%m%d-%H%M%S)"  # a report is never overwritten
$CMD compare --checkpoint "$OUT/G1" --checkpoint "$OUT/G4" --checkpoint "$OUT/G16" --checkpoint "$OUT/dense" \
    --name G1 --name G4 --name G16 --name dense --max-tokens "$TOKENS" --out "$REPORT"
