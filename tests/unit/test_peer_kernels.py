"""PEER: expert backends against the eager reference (forward and backward, ragged pairs, Megatron's
main_grad accumulation), the layer's retrieval against a brute-force reference, settings and bad
input, flags, and layer selection in the specs."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.kernels.peer_experts import (
    ACTIVATIONS,
    peer_experts,
    uniform_offsets,
)
from megatron_moe_ext.settings.peer import (
    check_peer_parallel,
    padded_rows,
    peer_layer_numbers,
    peer_layout,
    table_shard,
)


def _problem(T=23, h=12, N=40, K=5, ragged=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, h, generator=gen, dtype=dtype, requires_grad=True)
    u = torch.randn(N, h, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(N, h, generator=gen, dtype=dtype, requires_grad=True)
    if ragged:
        counts = torch.randint(0, K + 1, (T,), generator=gen)
        counts[::4] = 0  # tokens with no pair on this shard
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    else:
        offsets = uniform_offsets(T, K, "cpu")
    P = int(offsets[-1])
    ids = torch.randint(0, N, (P,), generator=gen)
    gates = torch.rand(P, generator=gen, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
    dy = torch.randn(T, h, generator=gen, dtype=dtype)
    return x, u, v, ids, gates, offsets, dy


def _run(backend, x, u, v, ids, gates, offsets, dy, act, **kw):
    out = peer_experts(x, u, v, ids, gates, offsets, act, backend=backend, **kw)
    grads = torch.autograd.grad((out * dy).sum(), [x, u, v, gates])
    return out, grads


@pytest.mark.parametrize("backend", ["chunked", "embedding_bag"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("ragged", [True, False])
def test_backends_equal_eager_reference(backend: str, act: str, ragged: bool) -> None:
    problem = _problem(ragged=ragged)
    ref_out, ref_grads = _run("eager", *problem, act)
    out, grads = _run(backend, *problem, act, chunk_pairs=7)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("xuvg", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"grad {n}: {m}")


def test_chunked_fp32_and_bf16_tables_match_reference() -> None:
    """Low-precision storage against the fp64 reference of the same values (the chunked path
    computes activations and gates in fp32, so it is at least as close as bf16 eager)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, u, v, ids, gates, offsets, dy = _problem(dtype=dtype)
        as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, u, v)]
        g64 = gates.detach().double().requires_grad_()
        ref_out, ref_grads = _run("eager", *as64, ids, g64, offsets, dy.double(), "gelu")
        out, grads = _run("chunked", x, u, v, ids, gates, offsets, dy, "gelu", chunk_pairs=16)
        assert out.dtype == dtype
        for got, want in zip((out, *grads), (ref_out, *ref_grads)):
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("ragged", [True, False])
def test_fused_cpu_kernel_equals_reference(act: str, ragged: bool) -> None:
    """The compiled kernel (fp32) against the fp64 eager reference of the same values."""
    from megatron_moe_ext.kernels import peer_cpu

    assert peer_cpu.available(), "the fused CPU kernel did not build (is g++ installed?)"
    x, u, v, ids, gates, offsets, dy = _problem(T=29, h=37, ragged=ragged, dtype=torch.float32)
    as64 = [t.detach().double().requires_grad_() for t in (x, u, v, gates)]
    ref_out, ref_grads = _run("eager", as64[0], as64[1], as64[2], ids, as64[3], offsets, dy.double(), act)
    out, grads = _run("cpu_fused", x, u, v, ids, gates, offsets, dy, act)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # main_grad accumulation (Megatron DDP) and a partial set of gradients.
    for table in (u, v):
        table.main_grad = torch.full(table.shape, -1.0)
        table.grad_added_to_main_grad = False
    x2 = x.detach()
    out2 = peer_experts(x2, u, v, ids, gates.detach(), offsets, act, backend="cpu_fused")
    (out2 * dy).sum().backward()
    for table, want in ((u, ref_grads[1]), (v, ref_grads[2])):
        assert table.grad_added_to_main_grad
        torch.testing.assert_close(table.main_grad.double(), want - 1.0, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fused_cpu_kernel_refuses_other_dtypes() -> None:
    x, u, v, ids, gates, offsets, _ = _problem(dtype=torch.float64)
    with pytest.raises(ValueError, match="fp32 CPU tensors"):
        peer_experts(x, u, v, ids, gates, offsets, "gelu", backend="cpu_fused")
    from megatron_moe_ext.kernels.peer_experts import resolve_backend

    assert resolve_backend("auto", x, u) == "chunked"  # auto never picks it for fp64
    assert resolve_backend("auto", x.float(), u.float()) == "cpu_fused"


def test_chunked_adds_table_grads_into_megatron_main_grad() -> None:
    """Megatron DDP's gradient-accumulation-fusion protocol: rows added to main_grad (existing
    contents kept), autograd gets a placeholder and grad_added_to_main_grad is set."""
    x, u, v, ids, gates, offsets, dy = _problem(dtype=torch.float32)
    _, ref_grads = _run("eager", x, u, v, ids, gates, offsets, dy, "silu")
    for table in (u, v):
        table.main_grad = torch.full(table.shape, 0.5)
        table.grad_added_to_main_grad = False
    out = peer_experts(x, u, v, ids, gates, offsets, "silu", backend="chunked", chunk_pairs=9)
    (out * dy).sum().backward()
    for table, want in ((u, ref_grads[1]), (v, ref_grads[2])):
        assert table.grad_added_to_main_grad is True
        torch.testing.assert_close(table.main_grad, want + 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_grads[0], rtol=1e-5, atol=1e-5)


def test_chunked_saves_no_pair_sized_tensors() -> None:
    """The memory-lean claim: between forward and backward only the inputs are kept alive."""
    x, u, v, ids, gates, offsets, _ = _problem(T=64, K=8, ragged=False, dtype=torch.float32)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peer_experts(x, u, v, ids, gates, offsets, "gelu", backend="chunked", chunk_pairs=32)
    P, h = ids.numel(), x.shape[1]
    assert all(s != torch.Size([P, h]) for s in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peer_experts(x, u, v, ids, gates, offsets, "gelu", backend="eager")
    assert any(s == torch.Size([P, h]) for s in saved), "the eager reference should keep [P, h] gathers"


def test_bad_kernel_input_names_the_values() -> None:
    x, u, v, ids, gates, offsets, _ = _problem()
    with pytest.raises(ValueError, match="activation 'tanh'"):
        peer_experts(x, u, v, ids, gates, offsets, "tanh")
    with pytest.raises(ValueError, match="backend 'fast'"):
        peer_experts(x, u, v, ids, gates, offsets, "gelu", backend="fast")
    with pytest.raises(ValueError, match="offsets"):
        peer_experts(x, u, v, ids, gates, offsets[:-1], "gelu")
    with pytest.raises(ValueError, match="chunk_pairs=0"):
        peer_experts(x, u, v, ids, gates, offsets, "gelu", backend="chunked", chunk_pairs=0)


# -- settings -----------------------------------------------------------------------------------
def test_layout_and_bad_geometry() -> None:
    layout = peer_layout(1024 * 1024, heads=8, topk=16, key_dim=128)
    assert (layout.grid, layout.granularity, layout.subkey_topk) == (1024, 128, 16)
    with pytest.raises(ValueError, match=r"1000 is not a perfect square.*use 961 or 1024"):
        peer_layout(1000, heads=8, topk=4, key_dim=8)
    with pytest.raises(ValueError, match="moe_peer_key_dim=7 must be even"):
        peer_layout(64, heads=1, topk=4, key_dim=7)
    with pytest.raises(ValueError, match=r"moe_peer_subkey_topk=2 < min\(moe_peer_topk=4, n=8\)"):
        peer_layout(64, heads=1, topk=4, key_dim=8, subkey_topk=2)
    with pytest.raises(ValueError, match="moe_peer_topk=65"):
        peer_layout(64, heads=1, topk=65, key_dim=8)


def test_layer_selection() -> None:
    assert peer_layer_numbers("middle", 12) == [6]
    assert peer_layer_numbers("middle", 3) == [2]
    assert peer_layer_numbers("all", 3) == [1, 2, 3]
    assert peer_layer_numbers("4, 2", 4) == [2, 4]
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] outside 1..4"):
        peer_layer_numbers("2,5", 4)
    with pytest.raises(ValueError, match="not 'middle', 'all'"):
        peer_layer_numbers("first", 4)


def test_table_shards_cover_the_experts_with_equal_padded_rows() -> None:
    for N, shards in ((81, 2), (64, 4), (10, 4), (7, 8)):
        parts = [table_shard(N, r, shards) for r in range(shards)]
        assert all(p.rows == parts[0].rows for p in parts)
        assert sum(p.end - p.first for p in parts) == N
        assert [p.first for p in parts] == sorted(p.first for p in parts)
        assert sum(p.padding for p in parts) == padded_rows(N, shards) - N


def test_parallel_layout_checks() -> None:
    check_peer_parallel(shard="tp", tp=2, ep=1)
    check_peer_parallel(shard="ep", tp=1, ep=2)
    with pytest.raises(ValueError, match="expert_model_parallel_size=1"):
        check_peer_parallel(shard="ep", tp=1, ep=1)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2"):
        check_peer_parallel(shard="ep", tp=2, ep=2)


def test_config_validates_before_building(tiny_config) -> None:
    base = dict(num_moe_experts=None, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8)
    with pytest.raises(ValueError, match="moe_peer_num_experts=50 is not a perfect square"):
        tiny_config(moe_peer_num_experts=50, **base)
    with pytest.raises(ValueError, match=r"layer\(s\) \[3\]"):
        tiny_config(moe_peer_num_experts=64, moe_peer_layers="3", **base)
    mixed = tiny_config(moe_peer_num_experts=64, moe_peer_layers="2", **base)
    assert mixed.ext.peer.layers == (2,) and mixed.hetereogenous_dist_checkpoint
    uniform = tiny_config(moe_peer_num_experts=64, moe_peer_layers="all", **base)
    assert not uniform.hetereogenous_dist_checkpoint


def test_flags_reach_the_config_and_bad_flags_exit() -> None:
    import warnings

    from megatron_moe_ext.args import config_from_args, parse_megatron_args

    argv = [
        "--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--moe-peer-num-experts", "256", "--moe-peer-heads", "4",
        "--moe-peer-topk", "8", "--moe-peer-key-dim", "16", "--moe-peer-activation", "relu",
        "--moe-peer-gate", "sigmoid", "--moe-peer-table-lr-mult", "3.0", "--no-rope-fusion",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args(argv, validate=False)
        args.params_dtype = torch.float32
        config = config_from_args(args)
    assert (config.moe_peer_num_experts, config.moe_peer_heads, config.moe_peer_topk) == (256, 4, 8)
    assert (config.moe_peer_activation, config.moe_peer_gate, config.moe_peer_table_lr_mult) == ("relu", "sigmoid", 3.0)
    assert config.ext.peer.layers == (2,)
    with pytest.raises(SystemExit) as exit_info:
        parse_megatron_args([*argv[:-1], "--moe-peer-layers", "7"], validate=False)
    assert exit_info.value.code == 2


def test_compiled_row_topk_equals_torch_topk() -> None:
    from megatron_moe_ext.kernels.peer_cpu import available, row_topk

    assert available()
    gen = torch.Generator().manual_seed(5)
    for shape, k in (((7, 3, 100), 16), ((50, 9), 9), ((4, 1), 1)):
        scores = torch.randn(*shape, generator=gen)
        vals, idx = row_topk(scores, k)
        ref_vals, ref_idx = torch.topk(scores, k, dim=-1, sorted=True)
        torch.testing.assert_close(vals, ref_vals, rtol=0, atol=0)
        assert torch.equal(idx, ref_idx)
