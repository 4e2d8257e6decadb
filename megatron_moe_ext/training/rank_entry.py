"""One rank of ``megatron-moe-ext train``: ``megatron.training.pretrain`` with our step and specs.

Run by torchrun (``python -m megatron_moe_ext.training.rank_entry MEGATRON_FLAGS...``) or forked by the CPU
launcher; the ``__main__`` guard matters because torch_dist checkpointing starts a spawn ``Manager`` that
re-imports the main module. The setup is the one every entry shares (``runtime.rank.setup_rank``) and the
model config the one ``launch`` builds too (``integration.model_config.gpt_model_config``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# No module-level torch/Megatron imports: torch_dist checkpointing's spawn Manager re-imports this
# module in a child process, which then starts in a fraction of a second instead of seconds.


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags for the train entry, added to Megatron's parser through ``extra_args_provider``."""
    group = parser.add_argument_group(title="megatron-moe-ext train")
    group.add_argument(
        "--ext-loss-log",
        type=str,
        default=None,
        help="Append each micro-batch's exact loss sum and token count to PATH.rankN (JSON lines).",
    )
    return parser


def parse_rank_args(flags: Sequence[str]) -> argparse.Namespace:
    """The train entry's argument namespace for ``flags`` on this rank (validated; Megatron globals set)."""
    from megatron_moe_ext.args import parse_megatron_args

    return parse_megatron_args(list(flags), extra_args_provider=add_train_args)


# What a rank imports: a CPU launcher imports it once before forking its local ranks (``preload``).
RANK_MODULES: tuple[str, ...] = (
    "megatron.training",
    "megatron.training.training",
    "megatron.training.argument_utils",
    "megatron_moe_ext.specs",
    "megatron_moe_ext.training.gpt_step",
    "megatron_moe_ext.integration.model_config",
    "megatron_moe_ext.integration.upcycling",
    "megatron_moe_ext.integration.optimizer_groups",
    "megatron_moe_ext.integration.telemetry",
    "megatron_moe_ext.integration.metrics_logging",
)


def rank_main(argv: Sequence[str], *, wrap_step: Callable[[Callable], Callable] | None = None) -> None:
    """Parse Megatron's flags (plus ours) from ``argv`` and run ``pretrain`` on this rank; ``wrap_step``, when
    given, wraps the forward step (``training/routing_checkpoints.py``)."""
    from megatron_moe_ext.runtime.rank import setup_rank

    setup_rank("train")

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_moe_ext.integration.model_config import gpt_model_config
    from megatron_moe_ext.training.gpt_step import forward_step, set_loss_log, train_valid_test_datasets_provider

    args = parse_rank_args(argv)
    set_loss_log(args.ext_loss_log)
    pretrain(
        pretrain_cfg_container_from_args(args, gpt_model_config(args)),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step if wrap_step is None else wrap_step(forward_step),
    )


if __name__ == "__main__":
    rank_main(sys.argv[1:])
