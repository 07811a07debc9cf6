"""Confidence (entropy) neurons: last-layer MLP neurons with a large output norm that write into the
unembedding's effective null space, found by the paper's criterion, and the effect of mean-ablating them
on cross-entropy and output entropy."""

from __future__ import annotations

import torch

from attribution import hooks
from attribution.findings import base
from attribution.metric import apply_final_ln, final_ln
from attribution.patching import capture


def unembed_projection(bridge, directions: torch.Tensor) -> torch.Tensor:
    """Relative logit spread of residual directions [n, d_model] through the final LN and W_U -> [n].

    A direction w changes the logits by A(w) = centre_vocab(W_U^T (g * centre_d(w))) / sigma
    (LN's centring, gain g, the unembedding; a shift shared by every logit does not
    change the softmax, so it is removed).  The value is ||A(w)|| / ||w|| divided by
    its root-mean-square over random directions, sqrt(||A||_F^2 / d): 1 for a typical
    direction, ~0 for a direction in the effective null space of the unembedding.
    """
    g = final_ln(bridge).weight.detach().float()
    W_U = bridge.W_U.detach().float()
    A = g[:, None] * W_U                                   # [d, V]
    A = A - A.mean(0, keepdim=True)                        # centre_d(w) . A == w . (A - column means)
    A = A - A.mean(1, keepdim=True)                        # drop the shared logit shift
    typical = A.pow(2).sum().div(A.shape[0]).sqrt()
    w = directions.float()
    return (w @ A).norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30) / typical


@torch.no_grad()
def confidence_neurons(bridge, k: int = 5, layer: int | None = None) -> list[dict]:
    """Candidate confidence (entropy) neurons of the last MLP layer, best first.

    The paper's criterion: a large output-weight norm and a small effective
    projection onto the unembedding (the neuron writes into W_U's null space, so it
    acts on the logits only through the final LN's scale).  For every neuron n:
      w_out_norm              ||W_out[n]||
      norm_ratio              w_out_norm / median norm of the layer
      effective_unembed_proj  unembed_projection(W_out[n]) (1 = typical direction, 0 = null space)
      score                   norm_ratio / effective_unembed_proj
    Candidates are the k neurons with the highest score among those with
    norm_ratio >= 1 (a tiny neuron in the null space does nothing either way).
    """
    L, d_mlp = bridge.cfg.n_layers, bridge.cfg.d_mlp
    layer = L - 1 if layer is None else layer
    if not 0 <= layer < L:
        raise base.FindingsInputError(f"Layer {layer} does not exist; the model has layers 0..{L - 1}.")
    if k < 1:
        raise base.FindingsInputError("Ask for at least one confidence-neuron candidate (k >= 1).")
    W_out = bridge.W_out[layer].detach().float()          # [d_mlp, d]
    norms = W_out.norm(dim=-1)
    ratio = norms / norms.median()
    proj = unembed_projection(bridge, W_out)
    score = ratio / proj.clamp_min(1e-12)
    score = torch.where(ratio >= 1, score, torch.zeros_like(score))
    idx = score.topk(min(k, d_mlp)).indices
    return [{"neuron": int(i), "layer": layer, "w_out_norm": float(norms[i]), "norm_ratio": float(ratio[i]),
             "effective_unembed_proj": float(proj[i]), "score": float(score[i])} for i in idx]


@torch.no_grad()
def ablate_neurons(bridge, tokens: torch.Tensor, neurons: list[int], progress: base.Progress = None,
                   should_stop: base.ShouldStop = None, layer: int | None = None,
                   individually: bool = False) -> dict:
    """Mean-ablate MLP neurons (last layer by default) and measure CE and output entropy.

    The mean of each neuron's activation (mlp.hook_post) is taken over every
    position of every given sequence; the ablated run replaces the neuron's
    activation by that mean at every position.  CE and entropy (nats) are means
    over the next-token predictions at positions 0..T-2.  With individually=True,
    "per_neuron" also holds the effect of ablating each neuron alone.
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
    groups = [neurons] + ([[n] for n in neurons] if individually and len(neurons) > 1 else [])
    last = layer == L - 1
    # The last layer's neurons reach the logits only through W_out -> final LN -> W_U, so one captured
    # pass gives every group's ablated logits; other layers need one hooked forward pass per group.
    n_pass = 2 if last else 1 + len(groups)
    size = base.batch_size(bridge, tokens.shape[1], floats_per_token=2 * bridge.cfg.d_vocab if last else 0)

    # Pass 1: the clean run; neuron means and baseline CE / entropy.
    act_sum = torch.zeros(len(neurons), dtype=torch.float64, device=tokens.device)
    ce = ent = 0.0
    n_pos = tokens.shape[0] * (tokens.shape[1] - 1)
    for batch in base.batches(tokens, size, base.sub_progress(progress, 0, 1 / n_pass), should_stop, "ablation: clean run"):
        logits, acts = capture(bridge, batch, [hook_name])
        act_sum += acts[hook_name][..., neurons].double().sum((0, 1))
        s = base.next_token_stats(logits, batch)
        ce += float(s["ce"].double().sum())
        ent += float(s["entropy"].double().sum())
    means = (act_sum / (tokens.shape[0] * tokens.shape[1])).to(bridge.W_U.dtype)
    before = {"ce": ce / n_pos, "entropy": ent / n_pos}
    sums = [[0.0, 0.0] for _ in groups]

    def add(i: int, logits: torch.Tensor, batch: torch.Tensor) -> None:
        st = base.next_token_stats(logits, batch)
        sums[i][0] += float(st["ce"].double().sum())
        sums[i][1] += float(st["entropy"].double().sum())

    if last:
        W_out, W_U = bridge.W_out[layer], bridge.W_U
        b_U = getattr(bridge, "b_U", None)
        resid = hooks.resid_post(layer)
        for batch in base.batches(tokens, size, base.sub_progress(progress, 1 / n_pass, 1), should_stop, "ablation: ablated"):
            _, acts = capture(bridge, batch, [hook_name, resid])
            shift = means - acts[hook_name][..., neurons]                  # [B, T, k]
            for i, group in enumerate(groups):
                cols = [neurons.index(n) for n in group]
                x = acts[resid] + shift[..., cols] @ W_out[group]          # the ablated final residual
                logits = apply_final_ln(bridge, x) @ W_U
                add(i, logits if b_U is None else logits + b_U, batch)
    else:
        for i, group in enumerate(groups):
            cols = [neurons.index(n) for n in group]

            def ablate(x, hook, group=group, cols=cols):
                x = x.clone()
                x[..., group] = means[cols]
                return x

            for batch in base.batches(tokens, size, base.sub_progress(progress, (1 + i) / n_pass, (2 + i) / n_pass),
                                  should_stop, f"ablation: neurons {group}"):
                add(i, bridge.run_with_hooks(batch, fwd_hooks=[(hook_name, ablate)]), batch)

    def means_of(i: int) -> dict[str, float]:  # pass i's mean CE and entropy
        return {"ce": sums[i][0] / n_pos, "entropy": sums[i][1] / n_pos}

    after = means_of(0)
    out = {"layer": layer, "neurons": neurons, "mean_activation": [float(m) for m in means],
           "ce_before": before["ce"], "ce_after": after["ce"],
           "entropy_before": before["entropy"], "entropy_after": after["entropy"],
           "delta_ce": after["ce"] - before["ce"], "delta_entropy": after["entropy"] - before["entropy"]}
    if len(groups) > 1:
        out["per_neuron"] = []
        for i, group in enumerate(groups[1:], start=1):
            r = means_of(i)
            out["per_neuron"].append({"neuron": group[0], "delta_ce": r["ce"] - before["ce"],
                                      "delta_entropy": r["entropy"] - before["entropy"]})
    elif individually:
        out["per_neuron"] = [{"neuron": neurons[0], "delta_ce": out["delta_ce"],
                              "delta_entropy": out["delta_entropy"]}]
    return out

