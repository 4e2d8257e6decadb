"""Script templates ``sweep plan`` writes per run: the local command and a SLURM job (string.Template text).

``command.sh`` runs in the run's own directory, so the plan directory can be moved; ``$MEGATRON_MOE_EXT``
(default ``megatron-moe-ext``) names the command, as in examples/granularity_sweep.sh. It appends to
``train.log``: a resumed run keeps the log of its interrupted attempt above its own.
``slurm.sbatch`` is never run here: torchrun on each node, one rank per GPU, the same train flags (the rank half of
``megatron-moe-ext train`` runs directly under torchrun because it sets RANK).
"""

from __future__ import annotations

import string

COMMAND_SH = string.Template("""\
#!/usr/bin/env bash
# Sweep run $run ($kind): $summary
# Written by `megatron-moe-ext sweep plan`; `megatron-moe-ext sweep run` runs it (resumable: --save/--load ckpt).
set -euo pipefail
cd "$$(dirname "$$0")"
exec $${MEGATRON_MOE_EXT:-megatron-moe-ext} train $args >> train.log 2>&1
""")

SLURM_SBATCH = string.Template("""\
#!/usr/bin/env bash
# Sweep run $run ($kind) on a cluster: $summary
# Written by `megatron-moe-ext sweep plan`; not run by it. Adjust the #SBATCH lines to your cluster, then
#   sbatch $run/slurm.sbatch          (from the plan directory; resubmitting resumes from $run/ckpt)
# --nproc is the local CPU rank count and is dropped here: torchrun starts one rank per GPU.
#SBATCH --job-name=$run
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --time=$time_limit
#SBATCH --output=$run/slurm-%j.out
set -euo pipefail
cd "$${SLURM_SUBMIT_DIR:-.}/$run"
MASTER_ADDR=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 python -m torch.distributed.run \\
    --nnodes "$$SLURM_NNODES" --nproc-per-node $gpus_per_node --node-rank "$$SLURM_NODEID" \\
    --rdzv-id "$$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$$MASTER_ADDR:$${MASTER_PORT:-29500}" \\
    -m megatron_moe_ext train --distributed-backend nccl $args >> train.log 2>&1
""")
