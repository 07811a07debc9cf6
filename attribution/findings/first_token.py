"""The first token: residual-stream norms at position 0 against the other positions, and attention sinks."""

from __future__ import annotations

import torch

from attribution import hooks
from attribution.findings import base
from attribution.patching import capture


@torch.no_grad()
def first_token_norms(bridge, tokens: torch.Tensor, progress: base.Progress = None,
                      should_stop: base.ShouldStop = None) -> dict:
    """Mean L2 norm of the residual stream at position 0 vs positions 1..T-1, per layer.

    layers[i] for i < L is resid_pre of block i (layer 0 = embeddings); layers[L]
    is resid_post of the last block (the final residual, before ln_final).
    pos0: mean over sequences of ||x[:, 0]||; rest: mean over sequences and
    positions 1..T-1 of ||x[:, p]||.
    """
    L = bridge.cfg.n_layers
    tokens = base.check_tokens(bridge, tokens)
    names = [hooks.resid_pre(i) for i in range(L)] + [hooks.resid_post(L - 1)]
    pos0 = torch.zeros(L + 1, dtype=torch.float64)
    rest = torch.zeros(L + 1, dtype=torch.float64)
    for batch in base.batches(tokens, base.batch_size(bridge, tokens.shape[1]), progress, should_stop, "residual norms"):
        _, acts = capture(bridge, batch, names)
        for i, n in enumerate(names):
            norm = acts[n].double().norm(dim=-1)   # [B, T]
            pos0[i] += norm[:, 0].sum().cpu()
            rest[i] += norm[:, 1:].sum().cpu()
    N, T = tokens.shape
    return {"layers": list(range(L + 1)),
            "labels": [f"resid_pre {i}" for i in range(L)] + [f"resid_post {L - 1}"],
            "pos0": (pos0 / N).tolist(), "rest": (rest / (N * (T - 1))).tolist()}


@torch.no_grad()
def attention_sink_rate(bridge, tokens: torch.Tensor, threshold: float = 0.3, progress: base.Progress = None,
                        should_stop: base.ShouldStop = None) -> dict:
    """Attention sinks on the first token (the sink metric of Gu et al. 2024, as the paper uses it).

    For sequence s, layer l, head h let a[s,l,h] be the head's attention on
    position 0, averaged over query positions 1..T-1 (query 0 can only attend to
    itself, so it is left out).  A head is a sink on s when a[s,l,h] >= threshold.
      rate            share of (sequence, head) pairs that are sinks (the paper's 55.3% -> 45.3%)
      per_head        [L][H] share of sequences on which the head is a sink (rate = its mean)
      mean_attention  [L][H] a[s,l,h] averaged over sequences
      query_rate      [L][H] share of (sequence, query position >= 1) pairs with attention on
                      position 0 >= threshold; query_rate_overall is its mean
    """
    if not 0 < threshold <= 1:
        raise base.FindingsInputError("The sink threshold must lie in (0, 1], e.g. 0.3.")
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    tokens = base.check_tokens(bridge, tokens)
    sink = torch.zeros(L, H, dtype=torch.float64)
    mean_att = torch.zeros(L, H, dtype=torch.float64)
    q_rate = torch.zeros(L, H, dtype=torch.float64)

    def make_hook(layer: int):
        def hook(pattern, hook):  # [B, H, q, k]
            first = pattern[:, :, 1:, 0].double()          # [B, H, T-1]
            a = first.mean(-1)
            sink[layer] += (a >= threshold).double().sum(0).cpu()
            mean_att[layer] += a.sum(0).cpu()
            q_rate[layer] += (first >= threshold).double().mean(-1).sum(0).cpu()
            return pattern
        return hook

    fwd = [(hooks.pattern(i), make_hook(i)) for i in range(L)]
    for batch in base.batches(tokens, base.batch_size(bridge, tokens.shape[1]), progress, should_stop, "attention sinks"):
        bridge.run_with_hooks(batch, fwd_hooks=fwd)
    N = tokens.shape[0]
    per_head = sink / N
    return {"threshold": threshold, "rate": float(per_head.mean()), "per_head": per_head.tolist(),
            "mean_attention": (mean_att / N).tolist(), "query_rate": (q_rate / N).tolist(),
            "query_rate_overall": float((q_rate / N).mean())}

