"""Expert logit lens (``analyze --readouts logit_lens``): what each expert writes into the logits, through the
final norm and the output layer: the tokens it promotes and suppresses on average, and, per token, which of the
token's experts raises the correct next token most.

Linearisation (direct logit attribution: Elhage et al. 2021, "A Mathematical Framework for Transformer
Circuits", section "Direct path"; the logit lens: nostalgebraist 2020, "interpreting GPT: the logit lens").
Token t's final residual r_t contains expert e's gated output c_{t,e} (its share of the MoE layer's output).
The logits are W_U N(r_t), N the final norm: RMSNorm N(r) = g * r / sigma_t with sigma_t = sqrt(mean_H(r^2) +
eps); LayerNorm N(r) = g * (r - mean_H r) / sigma_t + b with sigma_t = sqrt(var_H(r) + eps) (g = 1 + weight
with Megatron's zero-centred gamma). Holding sigma_t at its value on token t's actual final residual, N is
linear in r and expert e's direct share of token t's logits is

    dla_{t,e} = W_U (g * P c_{t,e}) / sigma_t        (in R^V; P = identity for RMSNorm, centring for LayerNorm)

It is the direct path only: later layers' reactions to c_{t,e} are not counted. Expert e's mean contribution
m_e = mean over the tokens routed to e of dla_{t,e} = W_U (g * P mu_e), mu_e = mean_t c_{t,e} / sigma_t (linear,
so the mean is projected once); its top promoted / suppressed tokens are the largest / smallest entries of m_e
(ids below the tokenizer's vocabulary; text when the checkpoint's tokenizer gives it: ``token_text``).
Per token: s_{t,e} = dla_{t,e}[y_t], y_t the next token; the token's best expert is argmax over its selected
experts of s_{t,e}.

How c_{t,e} is isolated (never recomputing routing or experts by hand): in a clean rerun of the batch, a
forward hook on each MoE layer calls the layer again K times on its own input, with a hook on its router that
zeroes every gate but the token's j-th largest (j = 0..K-1; the routing map, hence the dispatch, is unchanged).
Megatron's experts (SequentialMLP, GroupedMLP, TE) and ours (FineGrainedExperts) scale each row's output, fc2
bias included, by its gate, so call j returns exactly c_{t, e_j(t)} (+ the shared experts' output, measured by
one more call with every gate zeroed and subtracted). The check: sum_j c_{t,e_j} equals the layer's routed
output (``reconstruction_error``, relative max). The K calls run on every rank (EP all-to-alls included), so
the result is the same at any TP/EP. Cost per batch: one forward plus K MoE-layer calls per MoE layer.

PEER layers (up to 10^6 experts, each seen by few tokens): per-expert means are ``not_applicable``; the whole
layer's direct share of the correct next token (its experts, shared MLP excluded) is reported per token.

Under tensor parallelism the output layer is vocabulary-parallel: its weight is all-gathered once at attach
(V x H floats on every rank). Sums are float64, reduced to rank 0 in rank order.

Legend: S sequence (S_loc: this rank's slice under SP), B micro-batch, T = S_loc*B local token rows
(Megatron's s-major order), H hidden, V (padded) vocabulary, K selections per token, N experts in a layer,
E experts listed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megatron_moe_ext.analysis.instrument_api import Batch, RankEnv, router_rows

# name -> (type, default, help): H4 turns these into ``analyze`` flags (``--logit-lens-top-tokens`` etc.).
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "logit_lens_top_tokens": (int, 10, "tokens listed per expert as most promoted and most suppressed"),
    "logit_lens_max_experts": (int, 64, "experts listed per layer (the busiest, when a layer has more)"),
    "logit_lens_examples": (int, 20, "tokens listed per layer whose correct next token an expert raised most"),
}


def check_options(options: dict[str, Any]) -> None:
    """ValueError naming the value and the fix unless every logit-lens option is a positive int."""
    for name, (_, default, _) in OPTIONS.items():
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= 1; fix: pass e.g. "
                             f"--{name.replace('_', '-')} {default}")


# -- pure statistics ---------------------------------------------------------------------------------------------
def norm_scale(r_TH: torch.Tensor, *, kind: str, eps: float) -> torch.Tensor:
    """sigma_T of the final norm on residuals r_TH: sqrt(mean(r^2) + eps) for RMSNorm, sqrt(var(r) + eps)
    (biased variance, as LayerNorm) for LayerNorm (Zhang & Sennrich 2019; Ba et al. 2016)."""
    r = r_TH.double()
    if kind == "RMSNorm":
        return torch.sqrt(r.pow(2).mean(-1) + eps)
    if kind == "LayerNorm":
        return torch.sqrt(r.var(-1, unbiased=False) + eps)
    raise ValueError(f"final norm {kind!r}: the logit lens linearises RMSNorm and LayerNorm only")


def normalised_contribution(c_XTH: torch.Tensor, sigma_T: torch.Tensor, *, centre: bool) -> torch.Tensor:
    """P c / sigma_t (float64), P the LayerNorm centring when ``centre`` (module docstring)."""
    c = c_XTH.double()
    if centre:
        c = c - c.mean(-1, keepdim=True)
    return c / sigma_T.unsqueeze(-1)


def direct_logits(v_XH: torch.Tensor, *, gamma_H: torch.Tensor, unembed_VH: torch.Tensor) -> torch.Tensor:
    """W_U (g * v) [X, V] of normalised contributions v_XH (module docstring: dla = W_U (g * P c) / sigma)."""
    return (v_XH.double() * gamma_H.double()) @ unembed_VH.double().T


def top_entries(values_V: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(largest ids, smallest ids) of values_V, k each, ordered from the extreme; ties by id."""
    order = np.lexsort((np.arange(values_V.size), -values_V))
    low = np.lexsort((np.arange(values_V.size), values_V))
    return order[:k], low[:k]


# -- the rank-side instrument ------------------------------------------------------------------------------------
class _LayerAcc:
    """One routed layer's float64 sums on this rank."""

    def __init__(self, layer: int, kind: str, num_experts: int, top_k: int, hidden: int) -> None:
        self.layer, self.kind, self.num_experts, self.top_k = layer, kind, num_experts, top_k
        per_expert = kind == "moe"
        self.sum_NH = np.zeros((num_experts, hidden)) if per_expert else None
        self.count_N = np.zeros(num_experts, np.int64) if per_expert else None
        self.best_N = np.zeros(num_experts, np.int64) if per_expert else None
        self.correct_sum_N = np.zeros(num_experts) if per_expert else None
        self.correct_count_N = np.zeros(num_experts, np.int64) if per_expert else None
        self.layer_correct_sum = 0.0
        self.scored_tokens = 0
        self.best_is_top_gate = 0
        self.reconstruction_error = 0.0
        self.examples: list[tuple[float, int, int, int, int, int]] = []  # (s, window, position, token, next, expert)


class LogitLens:
    """``logit_lens``: see the module docstring. ``LogitLens(name, env)`` is the INSTRUMENTS factory."""

    def __init__(self, name: str, env: RankEnv) -> None:
        check_options(env.options)
        self.name = name
        self.env = env
        self.top_tokens = int(env.options.get("logit_lens_top_tokens", OPTIONS["logit_lens_top_tokens"][1]))
        self.max_experts = int(env.options.get("logit_lens_max_experts", OPTIONS["logit_lens_max_experts"][1]))
        self.max_examples = int(env.options.get("logit_lens_examples", OPTIONS["logit_lens_examples"][1]))
        self._armed = False
        self._inside = False
        self._handles: list[Any] = []
        self._moe: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._peer: dict[int, torch.Tensor] = {}
        self._peer_shared: dict[int, torch.Tensor] = {}
        self._final_in: torch.Tensor | None = None
        self.acc: dict[int, _LayerAcc] = {}

    # -- attach ------------------------------------------------------------------------------------------------
    def attach(self, model: Any, env: RankEnv) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from megatron_moe_ext.layers.peer import PEERLayer

        config = model.config
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"logit_lens: final norm {config.normalization!r} is not RMSNorm or LayerNorm")
        self.norm_kind, self.eps = config.normalization, float(config.layernorm_epsilon)
        norm = model.decoder.final_layernorm
        if norm is None:
            raise ValueError("logit_lens: the model has no final norm on this stage (pipeline stages are not "
                             "supported by analysis)")
        weight = norm.weight.detach().double().cpu()
        self.gamma_H = weight + 1.0 if config.layernorm_zero_centered_gamma else weight
        self.unembed_VH = self._gather_unembedding(model, env)
        args = env.model_args
        real_vocab = getattr(args, "vocab_size", None) if args is not None else None
        self.vocab = min(int(real_vocab), self.unembed_VH.shape[0]) if real_vocab else self.unembed_VH.shape[0]
        self._handles.append(norm.register_forward_pre_hook(self._final_hook))
        H = config.hidden_size
        for module in model.modules():
            number = getattr(module, "layer_number", None)
            if isinstance(module, MoELayer):
                number = module.router.layer_number
                self.acc[number] = _LayerAcc(number, "moe", config.num_moe_experts, module.router.topk, H)
                self._handles.append(module.register_forward_hook(self._moe_hook(number), with_kwargs=True))
            elif isinstance(module, PEERLayer):
                self.acc[number] = _LayerAcc(number, "peer", module.layout.num_experts,
                                             module.layout.heads * module.layout.topk, H)
                self._handles.append(module.register_forward_hook(self._peer_hook(number)))
                if module.shared_mlp is not None:
                    self._handles.append(module.shared_mlp.register_forward_hook(self._peer_shared_hook(number)))
        self.acc = dict(sorted(self.acc.items()))

    @staticmethod
    def _gather_unembedding(model: Any, env: RankEnv) -> torch.Tensor:
        """W_U [V, H] (float64, CPU), all-gathered over TP (vocabulary-parallel rows)."""
        if model.share_embeddings_and_output_weights:
            w = model.shared_embedding_or_output_weight()
        else:
            w = model.output_layer.weight
        w = w.detach()
        if env.tensor_parallel_size > 1:
            parts = [torch.empty_like(w) for _ in range(env.tensor_parallel_size)]
            torch.distributed.all_gather(parts, w.contiguous(), group=env.tensor_parallel_group)
            w = torch.cat(parts, dim=0)
        return w.double().cpu()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks (armed only during this instrument's own clean rerun) --------------------------------------------
    def _final_hook(self, module: Any, inputs: tuple) -> None:
        if self._armed:
            self._final_in = inputs[0].detach().clone()

    def _peer_hook(self, number: int) -> Callable:
        def hook(module: Any, inputs: tuple, output: Any) -> None:
            if self._armed:
                self._peer[number] = output[0].detach().clone()
        return hook

    def _peer_shared_hook(self, number: int) -> Callable:
        def hook(module: Any, inputs: tuple, output: Any) -> None:
            if self._armed:
                out, bias = output if isinstance(output, tuple) else (output, None)
                self._peer_shared[number] = (out if bias is None else out + bias).detach().clone()
        return hook

    def _moe_hook(self, number: int) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._armed or self._inside:
                return
            self._inside = True
            K = module.router.topk
            state: dict[str, Any] = {"keep": None, "ids": None}

            def router_hook(router: Any, inputs: tuple, out: tuple) -> tuple:
                probs_TN, map_TN = out[0], out[1]
                masked_TN = torch.where(map_TN.bool(), probs_TN.float(), torch.full_like(probs_TN, -1.0,
                                                                                           dtype=torch.float32))
                ids_TK = masked_TN.topk(K, dim=-1).indices  # the token's experts by gate, largest first
                if state["ids"] is None:
                    state["ids"] = ids_TK
                keep_TN = torch.zeros_like(map_TN, dtype=torch.bool)
                if state["keep"] is not None:
                    keep_TN.scatter_(1, ids_TK[:, state["keep"]:state["keep"] + 1], True)
                return (torch.where(keep_TN, probs_TN, torch.zeros_like(probs_TN)), *out[1:])

            handle = module.router.register_forward_hook(router_hook)  # registered last: runs after others
            try:
                shared = None
                if module.shared_experts is not None:
                    shared = module(*args, **kwargs)[0].detach()  # every gate zero: the shared experts alone
                parts = []
                for j in range(K):
                    state["keep"] = j
                    out_j = module(*args, **kwargs)[0].detach()
                    parts.append(out_j if shared is None else out_j - shared)
                # clone: the layer's caller may add into its output in place afterwards
                routed = output[0].detach().clone() if shared is None else output[0].detach() - shared
                self._moe[number] = (state["ids"], torch.stack(parts), routed)
            finally:
                handle.remove()
                self._inside = False
        return hook

    # -- per batch ---------------------------------------------------------------------------------------------
    def on_batch(self, batch: Batch, clean_loss_BS: Any, rerun: Callable[[], Any]) -> None:
        if not self.acc:  # a dense model (the same on every rank): nothing to attribute, no rerun
            return
        self._armed = True
        try:
            rerun()
        finally:
            self._armed = False
        if self._final_in is None:
            raise RuntimeError("logit_lens: the final norm did not run in the rerun")
        r_TH = self._final_in.reshape(-1, self._final_in.shape[-1])
        self._final_in = None
        sigma_T = norm_scale(r_TH, kind=self.norm_kind, eps=self.eps).cpu()
        T = r_TH.shape[0]
        window_T, position_T = router_rows(batch, self.env, T)
        B = len(batch.window_ids_B)
        b_T = np.tile(np.arange(B), T // B)
        tokens_BS = batch.tokens_BS.detach().cpu().numpy()
        S = tokens_BS.shape[1]
        real_T = np.asarray(batch.real_B, dtype=bool)[b_T]
        scored_T = real_T & np.asarray(batch.loss_mask_BS, dtype=bool)[b_T, position_T]
        token_T = tokens_BS[b_T, position_T]
        next_T = tokens_BS[b_T, np.minimum(position_T + 1, S - 1)]
        u_TH = self.unembed_VH[torch.from_numpy(next_T)] * self.gamma_H  # W_U[y_t] * g
        centre = self.norm_kind == "LayerNorm"
        for number, acc in self.acc.items():
            if acc.kind == "moe":
                ids_TK, c_KTH, routed_TH = self._moe.pop(number)
                c_KTH = c_KTH.reshape(c_KTH.shape[0], T, -1).cpu()
                routed = routed_TH.reshape(T, -1).cpu().double()
                err = (c_KTH.double().sum(0) - routed).abs().max() / routed.abs().max().clamp_min(1e-30)
                acc.reconstruction_error = max(acc.reconstruction_error, float(err))
                v_KTH = normalised_contribution(c_KTH, sigma_T, centre=centre)
                ids_TK = ids_TK.reshape(T, -1).cpu().numpy()
                for j in range(ids_TK.shape[1]):
                    keep = real_T
                    np.add.at(acc.sum_NH, ids_TK[keep, j], v_KTH[j][torch.from_numpy(keep)].numpy())
                    acc.count_N += np.bincount(ids_TK[keep, j], minlength=acc.num_experts)
                s_TK = torch.einsum("kth,th->tk", v_KTH, u_TH).numpy()
                sel = scored_T
                best_T = s_TK[sel].argmax(axis=1)
                best_ids = ids_TK[sel][np.arange(best_T.size), best_T]
                acc.best_N += np.bincount(best_ids, minlength=acc.num_experts)
                acc.best_is_top_gate += int((best_T == 0).sum())
                for j in range(ids_TK.shape[1]):
                    acc.correct_sum_N += np.bincount(ids_TK[sel, j], weights=s_TK[sel, j], minlength=acc.num_experts)
                    acc.correct_count_N += np.bincount(ids_TK[sel, j], minlength=acc.num_experts)
                layer_T = s_TK.sum(axis=1)
                expert_T = np.where(sel, ids_TK[np.arange(T), np.argmax(s_TK, axis=1)], -1)
                value_T = np.where(sel, s_TK.max(axis=1), -np.inf)
            else:
                out_TH = self._peer.pop(number).reshape(T, -1).cpu()
                shared = self._peer_shared.pop(number, None)
                if shared is not None:
                    out_TH = out_TH - shared.reshape(T, -1).cpu()
                v_TH = normalised_contribution(out_TH, sigma_T, centre=centre)
                layer_T = (v_TH * u_TH).sum(-1).numpy()
                sel = scored_T
                expert_T = np.full(T, -1)
                value_T = np.where(sel, layer_T, -np.inf)
            acc.layer_correct_sum += float(layer_T[sel].sum())
            acc.scored_tokens += int(sel.sum())
            rows = np.flatnonzero(sel)
            for t in rows[np.argsort(-value_T[rows], kind="stable")[: self.max_examples]]:
                acc.examples.append((float(value_T[t]), int(window_T[t]), int(position_T[t]), int(token_T[t]),
                                     int(next_T[t]), int(expert_T[t])))
            acc.examples = sorted(acc.examples, key=lambda e: (-e[0], e[1], e[2]))[: self.max_examples]

    # -- result ------------------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any] | None:
        self.detach()
        if not self.acc:  # the same on every rank: no collective below
            return {"not_applicable": "the model has no MoE or PEER layer (a dense model's FFN output has no "
                                      "experts to attribute)"} if self.env.rank == 0 else None
        mine = {n: vars(a) for n, a in self.acc.items()}
        if self.env.world_size > 1:
            gathered = [None] * self.env.world_size if self.env.rank == 0 else None
            torch.distributed.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if self.env.rank != 0:
            return None
        # Under TP without SP every TP rank would hold the same tokens; MoE under TP always has SP (Megatron).
        if self.env.tensor_parallel_size > 1 and not self.env.sequence_parallel:
            gathered = gathered[:: self.env.tensor_parallel_size]
        from megatron_moe_ext.analysis.token_text import texts, token_decoder

        decode = token_decoder(self.env.model_args)
        layers = []
        for number, acc in self.acc.items():
            parts = [g[number] for g in gathered]

            def total(key: str, parts: list = parts) -> Any:
                return sum(p[key] for p in parts)

            scored = total("scored_tokens")
            examples = sorted((e for p in parts for e in p["examples"]), key=lambda e: (-e[0], e[1], e[2]))
            out: dict[str, Any] = {
                "layer": number, "kind": acc.kind, "num_experts": acc.num_experts, "top_k": acc.top_k,
                "scored_tokens": scored,
                "mean_layer_correct_logit": total("layer_correct_sum") / scored if scored else None,
                "examples": [{"window": w, "position": p, "token": t, "next_token": y,
                              "next_text": texts([y], decode)[0], "expert": e if e >= 0 else None,
                              "correct_logit": s}
                             for s, w, p, t, y, e in examples[: self.max_examples]],
            }
            if acc.kind == "peer":
                out["experts"] = {"not_applicable": "PEER layers have up to 10^6 experts, each routed few tokens: "
                                                    "per-expert means are not formed; the layer's direct share "
                                                    "of each correct next token is reported"}
                layers.append(out)
                continue
            count_N = total("count_N")
            sum_NH = total("sum_NH")
            best_N, correct_sum_N, correct_count_N = total("best_N"), total("correct_sum_N"), total("correct_count_N")
            out["reconstruction_error"] = max(p["reconstruction_error"] for p in parts)
            out["best_is_top_gate"] = total("best_is_top_gate") / scored if scored else None
            used = np.flatnonzero(count_N)
            listed = used[np.lexsort((used, -count_N[used]))][: self.max_experts]
            listed.sort()
            mean_EH = torch.from_numpy(sum_NH[listed] / count_N[listed, None])
            logits_EV = direct_logits(mean_EH, gamma_H=self.gamma_H, unembed_VH=self.unembed_VH)[:, : self.vocab]
            experts = []
            for row, e in enumerate(listed):
                values = logits_EV[row].numpy()
                up, down = top_entries(values, self.top_tokens)
                experts.append({
                    "expert": int(e), "tokens": int(count_N[e]),
                    "promoted": [{"id": int(i), "text": x, "logit": float(values[i])}
                                 for i, x in zip(up, texts(up, decode))],
                    "suppressed": [{"id": int(i), "text": x, "logit": float(values[i])}
                                   for i, x in zip(down, texts(down, decode))],
                    "mean_correct_logit": float(correct_sum_N[e] / correct_count_N[e]) if correct_count_N[e] else None,
                    "best_for_tokens": int(best_N[e]),
                })
            out["experts"] = experts
            out["experts_listed"] = f"{len(listed)} of {len(used)} used experts (the busiest)"
            layers.append(out)
        return {
            "linearisation": f"direct logit attribution through the final {self.norm_kind} with each token's own "
                             f"norm scale frozen: dla = W_U (g * P c) / sigma_t (Elhage et al. 2021; nostalgebraist "
                             f"2020)",
            "decoded": decode is not None,
            "vocab_size": self.vocab,
            "layers": layers,
        }


def _token_label(entry: dict[str, Any]) -> str:
    text = entry.get("text")
    label = f"{entry['id']} {text!r}" if text is not None else str(entry["id"])
    return label.replace("|", "&#124;")


def report_section(result: dict[str, Any], figures_dir: str) -> str:
    """Markdown of the logit-lens section (tables only; no figure)."""
    lines = ["## Expert logit lens", ""]
    if "not_applicable" in result:
        return "\n".join(lines + [f"Not applicable: {result['not_applicable']}", ""])
    lines += [f"Linearisation: {result['linearisation']}. Token text: "
              f"{'decoded with the checkpoint tokenizer' if result['decoded'] else 'ids only (no tokenizer text)'}.",
              ""]
    for layer in result["layers"]:
        mean = layer["mean_layer_correct_logit"]
        lines.append(f"### Layer {layer['layer']} ({layer['kind']}, {layer['num_experts']} experts, "
                     f"top-{layer['top_k']})")
        lines.append("")
        lines.append(f"Mean direct logit of the correct next token from the whole layer: "
                     f"{'n/a' if mean is None else f'{mean:.4g}'} over {layer['scored_tokens']} tokens.")
        if isinstance(layer["experts"], dict):
            lines += ["", f"Per expert: not applicable ({layer['experts']['not_applicable']}).", ""]
        else:
            lines.append(f"Isolation check (relative max error of the summed contributions): "
                         f"{layer['reconstruction_error']:.2e}; the token's best expert is its top-gate expert "
                         f"for {layer['best_is_top_gate']:.1%} of tokens." if layer["best_is_top_gate"] is not None
                         else "")
            lines += ["", f"Experts listed: {layer['experts_listed']}.", "",
                      "| expert | tokens | best for | mean correct logit | promotes | suppresses |",
                      "|---|---|---|---|---|---|"]
            for e in layer["experts"]:
                mc = e["mean_correct_logit"]
                lines.append(f"| {e['expert']} | {e['tokens']} | {e['best_for_tokens']} | "
                             f"{'n/a' if mc is None else f'{mc:.4g}'} | "
                             f"{', '.join(_token_label(x) for x in e['promoted'][:5])} | "
                             f"{', '.join(_token_label(x) for x in e['suppressed'][:5])} |")
            lines.append("")
        if layer["examples"]:
            lines += ["Tokens whose correct next token got the largest direct logit from one expert (or layer):", "",
                      "| window | position | next token | expert | logit |", "|---|---|---|---|---|"]
            for x in layer["examples"][:10]:
                nt = f"{x['next_token']} {x['next_text']!r}" if x["next_text"] is not None else str(x["next_token"])
                lines.append(f"| {x['window']} | {x['position']} | {nt.replace('|', '&#124;')} | "
                             f"{'layer' if x['expert'] is None else x['expert']} | {x['correct_logit']:.4g} |")
            lines.append("")
    return "\n".join(lines).replace("\n\n\n", "\n\n")
