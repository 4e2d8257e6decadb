"""Expert choice through `launch` of a pretrain script whose forward step is its own (as Megatron-LM's
pretrain_gpt.py): the evaluation log carries the batch-choice loss next to the causal rule's (integration row
script-eval-batch-choice), on Megatron's defaults (biased linears) with EP=2 and the alltoall dispatcher (row
variable-experts-alltoall)."""

from __future__ import annotations

import re

from test_launch import launch, megatron_defaults_flags

# A script in pretrain_gpt.py's shape: its own forward step and loss function, nothing of ours but the data.
SCRIPT = '''
from functools import partial

import torch
from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

from megatron_moe_ext.training.gpt_step import train_valid_test_datasets_provider


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan=False):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


if __name__ == "__main__":
    setattr(train_valid_test_datasets_provider, "is_distributed", True)
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
'''
GAP = re.compile(r"validation loss at iteration 4 \| lm loss value: (\S+) \|.*lm loss \(batch choice\) value: (\S+) \|")


def test_launch_reports_the_batch_choice_loss_of_a_scripts_own_step(tmp_path) -> None:
    (tmp_path / "pretrain_script.py").write_text(SCRIPT)
    flags = [*megatron_defaults_flags(), "--moe-router-type", "expert_choice", "--train-iters", "4",
             "--eval-interval", "4", "--eval-iters", "1"]
    proc = launch(tmp_path, "pretrain_script.py", *flags)
    gap = GAP.search(proc.stdout)
    assert gap, proc.stdout[-3000:]
    causal, batch = (float(v) for v in gap.groups())
    assert causal > 0 and batch > 0
    assert re.search(r"iteration +4/ +4 \|.*active_experts: ", proc.stdout)
