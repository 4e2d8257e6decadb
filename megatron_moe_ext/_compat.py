"""Optional dependencies and supported versions, decided once.

Transformer Engine, apex, Triton and NVML cannot be installed on CPU machines; every module of this
package asks here instead of importing them itself, so a missing optional dependency is never an
ImportError at a distance.
"""

from __future__ import annotations

import importlib.util

# The megatron-core releases the CPU runtime's shims were written against and tested with. Each shim
# names a call site of these releases; another release may move them.
SUPPORTED_MEGATRON_CORE: tuple[str, ...] = ("0.19.2",)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE: bool = _importable("transformer_engine")
HAVE_APEX: bool = _importable("apex")
HAVE_TRITON: bool = _importable("triton")
HAVE_NVML: bool = _importable("pynvml")
HAVE_MATPLOTLIB: bool = _importable("matplotlib")
HAVE_TRANSFORMERS: bool = _importable("transformers")


def megatron_core_version() -> str:
    """The installed megatron-core version string (raises ImportError if it is not installed)."""
    from importlib.metadata import version

    return version("megatron-core")


def check_megatron_core_version(version: str | None = None) -> str:
    """Return the installed megatron-core version, or raise ValueError if it is not supported.

    ``version`` overrides the detected one (for tests of the refusal itself).
    """
    found = version if version is not None else megatron_core_version()
    if found not in SUPPORTED_MEGATRON_CORE:
        raise ValueError(
            f"megatron-core {found} is not supported by megatron_moe_ext's CPU runtime; it was verified "
            f"with {', '.join(SUPPORTED_MEGATRON_CORE)}. Fix: pip install "
            f"'megatron-core=={SUPPORTED_MEGATRON_CORE[-1]}'."
        )
    return found
