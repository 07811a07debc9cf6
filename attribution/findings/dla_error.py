"""The DLA error over a dataset: per-head NMAE between frozen-scale DLA of the actual next token's logit
and the true direct effect (attribution.dla.effects, the same maths as the per-prompt analysis)."""

from __future__ import annotations

import math

import torch

from attribution import hooks
from attribution.dla import effects
from attribution.findings.base import Progress, ShouldStop, batch_size, batches, check_tokens
from attribution.patching import capture


@torch.no_grad()
def head_direct_effects(bridge, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head DLA and true direct effect on the actual next token's logit: ([B, T-1, L, H],) * 2, float64.

    For head (l, h) with output c = z[l, h] @ W_O[l, h] at position p (no b_O), the
    final residual x and the actual next token t = tokens[p + 1]:
      DLA = centre(c) / scale(x) . (g * W_U[:, t])       (scale frozen at the real run's value)
      DE  = logit_t(x) - logit_t(x - c)                  (the model's final LN recomputed live)
    For an LN-free model the scale is the constant sigma, so DLA == DE up to float64 rounding.
    """
    L = bridge.cfg.n_layers
    tokens = check_tokens(bridge, tokens)
    names = [hooks.z(i) for i in range(L)] + [hooks.resid_post(L - 1)]
    _, acts = capture(bridge, tokens, names)
    x = acts[hooks.resid_post(L - 1)][:, :-1]
    W_O = bridge.W_O.detach().double()
    dla, de = [], []
    for i in range(L):
        c = torch.einsum("bphe,hed->bphd", acts[hooks.z(i)][:, :-1].double(), W_O[i])  # [B, T-1, H, d]
        a, e = effects(bridge, x, c, tokens[:, 1:])
        dla.append(a)
        de.append(e)
    return torch.stack(dla, 2), torch.stack(de, 2)


def dataset_dla_error(bridge, tokens: torch.Tensor, progress: Progress = None,
                      should_stop: ShouldStop = None) -> dict:
    """NMAE between frozen-scale DLA and the true direct effect of every head over a dataset.

    Over all sequences and positions 0..T-2 (target: the actual next token), per head
      per_head[l][h] = sum |DLA - DE| / sum |DE|
    and overall ("nmae") the same ratio summed over all heads too (as attribution.dla.nmae).
    Also returns the mean |DE| and mean DLA / DE per head.
    """
    L, H, d = bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_model
    tokens = check_tokens(bridge, tokens)
    err = torch.zeros(L, H, dtype=torch.float64)
    mag = torch.zeros(L, H, dtype=torch.float64)
    dla_sum = torch.zeros(L, H, dtype=torch.float64)
    de_sum = torch.zeros(L, H, dtype=torch.float64)
    size = batch_size(bridge, tokens.shape[1], floats_per_token=8 * H * d + 2 * L * H * 16)
    for batch in batches(tokens, size, progress, should_stop, "DLA error"):
        dla, de = head_direct_effects(bridge, batch)
        err += (dla - de).abs().sum((0, 1)).cpu()
        mag += de.abs().sum((0, 1)).cpu()
        dla_sum += dla.sum((0, 1)).cpu()
        de_sum += de.sum((0, 1)).cpu()
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    per_head = torch.where(mag > 0, err / mag.clamp_min(1e-300), torch.full_like(err, math.nan))
    total = float(mag.sum())
    return {"nmae": float(err.sum() / total) if total > 0 else math.nan, "per_head": per_head.tolist(),
            "mean_abs_de": (mag / n).tolist(), "mean_dla": (dla_sum / n).tolist(),
            "mean_de": (de_sum / n).tolist(), "n_predictions": n}

