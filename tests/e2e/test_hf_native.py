"""Native Hugging Face targets end to end: per target, one randomised Megatron checkpoint saved on 2 gloo ranks at
TP=2/EP=2 is exported with ``export_hf`` and loaded by transformers' own class (no remote code, offline, empty
HF_HOME); its logits match Megatron's (<= 1e-4 in fp32, argmax identical), greedy generation reproduces Megatron's
greedy tokens, configs with one field wrong (negative controls) miss by > 1e-3, and ``import_model`` on the
written folder gives back the checkpoint's canonical state bit for bit.

Fixtures (each exercises what the target maps, plus one thing that must be dropped or must not matter):

- qwen3_moe: fine-grained experts (--moe-granularity), softmax top-k with pre-softmax off, QK-norm, GQA,
  kv_channels 24 != hidden/heads, a dense first layer, noisy gating (train-time only: its noise_weight is dropped);
- qwen2_moe: pre-softmax on, a gated shared expert, q/k/v bias, tied embeddings, Megatron's own SequentialMLP
  experts (--moe-expert-backend megatron) instead of ours;
- glm4_moe: sigmoid scores + expert bias + top-k scaling 2.5, group-limited routing (8 experts in 4 groups, 2
  groups kept, top-4: top-k // group-top-k == 2), 2 x moe_ffn shared experts, a dense first layer, QK-norm,
  partial RoPE 0.75, eps 1e-6, rotary base 50000.

Legend: B batch, S sequence, V padded vocabulary (the real vocabulary is 257 byte tokens).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_moe_ext.checkpoint.hf_export import export_hf
from megatron_moe_ext.checkpoint.hf_import import read_hf_tensors
from megatron_moe_ext.checkpoint.hf_targets import choose_target, get_target
from megatron_moe_ext.checkpoint.torch_dist import (
    read_args,
    read_model_state,
    resolve_iteration,
)
from megatron_moe_ext.testing.distributed import run_distributed
from megatron_moe_ext.testing.random_checkpoint import (
    assert_greedy_equal,
    model_flags,
    save_random_checkpoint,
)

REAL_VOCAB = 257
GREEDY_STEPS = 16
TOLERANCE = 1e-4
CONTROL_MIN_DIFF = 1e-3

FIXTURES: dict[str, tuple[str, ...]] = {
    "qwen3_moe": ("--moe-granularity", "2", "--moe-expansion-rate", "2", "--qk-layernorm",
                  "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24",
                  "--moe-layer-freq", "[0,1]", "--moe-router-noisy-gating", "--norm-epsilon", "1e-4"),
    "qwen2_moe": ("--moe-router-pre-softmax", "--moe-shared-expert-intermediate-size", "128",
                  "--moe-shared-expert-gate", "--add-qkv-bias", "--group-query-attention", "--num-query-groups", "2",
                  "--moe-expert-backend", "megatron", "--expert-tensor-parallel-size", "1"),
    "glm4_moe": ("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                 "--moe-router-topk-scaling-factor", "2.5", "--num-experts", "8", "--moe-router-topk", "4",
                 "--moe-ffn-hidden-size", "64", "--moe-shared-expert-intermediate-size", "128",
                 "--moe-router-num-groups", "4", "--moe-router-group-topk", "2", "--qk-layernorm",
                 "--group-query-attention", "--num-query-groups", "2", "--rotary-percent", "0.75",
                 "--moe-layer-freq", "[0,1]", "--norm-epsilon", "1e-6", "--rotary-base", "50000"),
}
TIED = {"qwen2_moe"}


def _set(**fields):
    def change(config: dict, folder: Path) -> None:
        config.update(fields)
    return change


def _drop(key: str):
    def change(config: dict, folder: Path) -> None:
        del config[key]
    return change


def _default_partial_rotary(config: dict, folder: Path) -> None:
    config.pop("partial_rotary_factor", None)
    config["rope_parameters"].pop("partial_rotary_factor", None)


def _full_rotary(config: dict, folder: Path) -> None:
    config["partial_rotary_factor"] = config["rope_parameters"]["partial_rotary_factor"] = 1.0


def _zero_selection_bias(config: dict, folder: Path) -> None:
    """A converter that forgot the expert bias (selection only: the gates are unchanged)."""
    from safetensors.torch import load_file, save_file

    for file in folder.glob("*.safetensors"):
        tensors = {n: (torch.zeros_like(t) if n.endswith("e_score_correction_bias") else t)
                   for n, t in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})


# One wrong field each (config, or the written folder); every one must move the logits by > CONTROL_MIN_DIFF.
CONTROLS = {
    "qwen3_moe": {"norm_topk_prob flipped": _set(norm_topk_prob=False),
                  "rms_norm_eps absent (Qwen default 1e-6)": _drop("rms_norm_eps")},
    "qwen2_moe": {"norm_topk_prob flipped": _set(norm_topk_prob=True), "rms_norm_eps 1e-6": _set(rms_norm_eps=1e-6)},
    "glm4_moe": {"routed_scaling_factor 1.0": _set(routed_scaling_factor=1.0),
                 "partial_rotary_factor default 0.5": _default_partial_rotary,
                 "partial_rotary_factor 1.0": _full_rotary,
                 "group limit off (topk_group 4)": _set(topk_group=4),
                 "e_score_correction_bias zero": _zero_selection_bias,
                 "rms_norm_eps 1e-5": _set(rms_norm_eps=1e-5)},
}


@dataclasses.dataclass
class Exported:
    target: str
    folder: Path
    ref: dict
    args: object
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """Offline, with an empty HF_HOME: the folder alone must be enough."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    yield
    mp.undo()


def save_checkpoints(jobs: list[tuple[list[str], str]]) -> list[dict | None]:
    """Rank function: every (flags, save_dir) job in one process group (process start and imports cost more than
    a tiny model); Megatron's globals are reset between models (``unset_global_variables``: "useful for
    multiple runs"). A leak from one model into the next could only make the comparisons below fail."""
    from megatron.training.global_vars import unset_global_variables

    results = []
    for flags, save_dir in jobs:
        results.append(save_random_checkpoint(flags, save_dir, greedy_steps=GREEDY_STEPS))
        unset_global_variables()
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("hf_native")
    jobs = []
    for target, extra in FIXTURES.items():
        flags = model_flags(*extra, tp=2, ep=2)
        if target in TIED:
            flags = [f for f in flags if f != "--untie-embeddings-and-output-weights"]
        jobs.append((flags, str(root / target / "ckpt")))
    refs = run_distributed(save_checkpoints, 2, jobs)[0]
    return {target: (root / target, ref) for target, ref in zip(FIXTURES, refs)}


@pytest.fixture(scope="module", params=list(FIXTURES))
def exported(request, checkpoints, hf_env) -> Exported:
    target = request.param
    root, ref = checkpoints[target]
    folder = export_hf(str(root / "ckpt"), str(root / "hf"), target=target, log=lambda *_: None)
    iter_dir, _ = resolve_iteration(str(root / "ckpt"))
    args = read_args(iter_dir)
    return Exported(target, Path(folder), ref, args, read_model_state(iter_dir, args.num_layers))


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_logits(folder: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(folder)(tokens_BS).logits.float()


def test_native_class_reproduces_megatron(exported: Exported) -> None:
    assert choose_target(exported.args)[0].name == exported.target  # auto picks this exact target
    model = load_hf(exported.folder)
    assert type(model).__module__.startswith(f"transformers.models.{exported.target}.")
    tokens_BS, ref_BSV = exported.ref["tokens"], exported.ref["logits"]
    with torch.no_grad():
        logits_BSV = model(tokens_BS).logits.float()
    assert logits_BSV.shape == ref_BSV.shape
    diff_real = (logits_BSV[..., :REAL_VOCAB] - ref_BSV[..., :REAL_VOCAB]).abs().max().item()
    diff_all = (logits_BSV - ref_BSV).abs().max().item()
    print(f"\n{exported.target}: max |logits - megatron| {diff_real:.2e} (real vocab), {diff_all:.2e} (all columns)")
    assert diff_real <= TOLERANCE and diff_all <= TOLERANCE
    assert torch.equal(logits_BSV[..., :REAL_VOCAB].argmax(-1), ref_BSV[..., :REAL_VOCAB].argmax(-1))
    with torch.no_grad():
        greedy_BS = model.generate(tokens_BS, max_new_tokens=GREEDY_STEPS, do_sample=False,
                                   attention_mask=torch.ones_like(tokens_BS), pad_token_id=0)
    compared = assert_greedy_equal(greedy_BS, exported.ref["greedy"], exported.ref["greedy_margins"],
                                   tolerance=TOLERANCE)
    assert compared >= 1


def test_negative_controls_miss(exported: Exported, tmp_path: Path) -> None:
    config = json.loads((exported.folder / "config.json").read_text())
    tokens_BS, ref_BSV = exported.ref["tokens"], exported.ref["logits"]
    for label, change in CONTROLS[exported.target].items():
        folder = tmp_path / "".join(c if c.isalnum() else "_" for c in label)
        shutil.copytree(exported.folder, folder)
        wrong = json.loads(json.dumps(config))
        change(wrong, folder)
        (folder / "config.json").write_text(json.dumps(wrong))
        diff = (hf_logits(folder, tokens_BS) - ref_BSV).abs().max().item()
        print(f"\n{exported.target} control '{label}': max |logits - megatron| {diff:.3g}")
        assert diff > CONTROL_MIN_DIFF, f"{label}: the comparison does not see this field"


def test_import_gives_back_the_canonical_state(exported: Exported) -> None:
    config = json.loads((exported.folder / "config.json").read_text())
    flags, state = get_target(exported.target).import_model(config, read_hf_tensors(str(exported.folder)))
    expected = {n: t for n, t in exported.state.items() if not n.endswith("router.noise_weight")}
    assert state.keys() == expected.keys()
    for name, t in expected.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name
    assert "--moe-router-noisy-gating" not in flags
    if exported.target == "qwen2_moe":
        assert "--moe-shared-expert-gate" in flags and "--untie-embeddings-and-output-weights" not in flags
    assert not any(f.startswith(("--tokenizer", "--vocab", "--tensor-model", "--expert-model")) for f in flags)


def test_import_command_rebuilds_the_model(checkpoints, hf_env, tmp_path: Path) -> None:
    """import-hf builds the model of import_model's flags through the train entry and fills it (nothing missing or
    left over); exporting that checkpoint again gives the same folder, bit for bit. GLM: the most flags."""
    from megatron_moe_ext.checkpoint.hf_import import import_hf

    root, _ = checkpoints["glm4_moe"]
    quiet = {"log": lambda *_: None}
    first = export_hf(str(root / "ckpt"), str(tmp_path / "hf1"), **quiet)
    import_hf(first, str(tmp_path / "imported"), tp=2, **quiet)
    second = export_hf(str(tmp_path / "imported"), str(tmp_path / "hf2"), **quiet)
    a, b = read_hf_tensors(first), read_hf_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads(Path(first, "config.json").read_text()) == json.loads(Path(second, "config.json").read_text())
