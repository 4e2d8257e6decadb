"""Hugging Face targets: native architectures first (exact or refused), our remote-code architecture last."""

from __future__ import annotations

import argparse
import importlib

from megatron_moe_ext.checkpoint.hf_targets.base import HFModel, Target

__all__ = ["TARGET_NAMES", "HFModel", "Target", "choose_target", "get_target"]

# Preference order for --target auto (module name = target name, except the remote one).
_MODULES = {"qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen2_moe", "glm4_moe": "glm4_moe", "megatron_moe_ext": "remote"}
TARGET_NAMES: tuple[str, ...] = tuple(_MODULES)


def get_target(name: str) -> Target:
    """The target called ``name`` (``--target`` value or HF ``model_type``); ValueError listing the known ones."""
    if name not in _MODULES:
        raise ValueError(f"unknown target {name!r}; fix: one of {', '.join(TARGET_NAMES)} (or auto)")
    return importlib.import_module(f"megatron_moe_ext.checkpoint.hf_targets.{_MODULES[name]}").TARGET


def choose_target(args: argparse.Namespace, requested: str = "auto") -> tuple[Target, dict[str, list[str]]]:
    """(target, reasons each native target was refused) for a model. ``auto`` takes the first exact native
    target, else our remote-code architecture; a named target that cannot reproduce the model exactly is a
    ValueError with its reasons (nothing is ever exported inexactly)."""
    if requested != "auto":
        target = get_target(requested)
        reasons = target.unsupported(args)
        if reasons:
            hint = "" if not target.native else "; fix: --target auto (or megatron_moe_ext, our remote-code architecture)"
            raise ValueError(f"--target {requested} cannot reproduce this model exactly: " + "; ".join(reasons) + hint)
        return target, {}
    refused: dict[str, list[str]] = {}
    for name in TARGET_NAMES:
        target = get_target(name)
        reasons = target.unsupported(args)
        if not reasons:
            return target, refused
        refused[name] = reasons
    raise ValueError("no target can reproduce this model exactly: " +
                     " | ".join(f"{n}: {'; '.join(r)}" for n, r in refused.items()))
