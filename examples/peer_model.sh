#!/usr/bin/env bash
# A PEER model (He 2024, "Mixture of A Million Experts"): layer 2 of the demo model becomes a
# PEER layer with 256 single-neuron experts (16 x 16 product keys), 4 heads x top-8, a dense
# branch of 64, tables sharded over EP=2, table learning rate x2. Flags: README, "PEER layers".
# At paper scale use --moe-peer-num-experts 1048576 (defaults: 8 heads x top-16, d_key 128) on GPUs.
#
#   bash examples/peer_model.sh          # 300 iterations, CPU, 2 gloo ranks
#   TINY=1 bash examples/peer_model.sh   # 5 iterations (tests/e2e/test_examples.py)
set -euo pipefail
CMD=${MEGATRON_MOE_EXT:-megatron-moe-ext}
EXTRA=()
if [[ "${TINY:-0}" == 1 ]]; then
  EXTRA=(--train-iters 5 --lr-warmup-iters 1 --eval-interval 100 --eval-iters 1 --save-interval 5 --save tiny/peer)
fi
$CMD train --moe-peer-num-experts 256 --moe-peer-heads 4 --moe-peer-topk 8 --moe-peer-key-dim 32 \
    --moe-peer-layers 2 --moe-peer-shared-ffn-hidden-size 64 --moe-peer-shard ep --moe-peer-table-lr-mult 2 \
    "${EXTRA[@]}" "$@"
