"""What a Hugging Face target is: the contract between the export/import commands and one architecture.

A target sees Megatron's argument namespace (the architecture, as the training run validated it) and the
canonical state (``megatron_moe_ext.checkpoint.torch_dist``: name -> whole tensor); it never builds a model.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass
class HFModel:
    """One exported model before it is written: ``config.json`` content and tensors by their on-disk HF names.

    ``keep_fp32`` names tensors written in fp32 whatever ``--dtype`` says (e.g. an expert-bias buffer that
    transformers keeps in fp32); ``code_files`` are remote-code files (absolute paths) copied next to the
    weights, empty for native targets."""

    config: dict
    tensors: dict[str, torch.Tensor]
    keep_fp32: set[str] = dataclasses.field(default_factory=set)
    code_files: list[str] = dataclasses.field(default_factory=list)


class Target(Protocol):
    """One HF architecture. ``name`` is the ``--target`` value (the HF ``model_type`` for native targets)."""

    name: str
    native: bool

    def unsupported(self, args: argparse.Namespace) -> list[str]:
        """Why this target cannot reproduce the model of ``args`` exactly (one reason per item); [] if it can."""
        ...

    def export(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> HFModel:
        """The HF model of a checkpoint (``unsupported(args)`` is empty)."""
        ...

    def import_model(self, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The inverse: (Megatron model flags for the train entry, canonical state) of an HF folder's config and
        tensors (on-disk names). ValueError naming the field when the config has something we cannot build."""
        ...
