"""The first token: residual-stream norms at position 0 against the other positions, and attention sinks.

Both follow the paper's code (github.com/submarat/removing-layer-norm):
first_token_norms its mech_interp/residual_stream/residual_norms.py (ResidualNorms),
attention_sink_rate its utils.py (calculate_sink_rate, as sink_rate.py calls it).
"""

from __future__ import annotations

import torch

from attribution import hooks
from attribution.findings import base
from attribution.metric import final_ln_scale
from attribution.patching import capture
from models.ln_free import FixedLayerNorm


def norm_points(n_layers: int) -> list[tuple[str, str]]:
    """(label, hook name) of every point where the norms are read, in the paper's order: the token and
    position embeddings, then resid_mid and resid_post of every block, then the final LN's output."""
    points = [("embed", hooks.EMBED), ("pos_embed", hooks.POS_EMBED)]
    for i in range(n_layers):
        points += [(f"resid_mid {i}", f"blocks.{i}.hook_resid_mid"), (f"resid_post {i}", hooks.resid_post(i))]
    return points + [("ln_final", hooks.resid_post(n_layers - 1))]


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


@torch.no_grad()
def first_token_norms(bridge, tokens: torch.Tensor, progress: base.Progress = None,
                      should_stop: base.ShouldStop = None) -> dict:
    """Mean (and std) L2 norm of the centred residual stream at position 0 vs positions 1..T-1.

    As the paper's ResidualNorms: its models are TransformerLens models with
    center_writing_weights (every write, hence every residual vector, has zero
    mean over d_model), so a norm there is ||x - mean(x)||, the part of x every
    LN and unembedding reads; read at hook_embed, hook_pos_embed, resid_mid and
    resid_post of every block and ln_final.hook_normalized (the final LN's output
    before its folded gain: centre(x) / sqrt(var(x) + eps) with LN, and the
    centred final residual itself for an LN-free model, whose ln_final the paper
    replaces by the identity with 1/sigma folded into W_U).
      pos0[i]   mean over sequences of the norm at position 0 (pos0_std: its std)
      rest[i]   mean over sequences and positions 1..T-1 (rest_std: its std)
    stds are sample stds (torch.std), as the paper's shaded bands.
    pos0_final / rest_final are the values at resid_post of the last block;
    pos0_peak the largest position-0 value over the blocks (resid_mid / resid_post).
    """
    L = bridge.cfg.n_layers
    tokens = base.check_tokens(bridge, tokens)
    points = norm_points(L)
    names = sorted({name for _, name in points})
    n = len(points)
    s0, q0 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    s1, q1 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    lnf = bridge.ln_final.original_component
    for batch in base.batches(tokens, base.batch_size(bridge, tokens.shape[1]), progress, should_stop,
                              "residual norms"):
        _, acts = capture(bridge, batch, names)
        for i, (label, name) in enumerate(points):
            x = _centre(acts[name].double())
            if label == "ln_final" and not isinstance(lnf, FixedLayerNorm):
                x = x / final_ln_scale(bridge, acts[name])
            norm = x.norm(dim=-1)                  # [B, T]
            s0[i] += norm[:, 0].sum().cpu()
            q0[i] += norm[:, 0].pow(2).sum().cpu()
            s1[i] += norm[:, 1:].sum().cpu()
            q1[i] += norm[:, 1:].pow(2).sum().cpu()
    N, T = tokens.shape

    def mean_std(s, q, m):
        mean = s / m
        var = (q - m * mean ** 2) / (m - 1) if m > 1 else torch.full_like(s, float("nan"))
        return mean, var.clamp_min(0).sqrt()

    pos0, pos0_std = mean_std(s0, q0, N)
    rest, rest_std = mean_std(s1, q1, N * (T - 1))
    labels = [label for label, _ in points]
    final = labels.index(f"resid_post {L - 1}")
    blocks = [i for i, label in enumerate(labels) if label.startswith("resid_")]
    peak = max(blocks, key=lambda i: float(pos0[i]))
    return {"labels": labels, "centred": True, "pos0": pos0.tolist(), "rest": rest.tolist(),
            "pos0_std": pos0_std.tolist(), "rest_std": rest_std.tolist(),
            "pos0_final": float(pos0[final]), "rest_final": float(rest[final]),
            "pos0_peak": float(pos0[peak]), "pos0_peak_at": labels[peak]}


@torch.no_grad()
def attention_sink_rate(bridge, tokens: torch.Tensor, threshold: float = 0.3, progress: base.Progress = None,
                        should_stop: base.ShouldStop = None, head_mean: bool = False) -> dict:
    """Attention-sink rate as the paper's calculate_sink_rate (utils.py) computes it.

    Every (sequence, layer, head, query position) counts, query 0 included (it can
    only attend to itself, so it is always a sink), and a pair is a sink when its
    attention on position 0 is > threshold (strictly):
      rate      share of (sequence, layer, head, query) that are sinks (the paper's 55.3% -> 45.3%)
      per_head  [L][H] that share per head (rate is their mean)
    The paper's docstring describes the definition it cites (Gu et al. 2024) as a
    threshold on each head's attention averaged over queries; its code thresholds
    every query.  head_mean=True adds "head_mean" (our variant, that reading):
    share of (sequence, head) pairs whose attention on position 0, averaged over
    query positions 1..T-1, is >= threshold, per head, and that mean attention.
    """
    if not 0 < threshold <= 1:
        raise base.FindingsInputError("The sink threshold must lie in (0, 1], e.g. 0.3.")
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    tokens = base.check_tokens(bridge, tokens)
    sink = torch.zeros(L, H, dtype=torch.float64)
    head_sink = torch.zeros(L, H, dtype=torch.float64)
    mean_att = torch.zeros(L, H, dtype=torch.float64)

    def make_hook(layer: int):
        def hook(pattern, hook):  # [B, H, q, k]
            first = pattern[..., 0].double()               # [B, H, T]: every query's attention on position 0
            sink[layer] += (first > threshold).double().mean(-1).sum(0).cpu()
            if head_mean:
                a = first[..., 1:].mean(-1)                # [B, H]
                head_sink[layer] += (a >= threshold).double().sum(0).cpu()
                mean_att[layer] += a.sum(0).cpu()
            return pattern
        return hook

    fwd = [(hooks.pattern(i), make_hook(i)) for i in range(L)]
    for batch in base.batches(tokens, base.batch_size(bridge, tokens.shape[1]), progress, should_stop, "attention sinks"):
        bridge.run_with_hooks(batch, fwd_hooks=fwd)
    N = tokens.shape[0]
    per_head = sink / N
    out = {"threshold": threshold, "rate": float(per_head.mean()), "per_head": per_head.tolist()}
    if head_mean:
        out["head_mean"] = {"definition": "our variant: a head is a sink on a sequence when its attention on "
                                          "position 0, averaged over queries 1..T-1, is >= threshold",
                            "rate": float((head_sink / N).mean()), "per_head": (head_sink / N).tolist(),
                            "mean_attention": (mean_att / N).tolist()}
    return out
