"""One rank of ``megatron-moe-ext train``: ``megatron.training.pretrain`` with our step and specs.

Run by torchrun (``python -m megatron_moe_ext.training.rank_entry MEGATRON_FLAGS...``); the
``__main__`` guard matters because torch_dist checkpointing starts a spawn ``Manager`` that
re-imports the main module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# No module-level torch/Megatron imports: torch_dist checkpointing's spawn Manager re-imports this
# module in a child process, which then starts in a fraction of a second instead of seconds.


def parse_rank_args(flags: Sequence[str]) -> argparse.Namespace:
    """The train entry's argument namespace for ``flags`` on this rank (validated; Megatron globals set)."""
    from megatron_moe_ext.args import parse_megatron_args
    from megatron_moe_ext.training.train import add_train_args

    return parse_megatron_args(list(flags), extra_args_provider=add_train_args)


# What a rank imports: a CPU launcher imports it once before forking its local ranks (``preload``).
RANK_MODULES: tuple[str, ...] = (
    "megatron.training",
    "megatron.training.training",
    "megatron.training.argument_utils",
    "megatron_moe_ext.specs",
    "megatron_moe_ext.training.gpt_step",
    "megatron_moe_ext.balancing.metrics_logging",
    "megatron_moe_ext.upcycling",
    "megatron_moe_ext.optimizer_groups",
    "megatron_moe_ext.telemetry",
)


def rank_main(argv: Sequence[str]) -> None:
    """Parse Megatron's flags (plus ours) from ``argv`` and run ``pretrain`` on this rank."""
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        from megatron_moe_ext.runtime import enable_cpu_runtime, init_gloo_from_env

        enable_cpu_runtime()
        init_gloo_from_env()

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.utils import print_rank_0

    from megatron_moe_ext.accounting import account, format_report, shape_from_args
    from megatron_moe_ext.args import config_from_args, parse_megatron_args
    from megatron_moe_ext.balancing.metrics_logging import install_balance_logging
    from megatron_moe_ext.balancing.settings import tracked_names_for
    from megatron_moe_ext.optimizer_groups import install_peer_optimizer_groups
    from megatron_moe_ext.specs import moe_ext_gpt_block_spec
    from megatron_moe_ext.telemetry import install_telemetry
    from megatron_moe_ext.training.gpt_step import (
        forward_step,
        set_loss_log,
        train_valid_test_datasets_provider,
    )
    from megatron_moe_ext.training.train import add_train_args
    from megatron_moe_ext.upcycling import install_upcycling

    install_upcycling()  # --moe-use-upcycling with our experts (no seam in Megatron: see upcycling.py)
    install_peer_optimizer_groups()  # PEER table lr/wd multipliers (no seam: see optimizer_groups.py)
    install_telemetry()  # NVML GPU telemetry next to Megatron's log (one notice without NVML)
    args = parse_megatron_args(argv, extra_args_provider=add_train_args)
    set_loss_log(args.ext_loss_log)
    from megatron_moe_ext.training.model_config import MoEExtGPTModelConfig

    transformer_cfg = config_from_args(args)
    # Our balance losses/metrics next to Megatron's in its training log (it prints a fixed list).
    install_balance_logging(tracked_names_for(transformer_cfg))
    model_cfg = gpt_config_from_args(args, config=transformer_cfg, model_config_cls=MoEExtGPTModelConfig)
    if model_cfg.transformer_layer_spec is None:  # --spec, when given, wins
        # Local (non-TE) modules with our layers in Megatron's slots; TE specs come with the GPU path.
        model_cfg.transformer_layer_spec = moe_ext_gpt_block_spec
    print_rank_0("> megatron-moe-ext model accounting:\n" + format_report(account(shape_from_args(args))))
    pretrain(
        pretrain_cfg_container_from_args(args, model_cfg),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
    )


if __name__ == "__main__":
    rank_main(sys.argv[1:])
