"""`sweep plan --routers`: the router axis at equal mean compute, its flags and accounting, refusals."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from megatron_moe_ext.scaling import sweep_cli
from megatron_moe_ext.scaling.sweep_plan import SweepSpec, plan_runs
from megatron_moe_ext.training.train import _without

SPEC = SweepSpec(budgets=(1e12,), hidden_sizes=(64,), granularities=(1, 2), expansion_rates=(4,), seeds=(1,),
                 routers=("topk", "expert_choice", "relu", "null"))


def test_router_axis_equal_mean_compute() -> None:
    runs = {r.run: r for r in plan_runs(SPEC)}
    # per G: 4 routers; + 1 equal-compute dense + 1 equal-params dense
    assert len(runs) == 2 * 4 + 2
    h, L = 64, SPEC.num_layers
    for g in (1, 2):
        topk = runs[f"b1e12_h64_G{g}_E4_s1"]
        ec, relu, null = (runs[f"b1e12_h64_G{g}_E4_{r}_s1"] for r in ("expert_choice", "relu", "null"))
        assert topk.router == "topk" and topk.active_experts == topk.topk == 2 * g
        for run in (ec, relu, null):
            assert run.active_experts == pytest.approx(topk.active_experts)  # equal mean compute
        # expert choice and ReLU: the same parameters and FLOPs as top-k token choice
        assert (ec.training_flops_per_token, ec.params) == (topk.training_flops_per_token, topk.params)
        assert (relu.training_flops_per_token, relu.params) == (topk.training_flops_per_token, topk.params)
        # null experts: top-2k over N + N outputs; only the router (N more outputs per layer) costs more
        assert (null.topk, null.null_experts, null.experts) == (2 * topk.topk, topk.experts, topk.experts)
        assert null.training_flops_per_token - topk.training_flops_per_token == 3 * L * 2 * h * topk.experts
        assert null.total_params - topk.total_params == L * h * topk.experts
        assert "--moe-base-topk 4 --moe-layer-freq 1 --moe-null-experts" in null.row()["command"]
        assert "--moe-router-type expert_choice --moe-ec-capacity-factor 1.0 --moe-aux-loss-coeff 0" in ec.row()["command"]
        for run in (ec, relu, null):
            assert "--moe-token-dispatcher-type allgather" in run.row()["command"]
        assert "--moe-router-type relu" in relu.row()["command"]
        assert "--moe-router-type" not in topk.row()["command"]
    assert runs["b1e12_h64_dense-compute_s1"].router is None


def test_router_runs_accounted_as_their_commands() -> None:
    """The planned numbers equal `megatron-moe-ext flops` on each router run's own flags."""
    runs = {r.run: r for r in plan_runs(SPEC)}
    names = [f"b1e12_h64_G2_E4_{r}_s1" for r in ("expert_choice", "relu", "null")]
    drop = {"--nproc", "--train-iters", "--eval-interval", "--eval-iters", "--save-interval", "--save", "--load",
            "--ext-loss-log", "--seed"}
    argvs = [[*_without(shlex.split(runs[n].row()["command"])[2:], drop), "--vocab-size", str(SPEC.vocab_size),
              "--json"] for n in names]
    script = ("import sys, json\nfrom megatron_moe_ext.accounting_cli import main\n"
              f"for argv in json.loads({json.dumps(json.dumps(argvs))}):\n    main(argv)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    decoder, text, found = json.JSONDecoder(), proc.stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        found.append(obj)
        text = text[end:].strip()
    for name, acc in zip(names, found, strict=True):
        run = runs[name]
        assert acc["training_flops_per_token"] == run.training_flops_per_token, name
        assert acc["total_params"] - acc["embedding_params"] == run.total_params, name
        assert acc["active_experts"] == pytest.approx(run.active_experts), name


@pytest.mark.parametrize(("flags", "needles"), [
    (["--routers", "topk,sinkhorn"], ["routers ['sinkhorn'] are unknown", "fix: --routers from topk"]),
    (["--routers", "product_key", "--granularity", "2"], ["router product_key at G=2, E=4", "not a perfect square",
                                                          "fix:"]),
    (["--routers", "null", "--expansion-rate", "2"], ["router null at G=1, E=2 (base top-k 4)", "fix:"]),
    (["--", "--moe-router-type", "relu"], ["extra train flags ['--moe-router-type'] are set by the planner"]),
    (["--routers", "topk,expert_choice", "--", "--moe-balance-metrics"],
     ["extra train flags ['--moe-balance-metrics'] with the expert_choice router", "fix: drop them"]),
])
def test_bad_router_axis_refused_before_writing(tmp_path, capsys, flags, needles) -> None:
    out = tmp_path / "plan"
    with pytest.raises(SystemExit) as exc:
        sweep_cli.main(["plan", "--flops", "1e12", "--granularity", "1", "--expansion-rate", "4", "--hidden-size",
                        "64", "--out", str(out), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_plan_cli_writes_router_columns(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    assert sweep_cli.main(["plan", "--flops", "1e12", "--granularity", "1", "--expansion-rate", "4", "--hidden-size",
                           "64", "--routers", "topk,null", "--no-dense", "--out", str(out)]) == 0
    rows = json.loads((out / "runs.json").read_text())["runs"]
    assert [(r["run"], r["router"], r["null_experts"], r["active_experts"]) for r in rows] == [
        ("b1e12_h64_G1_E4_s1234", "topk", 0, 2.0), ("b1e12_h64_G1_E4_null_s1234", "null", 4, 2.0)]
    assert "router null (2 experts/token)" in (out / "b1e12_h64_G1_E4_null_s1234" / "command.sh").read_text()
