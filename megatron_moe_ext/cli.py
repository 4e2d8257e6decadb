"""The ``megatron-moe-ext`` command: ``megatron-moe-ext SUBCOMMAND [ARGS...]``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _train(argv: Sequence[str]) -> int:
    from megatron_moe_ext.training.train import main

    return main(argv)


def _launch(argv: Sequence[str]) -> int:
    from megatron_moe_ext.launch import main

    return main(argv)


def _flops(argv: Sequence[str]) -> int:
    from megatron_moe_ext.accounting_cli import main

    return main(argv)


def _analyze(argv: Sequence[str]) -> int:
    from megatron_moe_ext.analysis.cli import analyze_main

    return analyze_main(argv)


def _compare(argv: Sequence[str]) -> int:
    from megatron_moe_ext.analysis.cli import compare_main

    return compare_main(argv)


def _dynamics(argv: Sequence[str]) -> int:
    from megatron_moe_ext.analysis.dynamics_cli import main

    return main(argv)


def _export_hf(argv: Sequence[str]) -> int:
    from megatron_moe_ext.checkpoint.hf_export import main

    return main(argv)


def _sweep(argv: Sequence[str]) -> int:
    from megatron_moe_ext.scaling.sweep_cli import main

    return main(argv)


def _fit(argv: Sequence[str]) -> int:
    from megatron_moe_ext.scaling.fit_cli import main

    return main(argv)


def _plan(argv: Sequence[str]) -> int:
    from megatron_moe_ext.scaling.plan_cli import main

    return main(argv)


def _import_hf(argv: Sequence[str]) -> int:
    from megatron_moe_ext.checkpoint.hf_import import main

    return main(argv)


# Sub-command -> (handler, one-line help). Handlers parse their own arguments: `train` passes
# every Megatron flag through unchanged, which a parent argparse parser would fight.
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (_train, "pretrain with megatron.training.pretrain (embedded tiny MoE demo without data flags)"),
    "launch": (_launch, "run an unmodified Megatron-LM pretrain_gpt.py with our flags, config and specs (no patch)"),
    "analyze": (_analyze, "routing analysis of a checkpoint on your data: trace, statistics, plots, report"),
    "compare": (_compare, "two or more checkpoints side by side on the same tokens (routing, CKA of hidden states)"),
    "dynamics": (_dynamics, "router saturation over a run's routing checkpoints (train --routing-checkpoints)"),
    "export-hf": (_export_hf, "torch_dist checkpoint -> Hugging Face folder (native target if exact, else remote code)"),
    "import-hf": (_import_hf, "Hugging Face folder (an export-hf target) -> torch_dist checkpoint train can --load"),
    "flops": (_flops, "parameters and FLOPs per token (total/active, router term) for Megatron model flags [--json]"),
    "sweep": (_sweep, "granularity scaling sweep: plan a compute-matched grid, run it (resumable), collect results"),
    "fit": (_fit, "fit a fine-grained MoE scaling law (Krajewski et al. 2024, joint law) to a results table"),
    "plan": (_plan, "compute-optimal model size, tokens, granularity (and experts under a memory bound) for a budget"),
}


# Sub-commands that import megatron-core (export-hf reads checkpoints with torch alone).
NEEDS_MEGATRON = frozenset({"train", "launch", "analyze", "compare", "dynamics", "import-hf", "flops"})


def quiet_cpu_host() -> None:
    """On a host without CUDA, silence the known-harmless messages (``runtime.cpu.HARMLESS_CPU_MESSAGES``)
    before Megatron is imported: forked CPU ranks inherit the filters and the already-imported modules."""
    import torch

    if not torch.cuda.is_available():
        from megatron_moe_ext.runtime.cpu import filter_harmless_cpu_messages

        filter_harmless_cpu_messages()


def _usage() -> str:
    lines = ["usage: megatron-moe-ext SUBCOMMAND [ARGS...]", "", "sub-commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'megatron-moe-ext SUBCOMMAND --help' for a sub-command's own options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command; exit code 2 with the usage for an unknown one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megatron-moe-ext: unknown sub-command {name!r}; choose from {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    if name in NEEDS_MEGATRON and not {"-h", "--help"} & set(rest):
        from megatron_moe_ext._compat import check_megatron_core_version

        try:  # before any Megatron import: a missing or out-of-range megatron-core is one line with the fix
            check_megatron_core_version()
        except (ImportError, ValueError) as err:
            print(f"megatron-moe-ext {name}: error: {err}", file=sys.stderr)
            return 2
    if name in NEEDS_MEGATRON:
        quiet_cpu_host()
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
