#!/usr/bin/env bash
# CPU quick start: the README demo. The embedded tiny MoE GPT (2 layers, hidden 64, 4 SwiGLU
# experts, top-2, EP=2, alltoall) on the Python standard library's sources, 2 gloo ranks, no GPU.
#
#   bash examples/cpu_quickstart.sh          # 300 iterations, checkpoint in runs/demo/checkpoints (~80 s)
#   TINY=1 bash examples/cpu_quickstart.sh   # 5 iterations (what tests/e2e/test_examples.py runs)
#
# MEGATRON_MOE_EXT overrides the command (default `megatron-moe-ext`; e.g. "python -m megatron_moe_ext").
set -euo pipefail
CMD=${MEGATRON_MOE_EXT:-megatron-moe-ext}
EXTRA=()
if [[ "${TINY:-0}" == 1 ]]; then
  EXTRA=(--train-iters 5 --lr-warmup-iters 1 --eval-interval 100 --eval-iters 1 --save-interval 5 --save tiny/quickstart)
fi
$CMD train "${EXTRA[@]}" "$@"
