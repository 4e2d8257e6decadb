"""The CPU runtime's contract: explicit, idempotent, refuses unsupported versions and CUDA hosts."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext._compat import SUPPORTED_MEGATRON_CORE, check_megatron_core_version
from megatron_moe_ext.testing import run_distributed


def test_supported_version_passes_and_others_are_refused() -> None:
    assert check_megatron_core_version() in SUPPORTED_MEGATRON_CORE
    with pytest.raises(ValueError, match=r"megatron-core 0\.18\.0 is not supported.*>=0\.19\.2,<0\.21"):
        check_megatron_core_version("0.18.0")


def runtime_properties() -> dict:
    """Runs in a fresh rank process (the runtime is already enabled by the harness)."""
    import torch.distributed as dist

    from megatron_moe_ext.runtime import cpu_runtime_enabled, enable_cpu_runtime

    wrapped = dist.all_to_all_single
    enable_cpu_runtime()  # second call: must change nothing
    x = torch.empty(3, device="cuda")
    y = torch.ones(2).cuda()
    z = torch.zeros(2).to("cuda:0")
    return {
        "enabled": cpu_runtime_enabled(),
        "same_wrapper": dist.all_to_all_single is wrapped,
        "devices": [t.device.type for t in (x, y, z)],
        "type_string": torch.zeros(1).type(),
        "bf16_type_string": torch.zeros(1, dtype=torch.bfloat16).type(),
        "conversion_untouched": torch.zeros(1).type(torch.float64).dtype == torch.float64,
        "current_device": torch.cuda.current_device(),
    }


def test_runtime_maps_cuda_to_cpu_and_is_idempotent() -> None:
    (props,) = run_distributed(runtime_properties, 1)
    assert props["enabled"] and props["same_wrapper"]
    assert props["devices"] == ["cpu", "cpu", "cpu"]
    assert props["type_string"] == "torch.cuda.FloatTensor"
    assert props["bf16_type_string"] == "torch.cuda.BFloat16Tensor"
    assert props["conversion_untouched"]


def _enable_with(monkeypatch_cuda: bool, version: str | None) -> str:
    import megatron_moe_ext._compat as compat
    from megatron_moe_ext.runtime import cpu

    if monkeypatch_cuda:
        torch.cuda.is_available = lambda: True
    if version is not None:
        compat.megatron_core_version = lambda: version
        cpu.check_megatron_core_version = lambda: compat.check_megatron_core_version(version)
    try:
        cpu.enable_cpu_runtime()
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "enabled"


def refusal_body(monkeypatch_cuda: bool, version: str | None) -> str:
    return _enable_with(monkeypatch_cuda, version)


def test_runtime_refuses_cuda_hosts_and_unsupported_versions() -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        cuda = pool.apply(refusal_body, (True, None))
        old = pool.apply(refusal_body, (False, "0.17.0"))
    assert cuda.startswith("RuntimeError: CUDA is available"), cuda
    assert old.startswith("ValueError: megatron-core 0.17.0 is not supported"), old


def test_allocator_tuning_applies_on_glibc_and_can_be_left_alone(monkeypatch) -> None:
    import platform

    from megatron_moe_ext.runtime.cpu import _tune_allocator

    if platform.libc_ver()[0] == "glibc":
        assert _tune_allocator() is True
    monkeypatch.setenv("MEGATRON_MOE_EXT_KEEP_MALLOC", "1")
    assert _tune_allocator() is False


def _record_rank_env(argv: list[str]) -> None:
    """A forked local rank: write the torchrun-style variables it sees (no tensor work)."""
    import json
    import os

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    with open(f"{argv[0]}.{os.environ['RANK']}", "w") as fh:
        json.dump({k: os.environ[k] for k in keys} | {"threads": torch.get_num_threads(), "argv": argv}, fh)


def _fail_on_rank_1(argv: list[str]) -> None:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError(f"rank 1 refuses {argv}")


def test_local_ranks_get_torchrun_environment_and_failures_propagate(tmp_path, capsys) -> None:
    import json

    from megatron_moe_ext.runtime.local_ranks import start_local_ranks

    prefix = str(tmp_path / "env")
    assert start_local_ranks(_record_rank_env, [prefix, "--flag"], nproc=2, threads_per_rank=1) == 0
    seen = [json.loads((tmp_path / f"env.{r}").read_text()) for r in (0, 1)]
    for rank, env in enumerate(seen):
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
            str(rank), str(rank), "2", "2")
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["OMP_NUM_THREADS"] == "1" and env["threads"] == 1
        assert env["argv"] == [prefix, "--flag"]
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]

    assert start_local_ranks(_fail_on_rank_1, ["x"], nproc=2, threads_per_rank=1) == 1
    err = capsys.readouterr().err
    assert "rank 1 failed" in err and "ValueError: rank 1 refuses ['x']" in err
    with pytest.raises(ValueError, match="nproc=0"):
        start_local_ranks(_record_rank_env, [prefix], nproc=0)


def test_local_ranks_fall_back_to_one_thread_after_the_pool_started(tmp_path, capsys, monkeypatch) -> None:
    """Once this process has started threads since local_ranks was imported (here: torch's pool, after
    parallel ops), ranks asking for 2 intra-op threads get 1: a forked child entering the OpenMP region its
    parent used deadlocks (the ranks here only report their thread count, so a regression fails, not hangs)."""
    import json

    from megatron_moe_ext.runtime import local_ranks

    torch.set_num_threads(2)
    x = torch.randn(1024, 1024)
    (x @ x).sum()  # starts the pool here if nothing had yet
    if local_ranks._os_threads() <= local_ranks._THREADS_AT_IMPORT:  # the pool predates the import
        monkeypatch.setattr(local_ranks, "_THREADS_AT_IMPORT", local_ranks._os_threads() - 1)
    prefix = str(tmp_path / "t")
    assert local_ranks.start_local_ranks(_record_rank_env, [prefix], nproc=1, threads_per_rank=2) == 0
    env = json.loads((tmp_path / "t.0").read_text())
    assert env["threads"] == 1 and env["OMP_NUM_THREADS"] == "1"
    assert "each rank runs with 1 intra-op thread instead of 2" in capsys.readouterr().err
