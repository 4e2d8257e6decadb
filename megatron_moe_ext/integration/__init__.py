"""How megatron-moe-ext hooks Megatron: one table of every replacement, one install function, one check.

- ``table.py``: THE table (target, wrapper, group, reason, the seam that would remove the row, versions
  checked) and the seams we use without replacing anything.
- ``installer.py``: ``install(groups)`` (the only code that assigns to a Megatron attribute), ``check`` (the
  canary: every target still exists with the parameters we rely on; also run at every install).
- wrappers, one file per concern: ``cpu.py`` (Megatron on CPU), ``upcycling.py``, ``optimizer_groups.py``
  (PEER table lr/wd), ``telemetry.py`` (NVML next to Megatron's log), ``metrics_logging.py`` (our balance
  names in Megatron's log), ``script_hooks.py`` (``launch`` on an unmodified pretrain script).
- ``model_config.py``: the one GPT model config assembly (config class, spec, builder) every entry uses.

The rank setup that calls ``install`` for train, launch, the patched script, analysis and import is
``megatron_moe_ext.runtime.rank.setup_rank``. docs/integration.md renders the table.
"""

from megatron_moe_ext.integration.installer import IntegrationError, check, install, installed, original

__all__ = ["IntegrationError", "check", "install", "installed", "original"]
