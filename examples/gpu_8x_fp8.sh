#!/usr/bin/env bash
# Single node, 8 GPUs, FP8 (Transformer Engine, hybrid E4M3/E5M2, delayed scaling), through
# Megatron-LM's own pretrain_gpt.py (unmodified) with `megatron-moe-ext launch`.
#
# NOT RUN IN THIS REPOSITORY'S CI OR DEVELOPMENT MACHINE (no GPU there): the flags are Megatron's
# and ours as documented, but this exact recipe has not been executed. Needs: 8 CUDA GPUs with FP8
# (Hopper or newer), Transformer Engine >= 2.x, a Megatron-LM checkout at core_v0.19.0
# ($MEGATRON_LM), and a tokenized Megatron dataset ($DATA, a .bin/.idx prefix) with its tokenizer.
#
# Model: 24 layers, hidden 2048, fine-grained MoE (G=4, E=8: 32 experts of ffn 8192/4, top-8), our
# grouped experts on TE's grouped GEMM (FP8), TP=2 with sequence parallelism, EP=4 (ETP 1).
# FP8 GEMMs need expert sizes that are multiples of 16: 8192/4 = 2048 is.
set -euo pipefail
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at core_v0.19.0}"
: "${DATA:?set DATA to a Megatron dataset prefix}"
TOKENIZER_MODEL=${TOKENIZER_MODEL:-meta-llama/Llama-3.1-8B}
export CUDA_DEVICE_MAX_CONNECTIONS=1

megatron-moe-ext launch "$MEGATRON_LM/pretrain_gpt.py" --nproc 8 \
    --num-layers 24 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 16 \
    --group-query-attention --num-query-groups 4 --seq-length 4096 --max-position-embeddings 4096 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --moe-granularity 4 --moe-expansion-rate 8 --moe-base-topk 2 --moe-expert-backend te \
    --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 \
    --moe-router-dtype fp32 \
    --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 4 --expert-tensor-parallel-size 1 \
    --bf16 --fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1024 --fp8-amax-compute-algo max \
    --transformer-impl transformer_engine \
    --micro-batch-size 1 --global-batch-size 256 --train-iters 20000 --lr 3e-4 --min-lr 3e-5 \
    --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0 \
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --data-path "$DATA" --split 99,1,0 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --log-interval 10 --log-throughput --eval-interval 1000 --eval-iters 10 \
    --save "${SAVE:-checkpoints/gpu_8x_fp8}" --save-interval 1000 --ckpt-format torch_dist \
    --tensorboard-dir "${TB:-tensorboard/gpu_8x_fp8}" "$@"
# With nvidia-ml-py installed, every --log-interval also prints GPU memory, power, energy per
# token and SM clock next to Megatron's line (and to TensorBoard under gpu/*).
