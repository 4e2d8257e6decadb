"""Wrappers of the ``cpu`` rows of the integration table: Megatron call sites that assume CUDA.

Each ``wrap_*`` takes the original attribute and returns its replacement; ``install`` applies them
(only from ``runtime.enable_cpu_runtime``, which first puts torch's CUDA API stand-ins in place; the
call sites and the measurements behind each row are in ``runtime/cpu.py``'s docstring, items 5-9 and 12).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def wrap_all_to_all_single(original):
    """Split sizes given as tensors become lists (row cpu-all-to-all-splits)."""

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return all_to_all_single


def wrap_get_rng_state(original):
    """The tracker's "CUDA" state is the CPU generator's (row cpu-rng-get)."""

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    return _get_cuda_rng_state


def wrap_set_rng_state(original):
    """Row cpu-rng-set."""

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    return _set_cuda_rng_state


def wrap_initialize_megatron(original):
    """``initialize_megatron(allow_no_cuda=True)`` (row cpu-initialize)."""
    return functools.partial(original, allow_no_cuda=True)


def wrap_noop(original):
    """A function that does nothing (CUDA fusion warm-up, dataset helper compilation)."""

    @functools.wraps(original)
    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    return noop


def wrap_compile_helpers(original):
    """The wheel's prebuilt ``helpers_cpp`` is used as it is; a source checkout without it gets one error naming
    the build command (row cpu-compile-helpers)."""

    @functools.wraps(original)
    def compile_helpers() -> None:
        import importlib.util
        import os

        if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
            return
        import megatron.core.datasets as datasets

        folder = os.path.dirname(datasets.__file__)
        raise RuntimeError(
            f"megatron.core.datasets.helpers_cpp is not built in {folder} (a Megatron-LM source checkout builds it "
            f"on first use with make, which the CPU runtime does not run in ranks); fix: pip install pybind11 && "
            f"make -C {folder}"
        )

    return compile_helpers


def wrap_device_arch(original):
    """Pre-Blackwell (0): its only demand, CUDA_DEVICE_MAX_CONNECTIONS=1, means nothing on CPU."""

    @functools.wraps(original)
    def get_device_arch_version() -> int:
        return 0

    return get_device_arch_version


def _with_adam_step(init_state_fn):
    @functools.wraps(init_state_fn)
    def init_state_with_step(opt, config=None):
        init_state_fn(opt, config)
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if state and "step" not in state:
                    state["step"] = torch.tensor(0.0)

    return init_state_with_step


def wrap_distopt_init(original):
    """torch Adam's ``init_state_fn`` completed with ``step`` (row cpu-distopt-init)."""

    @functools.wraps(original)
    def __init__(self, optimizer, config, grad_scaler, init_state_fn, *args, **kwargs):
        if init_state_fn is not None and isinstance(optimizer, _ADAMS):
            init_state_fn = _with_adam_step(init_state_fn)
        original(self, optimizer, config, grad_scaler, init_state_fn, *args, **kwargs)

    return __init__


def wrap_distopt_state_dict(original):
    """Build torch Adam's state before the layout is read at resume (row cpu-distopt-state-dict)."""
    from megatron.core.optimizer import distrib_optimizer

    @functools.wraps(original)
    def state_dict(self):
        if (
            not distrib_optimizer.HAVE_APEX_OR_TE
            and self.init_state_fn is not None
            and isinstance(self.optimizer, _ADAMS)
            and len(self.optimizer.state) == 0
        ):
            self.init_state_fn(self.optimizer, self.config)
        return original(self)

    return state_dict


def wrap_distopt_load_state_dict(original):
    """Each parameter gets its own step tensor holding the checkpoint's step (row cpu-distopt-load)."""
    from megatron.core.optimizer import distrib_optimizer

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        if distrib_optimizer.HAVE_APEX_OR_TE or not isinstance(self.optimizer, _ADAMS):
            return
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) == 1:
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step)

    return load_state_dict


def wrap_no_grad(original):
    """The original under ``torch.no_grad()`` (row cpu-distopt-set-main: a state copy has no gradient meaning)."""
    return torch.no_grad()(original)
