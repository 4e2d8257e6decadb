"""`megatron-moe-ext train` with the ReLU router (ReMoE) and with null experts: the L1 controller reaches its
target sparsity on the demo model, its coefficient survives a checkpoint, null experts train and log their
fraction, and bad settings are refused before any rank starts.

The runs use Megatron's allgather dispatcher: Megatron 0.19's dropless alltoall dispatcher sizes its
permutation as tokens x top-k, which a variable number of experts per token breaks (see the report of
issue #22 for the integration row that lifts this).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from test_train import run_launcher, train

RELU_ITERS = 100
TARGET = 0.95  # 0.4 of 8 experts per token: sparser than the demo model settles by itself (about 0.85)
RELU = [
    "--moe-router-type", "relu", "--moe-token-dispatcher-type", "allgather", "--num-experts", "8",
    "--moe-relu-target-sparsity", str(TARGET), "--moe-relu-l1-coeff", "1e-4",
    "--lr-warmup-iters", "1", "--eval-interval", "1000", "--eval-iters", "1",
]
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|")


def logged(stdout: str, name: str) -> dict[int, float]:
    """Iteration -> the value Megatron's training log prints for ``name`` (the MoE metrics, mean over layers)."""
    values = {}
    for line in stdout.splitlines():
        it, value = _ITERATION.search(line), re.search(rf"\| {name}: ([-+0-9.eE]+) \|", line)
        if it and value:
            values[int(it.group(1))] = float(value.group(1))
    return values


def relu_coeffs(save: Path) -> list[float]:
    from megatron_moe_ext.checkpoint.torch_dist import read_model_state, resolve_iteration

    iter_dir, _ = resolve_iteration(str(save))
    state = read_model_state(iter_dir, 2)
    return [float(v) for k, v in sorted(state.items()) if k.endswith("router.relu_l1_coeff")]


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("relu")
    proc = train(tmp, *RELU, "--train-iters", str(RELU_ITERS), "--save", "A", "--save-interval", str(RELU_ITERS))
    return {"tmp": tmp, "stdout": proc.stdout}


def test_l1_controller_reaches_target_sparsity(relu_run) -> None:
    """The logged sparsity (zero gates over all layers, tokens and ranks) averaged over the last 30 iterations
    is within 0.02 of the target. Tolerance: the controller multiplies lambda by 1.2 or 1/1.2 every step,
    so the sparsity oscillates around the target; on this model the 30-iteration mean stays within 0.01
    (measured) and the start (about 0.5 at initialisation, 0.85 unregularised) is far outside it."""
    sparsity = logged(relu_run["stdout"], "relu_sparsity")
    active = logged(relu_run["stdout"], "active_experts")
    assert sorted(sparsity) == list(range(1, RELU_ITERS + 1))
    tail = [sparsity[i] for i in range(RELU_ITERS - 29, RELU_ITERS + 1)]
    mean = sum(tail) / len(tail)
    print(f"relu_sparsity: iteration 1 {sparsity[1]:.2f}, mean of the last 30 {mean:.3f} (target {TARGET})")
    assert abs(mean - TARGET) < 0.02, tail
    assert sparsity[1] < TARGET - 0.1
    # active experts = (1 - sparsity) x 8 per layer (console rounding: 2 decimals each)
    assert all(abs(active[i] - (1 - sparsity[i]) * 8) < 0.05 for i in sparsity)
    assert "relu_l1_loss" in relu_run["stdout"] and "| relu_l1_coeff: " in relu_run["stdout"]


def test_coefficient_in_checkpoint_and_resume_continues_from_it(relu_run) -> None:
    """The coefficient is saved (the same in every layer: one lambda for the model, as ReMoE) and a resumed run
    starts from it: after 4 more steps it differs from the saved one by alpha^j, j an even integer in [-4, 4]
    (a run restarted from --moe-relu-l1-coeff would be off by a non-integer power)."""
    tmp = relu_run["tmp"]
    saved = relu_coeffs(tmp / "A")
    assert len(saved) == 2 and saved[0] == saved[1] and saved[0] != 1e-4
    train(tmp, *RELU, "--train-iters", str(RELU_ITERS + 4), "--load", "A", "--save", "B",
          "--save-interval", str(RELU_ITERS + 4), "--override-opt_param-scheduler")
    resumed = relu_coeffs(tmp / "B")
    steps = math.log(resumed[0] / saved[0]) / math.log(1.2)
    assert abs(steps - round(steps)) < 1e-3 and round(steps) in (-4, -2, 0, 2, 4), (saved, resumed)
    assert abs(math.log(1e-4 / saved[0]) / math.log(1.2) - round(steps)) > 0.5


def test_null_experts_train_on_megatron_defaults_and_log_their_fraction(tmp_path) -> None:
    proc = train(tmp_path, "--moe-null-experts", "2", "--moe-token-dispatcher-type", "allgather",
                 "--moe-balance-metrics", "--train-iters", "5", "--lr-warmup-iters", "1", "--eval-interval", "100",
                 "--eval-iters", "1", "--save", "N", "--save-interval", "5")
    fraction, active = logged(proc.stdout, "null_fraction"), logged(proc.stdout, "active_experts")
    assert sorted(fraction) == [1, 2, 3, 4, 5]
    # top-2 over 4 real + 2 null experts: 2 slots per token, each real or null
    for it in fraction:
        assert 0 < fraction[it] < 1 and active[it] == pytest.approx(2 * (1 - fraction[it]), abs=0.02)
    assert "| max_violation: " in proc.stdout
    from megatron_moe_ext.checkpoint.torch_dist import read_model_state, resolve_iteration

    state = read_model_state(resolve_iteration(str(tmp_path / "N"))[0], 2)
    assert state["decoder.layers.0.mlp.router.weight"].shape == (6, 64)  # N + M router outputs


@pytest.mark.parametrize(
    "args, message",
    [
        (["--moe-router-type", "relu", "--moe-relu-target-sparsity", "1.5"],
         "--moe-relu-target-sparsity 1.5: the target fraction of zero gates must be in (0, 1); fix:"),
        (["--moe-router-type", "relu", "--moe-null-experts", "2"], "--moe-null-experts 2 with --moe-router-type relu"),
        (["--moe-router-type", "relu", "--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias"),
        (["--moe-null-experts", "2", "--moe-token-dispatcher-type", "flex"], "fix: --moe-token-dispatcher-type"),
        (["--moe-null-experts", "2", "--moe-router-type", "product_key"], "not a perfect square"),
    ],
)
def test_bad_settings_refused_before_any_rank_starts(tmp_path, args, message) -> None:
    code, err = run_launcher(tmp_path, *args, "--dry-run")
    assert code == 2, err
    assert message in err, err
