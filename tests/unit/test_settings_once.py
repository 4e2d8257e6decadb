"""Settings are built and checked once (``megatron_moe_ext/settings/``): each feature's function on known
answers and refusals, the flag path and the config giving equal ``MoEExtSettings``, a plain TransformerConfig
reading MoEExtConfig's defaults, and no shipped module restating a default with ``getattr(config, name, default)``."""

from __future__ import annotations

import ast
import copy
import dataclasses
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_moe_ext.settings import build_settings
from megatron_moe_ext.settings.balancing import DEFAULT_BALANCE_COEFF, balance_settings
from megatron_moe_ext.settings.granularity import check_upcycling_granularity, granularity_settings
from megatron_moe_ext.settings.peer import peer_settings
from megatron_moe_ext.settings.router import router_settings

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_moe_ext"

# Megatron's fields the settings functions read, at their TransformerConfig defaults (a tiny MoE model).
MEGATRON = dict(
    num_layers=4, ffn_hidden_size=256, num_moe_experts=16, moe_router_topk=None, moe_ffn_hidden_size=None,
    moe_shared_expert_intermediate_size=None, expert_model_parallel_size=1, tensor_model_parallel_size=1,
    expert_tensor_parallel_size=None, fp8=None, fp8_recipe="delayed", fp4=None, add_bias_linear=False,
    moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
    moe_router_enable_expert_bias=False, moe_router_num_groups=None, moe_router_group_topk=None,
    moe_router_fusion=False, moe_router_force_load_balancing=False, moe_enable_routing_replay=False,
    moe_latent_size=None, moe_mlp_glu_interleave_size=None, use_te_activation_func=False,
)


def getter(**overrides):
    """A strict ``get(name)``: MoEExtConfig's field defaults and ``MEGATRON``, with ``overrides``."""
    from megatron_moe_ext.config import _ext_field_defaults

    values = {**_ext_field_defaults(), **MEGATRON, **overrides}
    return values.__getitem__  # KeyError names a field a settings function reads but this test forgot


# ---------------------------------------------------------------------------------------------------------
# One function per feature: known answers and refusals
# ---------------------------------------------------------------------------------------------------------
def test_granularity_known_answer_and_refusals() -> None:
    g = granularity_settings(getter(moe_granularity=4, moe_expansion_rate=2, num_moe_experts=None))
    assert (g.sizes.num_experts, g.sizes.moe_ffn_hidden_size, g.sizes.topk) == (8, 64, 4)
    assert g.derived() == {"num_moe_experts": 8, "moe_ffn_hidden_size": 64, "moe_router_topk": 4,
                           "moe_shared_expert_intermediate_size": None}
    assert granularity_settings(getter()).derived() == {}
    # An explicit value equal to the derived one is no conflict.
    granularity_settings(getter(moe_granularity=4, moe_expansion_rate=2, num_moe_experts=8, moe_router_topk=4))
    refusals = [
        (dict(moe_num_shared_experts=1), "--moe-num-shared-experts 1 needs --moe-granularity"),
        (dict(moe_granularity=4), "--moe-granularity 4 needs --moe-expansion-rate"),
        (dict(moe_granularity=4, moe_expansion_rate=2, ffn_hidden_size=None), "fix: pass --ffn-hidden-size"),
        (dict(moe_granularity=4, moe_expansion_rate=2), "contradict --num-experts 16 (G implies 8)"),
        (dict(moe_granularity=4, moe_expansion_rate=2, num_moe_experts=None, moe_router_topk=2),
         "--moe-router-topk 2 (G implies 4)"),
        (dict(moe_granularity=3, moe_expansion_rate=2, num_moe_experts=None), "nearest valid G: 2"),
    ]
    for overrides, needle in refusals:
        with pytest.raises(ValueError, match="fix|Fix|nearest") as err:
            granularity_settings(getter(**overrides))
        assert needle in str(err.value), str(err.value)
    check_upcycling_granularity(4, upcycling=True, upcycling_granularity=1)
    check_upcycling_granularity(None, upcycling=True, upcycling_granularity=2)
    with pytest.raises(ValueError, match="fix: drop --moe-upcycling-granularity"):
        check_upcycling_granularity(4, upcycling=True, upcycling_granularity=2)


def test_router_known_answer_and_refusals() -> None:
    r = router_settings(getter())
    assert (r.router_type, r.pk_layout, r.selection_biases) == ("topk", None, False)
    r = router_settings(getter(moe_router_type="product_key", moe_router_topk=2, moe_pk_key_dim=8,
                               moe_pk_bias_balancing=True, moe_pk_bias_update_rule="relative"))
    assert (r.pk_layout.rows, r.pk_layout.cols, r.pk_layout.k, r.pk_key_dim) == (4, 4, 2, 8)
    assert r.selection_biases and r.pk_bias_update_rule == "relative"
    refusals = [
        (dict(moe_router_type="dense"), "--moe-router-type 'dense' is unknown"),
        (dict(moe_pk_bias_balancing=True), "--moe-pk-bias-balancing with --moe-router-type topk"),
        (dict(moe_pk_bias_update_rule="relative"), "no selection bias to update"),
        (dict(moe_router_type="product_key", moe_router_topk=2, num_moe_experts=12), "not a perfect square"),
        (dict(moe_router_type="product_key", moe_router_topk=2, moe_router_load_balancing_type="sinkhorn"),
         "sinkhorn"),
    ]
    for overrides, needle in refusals:
        with pytest.raises(ValueError, match="fix|choose from") as err:
            router_settings(getter(**overrides))
        assert needle in str(err.value), str(err.value)


def test_balance_known_answer_and_refusals() -> None:
    b = balance_settings(getter())
    assert (b.coefficients, b.tracked_names, b.requested, b.needs_step_hook) == ((), (), False, False)
    b = balance_settings(getter(moe_balance_losses=["expert", "global_expert"], moe_balance_metrics=True,
                                moe_granularity=16))
    g16 = DEFAULT_BALANCE_COEFF * 4  # the default policy: x sqrt(G)
    assert b.coefficients == (("expert", g16), ("global_expert", g16))
    assert b.tracked_names == ("expert_balance_loss", "global_expert_balance_loss", "max_violation", "load_entropy",
                               "experts_used_fraction")
    assert b.needs_step_hook and b.requested
    b = balance_settings(getter(moe_balance_losses=["expert", "sequence"], moe_balance_coeffs=[0.1, 0.0]))
    assert b.losses == (("expert", 0.1),) and b.tracked_names == ("expert_balance_loss",)
    for overrides, needle in [
        (dict(moe_balance_losses=["subkey"]), "--moe-balance-losses subkey with --moe-router-type topk"),
        (dict(moe_balance_coeffs=[0.1]), "without --moe-balance-losses"),
        (dict(moe_balance_metrics=True, num_moe_experts=None), "--moe-balance-metrics needs MoE layers"),
    ]:
        with pytest.raises(ValueError, match="fix") as err:
            balance_settings(getter(**overrides))
        assert needle in str(err.value), str(err.value)


def test_peer_known_answer_and_refusals() -> None:
    p = peer_settings(getter())
    assert (p.enabled, p.layout, p.layers) == (False, None, ())
    peer = dict(moe_peer_num_experts=64, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8)
    p = peer_settings(getter(**peer))
    assert p.enabled and (p.layout.grid, p.layout.granularity, p.layers) == (8, 8, (2,))
    assert peer_settings(getter(**peer, moe_peer_layers="all")).layers == (1, 2, 3, 4)
    for overrides, needle in [
        (dict(moe_peer_num_experts=50), "not a perfect square"),
        (dict(moe_peer_layers="9"), "outside 1..4"),
        (dict(moe_peer_shard="ep"), "expert_model_parallel_size=1"),
        (dict(moe_peer_subkey_loss_stride=4), "with moe_peer_subkey_loss_marginals='candidates'"),
        (dict(moe_peer_chunk_pairs=0), "moe_peer_chunk_pairs=0 must be >= 1"),
        (dict(moe_peer_table_lr_mult=-1.0), "moe_peer_table_lr_mult=-1.0 must be >= 0"),
    ]:
        with pytest.raises(ValueError, match="fix") as err:
            peer_settings(getter(**{**peer, **overrides}))
        assert needle in str(err.value), str(err.value)


def test_build_settings_derives_first_and_defaults_the_topk() -> None:
    # The router sees the experts and top-k the granularity derives (16 experts: a 4 x 4 grid, top-4).
    ext = build_settings(getter(moe_granularity=4, moe_expansion_rate=4, num_moe_experts=None,
                                moe_router_type="product_key", moe_pk_key_dim=8), default_topk=2)
    assert dict(ext.derived)["num_moe_experts"] == 16 and ext.router.pk_layout.k == 4
    # Without a granularity, an unset top-k is the default one.
    assert dict(build_settings(getter(), default_topk=2).derived) == {"moe_router_topk": 2}
    assert build_settings(getter(moe_balance_metrics=True), default_topk=2).needs_step_hook


def test_settings_package_is_pure() -> None:
    code = ("import sys, megatron_moe_ext.settings; "
            "bad = [m for m in ('torch', 'megatron') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


# ---------------------------------------------------------------------------------------------------------
# The flag path and the config: the same settings
# ---------------------------------------------------------------------------------------------------------
BASE = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--disable-bias-linear", "--no-bias-gelu-fusion",
        "--no-rope-fusion"]
FLAG_SETS = {
    "granularity": ["--moe-granularity", "4", "--moe-expansion-rate", "2", "--moe-num-shared-experts", "1"],
    "product_key_bias_balancing": [
        "--num-experts", "32", "--moe-router-topk", "4", "--moe-router-type", "product_key", "--moe-pk-heads", "2",
        "--moe-pk-key-dim", "16", "--moe-pk-bias-balancing", "--moe-pk-expert-bias-balancing",
        "--moe-pk-bias-update-rule", "relative"],
    "peer": ["--moe-peer-num-experts", "64", "--moe-peer-heads", "2", "--moe-peer-topk", "4", "--moe-peer-key-dim",
             "8", "--moe-peer-layers", "2,4", "--moe-balance-losses", "subkey", "--moe-balance-metrics"],
    "balance_losses": ["--num-experts", "8", "--moe-granularity", "2", "--moe-expansion-rate", "4",
                       "--moe-balance-losses", "expert", "global_expert", "sequence", "--moe-balance-coeffs", "0.01",
                       "0.02", "0", "--moe-balance-coeff-policy", "constant_gradient", "--moe-balance-metrics"],
}


@pytest.mark.parametrize("name", sorted(FLAG_SETS))
def test_flag_path_and_config_build_equal_settings(name: str) -> None:
    from megatron_moe_ext.args import args_getter, config_from_args, parse_megatron_args, settings_from_args
    from megatron_moe_ext.config import MEGATRON_DEFAULT_TOPK

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args(BASE + FLAG_SETS[name], validate=False)
        args.params_dtype = torch.float32
        config = config_from_args(args)
    flags = settings_from_args(args)
    assert flags == build_settings(args_getter(args), default_topk=MEGATRON_DEFAULT_TOPK)
    assert flags == config.ext
    # Megatron copies configs (deepcopy, pickling for spawned processes): the settings travel with them.
    for other in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert other.ext == config.ext
    rebuilt = dataclasses.replace(config)
    assert rebuilt.ext == config.ext


def test_plain_transformer_config_reads_moe_ext_config_defaults() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_ext.config import MoEExtConfig
    from megatron_moe_ext.settings import ext_settings

    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4, add_bias_linear=False)
    plain = ext_settings(TransformerConfig(**common))
    ours = ext_settings(MoEExtConfig(**common))
    assert plain == ours
    assert plain.experts.backend == "grouped"  # the one default, in the MoEExtConfig field


# ---------------------------------------------------------------------------------------------------------
# No restated defaults
# ---------------------------------------------------------------------------------------------------------
# (file, setting name) -> why a getter with a default stays there. Every other shipped module reads our settings
# through ext_settings(config) / settings objects, and Megatron's own config fields by plain attribute access.
ALLOWED = {
    ("checkpoint/hf_targets/native_common.py", "moe_layer_freq"):
        "Megatron's own flag in a saved namespace; the converter core is pure torch (no Megatron parser to read)",
    ("checkpoint/hf_targets/native_common.py", "moe_router_score_function"):
        "Megatron's own flag in a saved namespace; the converter core is pure torch (no Megatron parser to read)",
    ("checkpoint/hf_targets/glm4_moe.py", "moe_router_score_function"):
        "Megatron's own flag in a saved namespace; the converter core is pure torch (no Megatron parser to read)",
    ("checkpoint/hf_targets/glm4_moe.py", "moe_router_topk"): "0 = absent, a sentinel of the refusal, not a default",
    ("checkpoint/hf_targets/glm4_moe.py", "moe_shared_expert_gate"):
        "Megatron's own flag in a saved namespace; the converter core is pure torch (no Megatron parser to read)",
    ("checkpoint/hf_targets/glm4_moe.py", "moe_layer_freq"): "None = absent, only printed in a refusal",
}
GETTERS = ("getattr", "_get", "_cfg")


def _restated_defaults() -> dict[tuple[str, str], int]:
    """(file, name) -> line of every ``getattr(x, "moe_...", default)`` (or a local _get/_cfg helper) in shipped
    code outside settings/, config.py and the self-contained HF remote code (HF config objects)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("settings/", "checkpoint/remote_code/")) or rel == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in GETTERS
                    and len(node.args) >= 3 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("moe_")):
                found[(rel, node.args[1].value)] = node.lineno
    return found


def test_no_shipped_module_restates_a_default() -> None:
    found = _restated_defaults()
    unexplained = {key: line for key, line in found.items() if key not in ALLOWED}
    assert not unexplained, f"getattr(config, name, default) restates a default (use ext_settings): {unexplained}"
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"allowlist entries no longer needed, remove them: {stale}"


def test_accounting_shape_defaults_are_moe_ext_config_defaults() -> None:
    """accounting.py sits below config.py in the import layers, so ModelShape states our defaults again for the
    flags a namespace may lack: they must stay MoEExtConfig's."""
    from megatron_moe_ext.accounting import EXT_SHAPE_FIELDS, ModelShape
    from megatron_moe_ext.config import _ext_field_defaults

    shape = {f.name: f.default for f in dataclasses.fields(ModelShape)}
    ours = _ext_field_defaults()
    assert {field: shape[field] for field in EXT_SHAPE_FIELDS} == {f: ours[n] for f, n in EXT_SHAPE_FIELDS.items()}
