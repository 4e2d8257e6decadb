"""``--help`` of ``train`` and ``launch``: the launcher's options, then our flags grouped by feature.

argparse shows only the launcher's own options (Megatron's flags and ours are parsed later, on the ranks), so the
launchers' ``-h/--help`` is ``FeatureHelpAction``: it builds our flags exactly as the ranks do
(``args.add_ext_args``, from ``MoEExtConfig``'s fields and docstrings) and files each under its feature
(``FEATURE_GROUPS``), then says that every Megatron flag is accepted. Megatron is imported only when help is asked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


# Our flags in `train --help` / `launch --help`, by feature: title -> MoEExtConfig field names or name prefixes
# (a test checks that every field lands in exactly one group).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "granularity and experts (docs/fine-grained-experts.md)": (
        "moe_granularity", "moe_expansion_rate", "moe_base_topk", "moe_num_shared_experts", "moe_expert_backend"),
    "FP8 experts (docs/fp8.md)": ("moe_fp8_",),
    "router and product keys (docs/product-key-router.md)": ("moe_router_type", "moe_router_noisy_gating", "moe_pk_"),
    "routing variants: expert choice, ReLU, null experts (docs/routing-variants.md)": (
        "moe_ec_", "moe_relu_", "moe_null_experts"),
    "balancing (docs/balancing.md)": ("moe_balance_",),
    "PEER (docs/peer.md)": ("moe_peer_",),
}
MEGATRON_FLAGS_NOTE = (
    "Every Megatron-LM flag (see Megatron-LM's `pretrain_gpt.py --help`) is accepted as well and passed through "
    "unchanged, e.g. --num-layers, --hidden-size, --num-experts, --data-path, --save, --load."
)


def feature_of(field: str) -> str | None:
    """The ``FEATURE_GROUPS`` title whose names or prefixes cover ``field`` (None if none does)."""
    for title, names in FEATURE_GROUPS.items():
        if any(field == n or (n.endswith("_") and field.startswith(n)) for n in names):
            return title
    return None


def feature_help(launcher: argparse.ArgumentParser) -> str:
    """The ``--help`` text of a launcher: its own options, then our flags (generated from MoEExtConfig's fields
    by ``args.add_ext_args``) grouped by feature, then the note that every Megatron flag is accepted."""
    from megatron_moe_ext.args import add_ext_args, ext_field_names

    parser = argparse.ArgumentParser(
        prog=launcher.prog, description=launcher.description, epilog=MEGATRON_FLAGS_NOTE,
        parents=[launcher], add_help=False, allow_abbrev=False,
    )
    generated = add_ext_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    fields = set(ext_field_names())
    groups = {title: parser.add_argument_group(f"megatron-moe-ext: {title}") for title in FEATURE_GROUPS}
    for action in generated._actions:
        if action.dest in fields:
            title = feature_of(action.dest)
            if title is None:
                raise AssertionError(f"MoEExtConfig field {action.dest!r} is in no FEATURE_GROUPS entry of cli.py")
            groups[title]._group_actions.append(action)
    return parser.format_help()


class FeatureHelpAction(argparse.Action):
    """``-h/--help`` of the launchers: prints ``feature_help`` (Megatron is imported only then) and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show this help (our flags by feature) and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace, values, option_string=None) -> None:
        parser._print_message(feature_help(parser), sys.stdout)
        parser.exit()
