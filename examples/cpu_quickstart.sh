#!/usr/bin/env bash
# CPU quick start: the README demo (`make demo` runs this). The embedded tiny GPT (2 layers, hidden 64)
# on the Python standard library's sources, 2 gloo ranks, EP=2, no GPU, with this package's features on:
#   layer 1: fine-grained MoE, G=4 x E=4 -> 16 SwiGLU experts of 64, top-4 (the compute of one dense
#            FFN of 256), routed by the product-key router (4 x 4 grid of sub-keys);
#   layer 2: a PEER layer, 256 single-neuron experts (16 x 16 product keys), 4 heads x top-8, tables
#            sharded over EP=2;
#   balancing: the granularity-normalised global-batch expert loss and the sub-key marginal loss, with
#            the balance metrics (MaxVio, entropy, usage, row/column usage) in Megatron's log.
# It saves a torch_dist checkpoint, then `megatron-moe-ext analyze` traces its routing on four stdlib
# packages and writes a report (load, paths, specialisation by package, CKA) next to it, and
# `megatron-moe-ext export-hf` writes a Hugging Face folder (our remote-code architecture: no native
# transformers model has product keys or PEER) that loads with trust_remote_code=True.
#
#   bash examples/cpu_quickstart.sh          # 300 iterations, checkpoint in runs/demo/checkpoints (~2.5 min)
#   TINY=1 bash examples/cpu_quickstart.sh   # 5 iterations (what tests/e2e/test_examples.py runs)
#
# MEGATRON_MOE_EXT overrides the command (default `megatron-moe-ext`; e.g. "python -m megatron_moe_ext").
set -euo pipefail
CMD=${MEGATRON_MOE_EXT:-megatron-moe-ext}
FEATURES=(
  --moe-granularity 4 --moe-expansion-rate 4 --moe-base-topk 1
  --moe-router-type product_key --moe-pk-key-dim 32
  --moe-peer-num-experts 256 --moe-peer-heads 4 --moe-peer-topk 8 --moe-peer-key-dim 32
  --moe-peer-layers 2 --moe-peer-shard ep
  --moe-balance-losses global_expert subkey --moe-balance-metrics
)
SAVE=runs/demo/checkpoints
STAMP=$(date +%Y%m%d-%H%M%S)
REPORT=runs/demo/analysis-$STAMP
HF=runs/demo/hf-$STAMP
TOKENS=16384
EXTRA=()
if [[ "${TINY:-0}" == 1 ]]; then
  SAVE=tiny/quickstart
  REPORT=tiny/quickstart-analysis
  HF=tiny/quickstart-hf
  TOKENS=1024
  EXTRA=(--train-iters 5 --lr-warmup-iters 1 --eval-interval 100 --eval-iters 1 --save-interval 5)
fi
$CMD train "${FEATURES[@]}" --save "$SAVE" "${EXTRA[@]}" "$@"
$CMD analyze --checkpoint "$SAVE" --name demo --nproc 2 --ep 2 --max-tokens "$TOKENS" --hidden --out "$REPORT"
$CMD export-hf --checkpoint "$SAVE" --out "$HF"
