"""One rank of ``megatron-moe-ext train``: ``megatron.training.pretrain`` with our step and specs.

Run by torchrun (``python -m megatron_moe_ext.training.rank_entry MEGATRON_FLAGS...``); the
``__main__`` guard matters because torch_dist checkpointing starts a spawn ``Manager`` that
re-imports the main module.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from megatron_moe_ext._compat import HAVE_TE


def rank_main(argv: Sequence[str]) -> None:
    """Parse Megatron's flags (plus ours) from ``argv`` and run ``pretrain`` on this rank."""
    cpu = not torch.cuda.is_available()
    if cpu:
        from megatron_moe_ext.runtime import enable_cpu_runtime, init_gloo_from_env

        enable_cpu_runtime()
        init_gloo_from_env()

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        core_transformer_config_from_args,
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from megatron_moe_ext.specs import local_gpt_block_spec
    from megatron_moe_ext.training.gpt_step import forward_step, set_loss_log, train_valid_test_datasets_provider
    from megatron_moe_ext.training.train import add_train_args

    sys.argv = [sys.argv[0], *argv]  # Megatron's parser reads sys.argv
    args = parse_and_validate_args(extra_args_provider=add_train_args)
    set_loss_log(args.ext_loss_log)
    model_cfg = gpt_config_from_args(args, config=core_transformer_config_from_args(args))
    if cpu or not HAVE_TE:
        if model_cfg.transformer_layer_spec is None:
            model_cfg.transformer_layer_spec = local_gpt_block_spec
    pretrain(
        pretrain_cfg_container_from_args(args, model_cfg),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
    )


if __name__ == "__main__":
    rank_main(sys.argv[1:])
