"""The one rank setup: every process that runs Megatron code for us starts here.

``setup_rank(entry)`` is called by each entry's rank half: ``train`` (training/rank_entry.py), ``launch``
(an unmodified pretrain script), ``patched`` (the patched pretrain_gpt.py, through
``megatron_moe_ext.launch.setup_rank``), ``analysis`` (trace capture) and ``import`` (import-hf's
checkpoint writer). Without CUDA it switches megatron-core to the CPU runtime and joins a gloo process
group from torchrun's environment; then it installs the integration table's groups that the entry needs
(``integration/table.py``), which first checks them against the installed megatron-core. Idempotent.

Also the Megatron flags every CPU run needs (``CPU_ARGS``), shared by the launchers and import-hf.
"""

from __future__ import annotations

# What each entry installs of the integration table (the cpu group comes with the CPU runtime).
ENTRY_GROUPS: dict[str, tuple[str, ...]] = {
    "train": ("model", "training"),
    "launch": ("model", "training", "script"),
    "patched": ("model", "training"),
    "analysis": ("model",),
    "import": ("model",),
}

# Flags every CPU run needs: the local (non-TE) implementation, gloo, and no CUDA-only fusions.
CPU_ARGS: tuple[str, ...] = (
    "--transformer-impl", "local",
    "--distributed-backend", "gloo",
    "--no-gradient-accumulation-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--num-workers", "0",
)

_DONE: set[str] = set()


def setup_rank(entry: str) -> None:
    """Per-rank setup of ``entry`` (a key of ``ENTRY_GROUPS``); see the module docstring."""
    if entry not in ENTRY_GROUPS:
        raise ValueError(f"unknown entry {entry!r}; choose from {', '.join(ENTRY_GROUPS)}")
    if entry in _DONE:
        return
    import torch

    from megatron_moe_ext._compat import check_megatron_core_version
    from megatron_moe_ext.integration import install

    check_megatron_core_version()  # also on GPU hosts, where the CPU runtime (which checks too) is not used

    if not torch.cuda.is_available():
        from megatron_moe_ext.runtime.cpu import enable_cpu_runtime, init_gloo_from_env

        enable_cpu_runtime()
        init_gloo_from_env()
    install(ENTRY_GROUPS[entry])
    _DONE.add(entry)
