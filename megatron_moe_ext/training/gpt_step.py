"""Forward step and dataset provider for ``megatron.training.pretrain`` on GPT models.

Megatron-LM's ``pretrain_gpt.py`` is not part of the megatron-core wheel, so the train entry brings
its own: the dataset is Megatron's ``GPTDataset`` built by ``BlendedMegatronDatasetBuilder`` from
the usual data flags, and the loss is token-summed cross entropy returned with its token count, the
form Megatron's schedules and training log average over the global batch.

At evaluation, a model with expert-choice routers (``--moe-router-type expert_choice``) evaluates each
micro-batch twice: with the causal rule its routers use outside training (``--moe-ec-eval-rule``), reported
as ``lm loss``, and again under ``batch_choice`` (the training rule, which sees later tokens of the
micro-batch), reported as ``lm loss (batch choice)``; Megatron's evaluation prints every key of the loss
dictionary, so the gap between the two is in the evaluation log. With pipeline parallelism the second pass
would need its own pipeline schedule, so there only ``lm loss`` is reported (a notice says so once).

Every rank builds its datasets (``is_distributed = True``) and reads its own loader instead of
receiving batches from TP rank 0: on CPU the datasets are small, the samplers are deterministic
per data-parallel rank, and it needs no broadcast of batches.

Legend: B micro-batch size, S sequence length.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any, Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.training import get_args, get_tokenizer
from megatron.training.utils.common_utils import get_blend_and_blend_per_split

from megatron_moe_ext.integration.eval_batch_choice import BATCH_CHOICE_LOSS_KEY, reports_batch_choice
from megatron_moe_ext.layers.expert_choice_router import batch_choice


_LOSS_LOG: dict[str, Any] = {"path": None, "file": None}


def set_loss_log(path: str | None) -> None:
    """Append every micro-batch's exact loss sum and token count to ``path`` (JSON lines), one
    file per rank (``.rankN`` suffix); used to compare runs bit for bit (e.g. resume tests)."""
    _LOSS_LOG["path"] = path


def _log_loss(loss_sum: torch.Tensor, num_tokens: torch.Tensor, training: bool) -> None:
    path = _LOSS_LOG["path"]
    if path is None or not training:
        return
    if _LOSS_LOG["file"] is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _LOSS_LOG["file"] = open(f"{path}.rank{rank}", "a", buffering=1)
    record = {
        "iteration": int(getattr(get_args(), "curr_iteration", -1)) + 1,
        "loss_sum": float(loss_sum),
        "tokens": int(num_tokens),
        "dp_rank": ps.get_data_parallel_rank(),
    }
    _LOSS_LOG["file"].write(json.dumps(record) + "\n")


def gpt_dataset_config(args: Any, tokenizer: Any) -> GPTDatasetConfig:
    """Megatron's GPTDatasetConfig from parsed Megatron arguments."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples: list[int]):
    """Train/valid/test GPTDatasets for ``pretrain``, built on every rank."""
    args = get_args()
    config = gpt_dataset_config(args, get_tokenizer())
    return BlendedMegatronDatasetBuilder(GPTDataset, train_val_test_num_samples, lambda: True, config).build()


train_valid_test_datasets_provider.is_distributed = True  # read by build_train_valid_test_data_loaders


def loss_func(loss_mask_BS: torch.Tensor, output_tensor: torch.Tensor, *, training: bool = True,
              batch_choice_output: torch.Tensor | None = None):
    """Token-summed LM loss, its token count, and the [sum, count] pair Megatron logs as 'lm loss'; with
    ``batch_choice_output`` (evaluation of an expert-choice model) also its [sum, count] as
    ``BATCH_CHOICE_LOSS_KEY``."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask_BS.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    _log_loss(loss_sum.detach(), num_tokens, training)
    report = {"lm loss": torch.cat([loss_sum.detach().view(1), num_tokens.float().view(1)])}
    if batch_choice_output is not None:
        batch_sum = torch.sum(batch_choice_output.detach().float().view(-1) * mask)
        report[BATCH_CHOICE_LOSS_KEY] = torch.cat([batch_sum.view(1), num_tokens.float().view(1)])
    return loss_sum, num_tokens, report


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module, return_schedule_plan: bool = False):
    """One micro-batch through the model; returns the per-token losses and the loss function (at
    evaluation of an expert-choice model, the loss function also gets the batch-choice forward's losses)."""
    batch = next(data_iterator)
    tokens_BS = batch["tokens"]
    labels_BS = batch["labels"]
    loss_mask_BS = batch["loss_mask"]
    attention_mask = batch.get("attention_mask")
    position_ids_BS = batch["position_ids"]
    output = model(tokens_BS, position_ids_BS, attention_mask, labels=labels_BS, loss_mask=loss_mask_BS)
    batch_output = None
    if reports_batch_choice(model):
        with torch.no_grad(), batch_choice(model):
            batch_output = model(tokens_BS, position_ids_BS, attention_mask, labels=labels_BS, loss_mask=loss_mask_BS)
    return output, partial(loss_func, loss_mask_BS, training=model.training, batch_choice_output=batch_output)
