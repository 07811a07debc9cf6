"""Confidence (entropy) neurons: last-layer MLP neurons with a large output norm that write into the
unembedding's effective null space, and the effect of mean-ablating them on cross-entropy and entropy.

Both follow the paper's code (github.com/submarat/removing-layer-norm, mech_interp/entropy_neurons/):
the candidates its svd_comparison.py (||w_out|| / LogitVar), the ablation its ablate_all_models.py
(AblationAnalyzer: each neuron alone, per-token |change|, median and quartiles).
"""

from __future__ import annotations

import torch

from attribution import hooks
from attribution.findings import base
from attribution.metric import apply_final_ln, final_ln
from attribution.patching import capture

F64 = torch.float64
K = 3  # candidates ablated: the paper ablates three per model (ablate_all_models.py)
_CHUNK = 256  # neurons per [chunk, d_vocab] block of cosines


def unembedding_as_read(bridge) -> torch.Tensor:
    """The unembedding [d_model, d_vocab] (float32) as the paper's TransformerLens models hold it
    (fold_ln, center_unembed): the final LN's gain folded in, centred over d_model (the LN's output has
    zero mean) and over the vocabulary (a shift shared by every logit changes no probability)."""
    W = bridge.W_U.detach().float() * final_ln(bridge).weight.detach().float()[:, None]
    W = W - W.mean(0, keepdim=True)
    return W - W.mean(1, keepdim=True)


@torch.no_grad()
def logit_var(bridge, directions: torch.Tensor) -> torch.Tensor:
    """LogitVar of residual directions [n, d_model] -> [n] (float64), as svd_comparison.py: the variance
    (unbiased, over the vocabulary) of the cosine similarity between each direction and each column of
    the unembedding as read (unembedding_as_read).  Small: the direction changes every logit alike."""
    W_U = unembedding_as_read(bridge)
    W_U = W_U / W_U.norm(dim=0, keepdim=True).clamp_min(1e-30)
    w = directions.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.cat([(w[i:i + _CHUNK] @ W_U).double().var(-1) for i in range(0, w.shape[0], _CHUNK)])


@torch.no_grad()
def confidence_neurons(bridge, k: int = K, layer: int | None = None) -> list[dict]:
    """Candidate confidence (entropy) neurons of the last MLP layer, best first: the paper's criterion.

    svd_comparison.py ranks the neurons of the last layer by
      score = ||w_out|| / LogitVar(w_out)
    (high norm, writing into the unembedding's effective null space) with w_out
    the neuron's row of W_out centred over d_model (its models use
    center_writing_weights) and LogitVar as logit_var.  Per candidate: neuron, layer, w_out_norm, logit_var, score
    (inf where LogitVar is 0: a direction exactly in the null space).  The
    script prints the original model's top 50 by this score; its ablation script
    hard-codes three of them (GPT-2 small: 584, 2123, 2870); we take the top k.
    """
    L, d_mlp = bridge.cfg.n_layers, bridge.cfg.d_mlp
    layer = L - 1 if layer is None else layer
    if not 0 <= layer < L:
        raise base.FindingsInputError(f"Layer {layer} does not exist; the model has layers 0..{L - 1}.")
    if k < 1:
        raise base.FindingsInputError("Ask for at least one confidence-neuron candidate (k >= 1).")
    W_out = bridge.W_out[layer].detach().float()          # [d_mlp, d]
    W_out = W_out - W_out.mean(-1, keepdim=True)
    norms = W_out.double().norm(dim=-1)
    var = logit_var(bridge, W_out)
    score = norms / var
    idx = torch.sort(score, descending=True, stable=True).indices[:min(k, d_mlp)]
    return [{"neuron": int(i), "layer": layer, "w_out_norm": float(norms[i]), "logit_var": float(var[i]),
             "score": float(score[i])} for i in idx]


def _quartiles(x: torch.Tensor) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles with linear interpolation (numpy's default, as the paper's)."""
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype, device=x.device))
    return float(q[0]), float(q[1]), float(q[2])


@torch.no_grad()
def ablate_neurons(bridge, tokens: torch.Tensor, neurons: list[int], progress: base.Progress = None,
                   should_stop: base.ShouldStop = None, layer: int | None = None, signed: bool = False) -> dict:
    """Mean-ablate MLP neurons (last layer by default), each alone, as the paper's AblationAnalyzer.

    Over the next-token predictions at positions 0..T-2 of every sequence: a
    neuron's mean activation (mlp.hook_post) is taken over those positions, the
    ablated run replaces its activation by that mean, and per prediction the
    effect is |CE_ablated - CE| and |entropy_ablated - entropy| (nats).  Per
    neuron, "per_neuron" gives the median and quartiles of those per-token
    effects (the paper prints the median [q1 - q3] and box-plots them).  For the
    last layer the clean and ablated logits are both recomputed (in float64)
    from the captured final residual through the model's own final LN, as the
    paper's simulation does (its LN uses eps 1e-12; we the model's own).
    signed=True adds "signed" (our variant): the signed mean change in CE and
    entropy of each neuron and of all of them ablated together.
    """
    L, d_mlp = bridge.cfg.n_layers, bridge.cfg.d_mlp
    layer = L - 1 if layer is None else layer
    if not neurons:
        raise base.FindingsInputError("Give at least one neuron to ablate.")
    if not 0 <= layer < L or any(not 0 <= int(n) < d_mlp for n in neurons):
        raise base.FindingsInputError(f"Neurons must lie in layer 0..{L - 1}, index 0..{d_mlp - 1}.")
    tokens = base.check_tokens(bridge, tokens)
    neurons = [int(n) for n in neurons]
    hook_name = hooks.mlp_post(layer)
    groups = [[n] for n in neurons] + ([neurons] if signed and len(neurons) > 1 else [])
    last = layer == L - 1
    # The last layer's neurons reach the logits only through W_out -> final LN -> W_U, so one captured
    # pass gives every group's ablated logits; other layers need one hooked forward pass per group.
    n_pass = 2 if last else 1 + len(groups)
    size = base.batch_size(bridge, tokens.shape[1], floats_per_token=8 * bridge.cfg.d_vocab if last else 0)

    # Pass 1: neuron means over the predicting positions, the clean CE / entropy per prediction.
    act_sum = torch.zeros(len(neurons), dtype=torch.float64, device=tokens.device)
    clean_ce, clean_ent = [], []
    for batch in base.batches(tokens, size, base.sub_progress(progress, 0, 1 / n_pass), should_stop, "ablation: clean run"):
        logits, acts = capture(bridge, batch, [hook_name])
        act_sum += acts[hook_name][:, :-1, neurons].double().sum((0, 1))
        if not last:
            s = base.next_token_stats(logits, batch)
            clean_ce.append(s["ce"].double())
            clean_ent.append(s["entropy"].double())
    n_pos = tokens.shape[0] * (tokens.shape[1] - 1)
    means = (act_sum / n_pos).to(bridge.W_U.dtype)
    d_ce = [[] for _ in groups]    # per group: per-prediction change (ablated - clean), float64 [B, T-1] per batch
    d_ent = [[] for _ in groups]
    before_ce, before_ent = [], []

    if last:  # in float64: a small change of CE or entropy is a difference of two nearly equal numbers
        W_out, W_U = bridge.W_out[layer].detach().double(), bridge.W_U.detach().double()
        b_U = getattr(bridge, "b_U", None)
        resid = hooks.resid_post(layer)

        def logits_of(x):
            out = apply_final_ln(bridge, x, F64) @ W_U
            return out if b_U is None else out + b_U.detach().double()

        for batch in base.batches(tokens, size, base.sub_progress(progress, 1 / n_pass, 1), should_stop, "ablation: ablated"):
            _, acts = capture(bridge, batch, [hook_name, resid])
            x = acts[resid].double()
            clean = base.next_token_stats(logits_of(x), batch, F64)
            before_ce.append(clean["ce"])
            before_ent.append(clean["entropy"])
            shift = means.double() - acts[hook_name][..., neurons].double()      # [B, T, k]
            for i, group in enumerate(groups):
                cols = [neurons.index(n) for n in group]
                st = base.next_token_stats(logits_of(x + shift[..., cols] @ W_out[group]), batch, F64)
                d_ce[i].append(st["ce"].double() - before_ce[-1])
                d_ent[i].append(st["entropy"].double() - before_ent[-1])
    else:
        before_ce, before_ent = clean_ce, clean_ent
        for i, group in enumerate(groups):
            cols = [neurons.index(n) for n in group]

            def ablate(x, hook, group=group, cols=cols):
                x = x.clone()
                x[..., group] = means[cols]
                return x

            for j, batch in enumerate(base.batches(tokens, size, base.sub_progress(progress, (1 + i) / n_pass,
                                                   (2 + i) / n_pass), should_stop, f"ablation: neurons {group}")):
                st = base.next_token_stats(bridge.run_with_hooks(batch, fwd_hooks=[(hook_name, ablate)]), batch)
                d_ce[i].append(st["ce"].double() - before_ce[j])
                d_ent[i].append(st["entropy"].double() - before_ent[j])

    d_ce = [torch.cat(d).flatten() for d in d_ce]
    d_ent = [torch.cat(d).flatten() for d in d_ent]
    per_neuron = []
    for i, n in enumerate(neurons):
        q_ce, q_ent = _quartiles(d_ce[i].abs()), _quartiles(d_ent[i].abs())
        per_neuron.append({"neuron": n, "median_abs_delta_ce": q_ce[1], "q1_abs_delta_ce": q_ce[0],
                           "q3_abs_delta_ce": q_ce[2], "median_abs_delta_entropy": q_ent[1],
                           "q1_abs_delta_entropy": q_ent[0], "q3_abs_delta_entropy": q_ent[2]})
    out = {"layer": layer, "neurons": neurons, "mean_activation": [float(m) for m in means],
           "ce_before": float(torch.cat(before_ce).mean()), "entropy_before": float(torch.cat(before_ent).mean()),
           "n_predictions": n_pos, "per_neuron": per_neuron}
    if signed:
        signed_rows = [{"neuron": n, "delta_ce": float(d_ce[i].mean()), "delta_entropy": float(d_ent[i].mean())}
                       for i, n in enumerate(neurons)]
        j = len(groups) - 1
        out["signed"] = {"definition": "our variant: the signed mean change in CE and entropy over every "
                                       "prediction, each neuron alone and all of them together",
                         "per_neuron": signed_rows,
                         "joint": {"neurons": neurons, "delta_ce": float(d_ce[j].mean()),
                                   "delta_entropy": float(d_ent[j].mean())}}
    return out
