"""Both sides of an export check: Megatron's logits from a saved checkpoint, and transformers' logits and greedy
tokens from an exported folder, loaded the way a user loads it (fresh process, offline, empty HF_HOME, the
repository not importable, ``trust_remote_code=True`` for our architecture).

Legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

# Runs in a fresh interpreter with the repository neither on sys.path nor the working directory. This package may
# still be installed in the interpreter (CI installs it editable), so a meta-path finder refuses it and records who
# tried: an export must load from its own folder alone.
_HF_SCRIPT = r"""
import sys
attempts = []
class _RefuseThisPackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "megatron_moe_ext":
            attempts.append(name)
            raise ImportError(f"{name} is refused in this check: an export must not need it")
        return None
sys.meta_path.insert(0, _RefuseThisPackage())
import torch
from transformers import AutoModelForCausalLM
io_file, steps = sys.argv[1], int(sys.argv[2])
jobs = torch.load(io_file)
results = {}
for key, (folder, tokens) in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
        greedy = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=steps,
                                min_new_tokens=steps, do_sample=False, pad_token_id=0) if steps else None
    results[key] = {"logits": logits, "greedy": greedy, "class": type(model).__name__,
                    "module": type(model).__module__}
results["package_imports"] = attempts
torch.save(results, io_file)
"""


def hf_outputs_many(jobs: dict[str, tuple[str, torch.Tensor]], greedy_steps: int = 0, *,
                    timeout_s: float = 600) -> dict:
    """For each ``key: (folder, tokens [B, S])``: ``{"logits": [B, S, V], "greedy": [B, S + steps] or None,
    "class", "module"}``, all loaded in one fresh Python process (``HF_HUB_OFFLINE=1``, temporary ``HF_HOME``, cwd
    outside the repository, no ``PYTHONPATH``, this package refused even where installed); ``"package_imports"`` lists
    the imports of this package that loading attempted (there should be none: an export must stand alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        io_file = os.path.join(tmp, "io.pt")
        torch.save({k: (os.path.abspath(f), t) for k, (f, t) in jobs.items()}, io_file)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME", "HF_MODULES_CACHE")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=os.path.join(tmp, "hf_home"))
        proc = subprocess.run([sys.executable, "-c", _HF_SCRIPT, io_file, str(greedy_steps)], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise AssertionError(f"loading with transformers failed:\n{proc.stderr[-4000:]}")
        return torch.load(io_file)


def hf_outputs(folder: str, tokens_BS: torch.Tensor, greedy_steps: int = 0, *, timeout_s: float = 600) -> dict:
    """:func:`hf_outputs_many` for one folder."""
    return hf_outputs_many({"model": (folder, tokens_BS)}, greedy_steps, timeout_s=timeout_s)["model"]


def checkpoint_logits(checkpoint: str, tokens_BS: torch.Tensor, *, tp: int = 1, ep: int = 1) -> torch.Tensor | None:
    """Rank function: Megatron's logits [B, S, V] of a saved checkpoint (latest iteration) at TP ``tp`` / EP ``ep``
    (rank 0; None elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.analysis.checkpoint_model import analysis_args
    from megatron_moe_ext.checkpoint.model import load_model
    from megatron_moe_ext.checkpoint.torch_dist import read_args, resolve_iteration
    from megatron_moe_ext.testing.random_checkpoint import megatron_logits

    iter_dir, _ = resolve_iteration(checkpoint)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    args = analysis_args(read_args(iter_dir), tp=tp, ep=ep, world_size=world, rank=rank, micro_batch_size=1)
    logits_BSV = megatron_logits(load_model(iter_dir, args), tokens_BS)
    ps.destroy_model_parallel()
    return logits_BSV if rank == 0 else None
