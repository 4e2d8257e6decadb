"""Wrappers of the ``script`` rows: an unmodified pretrain script gets our flags, checks, config and specs.

``megatron-moe-ext launch pretrain_gpt.py ...`` installs these before running the script. They are
module attributes that the script (or Megatron's own code) looks up at call or import time:
``arguments.add_megatron_arguments`` (looked up by ``parse_args``) gains our flags,
``arguments.validate_args`` first runs our derivation and checks (a contradiction is argparse's usage
error, exit 2), ``argument_utils.core_transformer_config_from_args`` uses ``MoEExtConfig``, and
``argument_utils.gpt_config_from_args`` (imported by name by the script, after the install) builds
the model config through ``model_config.gpt_model_config``.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

PROG = "megatron-moe-ext launch"


def apply_ext_args_or_exit(args: argparse.Namespace, prog: str = PROG) -> None:
    """Our derivation and checks on Megatron's parsed args; a ValueError becomes argparse's usage error (exit 2)."""
    from megatron_moe_ext.args import apply_ext_args

    try:
        apply_ext_args(args)
    except ValueError as err:
        argparse.ArgumentParser(prog=prog).error(str(err))


def wrap_add_megatron_arguments(original):
    """Row ``script-flags``."""
    from megatron_moe_ext.args import add_ext_args

    @functools.wraps(original)
    def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_ext_args(original(parser))

    return add_megatron_arguments


def wrap_validate_args(original):
    """Row ``script-validate``: ours first, so Megatron's checks see the derived --num-experts etc."""

    @functools.wraps(original)
    def validate_args(args: argparse.Namespace, defaults: dict | None = None) -> Any:
        apply_ext_args_or_exit(args)
        return original(args, {} if defaults is None else defaults)

    return validate_args


def wrap_core_transformer_config_from_args(original):
    """Row ``script-config-class``."""
    from megatron_moe_ext.config import MoEExtConfig

    return functools.partial(original, config_class=MoEExtConfig)


def wrap_gpt_config_from_args(original):
    """Row ``script-model-config``."""
    from megatron_moe_ext.integration.model_config import gpt_model_config

    return functools.partial(gpt_model_config, megatron_gpt_config_from_args=original)
