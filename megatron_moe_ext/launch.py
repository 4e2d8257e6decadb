"""``megatron-moe-ext launch PATH/TO/pretrain_gpt.py ...``: an unmodified Megatron-LM script, our features.

Megatron-LM's ``pretrain_gpt.py`` is not on the package index and has no plugin mechanism, so each rank
installs our pieces into the ``megatron.training`` modules the script imports (the ``script`` rows of the
integration table, ``integration/table.py``: our flags, our derivation and checks before Megatron's
validation, ``MoEExtConfig``, our block spec) and then runs the script itself with
``runpy.run_path(path, run_name="__main__")``. No line of the script changes.

The launcher half (no ``RANK`` in the environment) is ``train``'s (``training.train.start_ranks``): it
validates everything once and starts the ranks (torchrun on GPU; on CPU forked from this launcher). Under an
existing launcher (``RANK`` set: torchrun, SLURM) it is the rank half directly. The rank setup is the one
every entry shares (``runtime.rank.setup_rank``).

The patch route (``patches/``) calls ``setup_rank``, ``parse_and_validate_args`` and ``gpt_config_from_args``
from here explicitly instead of through the hooks.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import Any

from megatron_moe_ext.integration.script_hooks import PROG, apply_ext_args_or_exit


def setup_rank() -> None:
    """The patched script's rank setup (``runtime.rank.setup_rank('patched')``): CPU runtime and gloo without
    CUDA, and the integration table's ``training`` rows (upcycling, PEER optimizer groups, telemetry, balance
    logging). Idempotent."""
    from megatron_moe_ext.runtime.rank import setup_rank as _setup_rank

    _setup_rank("patched")


def parse_and_validate_args(
    extra_args_provider: Callable[[argparse.ArgumentParser], argparse.ArgumentParser] | None = None,
    ignore_unknown_args: bool = False,
    args_defaults: dict[str, Any] | None = None,
) -> argparse.Namespace:
    """Megatron's ``parse_and_validate_args`` with our flags and our derivation before validation.

    Same signature as Megatron's; ``extra_args_provider`` (e.g. ModelOpt's) runs after ours.
    ``--use-checkpoint-args`` and ``--yaml-cfg`` are not supported on this path (use ``launch``).
    """
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from megatron_moe_ext.args import add_ext_args

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = add_ext_args(parser)
        return extra_args_provider(parser) if extra_args_provider is not None else parser

    args = parse_args(provider, ignore_unknown_args)
    apply_ext_args_or_exit(args)
    validate_args(args, args_defaults or {})
    set_global_variables(args)
    return args


def gpt_config_from_args(args: argparse.Namespace, config: Any = None, model_config_cls: type | None = None) -> Any:
    """Megatron's ``gpt_config_from_args`` with ``MoEExtConfig``, ``MoEExtGPTModelConfig`` and our block spec
    (``integration.model_config.gpt_model_config``); a caller's own ``config``/``model_config_cls`` are kept."""
    from megatron_moe_ext.integration.model_config import gpt_model_config

    return gpt_model_config(args, config, model_config_cls)


def run_script(script: str, argv: Sequence[str]) -> None:
    """One rank: set up (with the script hooks), then run ``script`` as ``__main__`` with ``argv``."""
    from megatron_moe_ext.runtime.rank import setup_rank as _setup_rank

    _setup_rank("launch")  # imports megatron first: the script's directory may hold a checkout's megatron/
    path = os.path.abspath(script)
    # What `python script.py` does: the script's siblings (gpt_builders.py, model_provider.py)
    # become importable. megatron is already imported, so the hooked modules stay the ones used.
    sys.path.insert(0, os.path.dirname(path))
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


def _launcher_parser() -> argparse.ArgumentParser:
    from megatron_moe_ext.integration.flag_help import FeatureHelpAction

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run an unmodified Megatron-LM pretrain script (e.g. pretrain_gpt.py) with megatron-moe-ext's "
            "flags, config class and layer specs. Every Megatron flag and ours is accepted after the script."
        ),
        allow_abbrev=False,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action=FeatureHelpAction)
    parser.add_argument("script", help="path to Megatron-LM's pretrain_gpt.py (or a script with its __main__)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks to start on this machine (CPU default 2; GPU: one per GPU)")
    parser.add_argument("--cache-dir", default=None, help="dataset cache (default $MEGATRON_MOE_EXT_CACHE or ~/.cache/megatron_moe_ext)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the rank command, start nothing")
    return parser


def rank_command(nproc: int, script: str, argv: Sequence[str]) -> list[str]:
    """torchrun command starting ``nproc`` local ranks of ``run_script(script, argv)``."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}",
        # every rank's lines, prefixed with its rank, on the console (as local CPU ranks print them)
        "--tee", "3", "--log-line-prefix-template", "[rank${rank}] ",
        "-m", "megatron_moe_ext.launch", os.path.abspath(script), *argv,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``megatron-moe-ext launch``; returns the ranks' exit code."""
    from megatron_moe_ext.training.train import start_ranks

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _launcher_parser()
    ours, megatron_argv = parser.parse_known_args(argv)
    if not os.path.isfile(ours.script):
        parser.error(
            f"script {ours.script!r} is not a file; fix: pass the path to Megatron-LM's pretrain_gpt.py "
            "first, then the flags"
        )
    if "RANK" in os.environ:  # already one rank of a torchrun/SLURM job
        run_script(ours.script, megatron_argv)
        return 0
    script = os.path.abspath(ours.script)
    return start_ranks(
        parser, ours, megatron_argv,
        command=lambda nproc, full_argv: rank_command(nproc, script, full_argv),
        entry=_forked_rank, entry_prefix=[script], extra_args_provider=None,
    )


def _forked_rank(argv: Sequence[str]) -> None:
    """A local CPU rank started by ``start_local_ranks``: ``argv`` is the script, then its flags."""
    run_script(argv[0], argv[1:])


if __name__ == "__main__":
    # Through the importable module, not this __main__ copy: the spec function stored in the model
    # config must be importable by name (and the script itself becomes __main__ below).
    from megatron_moe_ext import launch as _launch

    if "RANK" in os.environ and len(sys.argv) > 1:  # started by rank_command / torchrun
        _launch.run_script(sys.argv[1], sys.argv[2:])
    else:
        sys.exit(_launch.main())
