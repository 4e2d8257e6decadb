"""``ext_settings(config)``: how shipped code reads our settings from a TransformerConfig.

An ``MoEExtConfig`` carries its validated ``MoEExtSettings`` as ``config.ext`` (built once in its
``__post_init__``). Any other TransformerConfig gets the settings of MoEExtConfig's field defaults with
its own Megatron fields, so layers never restate a default: ``config.py`` registers those defaults,
read from its fields, when it is imported (settings/ sits below config/ in the import layers, so it
cannot import it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_moe_ext.settings.aggregate import MoEExtSettings, build_settings

# MoEExtConfig's own fields -> their defaults, and Megatron's default top-k; set by config.py.
_FIELD_DEFAULTS: dict[str, Any] = {}
_DEFAULT_TOPK: list[int] = []


def register_field_defaults(defaults: Mapping[str, Any], *, default_topk: int) -> None:
    """Called once by ``config.py`` with MoEExtConfig's field defaults (from ``dataclasses.fields``)."""
    _FIELD_DEFAULTS.clear()
    _FIELD_DEFAULTS.update(defaults)
    _DEFAULT_TOPK[:] = [default_topk]


def ext_settings(config: Any) -> MoEExtSettings:
    """The settings of ``config`` (a TransformerConfig): ``config.ext`` for an MoEExtConfig, else built
    from MoEExtConfig's field defaults and the config's own fields."""
    ext = vars(config).get("ext")
    if isinstance(ext, MoEExtSettings):
        return ext
    if not _FIELD_DEFAULTS:
        raise RuntimeError(
            f"settings of a plain {type(config).__name__} need MoEExtConfig's field defaults; fix: import "
            "megatron_moe_ext.config (or build the model from MoEExtConfig)"
        )
    defaults = _FIELD_DEFAULTS
    return build_settings(lambda name: defaults[name] if name in defaults else getattr(config, name),
                          default_topk=_DEFAULT_TOPK[0])
