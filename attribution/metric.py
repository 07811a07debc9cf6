"""The one metric: logit(answer) - logit(counterfactual), or logit(answer) alone without a counterfactual.

It is read either from logits or from final-residual vectors through the model's own
final LN (computed live), for any batch shape: `answer` is [*A] (one token per prompt,
or per position for next-token targets) and a residual is [*A, *extra, d_model].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ln_free import FixedLayerNorm


def final_ln(bridge) -> torch.nn.Module:
    """The model's own final LN (nn.LayerNorm, or FixedLayerNorm on LN-free models)."""
    return bridge.ln_final.original_component


def apply_final_ln(bridge, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The final LN of `x`, computed in `dtype` (default: x's) with the model's weights cast to it."""
    ln = final_ln(bridge)
    dtype = dtype or x.dtype
    x = x.to(dtype)
    w, b = ln.weight.detach().to(dtype), ln.bias.detach().to(dtype)
    if isinstance(ln, FixedLayerNorm):
        return (x - x.mean(-1, keepdim=True)) / ln.sigma.to(dtype) * w + b
    return F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)


def direction(W_U: torch.Tensor, answer: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
    """Unembedding direction [*A, d_model] whose dot product with the final LN's output is the metric."""
    d = W_U.detach().T[answer]
    return d if counterfactual is None else d - W_U.detach().T[counterfactual]


def unembed_bias(bridge, answer: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
    """The unembedding bias's share of the metric [*A] (zero for GPT-2, which has none)."""
    b_U = getattr(bridge, "b_U", None)
    if b_U is None:
        return torch.zeros(answer.shape, device=answer.device)
    b_U = b_U.detach()
    return b_U[answer] if counterfactual is None else b_U[answer] - b_U[counterfactual]


def from_logits(logits: torch.Tensor, answer: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
    """The metric [*A] from logits [*A, d_vocab]."""
    out = logits.gather(-1, answer.to(logits.device)[..., None])[..., 0]
    if counterfactual is not None:
        out = out - logits.gather(-1, counterfactual.to(logits.device)[..., None])[..., 0]
    return out


def from_resid(bridge, resid: torch.Tensor, answer: torch.Tensor, counterfactual: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The metric [*A, *extra] from final-residual vectors [*A, *extra, d_model], the final LN computed live
    in `dtype` (default: the residual's)."""
    dtype = dtype or resid.dtype
    out = apply_final_ln(bridge, resid, dtype)
    dirn = direction(bridge.W_U, answer, counterfactual).to(out.device, dtype)
    bias = unembed_bias(bridge, answer, counterfactual).to(out.device, dtype)
    shape = answer.shape + (1,) * (resid.dim() - answer.dim() - 1)
    return (out * dirn.reshape(shape + dirn.shape[-1:])).sum(-1) + bias.reshape(shape)
