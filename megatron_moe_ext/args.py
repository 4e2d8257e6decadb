"""Our command-line flags, generated from ``MoEExtConfig``'s fields, and the args -> config step.

``add_ext_args`` is an ``extra_args_provider`` for Megatron's parser: one flag per field that
``MoEExtConfig`` adds to TransformerConfig (name, type and help from the field and its docstring,
Megatron's own ``ArgumentGroupFactory``). ``parse_megatron_args`` is Megatron's
``parse_and_validate_args`` with one step inserted between parsing and validation: the granularity
derivation, so that Megatron's own checks (experts divisible by EP, MoE logging, ...) see the
derived ``--num-experts``/``--moe-ffn-hidden-size``/``--moe-router-topk``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import MEGATRON_DEFAULT_TOPK, MoEExtConfig
from megatron_moe_ext.settings import MoEExtSettings, build_settings
from megatron_moe_ext.settings.granularity import check_upcycling_granularity

GROUP_TITLE = "megatron-moe-ext"
# TransformerConfig field -> Megatron's args name, where they differ (for the fields our settings read).
ARGS_NAMES = {"num_moe_experts": "num_experts"}


def ext_field_names() -> list[str]:
    """The fields MoEExtConfig adds to TransformerConfig (each becomes one flag)."""
    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    return [f.name for f in dataclasses.fields(MoEExtConfig) if f.name not in base]


def add_ext_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add our flags to Megatron's parser (an ``extra_args_provider``)."""
    from megatron.training.argument_utils import ArgumentGroupFactory

    base = [f.name for f in dataclasses.fields(TransformerConfig)]
    ArgumentGroupFactory(MoEExtConfig, exclude=base).build_group(parser, GROUP_TITLE)
    # None = "not given": lets the granularity derivation tell an explicit --moe-router-topk
    # from Megatron's default (restored in apply_ext_args when nothing is derived).
    parser.set_defaults(moe_router_topk=None)
    return parser


def apply_ext_args(args: argparse.Namespace) -> argparse.Namespace:
    """Derive Megatron's MoE args from ours; ValueError on contradictions (before any process group).

    The settings are built and checked by ``settings.build_settings``, the same code the config runs;
    the values they derive (granularity sizes, top-k) are written into ``args`` for Megatron's
    ``validate_args``.
    """
    check_upcycling_granularity(
        args.moe_granularity, upcycling=args.moe_use_upcycling, upcycling_granularity=args.moe_upcycling_granularity
    )
    ext = build_settings(args_getter(args), default_topk=MEGATRON_DEFAULT_TOPK)
    for name, value in ext.derived:
        setattr(args, ARGS_NAMES.get(name, name), value)
    if ext.experts.ours and args.num_experts and args.expert_tensor_parallel_size is None:
        # Our experts are not split over TP (too small to be worth it; expert_settings refuses
        # expert-TP > 1). Megatron defaults --expert-tensor-parallel-size to the TP size, which would make a
        # plain `--tensor-model-parallel-size 2` run fail after the ranks start: unset, it is 1 with ours.
        args.expert_tensor_parallel_size = 1
    return args


def args_getter(args: argparse.Namespace):
    """``get(name)`` by TransformerConfig/MoEExtConfig field name over Megatron's args (``ARGS_NAMES``)."""
    return lambda name: getattr(args, ARGS_NAMES.get(name, name))


def settings_from_args(args: argparse.Namespace) -> MoEExtSettings:
    """The settings of parsed args (after ``apply_ext_args``: the same values the config gets), or of a
    saved namespace (a flag it lacks reads as its default, ``saved_arg``)."""
    return build_settings(lambda name: saved_arg(args, ARGS_NAMES.get(name, name)), default_topk=MEGATRON_DEFAULT_TOPK)


def saved_arg(args: argparse.Namespace, name: str):
    """``args.<name>``; for a namespace without it (saved by an older version, or a parser without our
    flags) the flag's default, from the flag definitions (Megatron's and ours, generated from
    MoEExtConfig's fields), never restated; None for a flag no current parser defines (a removed one)."""
    if hasattr(args, name):
        return getattr(args, name)
    return _flag_defaults().get(name)


@functools.cache
def _flag_defaults() -> dict[str, object]:
    from megatron.training.arguments import add_megatron_arguments

    parser = add_ext_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    return vars(parser.parse_args([]))


def parse_megatron_args(
    argv: Sequence[str], *, extra_args_provider=None, validate: bool = True
) -> argparse.Namespace:
    """Megatron's parse -> (our derivation) -> validate -> set globals, for ``argv``.

    With ``validate=False`` only parsing and our derivation run (no process group needed): the
    launcher and ``flops`` use that. Argument errors exit with argparse's usage (code 2).
    """
    import sys

    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_ext_args(parser)
        return extra_args_provider(parser) if extra_args_provider is not None else parser

    saved = sys.argv
    sys.argv = [saved[0] if saved else "megatron-moe-ext", *argv]
    try:
        args = parse_args(provider)
    finally:
        sys.argv = saved
    try:
        apply_ext_args(args)
    except ValueError as err:
        parser = argparse.ArgumentParser(prog="megatron-moe-ext")
        parser.error(str(err))
    if validate:
        validate_args(args, {})
        set_global_variables(args)
    return args


def config_from_args(args: argparse.Namespace) -> MoEExtConfig:
    """Megatron's args -> MoEExtConfig with every field (ours included) populated."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    return core_transformer_config_from_args(args, config_class=MoEExtConfig)
