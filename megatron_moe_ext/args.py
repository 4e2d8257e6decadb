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
from collections.abc import Sequence

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.balancing.settings import check_balance_settings
from megatron_moe_ext.config import MEGATRON_DEFAULT_TOPK, MoEExtConfig
from megatron_moe_ext.granularity import (
    DERIVED_SETTINGS,
    derive_fine_grained,
    explicit_conflicts,
)
from megatron_moe_ext.peer_settings import (
    check_peer_parallel,
    check_peer_subkey_loss,
    peer_layer_numbers,
    peer_layout,
)
from megatron_moe_ext.router_settings import check_router_settings

GROUP_TITLE = "megatron-moe-ext"


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
    """Derive Megatron's MoE args from ours; ValueError on contradictions (before any process group)."""
    _derive_granularity(args)
    _check_router_args(args)
    _check_balance_args(args)
    _check_peer_args(args)
    _default_expert_tensor_parallel(args)
    return args


def _default_expert_tensor_parallel(args: argparse.Namespace) -> None:
    """Our experts are not split over TP (too small to be worth it; FineGrainedExperts refuses
    expert-TP > 1). Megatron defaults --expert-tensor-parallel-size to the TP size, which would make
    a plain `--tensor-model-parallel-size 2` run fail after the ranks start: unless the user set
    it, it is 1 with our experts."""
    ours = getattr(args, "num_experts", None) and getattr(args, "moe_expert_backend", "megatron") != "megatron"
    if ours and getattr(args, "expert_tensor_parallel_size", 1) is None:
        args.expert_tensor_parallel_size = 1


def _check_peer_args(args: argparse.Namespace) -> None:
    if args.moe_peer_num_experts is None:
        return
    peer_layout(
        args.moe_peer_num_experts, heads=args.moe_peer_heads, topk=args.moe_peer_topk,
        key_dim=args.moe_peer_key_dim, subkey_topk=args.moe_peer_subkey_topk,
    )
    peer_layer_numbers(args.moe_peer_layers, args.num_layers)
    check_peer_parallel(
        shard=args.moe_peer_shard, tp=args.tensor_model_parallel_size, ep=args.expert_model_parallel_size
    )
    check_peer_subkey_loss(marginals=args.moe_peer_subkey_loss_marginals, stride=args.moe_peer_subkey_loss_stride)


def _check_balance_args(args: argparse.Namespace) -> None:
    check_balance_settings(
        losses=args.moe_balance_losses,
        coeffs=args.moe_balance_coeffs,
        policy=args.moe_balance_coeff_policy,
        metrics=args.moe_balance_metrics,
        usage_window=args.moe_balance_usage_window,
        router_type=args.moe_router_type,
        num_experts=args.num_experts,
        ep_size=args.expert_model_parallel_size,
        peer_num_experts=args.moe_peer_num_experts,
    )


def _check_router_args(args: argparse.Namespace) -> None:
    names = {"num_moe_experts": "num_experts"}  # Megatron's args name for that config field
    check_router_settings(lambda name: getattr(args, names.get(name, name), None))


def _derive_granularity(args: argparse.Namespace) -> None:
    if args.moe_granularity is None:
        if args.moe_num_shared_experts:
            raise ValueError(
                f"--moe-num-shared-experts {args.moe_num_shared_experts} needs --moe-granularity (shared "
                "experts are sized ffn_hidden_size/G); fix: add --moe-granularity or use "
                "--moe-shared-expert-intermediate-size"
            )
        if args.moe_router_topk is None:
            args.moe_router_topk = MEGATRON_DEFAULT_TOPK
        return
    if getattr(args, "moe_use_upcycling", False) and getattr(args, "moe_upcycling_granularity", 1) != 1:
        raise ValueError(
            f"--moe-upcycling-granularity {args.moe_upcycling_granularity} with --moe-granularity "
            f"{args.moe_granularity}: the upcycling granularity is G itself (--ffn-hidden-size stays the "
            "dense size); fix: drop --moe-upcycling-granularity"
        )
    if args.moe_expansion_rate is None:
        raise ValueError(
            f"--moe-granularity {args.moe_granularity} needs --moe-expansion-rate (E, experts = E*G); fix: add e.g. --moe-expansion-rate 8"
        )
    if args.ffn_hidden_size is None:
        raise ValueError(
            f"--moe-granularity {args.moe_granularity} derives expert sizes from the dense FFN size; fix: pass --ffn-hidden-size"
        )
    sizes = derive_fine_grained(
        args.ffn_hidden_size,
        args.moe_granularity,
        args.moe_expansion_rate,
        args.moe_base_topk,
        num_shared_experts=args.moe_num_shared_experts,
        expert_parallel_size=args.expert_model_parallel_size,
        fp8_recipe=(args.fp8_recipe if getattr(args, "fp8", None) else None),
    )
    dest = {"num_moe_experts": "num_experts"}  # Megatron's args name for that config field
    explicit = {
        field: (f"{flag} ", getattr(args, dest.get(name, name))) for field, (name, flag) in DERIVED_SETTINGS.items()
    }
    conflicts = explicit_conflicts(sizes, explicit)
    if conflicts:
        raise ValueError(
            f"--moe-granularity {args.moe_granularity} --moe-expansion-rate {args.moe_expansion_rate} "
            f"--moe-base-topk {args.moe_base_topk} contradict {'; '.join(conflicts)}. Fix: drop those flags "
            "(they are derived from G) or drop --moe-granularity."
        )
    for field, (name, _) in DERIVED_SETTINGS.items():
        setattr(args, dest.get(name, name), getattr(sizes, field))


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
