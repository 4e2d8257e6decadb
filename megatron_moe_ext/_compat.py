"""Optional dependencies and supported versions, decided once.

Transformer Engine, apex, Triton and NVML cannot be installed on CPU machines; every module of this
package asks here instead of importing them itself, so a missing optional dependency is never an
ImportError at a distance.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from packaging.specifiers import SpecifierSet

# The megatron-core versions this package supports: the release its CPU runtime's shims name call sites of
# (0.19.2, the newest on the package index) up to, not including, the next minor release after Megatron-LM
# main (0.20.0, checked by hand: docs/megatron-versions.md). Pre-releases of in-range versions (0.20.0rc0,
# 0.20.0.dev0) and local labels (a checkout's "0.20.0+<commit>") are accepted; 0.21 pre-releases are not.
# setup.cfg's `megatron` and `test` extras state the same range (a unit test keeps them equal).
MEGATRON_CORE_MIN = "0.19.2"
MEGATRON_CORE_BELOW = "0.21"
MEGATRON_CORE_RANGE = f">={MEGATRON_CORE_MIN},<{MEGATRON_CORE_BELOW}"
SUPPORTED_MEGATRON_CORE = SpecifierSet(MEGATRON_CORE_RANGE, prereleases=True)
_INSTALL_HINT = (
    f'pip install "megatron-moe-ext[megatron]" (megatron-core{MEGATRON_CORE_RANGE} from the package index), '
    f"or put a Megatron-LM checkout of a supported version on PYTHONPATH (or pip install -e it)"
)


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


def megatron_core_location() -> str:
    """Where ``import megatron.core`` finds (or found) its ``__init__.py``, without importing it.

    Raises ImportError with the install fix if megatron.core is not importable.
    """
    module = sys.modules.get("megatron.core")
    if module is not None and getattr(module, "__file__", None):
        return module.__file__
    try:
        spec = importlib.util.find_spec("megatron.core")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ImportError(
            f"megatron.core is not importable: megatron_moe_ext needs megatron-core. Fix: {_INSTALL_HINT}."
        )
    return spec.origin


def megatron_core_version() -> str:
    """The version of the megatron.core that ``import megatron.core`` uses: ``"0.19.2"``, ``"0.20.0+1a2b3c4"``.

    Read from that package's ``package_info.py`` (source checkouts have it but no pip metadata, and may shadow
    an installed wheel), falling back to the ``megatron-core`` distribution's metadata. megatron.core itself is
    not imported. Raises ImportError with the install fix if megatron.core is not importable.
    """
    import runpy

    info = sys.modules.get("megatron.core.package_info")
    if info is not None:
        return str(info.__version__)
    info_path = os.path.join(os.path.dirname(megatron_core_location()), "package_info.py")
    if os.path.isfile(info_path):
        version = runpy.run_path(info_path).get("__version__")
        if version:
            return str(version)
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("megatron-core")
    except PackageNotFoundError as err:
        raise ImportError(
            f"cannot tell the version of megatron.core at {megatron_core_location()}: it has no package_info.py "
            f"and no megatron-core package metadata. Fix: {_INSTALL_HINT}."
        ) from err


def check_megatron_core_version(version: str | None = None) -> str:
    """Return the version of the megatron.core in use, or raise ValueError if it is not in the supported range.

    ``version`` overrides the detected one (for tests of the refusal itself). Raises ImportError when
    megatron.core is not importable at all.
    """
    found = version if version is not None else megatron_core_version()
    if not SUPPORTED_MEGATRON_CORE.contains(found):
        try:
            where = megatron_core_location()
        except ImportError:  # only with an explicit `version`
            where = "nowhere: megatron.core is not importable"
        raise ValueError(
            f"megatron-core {found} is not supported by megatron_moe_ext (imported from {where}); "
            f"it supports megatron-core{MEGATRON_CORE_RANGE}, pre-releases of those included. Fix: {_INSTALL_HINT}; "
            f"a checkout on PYTHONPATH takes precedence over any installed megatron-core."
        )
    return found
