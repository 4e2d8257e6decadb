"""``MoEExtConfig``: Megatron's TransformerConfig plus this package's settings.

Every field has a docstring: the command-line flags are generated from them (``args.py``), and
``core_transformer_config_from_args(args, config_class=MoEExtConfig)`` fills them from the flags.
``__post_init__`` builds and checks every feature's settings with ``settings.build_settings`` (the code
the flag path runs too), writes the values they derive into the fields, and keeps them as ``config.ext``
(an ``MoEExtSettings``; layers read it through ``settings.ext_settings(config)``). Validation raises
ValueError naming the values and the fix, before any model is built.

No ``from __future__ import annotations`` here: Megatron's ArgumentGroupFactory reads the field
types as real types to build the flags.
"""


import dataclasses
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.layers.query_norm import QUERY_NORMS
from megatron_moe_ext.settings import MoEExtSettings, build_settings
from megatron_moe_ext.settings.access import register_field_defaults
from megatron_moe_ext.settings.balancing import BALANCE_LOSSES, COEFF_POLICIES
from megatron_moe_ext.settings.experts import (
    DEFAULT_EXPERT_BACKEND,
    DEFAULT_MOE_FP8_RECIPE,
    EXPERT_BACKENDS,
    MOE_FP8_FORMATS,
    MOE_FP8_RECIPES,
)
from megatron_moe_ext.settings.peer import (
    PEER_ACTIVATIONS,
    PEER_BACKENDS,
    PEER_GATES,
    PEER_SHARDS,
    PEER_SUBKEY_MARGINALS,
)
from megatron_moe_ext.settings.expert_choice import DEFAULT_EC_EVAL_RULE, EC_EVAL_RULES
from megatron_moe_ext.settings.router import BIAS_UPDATE_RULES, ROUTER_TYPES

# Megatron's own default for moe_router_topk (read from its field); an unchanged default counts as
# "not set by the user" when a granularity derives the top-k (the flag path detects an explicit value exactly).
MEGATRON_DEFAULT_TOPK = next(f.default for f in dataclasses.fields(TransformerConfig) if f.name == "moe_router_topk")



@dataclasses.dataclass
class MoEExtConfig(TransformerConfig):
    """TransformerConfig with fine-grained MoE settings (more to come from later features)."""

    moe_granularity: int | None = None
    """Granularity G = ffn_hidden_size / expert hidden size (Krajewski et al. 2024). When set, the
    number of experts (E*G), the expert hidden size (ffn_hidden_size/G) and the router top-k (k0*G)
    are derived from it, so compute per token stays that of one dense FFN times k0. G=1 is coarse
    MoE; G=ffn_hidden_size gives single-neuron experts (see the PEER layer)."""

    moe_expansion_rate: int | None = None
    """Expansion rate E: total expert parameters over one dense FFN's. Required with
    --moe-granularity; the model has E*G experts."""

    moe_base_topk: int = 1
    """Base top-k k0: experts per token at G=1; the router picks k0*G experts (paper: 1)."""

    moe_num_shared_experts: int = 0
    """Fine-grained shared experts (DeepSeekMoE): each of hidden size ffn_hidden_size/G; sets the
    shared expert MLP to num_shared_experts*ffn_hidden_size/G. Needs --moe-granularity."""

    moe_expert_backend: str = dataclasses.field(
        default=DEFAULT_EXPERT_BACKEND, metadata={"argparse_meta": {"choices": EXPERT_BACKENDS}}
    )
    """Expert computation: 'grouped' (default: torch's grouped GEMM on CUDA, the segmented kernel
    elsewhere), 'segmented' (one autograd function of per-expert matmuls on row slices, no padding),
    'padded' (batched matmul over experts padded to the largest count), 'loop' (per-expert
    matmuls under autograd), 'eager' (reference loop over experts), 'megatron' (Megatron's own
    experts), or 'te' (Transformer Engine grouped GEMMs on the same stacked weights, FP8 under TE's
    autocast; needs TE and a GPU)."""

    moe_fp8_format: str | None = dataclasses.field(
        default=None, metadata={"argparse_meta": {"choices": MOE_FP8_FORMATS}}
    )
    """FP8 experts without Transformer Engine (docs/fp8.md): our FineGrainedExperts (any backend but
    'te' and 'megatron') compute their GEMMs with FP8 operands through torch's scaled matmul, master
    weights and the rest of the model in the parameter dtype. Formats as Megatron's --fp8-format:
    'e4m3' (everywhere) or 'hybrid' (e4m3 forward, e5m2 gradients in backward). Unset: off. Expert
    dimensions (hidden size, expert FFN size) must be multiples of 16."""

    moe_fp8_recipe: str = dataclasses.field(
        default=DEFAULT_MOE_FP8_RECIPE, metadata={"argparse_meta": {"choices": MOE_FP8_RECIPES}}
    )
    """Scaling of --moe-fp8-format, current scaling (no state across steps): 'tensorwise' (one scale
    per expert operand, Megatron's Fp8Recipe.tensorwise) or 'rowwise' (a scale per row of a GEMM's
    left operand and per column of its right one, torchao's rowwise)."""

    moe_router_type: str = dataclasses.field(
        default="topk", metadata={"argparse_meta": {"choices": ROUTER_TYPES}}
    )
    """Router of the MoE layers: 'topk' (Megatron's TopKRouter: a dense [hidden x experts] gate),
    'product_key' (exact top-k by product keys in O(sqrt(experts)) per token; the experts form
    heads pools of n1 x n2, see the --moe-pk-* flags), 'expert_choice' (each expert picks its
    tokens, see --moe-ec-*) or 'relu' (ReMoE: ReLU gates, experts per token variable, see
    --moe-relu-*)."""

    moe_router_noisy_gating: bool = False
    """Noisy top-k gating (Shazeer et al. 2017): at train time add N(0,1)*softplus(W_noise x) to the
    router logits (product keys: to each half's sub-key scores) before the top-k."""

    moe_pk_heads: int = 1
    """Product-key heads: each owns a disjoint pool of experts/heads experts and fills
    topk/heads of the token's top-k slots (so a token always gets topk distinct experts)."""

    moe_pk_key_dim: int = 128
    """Product-key query dimension per head (even: half scores the row sub-keys, half the column
    sub-keys)."""

    moe_pk_subkey_topk: int | None = None
    """Sub-keys kept per side before the final top-k (>= top-k per head for exactness; default
    the top-k per head)."""

    moe_pk_grid_rows: int | None = None
    """Rows n1 of each head's expert grid (columns = experts per head / n1); default a square
    grid, which needs experts per head to be a perfect square."""

    moe_pk_query_norm: str = dataclasses.field(
        default="batchnorm", metadata={"argparse_meta": {"choices": QUERY_NORMS}}
    )
    """Normalisation of the product-key queries: 'batchnorm' (default; PKM/PEER's choice, and the best
    measured on the tiny model, see benchmarks/RESULTS.md: exact statistics of the whole micro-batch,
    synchronised over SP/DP ranks, padding excluded, running statistics at eval; at train time it
    leaks information across positions and sequences of a causal LM batch), 'rmsnorm' or
    'layernorm' (per token, no leak), or 'none'."""

    moe_pk_bias_balancing: bool = False
    """Auxiliary-loss-free balancing for the product-key router: separable per-row and per-column
    selection biases (gates stay unbiased), updated after each step from all-reduced counts at
    --moe-router-bias-update-rate (Wang et al. 2024 per expert; here 2n counts per head)."""

    moe_pk_expert_bias_balancing: bool = False
    """Auxiliary-loss-free balancing per expert for the product-key router: a selection bias per
    expert (gates stay unbiased), added where each token's k' x k' candidate pairs are combined, so
    it re-ranks experts within that candidate grid (exact over all experts only when
    --moe-pk-subkey-topk covers the grid); it corrects overloaded (row, column) pairs that
    --moe-pk-bias-balancing cannot. Updated after each step from all-reduced per-expert counts at
    --moe-router-bias-update-rate (Megatron's expert-bias rule); needs >= 2 candidate pairs per
    slot, i.e. k' >= 2 when the top-k per head is 1."""

    moe_pk_bias_update_rule: str = dataclasses.field(
        default="sign", metadata={"argparse_meta": {"choices": BIAS_UPDATE_RULES}}
    )
    """Update of the product-key selection biases: 'sign' (Megatron's rule: bias += rate *
    sign(mean - count)) or 'relative' (bias += rate * clamp((mean - count) / mean, -1, 1): steps
    shrink as the load nears the mean)."""

    moe_ec_capacity_factor: float = 1.0
    """Expert-choice router (--moe-router-type expert_choice; Zhou et al. 2022): each expert takes its
    top-c tokens of the token group (a data-parallel rank's micro-batch, the whole sequence under
    sequence parallelism), c = ceil(tokens x top-k / experts x this factor); a token may get zero or
    several experts (dropped tokens pass through the residual). Must be > 0."""

    moe_ec_eval_rule: str = dataclasses.field(
        default=DEFAULT_EC_EVAL_RULE, metadata={"argparse_meta": {"choices": EC_EVAL_RULES}}
    )
    """Causal rule of the expert-choice router at evaluation and generation (choice over a batch sees
    later tokens): 'threshold' (a token goes to every expert whose score clears that expert's
    threshold, tracked during training as a running mean of the c-th best score) or 'token_choice'
    (each token's top-k of the same scores). The evaluation log reports the batch-choice loss too."""

    moe_relu_target_sparsity: float | None = None
    """ReLU router (--moe-router-type relu; ReMoE, Wang et al. 2025): target fraction of zero gates,
    in (0, 1). Default 1 - top-k / experts: the mean compute of top-k token choice."""

    moe_relu_l1_coeff: float = 1e-8
    """ReLU router: initial coefficient of the L1 penalty on the gates (ReMoE's lambda_0), adapted each
    step toward --moe-relu-target-sparsity."""

    moe_relu_l1_update_rate: float = 1.2
    """ReLU router: multiplicative step of the L1 coefficient (ReMoE's alpha > 1): times alpha when the
    gates are denser than the target, divided by alpha when sparser."""

    moe_null_experts: int = 0
    """Null (zero-computation) experts (MoE++, AdaMoE): M extra router outputs whose selection spends
    no expert compute (the token's slot contributes nothing; it keeps the residual), so compute per
    token varies. For the top-k, product-key (the grid then holds experts + M cells) and
    expert-choice routers. The fraction of null selections is logged; balancing counts them."""

    moe_balance_losses: list[str] | None = dataclasses.field(
        default=None, metadata={"argparse_meta": {"choices": BALANCE_LOSSES}}
    )
    """Granularity-normalised load-balancing losses (each equals its coefficient at perfect balance
    for any number of experts and top-k), attached like Megatron's aux losses and logged next to them:
    'expert' (per micro-batch, DeepSeekMoE), 'global_expert' (counts over the global batch: all DP
    ranks and the step's micro-batches, Qiu et al. 2025; exact DP gradient), 'sequence' (per sequence,
    DeepSeek-V3), 'device' and 'communication' (over the EP ranks of Megatron's expert placement,
    DeepSeek-V2; need --expert-model-parallel-size >= 2), 'subkey' (row/column marginals of
    --moe-router-type product_key). Independent of Megatron's --moe-router-load-balancing-type."""

    moe_balance_coeffs: list[float] | None = None
    """Coefficients of --moe-balance-losses, one per loss in the same order (like Megatron's list of
    --moe-aux-loss-coeff); used as given unless --moe-balance-coeff-policy is set too. Default: 1e-2
    per loss scaled by the default policy (constant_gradient: x sqrt(G))."""

    moe_balance_coeff_policy: str | None = dataclasses.field(
        default=None, metadata={"argparse_meta": {"choices": COEFF_POLICIES}}
    )
    """How coefficients follow the granularity G (--moe-granularity; 1 without it), reading them as
    G=1 weights: 'constant' (as given), 'constant_gradient' (x sqrt(G): the router weight's
    balance-gradient norm stays the same across G, since at a fixed coefficient it falls as
    1/sqrt(G)), 'constant_gradient_per_expert' (x G). Default: constant_gradient for the default
    coefficients, constant (exactly as given) for explicit --moe-balance-coeffs."""

    moe_balance_metrics: bool = False
    """Log load-balance metrics every step through Megatron's MoE metrics tracker (console,
    TensorBoard, W&B; layer mean, per layer with --moe-per-layer-logging): max_violation (MaxVio
    of the global batch), load_entropy (/log N), experts_used_fraction (used in the last
    --moe-balance-usage-window steps); with EP > 1 max_violation_ep_rank_max and
    device_max_violation; with product keys pk_rows_used and pk_cols_used. O(N) per layer and step."""

    moe_balance_usage_window: int = 100
    """Window W in steps of experts_used_fraction (--moe-balance-metrics): the fraction of experts
    selected at least once in the last W steps (the history is not checkpointed: it starts empty
    after a resume)."""

    moe_peer_num_experts: int | None = None
    """PEER layers (He 2024): N single-neuron experts per PEER layer, a perfect square n*n (paper:
    1048576 = 1024^2), retrieved by product keys. Replaces the MLP of the layers named by
    --moe-peer-layers; unset = no PEER layer."""

    moe_peer_layers: str = "middle"
    """Which layers' MLP is a PEER layer: 'middle' (layer ceil(L/2), as in the paper), 'all', or
    1-based layer numbers such as '2,4'."""

    moe_peer_heads: int = 8
    """PEER retrieval heads: each has its own query and sub-keys and selects --moe-peer-topk experts
    from the shared pool; their outputs are summed (experts per token G = heads * topk)."""

    moe_peer_topk: int = 16
    """Experts selected per PEER head and token."""

    moe_peer_key_dim: int = 128
    """PEER query dimension per head (even: half scores the row sub-keys, half the column ones)."""

    moe_peer_subkey_topk: int | None = None
    """Sub-keys kept per side before the final top-k (>= --moe-peer-topk for exactness; default
    --moe-peer-topk)."""

    moe_peer_query_norm: str = dataclasses.field(
        default="batchnorm", metadata={"argparse_meta": {"choices": QUERY_NORMS}}
    )
    """Normalisation of PEER queries: 'batchnorm' (the paper's; exact micro-batch statistics
    synchronised over the ranks holding distinct tokens, padding excluded; leaks across positions
    at train time), 'layernorm', 'rmsnorm' or 'none'."""

    moe_peer_activation: str = dataclasses.field(
        default="gelu", metadata={"argparse_meta": {"choices": PEER_ACTIVATIONS}}
    )
    """Activation of each single-neuron expert: act(u . x) * v."""

    moe_peer_gate: str = dataclasses.field(
        default="softmax", metadata={"argparse_meta": {"choices": PEER_GATES}}
    )
    """Gates of a head's k selected experts, in fp32: 'softmax' over their scores or 'sigmoid'."""

    moe_peer_shared_ffn_hidden_size: int | None = None
    """Hidden size of a dense MLP branch added to every PEER layer's output (unset: none). A layer
    without one is reported to hurt reasoning tasks."""

    moe_peer_backend: str = dataclasses.field(
        default="auto", metadata={"argparse_meta": {"choices": PEER_BACKENDS}}
    )
    """PEER expert compute: 'auto' (Triton on CUDA; on CPU cpu_fused for fp32 when a C++ compiler
    is present, else chunked), 'cpu_fused' (fused C++ kernel, fp32, built on first use),
    'chunked' (memory-lean torch: chunks of tokens, gathers recomputed in backward),
    'embedding_bag', 'triton' (fused GPU kernel), or 'eager' (the reference gather path)."""

    moe_peer_chunk_pairs: int = 16384
    """(token, expert) pairs per chunk of the chunked PEER backend: its extra memory is about
    4 * chunk * hidden values, whatever the number of tokens."""

    moe_peer_deterministic: bool = False
    """Deterministic PEER table gradients on GPU (the Triton backward sorts pairs by expert instead
    of using atomics; slower)."""

    moe_peer_shard: str = dataclasses.field(
        default="tp", metadata={"argparse_meta": {"choices": PEER_SHARDS}}
    )
    """How PEER expert tables are split across ranks: 'tp' (by expert id over the tensor-parallel
    group; outputs all-reduced, or reduce-scattered with sequence parallelism) or 'ep' (over the
    expert-parallel group: tokens gathered within it, outputs reduce-scattered back)."""

    moe_peer_table_lr_mult: float = 1.0
    """Learning-rate multiplier of the PEER expert tables u and v (memory-layer work trains values
    at their own rate), applied through Megatron's optimizer parameter groups."""

    moe_peer_table_wd_mult: float = 1.0
    """Weight-decay multiplier of the PEER expert tables (0 turns their weight decay off)."""

    moe_peer_subkey_loss_stride: int = 1
    """PEER layers with --moe-balance-losses subkey and --moe-peer-subkey-loss-marginals full:
    estimate the loss's soft row/column marginals from every s-th local token (the hard counts
    always use all tokens). The full marginals need dense half scores over all n sub-keys and a
    dense backward, ~3x the retrieval's sub-key work; s > 1 divides that cost by s (an unbiased
    estimate of the marginals for shuffled tokens). 1 = exact, the router's loss. Refused with
    'candidates' (nothing dense to thin)."""

    moe_peer_subkey_loss_marginals: str = dataclasses.field(
        default="candidates", metadata={"argparse_meta": {"choices": PEER_SUBKEY_MARGINALS}}
    )
    """Soft row/column marginals of the PEER subkey loss (--moe-balance-losses subkey):
    'candidates' (default: each token's softmax over the k' sub-keys per side its retrieval kept;
    the gradient joins the retrieval's sparse backward, O(k') per token, so it stays cheap at
    N = 1M) or 'full' (softmax over all n sub-keys per side, the product-key router's loss; a
    dense pass as costly as the retrieval's scoring, thinned by --moe-peer-subkey-loss-stride).
    Both equal the coefficient at balanced rows and columns."""

    def __post_init__(self) -> None:
        ext = build_settings(self._settings_getter(), default_topk=MEGATRON_DEFAULT_TOPK)
        for name, value in ext.derived:
            setattr(self, name, value)
        # Not a field: Megatron's dataclass machinery (flags, replace, asdict) sees only the fields, and
        # dataclasses.replace / a new config rebuild it; copies and pickles carry it in __dict__.
        self.ext: MoEExtSettings = ext
        if ext.peer.layers and len(ext.peer.layers) < self.num_layers:
            # PEER and other MLPs in one stack have different parameters, so checkpoints cannot
            # stack them along a layer axis: Megatron's per-layer keys (its own switch for that).
            self.hetereogenous_dist_checkpoint = True
        if ext.needs_step_hook and self.finalize_model_grads_func is None:
            # Once-per-step work (bias updates, global-batch counts reset, step metrics).
            from megatron_moe_ext.balancing.bias_update import finalize_model_grads_with_balancing

            self.finalize_model_grads_func = finalize_model_grads_with_balancing
        super().__post_init__()

    def _settings_getter(self):
        """``get(name)`` over this config for ``build_settings``; Megatron's default top-k reads as unset."""

        def get(name: str) -> Any:
            value = getattr(self, name)
            return None if name == "moe_router_topk" and value == MEGATRON_DEFAULT_TOPK else value

        return get


def _ext_field_defaults() -> dict[str, Any]:
    """MoEExtConfig's own fields (not TransformerConfig's) -> their defaults."""
    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(MoEExtConfig)
        if f.name not in base
    }


# Layers read a plain TransformerConfig's settings from these defaults (settings.ext_settings).
register_field_defaults(_ext_field_defaults(), default_topk=MEGATRON_DEFAULT_TOPK)
