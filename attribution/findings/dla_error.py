"""The DLA error over a dataset: per-head NMAE between frozen-scale DLA and the true direct effect.

By default as the paper's code (mech_interp/attention_head_attribution/run_analysis.py,
AttentionAttributionAnalysis.run_single_model_analysis): one prediction per sequence, at its last
position, whose target is the input token there (batch[:, -1]), read through the centred unembedding of
its TransformerLens models (center_unembed: W_U minus its mean over the vocabulary).  Our variant
(`positions="all"`) is the per-prompt analysis's metric at every position: the logit of the actual next
token through the raw W_U (attribution.dla.effects).
"""

from __future__ import annotations

import math

import torch

from attribution import hooks
from attribution.dla import effects
from attribution.findings.base import (
    FindingsInputError,
    Progress,
    ShouldStop,
    batch_size,
    batches,
    check_tokens,
)
from attribution.metric import apply_final_ln, final_ln, final_ln_scale
from attribution.patching import capture

F64 = torch.float64


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _paper_effects(bridge, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor):
    """DLA and DE [B, L, H] of head outputs c [B, L, H, d] in the final residual x [B, d] on the centred
    unembedding's logit of `target` [B], as run_analysis.py: DLA = apply_ln_to_stack(c) . W_U[:, t] with
    the scale frozen, DE = logit(x) - logit(x - c) with the final LN recomputed (all float64)."""
    W_U = bridge.W_U.detach().to(F64)
    u = W_U.T[target.to(W_U.device)] - W_U.mean(1)                    # [B, d]: centred unembedding columns
    x = x.to(F64)
    gain = final_ln(bridge).weight.detach().to(F64)
    dla = (_centre(c) / final_ln_scale(bridge, x)[:, None, None] * gain * u[:, None, None]).sum(-1)
    logit = (apply_final_ln(bridge, x, F64) * u).sum(-1)              # the final LN's bias cancels in DE
    de = logit[:, None, None] - (apply_final_ln(bridge, x[:, None, None] - c, F64) * u[:, None, None]).sum(-1)
    return dla, de


@torch.no_grad()
def head_direct_effects(bridge, tokens: torch.Tensor, positions: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head DLA and true direct effect, float64, for head (l, h) with output c = z[l, h] @ W_O[l, h]
    (no b_O) in the final residual x.

    positions="last" (the paper's): at position T-1, target tokens[:, T-1], the centred unembedding;
      ([B, L, H],) * 2.
    positions="all" (our variant): at positions 0..T-2, target the actual next token, the raw W_U;
      ([B, T-1, L, H],) * 2.
    Both: DLA = centre(c) / scale(x) . (g * u) with the scale frozen at the real run's value, and
    DE = logit(x) - logit(x - c) with the model's final LN recomputed live.  For an LN-free model the
    scale is the constant sigma, so DLA == DE up to float64 rounding.
    """
    if positions not in ("last", "all"):
        raise FindingsInputError("positions must be `last` (the paper's) or `all`.")
    L = bridge.cfg.n_layers
    tokens = check_tokens(bridge, tokens)
    names = [hooks.z(i) for i in range(L)] + [hooks.resid_post(L - 1)]
    _, acts = capture(bridge, tokens, names)
    W_O = bridge.W_O.detach().to(F64)
    if positions == "last":
        z = torch.stack([acts[hooks.z(i)][:, -1] for i in range(L)], 1).to(F64)          # [B, L, H, dh]
        c = torch.einsum("blhe,lhed->blhd", z, W_O)
        return _paper_effects(bridge, acts[hooks.resid_post(L - 1)][:, -1], c, tokens[:, -1])
    x = acts[hooks.resid_post(L - 1)][:, :-1]
    dla, de = [], []
    for i in range(L):
        c = torch.einsum("bphe,hed->bphd", acts[hooks.z(i)][:, :-1].to(F64), W_O[i])  # [B, T-1, H, d]
        a, e = effects(bridge, x, c, tokens[:, 1:])
        dla.append(a)
        de.append(e)
    return torch.stack(dla, 2), torch.stack(de, 2)


def dataset_dla_error(bridge, tokens: torch.Tensor, progress: Progress = None,
                      should_stop: ShouldStop = None, positions: str = "last") -> dict:
    """NMAE between frozen-scale DLA and the true direct effect of every head over a dataset.

    Over every prediction (positions="last", the paper's: one per sequence; "all",
    our variant: every position with its next token; see head_direct_effects), per head
      per_head[l][h] = mean |DLA - DE| / mean |DE|
    and overall ("nmae") the same ratio over all heads and predictions (the
    paper's global NMAE, as a share; it adds 1e-10 to the denominators, we give
    NaN for a head whose DE is always 0).  Also the mean |DE|, DLA and DE per head.
    """
    L, H, d = bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_model
    tokens = check_tokens(bridge, tokens)
    err = torch.zeros(L, H, dtype=F64)
    mag = torch.zeros(L, H, dtype=F64)
    dla_sum = torch.zeros(L, H, dtype=F64)
    de_sum = torch.zeros(L, H, dtype=F64)
    size = batch_size(bridge, tokens.shape[1], floats_per_token=8 * H * d + 2 * L * H * 16)
    text = "DLA error" if positions == "last" else "DLA error (all positions)"
    for batch in batches(tokens, size, progress, should_stop, text):
        dla, de = head_direct_effects(bridge, batch, positions)
        dims = tuple(range(dla.dim() - 2))
        err += (dla - de).abs().sum(dims).cpu()
        mag += de.abs().sum(dims).cpu()
        dla_sum += dla.sum(dims).cpu()
        de_sum += de.sum(dims).cpu()
    n = tokens.shape[0] * (1 if positions == "last" else tokens.shape[1] - 1)
    per_head = torch.where(mag > 0, err / mag.clamp_min(1e-300), torch.full_like(err, math.nan))
    total = float(mag.sum())
    out = {"positions": positions, "nmae": float(err.sum() / total) if total > 0 else math.nan,
           "per_head": per_head.tolist(), "mean_abs_de": (mag / n).tolist(), "mean_dla": (dla_sum / n).tolist(),
           "mean_de": (de_sum / n).tolist(), "n_predictions": n}
    if positions == "all":
        out["definition"] = ("our variant: every position 0..T-2, target the actual next token, raw W_U "
                             "(the per-prompt analysis's metric)")
    return out
