"""``megatron-moe-ext flops [Megatron and our flags] [--json]``: parameters and FLOPs per token.

Parses the flags exactly as ``train`` does (Megatron's parser plus the granularity derivation, no
validation, so no process group and no subprocess), then prints ``accounting.format_report`` or one
JSON object (``Accounting.to_dict()``).

Which model: without model-shape flags (``--num-layers``, ``--hidden-size``) it is the embedded default that
``megatron-moe-ext train`` trains without data flags (your flags on top, granularity flags replacing its
expert sizing, as in ``train``), so ``flops --moe-granularity 8 --moe-expansion-rate 4`` costs exactly what
``train --moe-granularity 8 --moe-expansion-rate 4`` trains. With them, Megatron's own defaults plus your
flags; the vocabulary is then ``--vocab-size`` padded by Megatron's rule (tokenizers are not loaded, so
``--vocab-size`` is required).

Variable experts per token (expert choice, ReLU routing, null experts): the expert FLOPs use the
router's nominal mean (``accounting.expected_active_experts``); ``--active-experts X`` replaces it by a
measured mean of real experts per token per MoE layer (e.g. the ``active_experts`` the routers log).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

PROG = "megatron-moe-ext flops"


def _parser() -> argparse.ArgumentParser:
    # Only used to report errors in argparse's format (usage line + exit code 2).
    return argparse.ArgumentParser(prog=PROG, usage=USAGE)


USAGE = f"{PROG} [MEGATRON AND megatron-moe-ext FLAGS] [--json] [--active-experts X]"


def _pop_active_experts(argv: list[str]) -> tuple[list[str], float | None]:
    """``argv`` without ``--active-experts X`` (or ``=X``), and X (None when absent); a bad X exits 2."""
    rest: list[str] = []
    value: str | None = None
    it = iter(argv)
    for a in it:
        if a == "--active-experts":
            value = next(it, None)
            if value is None:
                _parser().error("--active-experts needs a value: the measured mean of real experts per token per "
                                "MoE layer, e.g. --active-experts 1.6")
        elif a.startswith("--active-experts="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
    if value is None:
        return rest, None
    try:
        return rest, float(value)
    except ValueError:
        _parser().error(f"--active-experts {value!r} is not a number; fix: the measured mean of real experts per "
                        "token per MoE layer, e.g. --active-experts 1.6")


_SHAPE_FLAGS = ("--num-layers", "--hidden-size")


def with_embedded_default(argv: list[str]) -> list[str]:
    """``argv`` on top of the embedded default model when it names no model shape (see the module docstring)."""
    from megatron_moe_ext.training.train import _GRANULARITY_FLAGS, _SIZING_FLAGS, DEFAULT_MODEL_ARGS, _without

    if any(a.split("=", 1)[0] in _SHAPE_FLAGS for a in argv):
        return argv
    defaults = list(DEFAULT_MODEL_ARGS)
    if any(a.split("=", 1)[0] in _GRANULARITY_FLAGS for a in argv):
        defaults = _without(defaults, _SIZING_FLAGS)
    return defaults + argv


def main(argv: Sequence[str]) -> int:
    """Print the accounting for the model the flags describe; argument errors exit 2."""
    import dataclasses

    from megatron_moe_ext.accounting import account, format_report, shape_from_args
    from megatron_moe_ext.args import parse_megatron_args

    argv = list(argv)
    as_json = "--json" in argv
    rest, active = _pop_active_experts([a for a in argv if a != "--json"])
    rest = with_embedded_default(rest)
    if "-h" in rest or "--help" in rest:
        # Megatron's --help lists the model flags but not ours: say what flops adds first.
        print(f"usage: {USAGE}\n"
              "  --json              print one JSON object instead of the table\n"
              "  --active-experts X  measured mean real experts per token per MoE layer (expert choice, ReLU,\n"
              "                      null experts: replaces the router's nominal value in the expert FLOPs)\n")
    args = parse_megatron_args(rest, validate=False)
    if args.vocab_size is None and getattr(args, "padded_vocab_size", None) is None:
        _parser().error(
            "flops needs --vocab-size (the tokenizer's vocabulary size; flops does not load tokenizers "
            "and pads it like Megatron, to a multiple of --make-vocab-size-divisible-by x TP)"
        )
    try:
        shape = shape_from_args(args)
        if active is not None:
            if not shape.num_experts:
                raise ValueError(f"--active-experts {active} needs MoE layers; fix: set --num-experts or drop it")
            shape = dataclasses.replace(shape, active_experts=active)
        acc = account(shape)
    except ValueError as err:
        _parser().error(str(err))
    print(json.dumps(acc.to_dict()) if as_json else format_report(acc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
