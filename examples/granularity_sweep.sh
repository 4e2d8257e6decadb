#!/usr/bin/env bash
# Compute-matched granularity sweep (Krajewski et al. 2024, "Scaling Laws for Fine-Grained MoE"):
# G = 1, 4, 16 at expansion rate E = 4 on the embedded demo data, EP=2, CPU.
# G splits each expert of the dense FFN size (--ffn-hidden-size 256) into G experts of 256/G and
# routes to G x base-top-k of them, so the active parameters and FLOPs per token stay those of
# --moe-base-topk dense-sized experts (2 here; Megatron wants --moe-router-pre-softmax for top-1)
# while the number of experts grows to E x G:
#   G=1: 4 experts x 256, top-2;  G=4: 16 x 64, top-8;  G=16: 64 x 16, top-32.
# Compare the lm loss columns of the three logs (or `megatron-moe-ext flops` for the cost of each).
#
#   bash examples/granularity_sweep.sh          # 300 iterations each
#   TINY=1 bash examples/granularity_sweep.sh   # 3 iterations each (tests/e2e/test_examples.py)
set -euo pipefail
CMD=${MEGATRON_MOE_EXT:-megatron-moe-ext}
ITERS=300
[[ "${TINY:-0}" == 1 ]] && ITERS=3
OUT=${OUT:-runs/granularity_sweep}
mkdir -p "$OUT"
for G in 1 4 16; do
  echo "=== granularity G=$G (E=4, base top-k 2) ==="
  $CMD train --moe-granularity "$G" --moe-expansion-rate 4 --moe-base-topk 2 \
      --train-iters "$ITERS" --lr-warmup-iters 1 --eval-interval 100 --eval-iters 1 \
      --save-interval "$ITERS" --save "$OUT/G$G" "$@" 2>&1 | tee "$OUT/G$G.log"
done
