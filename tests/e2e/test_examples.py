"""The shipped examples that can run on CPU, at their tiny size (``TINY=1``); the GPU ones are
syntax-checked only (they need GPUs, NCCL, SLURM: their headers say so). The granularity sweep runs
in test_analysis.py, whose comparison report it produces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_cache

from megatron_moe_ext.analysis import TraceReader
from megatron_moe_ext.testing.distributed import run_distributed
from megatron_moe_ext.testing.hf_check import checkpoint_logits, hf_outputs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(tmp: Path, name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TINY="1", MEGATRON_MOE_EXT=f"{sys.executable} -m megatron_moe_ext",
               MEGATRON_MOE_EXT_CACHE=shared_cache(), OUT=str(tmp / "sweep"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(["bash", str(EXAMPLES / name)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_cpu_quickstart(tmp_path) -> None:
    """The README demo: fine-grained experts with the product-key router, a PEER layer, balancing; then the
    routing analysis of the checkpoint it saved, at EP=2 (2 ranks, PEER tables sharded); traced again at EP=1
    (1 rank), the trace is the same."""
    out = run_example(tmp_path, "cpu_quickstart.sh").stdout
    assert "iteration        5/       5" in out and "lm loss:" in out
    for logged in ("global_expert_balance_loss", "subkey_balance_loss", "max_violation"):
        assert logged in out, f"{logged} missing from the demo's log"
    assert (tmp_path / "tiny" / "quickstart" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    summary = json.loads((tmp_path / "tiny" / "quickstart-analysis" / "summary.json").read_text())
    layers = summary["models"]["demo"]["layers"]
    assert [(la["num_experts"], la["top_k"], la["num_heads"]) for la in layers] == [(16, 4, 1), (256, 32, 4)]
    assert (tmp_path / "tiny" / "quickstart-analysis" / "report.md").stat().st_size > 1000
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    subprocess.run([sys.executable, "-m", "megatron_moe_ext", "analyze", "--checkpoint", "tiny/quickstart",
                    "--max-tokens", "1024", "--hidden", "--out", "ep1"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    a = TraceReader(tmp_path / "tiny" / "quickstart-analysis" / "traces" / "demo")
    b = TraceReader(tmp_path / "ep1" / "traces" / "quickstart")
    assert a.manifest["metadata"]["layer_kinds"] == {"1": "moe", "2": "peer"}
    assert a.manifest["metadata"]["expert_parallel"] == 2 and b.manifest["metadata"]["expert_parallel"] == 1
    ta, tb = a.load_tokens(), b.load_tokens()
    assert np.array_equal(ta.token_ids_T, tb.token_ids_T) and ta.token_ids_T.size == 1024
    for layer in (1, 2):
        la, lb = a.load_layer(layer, hidden=True), b.load_layer(layer, hidden=True)
        assert np.array_equal(la.expert_ids_TK, lb.expert_ids_TK), f"layer {layer}: expert ids differ"
        np.testing.assert_allclose(la.gates_TK.astype(np.float32), lb.gates_TK.astype(np.float32), atol=1e-3)
        np.testing.assert_allclose(la.hidden_TD, lb.hidden_TD, atol=1e-4)
    peer = summary["models"]["demo"]["layers"][1]
    assert peer["head_overlap"] is not None and 1.0 < peer["effective_experts"]["entropy"] <= 32.0
    # The demo's Hugging Face export reproduces the trained model's logits (our remote-code architecture).
    hf = tmp_path / "tiny" / "quickstart-hf"
    assert json.loads((hf / "config.json").read_text())["model_type"] == "megatron_moe_ext"
    tokens_BS = torch.from_numpy(ta.token_ids_T[:64].astype(np.int64)).reshape(2, 32)
    reference = run_distributed(checkpoint_logits, 1, str(tmp_path / "tiny" / "quickstart"), tokens_BS)[0]
    exported = hf_outputs(str(hf), tokens_BS)
    assert exported["class"] == "MegatronMoEExtForCausalLM"
    assert (exported["logits"] - reference).abs().max().item() <= 1e-4


def test_peer_model(tmp_path) -> None:
    out = run_example(tmp_path, "peer_model.sh").stdout
    assert "iteration        5/       5" in out and "lm loss:" in out
    assert "PEER" in out, "no PEER layer in the accounting report"


@pytest.mark.parametrize("name", ["gpu_8x_fp8.sh", "slurm_multinode.sbatch"])
def test_gpu_examples_are_valid_bash_and_say_they_were_not_run(name) -> None:
    subprocess.run(["bash", "-n", str(EXAMPLES / name)], check=True)
    assert "NOT RUN" in (EXAMPLES / name).read_text()
