"""Expert MLP on Transformer Engine's functional grouped GEMM, over OUR stacked weights.

``expert_mlp_te`` has the contract of the kernels in ``expert_mlp.py``: rows grouped by expert,
``out[t] = fc2_e(act(fc1_e(x[t])) * prob[t])``. Both projections run as one TE grouped GEMM each
(``transformer_engine.pytorch.cpp_extensions.general_grouped_gemm``: cuBLASLt GEMMs, one per expert,
spread over TE's multi-stream workspace) on per-expert views of the stacked parameters
``w1 [E, F1, H]`` and ``w2 [E, H, F]``. No ``te.pytorch.GroupedLinear`` module (with its own
``weight0..N`` parameters) is made, so checkpoints and the other backends stay interchangeable.

Design
------
``_TEGroupedLinear`` is a ``torch.autograd.Function`` for ``y_m = x_m @ W_e^T`` over row groups,
laid out as TE's own ``GroupedLinear`` calls the same GEMM:

=========  ===========================  ======  ================================
GEMM       A (per expert)               layout  B / out
=========  ===========================  ======  ================================
fprop      W_e [O, K]                   TN      x_e [m, K] -> y_e [m, O]
dgrad      W_e [O, K]                   NN      dy_e [m, O] -> dx_e [m, K]
wgrad      x_e [m, K]                   NT      dy_e [m, O] -> dW_e [O, K]
=========  ===========================  ======  ================================

Experts with no rows are left out of the GEMM lists (their weight gradient is zero), so TE never
sees an empty operand. The activation and the probability scaling are plain torch ops between the
two grouped GEMMs, differentiated by autograd; so are the optional expert biases (gathered per row:
fc1's added before the activation, fc2's scaled by the probability after fc2, as in
``expert_mlp.py``). Under FP8 the padded rows get the fc1 bias too, but their probability is zero,
so nothing of them reaches the output or a gradient.

FP8
---
When a TE autocast is active (``FP8GlobalStateManager.is_fp8_enabled()``) at the call:

* each expert's row count is padded up to the FP8 alignment (16; 32 for MXFP8,
  ``granularity.FP8_ALIGNMENT``), as Megatron's ``Fp8Padding``/``Fp8Unpadding`` do in
  ``TEGroupedMLP.forward``: padded rows are zero (and their probability zero), are carried through
  both GEMMs and dropped from the output, so they add nothing to any gradient;
* every GEMM operand is quantized per expert with a TE quantizer: inputs and weights in the
  recipe's forward format (E4M3), output gradients in its backward format (E5M2 for HYBRID), with
  the row-/column-wise usages each GEMM layout needs (as ``GroupedLinear`` sets them);
* recipes: ``Float8CurrentScaling`` -> ``Float8CurrentScalingQuantizer`` (honouring the recipe's
  power-of-2 scales, amax epsilon and split-accumulator settings); ``MXFP8BlockScaling`` ->
  ``MXFP8Quantizer``; ``DelayedScaling`` -> ALSO ``Float8CurrentScalingQuantizer``: a functional op
  has no module ``fp8_meta`` to keep an amax history in, so delayed scaling is NOT reproduced; the
  scales come from each tensor's current amax (numerically at least as accurate, but not the
  delayed recipe's numbers, and the amax reductions of the recipe do not include these tensors).
  Other recipes (``Float8BlockScaling``, NVFP4, custom) raise ValueError.
* GEMM dims H, F1 and F must be multiples of the alignment (ValueError otherwise).

Targets and what was verified
-----------------------------
Written against Transformer Engine's source, v2.0 to 2.20.0.dev0 (``main`` of 2026-08): the three
signatures of ``general_grouped_gemm`` are handled by inspecting it (2.0-2.9 take ``workspaces``;
2.10 takes neither; >= 2.11 takes ``quantization_params``); TE < 2.0 (no ``general_grouped_gemm``)
is refused with a ValueError. FP8 tensorwise needs ``Float8CurrentScalingQuantizer`` (TE >= 2.2);
MXFP8 needs a Blackwell GPU. ``FP8GlobalStateManager`` is taken from
``transformer_engine.pytorch.quantization`` (>= 2.9), else ``transformer_engine.pytorch.fp8``.

NOT RUN ON A GPU: this module was written and tested on a CPU machine without Transformer Engine.
Its CPU tests drive the autograd function, the FP8 padding and the recipe dispatch through a
stand-in for TE's grouped GEMM (torch matmuls with TE's layout semantics) and stand-in quantizers;
the real TE calls, FP8 numerics and performance are covered only by the ``gpu``-marked tests in
``tests/unit/test_te_backend.py``, which have not been run yet.
FP32 note: TE runs pure-FP32 GEMMs with TF32 tensor cores, so FP32 results differ from torch's
(non-TF32 by default) matmuls at the 1e-3 relative level.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import torch

from megatron_moe_ext import _compat
from megatron_moe_ext.settings.granularity import FP8_ALIGNMENT

Activation = Callable[[torch.Tensor], torch.Tensor]

TE_MISSING_MESSAGE = (
    "moe_expert_backend='te' needs Transformer Engine (pip install 'megatron-moe-ext[gpu]' on a GPU machine); "
    "choose 'grouped' or 'eager'"
)
MIN_TE_VERSION = "2.0"

# TE's defaults for cuBLAS split accumulation (transformer_engine/pytorch/module/base.py
# _2X_ACC_FPROP/_DGRAD/_WGRAD); FP8 recipes with fp8_gemm_* settings override them.
_DEFAULT_SPLIT_ACCUMULATOR = {"fprop": False, "dgrad": True, "wgrad": True}


# --------------------------------------------------------------------------------------------------
# Transformer Engine, resolved once and lazily


@dataclasses.dataclass(frozen=True)
class TEApi:
    """The few Transformer Engine entry points this kernel uses (tests substitute stand-ins)."""

    version: str
    # grouped_gemm(A, B, out, *, layout, m_splits, grad, use_split_accumulator): out[i] = op(B[i]) op(A[i])
    grouped_gemm: Callable[..., Any]
    fp8_state: Any  # FP8GlobalStateManager (is_fp8_enabled, get_fp8_recipe)
    get_fp8_te_dtype: Callable[[Any, bool], Any]  # (recipe, fprop_tensor) -> TE fp8 dtype
    float8_current_scaling_quantizer: type | None  # TE >= 2.2
    mxfp8_quantizer: type | None


def adapt_general_grouped_gemm(
    fn: Callable[..., Any], workspaces: Callable[[], list] | None = None
) -> Callable[..., Any]:
    """A uniform caller for the versions of TE's ``general_grouped_gemm``:

    * 2.0-2.9:  ``(A, B, out, out_dtype, workspaces, layout=, m_splits=, gelu=, grad=, accumulate=, ...)``
    * 2.10:     ``(A, B, out, out_dtype, layout=, ...)`` (workspaces managed inside)
    * >= 2.11:  ``(A, B, out, quantization_params, out_dtype, layout=, ...)``

    Every argument after ``out`` is passed by keyword. ``workspaces`` is a zero-argument function
    returning TE's multi-stream cuBLAS workspaces (only called for 2.0-2.9)."""
    params = inspect.signature(fn).parameters
    needed = {"out_dtype", "layout", "m_splits", "grad", "accumulate", "use_split_accumulator", "single_output"}
    missing = sorted(needed - set(params))
    if missing:
        raise ValueError(
            f"moe_expert_backend='te': Transformer Engine's general_grouped_gemm{inspect.signature(fn)} lacks "
            f"{', '.join(missing)}; this backend was written for TE {MIN_TE_VERSION} to 2.20. Fix: install a "
            "TE in that range, or choose 'grouped'"
        )
    takes_quantization_params = "quantization_params" in params
    takes_workspaces = "workspaces" in params
    if takes_workspaces and workspaces is None:
        raise ValueError("moe_expert_backend='te': this TE's general_grouped_gemm needs workspaces; none were found")

    def grouped_gemm(A: list, B: list, out: list[torch.Tensor], *, layout: str, m_splits: list[int], grad: bool,
                     use_split_accumulator: bool) -> None:
        kwargs: dict[str, Any] = dict(
            out_dtype=out[0].dtype,
            layout=layout,
            m_splits=m_splits,
            grad=grad,
            accumulate=False,
            use_split_accumulator=use_split_accumulator,
            single_output=False,
        )
        if takes_quantization_params:
            kwargs["quantization_params"] = [None] * len(A)  # outputs in out_dtype, not quantized
        if takes_workspaces:
            kwargs["workspaces"] = workspaces()
        fn(A, B, out, **kwargs)

    return grouped_gemm


@functools.lru_cache(maxsize=None)
def load_te_api() -> TEApi:
    """Import Transformer Engine's pieces (once). ValueError, naming the version, if unusable."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # a broken install: CUDA/torch mismatch, missing libraries
        raise ValueError(
            f"moe_expert_backend='te': Transformer Engine is installed but does not import ({type(exc).__name__}: "
            f"{exc}); fix the install, or choose 'grouped' or 'eager'"
        ) from exc
    version = _te_version()
    try:
        from transformer_engine.pytorch.cpp_extensions import general_grouped_gemm
    except ImportError as exc:
        raise ValueError(
            f"moe_expert_backend='te' needs Transformer Engine >= {MIN_TE_VERSION} (found {version}): it calls the "
            "functional transformer_engine.pytorch.cpp_extensions.general_grouped_gemm, which older releases lack. "
            "Fix: pip install -U 'transformer-engine[pytorch]', or choose 'grouped'"
        ) from exc
    try:  # TE >= 2.9
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager, get_fp8_te_dtype
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager, get_fp8_te_dtype

    workspaces = None
    if "workspaces" in inspect.signature(general_grouped_gemm).parameters:  # TE 2.0-2.9
        from transformer_engine.pytorch.module.base import get_multi_stream_cublas_workspace

        workspaces = get_multi_stream_cublas_workspace
    try:
        from transformer_engine.pytorch.tensor.float8_tensor import Float8CurrentScalingQuantizer
    except ImportError:  # TE < 2.2
        Float8CurrentScalingQuantizer = None
    try:
        from transformer_engine.pytorch.tensor.mxfp8_tensor import MXFP8Quantizer
    except ImportError:
        MXFP8Quantizer = None
    return TEApi(
        version=version,
        grouped_gemm=adapt_general_grouped_gemm(general_grouped_gemm, workspaces),
        fp8_state=FP8GlobalStateManager,
        get_fp8_te_dtype=get_fp8_te_dtype,
        float8_current_scaling_quantizer=Float8CurrentScalingQuantizer,
        mxfp8_quantizer=MXFP8Quantizer,
    )


def _te_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformer_engine")
    except Exception:
        import transformer_engine

        return str(getattr(transformer_engine, "__version__", "unknown"))


def require_te(x_NH: torch.Tensor, *weights: torch.Tensor) -> TEApi:
    """The TE API, or ValueError: no Transformer Engine, or tensors not on one CUDA device."""
    if not _compat.HAVE_TE:
        raise ValueError(TE_MISSING_MESSAGE)
    if x_NH.device.type != "cuda":
        raise ValueError(
            f"moe_expert_backend='te' runs on CUDA tensors only, got the expert input on device {x_NH.device} "
            f"({x_NH.device.type}); move the model to a GPU, or choose 'grouped' or 'eager'"
        )
    for w in weights:
        if w.device != x_NH.device:
            raise ValueError(
                f"moe_expert_backend='te': expert weights are on device {w.device} but the input is on {x_NH.device}"
            )
    return load_te_api()


# --------------------------------------------------------------------------------------------------
# FP8: recipe -> quantizers and alignment


@dataclasses.dataclass(frozen=True)
class Fp8Plan:
    """How the GEMM operands are quantized while a TE FP8 autocast is active."""

    recipe_name: str
    align: int  # rows per expert and GEMM dims are multiples of this
    make: Callable[[str, bool, bool], Any]  # (role, rowwise, columnwise) -> quantizer; role in input/weight/grad
    split_accumulator: dict[str, bool]

    def quantize(self, role: str, tensors: Sequence[torch.Tensor], *, rowwise: bool, columnwise: bool) -> list:
        """One quantizer per expert (per-expert scales, like GroupedLinear's per-GEMM quantizers)."""
        out = []
        for t in tensors:
            quantizer = self.make(role, rowwise, columnwise)
            out.append(quantizer(t))
        return out


def _recipe_is(recipe: Any, name: str) -> bool:
    test = getattr(recipe, name, None)
    return bool(test()) if callable(test) else False


def fp8_plan(api: TEApi, device: torch.device) -> Fp8Plan | None:
    """None without an active FP8 autocast; else the plan for its recipe (ValueError if unsupported)."""
    if not api.fp8_state.is_fp8_enabled():
        return None
    recipe = api.fp8_state.get_fp8_recipe()
    name = type(recipe).__name__
    split_acc = dict(_DEFAULT_SPLIT_ACCUMULATOR)
    for gemm in split_acc:
        mm = getattr(recipe, f"fp8_gemm_{gemm}", None)
        if mm is not None and hasattr(mm, "use_split_accumulator"):
            split_acc[gemm] = bool(mm.use_split_accumulator)
    dtypes = {
        "input": api.get_fp8_te_dtype(recipe, True),
        "weight": api.get_fp8_te_dtype(recipe, True),
        "grad": api.get_fp8_te_dtype(recipe, False),
    }

    if _recipe_is(recipe, "mxfp8"):
        cls = api.mxfp8_quantizer
        if cls is None:
            raise ValueError(f"moe_expert_backend='te': TE {api.version} has no MXFP8Quantizer for recipe {name}")

        def make(role: str, rowwise: bool, columnwise: bool) -> Any:
            quantizer = cls(dtypes[role], rowwise=rowwise, columnwise=columnwise)
            quantizer.internal = True
            return quantizer

        return Fp8Plan(name, FP8_ALIGNMENT["mxfp8"], make, split_acc)

    if _recipe_is(recipe, "float8_current_scaling") or _recipe_is(recipe, "delayed"):
        cls = api.float8_current_scaling_quantizer
        if cls is None:
            raise ValueError(
                f"moe_expert_backend='te' quantizes FP8 with Float8CurrentScalingQuantizer, which TE {api.version} "
                "lacks (TE >= 2.2). Fix: upgrade Transformer Engine, or run without FP8"
            )
        # Float8CurrentScaling's per-role settings (absent in DelayedScaling: TE's defaults).
        qparams = {
            "input": getattr(recipe, "fp8_quant_fwd_inp", None),
            "weight": getattr(recipe, "fp8_quant_fwd_weight", None),
            "grad": getattr(recipe, "fp8_quant_bwd_grad", None),
        }

        def make(role: str, rowwise: bool, columnwise: bool) -> Any:
            q = qparams[role]
            extra = {}
            if q is not None:
                extra = dict(force_pow_2_scales=bool(q.power_2_scale), amax_epsilon=float(q.amax_epsilon))
            quantizer = cls(dtypes[role], device=device, rowwise=rowwise, columnwise=columnwise, **extra)
            quantizer.internal = True
            return quantizer

        return Fp8Plan(name, FP8_ALIGNMENT["default"], make, split_acc)

    raise ValueError(
        f"moe_expert_backend='te' supports the FP8 recipes DelayedScaling (run with current per-tensor scaling), "
        f"Float8CurrentScaling and MXFP8BlockScaling; the active recipe is {name}. Fix: --fp8-recipe tensorwise, "
        "delayed or mxfp8, or --moe-expert-backend megatron"
    )


def aligned_counts(counts: Sequence[int], align: int, device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """Each count rounded up to ``align``, and each row's index in that padded layout (None when
    every count is already aligned). Experts with 0 rows keep 0 (Megatron's Fp8Padding does too)."""
    padded = [-(-c // align) * align for c in counts]
    if padded == list(counts):
        return padded, None
    counts_E = torch.tensor(list(counts), dtype=torch.long)
    padded_E = torch.tensor(padded, dtype=torch.long)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    padded_starts_E = torch.cumsum(padded_E, 0) - padded_E
    expert_N = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
    dest_N = padded_starts_E[expert_N] + torch.arange(int(counts_E.sum())) - starts_E[expert_N]
    return padded, dest_N.to(device)


# --------------------------------------------------------------------------------------------------
# The grouped linear and the kernel


class _TEGroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e]^T`` with TE grouped GEMMs (fprop TN, dgrad NN, wgrad NT)."""

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_EOK: torch.Tensor, splits: tuple[int, ...], api: TEApi,
                fp8: Fp8Plan | None) -> torch.Tensor:
        x_MK, w_EOK = x_MK.contiguous(), w_EOK.contiguous()
        active = [e for e, m in enumerate(splits) if m > 0]
        m_splits = [splits[e] for e in active]
        x_parts = torch.split(x_MK, list(splits))
        xs = [x_parts[e] for e in active]
        ws = [w_EOK[e] for e in active]
        y_MO = x_MK.new_empty(x_MK.shape[0], w_EOK.shape[1])
        ys = list(torch.split(y_MO, m_splits)) if active else []
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if fp8 is not None:
            # Usages as GroupedLinear sets them: fprop reads row-wise data; dgrad (NN) reads the
            # weight column-wise, wgrad (NT) the input column-wise.
            xs = fp8.quantize("input", xs, rowwise=True, columnwise=need_wgrad)
            ws = fp8.quantize("weight", ws, rowwise=True, columnwise=need_dgrad)
        split_acc = fp8.split_accumulator if fp8 is not None else _DEFAULT_SPLIT_ACCUMULATOR
        if active:
            api.grouped_gemm(ws, xs, ys, layout="TN", m_splits=m_splits, grad=False,
                             use_split_accumulator=split_acc["fprop"])
        ctx.api, ctx.fp8, ctx.splits, ctx.active = api, fp8, tuple(splits), active
        ctx.shapes = (tuple(x_MK.shape), tuple(w_EOK.shape))
        if fp8 is not None:
            # Quantized operands are not plain tensors: kept on ctx (they reference no graph node).
            ctx.quantized = (xs if need_wgrad else None, ws if need_dgrad else None)
        else:
            ctx.save_for_backward(x_MK if need_wgrad else None, w_EOK if need_dgrad else None)
        return y_MO

    @staticmethod
    def backward(ctx, dy_MO: torch.Tensor):
        api, fp8, splits, active = ctx.api, ctx.fp8, ctx.splits, ctx.active
        (num_rows, in_features), (num_experts, out_features, _) = ctx.shapes
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        split_acc = fp8.split_accumulator if fp8 is not None else _DEFAULT_SPLIT_ACCUMULATOR
        m_splits = [splits[e] for e in active]
        dy_MO = dy_MO.contiguous()
        dy_parts = torch.split(dy_MO, list(splits))
        dys = [dy_parts[e] for e in active]
        if fp8 is not None:
            xs, ws = ctx.quantized
            ctx.quantized = None
            dys = fp8.quantize("grad", dys, rowwise=need_dgrad, columnwise=need_wgrad)
        else:
            x_MK, w_EOK = ctx.saved_tensors
            xs = [torch.split(x_MK, list(splits))[e] for e in active] if need_wgrad else None
            ws = [w_EOK[e] for e in active] if need_dgrad else None

        dx_MK = dw_EOK = None
        if need_dgrad:
            dx_MK = dy_MO.new_empty(num_rows, in_features)
            if active:
                api.grouped_gemm(ws, dys, list(torch.split(dx_MK, m_splits)), layout="NN", m_splits=m_splits,
                                 grad=True, use_split_accumulator=split_acc["dgrad"])
        if need_wgrad:
            alloc = torch.empty if len(active) == num_experts else torch.zeros  # experts with no rows: zero
            dw_EOK = alloc(num_experts, out_features, in_features, dtype=dy_MO.dtype, device=dy_MO.device)
            if active:
                api.grouped_gemm(xs, dys, [dw_EOK[e] for e in active], layout="NT", m_splits=m_splits,
                                 grad=True, use_split_accumulator=split_acc["wgrad"])
        return dx_MK, dw_EOK, None, None, None


def expert_mlp_with_api(
    api: TEApi,
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel body, given the TE entry points (no device checks: tests run it with stand-ins)."""
    counts = [int(c) for c in tokens_per_expert]
    num_experts, fc1_rows, hidden = w1_EF1H.shape
    if x_NH.dim() != 2 or x_NH.shape[1] != hidden:
        raise ValueError(f"expert input of shape {tuple(x_NH.shape)} does not match fc1 weights {tuple(w1_EF1H.shape)}")
    if w2_EHF.shape[0] != num_experts or w2_EHF.shape[1] != hidden:
        raise ValueError(f"fc2 weights {tuple(w2_EHF.shape)} do not match fc1 weights {tuple(w1_EF1H.shape)}")
    if len(counts) != num_experts or sum(counts) != x_NH.shape[0] or min(counts, default=0) < 0:
        raise ValueError(
            f"tokens_per_expert={counts} must give {num_experts} non-negative counts summing to {x_NH.shape[0]} rows"
        )
    fp8 = fp8_plan(api, x_NH.device)
    dest_N = None
    if fp8 is not None:
        dims = {"hidden": hidden, "fc1 rows": fc1_rows, "expert hidden": w2_EHF.shape[2]}
        bad = {k: v for k, v in dims.items() if v % fp8.align}
        if bad:
            raise ValueError(
                f"moe_expert_backend='te' under FP8 ({fp8.recipe_name}) needs GEMM dims that are multiples of "
                f"{fp8.align}; got {bad}. Fix: change the sizes (see granularity.FP8_ALIGNMENT), or run without FP8"
            )
        counts, dest_N = aligned_counts(counts, fp8.align, x_NH.device)
    # Mixed dtypes (fp32 master weights with bf16 activations): GEMMs run in the activation dtype.
    w1, w2 = w1_EF1H.to(x_NH.dtype), w2_EHF.to(x_NH.dtype)
    x, probs = x_NH, probs_N
    if dest_N is not None:
        x = x_NH.new_zeros(sum(counts), hidden).index_copy(0, dest_N, x_NH)
        probs = probs_N.new_zeros(sum(counts)).index_copy(0, dest_N, probs_N)
    splits = tuple(counts)
    expert_N = None
    if b1_EF1 is not None or b2_EH is not None:
        # Each (padded) row's expert, to gather per-row biases (the grouped GEMM takes none).
        counts_E = torch.tensor(list(counts), dtype=torch.long, device=x.device)
        expert_N = torch.repeat_interleave(torch.arange(len(counts_E), device=x.device), counts_E)
    h_NF1 = _TEGroupedLinear.apply(x, w1, splits, api, fp8)
    if b1_EF1 is not None:
        h_NF1 = h_NF1 + b1_EF1.to(x.dtype)[expert_N]  # the GEMM dtype, as the weights
    h_NF = activation(h_NF1)
    h_NF = (h_NF * probs.unsqueeze(-1)).to(h_NF.dtype)
    out_NH = _TEGroupedLinear.apply(h_NF, w2, splits, api, fp8)
    if b2_EH is not None:
        out_NH = (out_NH + b2_EH[expert_N] * probs.unsqueeze(-1)).to(out_NH.dtype)
    return out_NH if dest_N is None else out_NH.index_select(0, dest_N)


def expert_mlp_te(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transformer Engine grouped GEMMs for both projections (FP8 under a TE autocast; see the
    module docstring), optional expert biases. ValueError without TE, or for tensors not on a CUDA
    device."""
    api = require_te(x_NH, w1_EF1H, w2_EHF, *(b for b in (b1_EF1, b2_EH) if b is not None))
    return expert_mlp_with_api(api, x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation,
                               b1_EF1=b1_EF1, b2_EH=b2_EH)
