"""``megatron-moe-ext launch PATH/TO/pretrain_gpt.py ...``: an unmodified Megatron-LM script, our features.

Megatron-LM's ``pretrain_gpt.py`` is not on the package index and has no plugin mechanism, so this
entry installs our pieces into the ``megatron.training`` modules the script imports, then runs the
script itself with ``runpy.run_path(path, run_name="__main__")``. No line of the script changes.

The hooks (facts: ../shared/notes/megatron-integration.md section 4) are module attributes that the
script, or Megatron's own code, looks up at call or import time:

- ``arguments.add_megatron_arguments`` (looked up by ``parse_args``) gains our flags
  (``add_ext_args``), and ``arguments.validate_args`` (looked up by ``parse_and_validate_args``)
  first runs our derivation and checks (``apply_ext_args``): a contradiction is an argparse usage
  error (exit 2) before any model exists.
- ``argument_utils.core_transformer_config_from_args`` becomes a partial with
  ``config_class=MoEExtConfig``, and ``argument_utils.gpt_config_from_args`` (which the script
  imports by name, after the hooks) builds the ``MoEExtGPTModelConfig`` with our block spec,
  unless ``--spec`` names another.
- the same installs as our own rank entry: upcycling, PEER optimizer groups, balance logging,
  and the GPU telemetry line (``megatron_moe_ext.telemetry``).

The launcher half (no ``RANK`` in the environment) validates everything once, then starts the
ranks exactly like ``megatron-moe-ext train`` (torchrun on GPU; on CPU forked from this launcher, which
has already imported megatron: ``runtime/local_ranks.py``): on CPU the CPU flags are added and,
without data flags, the embedded default model and corpus are used. Under an existing launcher
(``RANK`` set: torchrun, SLURM) it is the rank half directly.

The patch route (``patches/``) calls ``setup_rank``, ``parse_and_validate_args`` and
``gpt_config_from_args`` from here explicitly instead of through the hooks.
"""

from __future__ import annotations

import argparse
import functools
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

PROG = "megatron-moe-ext launch"
_INSTALLED: dict[str, bool] = {"setup": False, "hooks": False}


def _usage_error(message: str) -> None:
    """Exit with argparse's usage error (code 2): the form every bad flag takes."""
    argparse.ArgumentParser(prog=PROG).error(message)


def setup_rank() -> None:
    """Per-rank setup shared by ``launch`` and the patched script. Idempotent.

    Without CUDA: the CPU runtime and a gloo process group (Megatron would otherwise assert CUDA).
    Always: our upcycling, PEER optimizer groups and telemetry, which have no seam in Megatron
    (see ``upcycling.py``, ``optimizer_groups.py``, ``telemetry.py``).
    """
    if _INSTALLED["setup"]:
        return
    if not torch.cuda.is_available():
        from megatron_moe_ext.runtime import enable_cpu_runtime, init_gloo_from_env

        enable_cpu_runtime()
        init_gloo_from_env()
    from megatron_moe_ext.optimizer_groups import install_peer_optimizer_groups
    from megatron_moe_ext.telemetry import install_telemetry
    from megatron_moe_ext.upcycling import install_upcycling

    install_upcycling()
    install_peer_optimizer_groups()
    install_telemetry()
    _INSTALLED["setup"] = True


def _apply_ext_args_or_exit(args: argparse.Namespace) -> None:
    from megatron_moe_ext.args import apply_ext_args

    try:
        apply_ext_args(args)
    except ValueError as err:
        _usage_error(str(err))


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
    _apply_ext_args_or_exit(args)
    validate_args(args, args_defaults or {})
    set_global_variables(args)
    return args


def logged_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    """``moe_ext_gpt_block_spec``, printing once which MLP/router/experts classes each layer gets
    (so a log shows that our layers, not Megatron's defaults, were built)."""
    from megatron.core.transformer.spec_utils import get_submodules
    from megatron.training.utils import print_rank_0

    from megatron_moe_ext.specs import moe_ext_gpt_block_spec

    block = moe_ext_gpt_block_spec(config, vp_stage=vp_stage)
    if not _INSTALLED.get("spec_logged"):
        rows = []
        for i, layer in enumerate(block.layer_specs, start=1):
            mlp = layer.submodules.mlp
            name = getattr(getattr(mlp, "func", mlp), "__name__", type(mlp).__name__)
            sub = get_submodules(mlp) if hasattr(mlp, "func") else None
            parts = [name]
            for slot in ("router", "experts"):
                value = getattr(sub, slot, None) if sub is not None else None
                if value is not None:
                    parts.append(f"{slot}={getattr(getattr(value, 'func', value), '__name__', value)}")
            rows.append(f"  layer {i}: " + " ".join(parts))
        print_rank_0("> megatron-moe-ext layers:\n" + "\n".join(rows))
        _INSTALLED["spec_logged"] = True
    return block


def gpt_config_from_args(
    args: argparse.Namespace,
    config: Any = None,
    model_config_cls: type | None = None,
    *,
    _megatron_gpt_config_from_args: Callable[..., Any] | None = None,
) -> Any:
    """Megatron's ``gpt_config_from_args`` with ``MoEExtConfig``, ``MoEExtGPTModelConfig`` and our
    block spec (unless ``--spec`` chose one), plus our balance logging and the accounting report.

    A caller's own ``config``/``model_config_cls`` (e.g. ModelOpt's) are kept.
    """
    from megatron.training.models.gpt import GPTModelConfig
    from megatron.training.utils import print_rank_0

    from megatron_moe_ext.accounting import account, format_report, shape_from_args
    from megatron_moe_ext.args import config_from_args
    from megatron_moe_ext.balancing.metrics_logging import install_balance_logging
    from megatron_moe_ext.balancing.settings import tracked_names_for
    from megatron_moe_ext.training.model_config import MoEExtGPTModelConfig

    if _megatron_gpt_config_from_args is None:
        from megatron.training.argument_utils import gpt_config_from_args as _megatron_gpt_config_from_args
    if model_config_cls is None or model_config_cls is GPTModelConfig:
        model_config_cls = MoEExtGPTModelConfig  # its builder also serves --moe-use-upcycling
    if config is None:
        config = config_from_args(args)
    model_cfg = _megatron_gpt_config_from_args(args, config=config, model_config_cls=model_config_cls)
    if model_cfg.transformer_layer_spec is None:  # --spec, when given, wins
        model_cfg.transformer_layer_spec = logged_block_spec
    # Our balance losses/metrics next to Megatron's in its training log (it prints a fixed list).
    install_balance_logging(tracked_names_for(config))
    try:
        print_rank_0("> megatron-moe-ext model accounting:\n" + format_report(account(shape_from_args(args))))
    except ValueError as err:  # a flag the accounting does not model: training is still fine
        print_rank_0(f"> megatron-moe-ext model accounting skipped: {err}")
    return model_cfg


def install_hooks() -> None:
    """Install our flags, derivation, config class and spec into ``megatron.training``. Idempotent.

    Must run before the script is executed: the script imports ``gpt_config_from_args`` by name.
    """
    if _INSTALLED["hooks"]:
        return
    import megatron.training.argument_utils as argument_utils
    import megatron.training.arguments as arguments

    from megatron_moe_ext.args import add_ext_args
    from megatron_moe_ext.config import MoEExtConfig

    add_megatron_arguments = arguments.add_megatron_arguments
    validate_args = arguments.validate_args
    megatron_gpt_config = argument_utils.gpt_config_from_args

    def add_megatron_and_ext_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_ext_args(add_megatron_arguments(parser))

    def validate_ext_then_megatron(args: argparse.Namespace, defaults: dict | None = None) -> Any:
        # Our derivation first, so Megatron's checks see the derived --num-experts etc.
        _apply_ext_args_or_exit(args)
        return validate_args(args, {} if defaults is None else defaults)

    arguments.add_megatron_arguments = add_megatron_and_ext_arguments
    arguments.validate_args = validate_ext_then_megatron
    argument_utils.core_transformer_config_from_args = functools.partial(
        argument_utils.core_transformer_config_from_args, config_class=MoEExtConfig
    )
    argument_utils.gpt_config_from_args = functools.partial(
        gpt_config_from_args, _megatron_gpt_config_from_args=megatron_gpt_config
    )
    _INSTALLED["hooks"] = True


def run_script(script: str, argv: Sequence[str]) -> None:
    """One rank: set up, install the hooks, then run ``script`` as ``__main__`` with ``argv``."""
    setup_rank()
    install_hooks()  # imports megatron first: the script's directory may hold a checkout's megatron/
    path = os.path.abspath(script)
    # What `python script.py` does: the script's siblings (gpt_builders.py, model_provider.py)
    # become importable. megatron is already imported, so the hooked modules stay the ones used.
    sys.path.insert(0, os.path.dirname(path))
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run an unmodified Megatron-LM pretrain script (e.g. pretrain_gpt.py) with megatron-moe-ext's "
            "flags, config class and layer specs. Every Megatron flag and ours is accepted after the script."
        ),
        allow_abbrev=False,
    )
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
        "-m", "megatron_moe_ext.launch", os.path.abspath(script), *argv,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``megatron-moe-ext launch``; returns the ranks' exit code."""
    from megatron_moe_ext.training import train as train_lib

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
    cpu = not torch.cuda.is_available()
    nproc = ours.nproc if ours.nproc is not None else (2 if cpu else torch.cuda.device_count())
    if nproc < 1:
        parser.error(f"--nproc {nproc} must be >= 1")
    cache_dir = ours.cache_dir or train_lib.default_cache_dir()
    try:
        full_argv = train_lib.prepare_argv(megatron_argv, cache_dir=cache_dir, cpu=cpu)
        train_lib.validate_layout(full_argv, nproc)
        # Megatron's parser plus our flags and derivation: unknown or contradictory flags fail
        # here, once, before any process starts (exit 2 with argparse's usage).
        from megatron_moe_ext.args import parse_megatron_args

        parse_megatron_args(full_argv, validate=False)
        save = train_lib._flag(full_argv, "--save")
        if save is not None:
            train_lib.check_save_dir(save)
    except ValueError as err:
        parser.error(str(err))
    command = rank_command(nproc, ours.script, full_argv)
    if ours.dry_run:
        print(" ".join(command))
        return 0
    if cpu:
        # Local gloo ranks forked from this already-imported launcher (runtime/local_ranks.py), not fresh
        # interpreters that import megatron again.
        from megatron_moe_ext.runtime.local_ranks import start_local_ranks
        from megatron_moe_ext.training.rank_entry import RANK_MODULES

        return start_local_ranks(_forked_rank, [os.path.abspath(ours.script), *full_argv], nproc,
                                 preload=RANK_MODULES)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(command, env=env)


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
