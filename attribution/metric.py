"""The one metric: logit(answer) - logit(counterfactual), or logit(answer) alone without a counterfactual.

It is read either from logits or from final-residual vectors through the model's own
final LN (computed live), for any batch shape: `answer` is [*A] (one token per prompt,
or per position for next-token targets) and a residual is [*A, *extra, d_model].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ln_free import FixedLayerNorm


def work_dtype(bridge) -> torch.dtype:
    """The precision of the large intermediate tensors of edge scores and of AtP*'s QK fix: the model's, at
    least float32.  The activations and gradients they come from are the model's own, so more buys
    nothing there; their sums over positions and prompts are taken in float64."""
    return torch.promote_types(bridge.W_U.dtype, torch.float32)


def final_ln(bridge) -> torch.nn.Module:
    """The model's own final LN (nn.LayerNorm, or FixedLayerNorm on LN-free models)."""
    return bridge.ln_final.original_component


def apply_ln(ln: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A model's LN (nn.LayerNorm or FixedLayerNorm) of `x`, computed in `dtype` (default: x's) with its
    weights cast to it (float64 readouts of a bfloat16 model, say)."""
    dtype = dtype or x.dtype
    x = x.to(dtype)
    w, b = ln.weight.detach().to(dtype), ln.bias.detach().to(dtype)
    if isinstance(ln, FixedLayerNorm):
        return (x - x.mean(-1, keepdim=True)) / ln.sigma * w + b
    return F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)


def apply_final_ln(bridge, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return apply_ln(final_ln(bridge), x, dtype)


def final_ln_scale(bridge, x: torch.Tensor) -> torch.Tensor:
    """The final LN's scale [..., 1] in float64 for final residuals x [..., d]: the constant sigma of an
    LN-free model, else sqrt(var(x) + eps) recomputed from x (so it matches a float64 live LN exactly)."""
    ln = final_ln(bridge)
    if isinstance(ln, FixedLayerNorm):
        return torch.full(x.shape[:-1] + (1,), ln.sigma, dtype=torch.float64, device=x.device)
    return (x.double().var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()


def direction(W_U: torch.Tensor, answer: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
    """Unembedding direction [*A, d_model] whose dot product with the final LN's output is the metric."""
    W = W_U.detach().T
    d = W[answer.to(W.device)]
    return d if counterfactual is None else d - W[counterfactual.to(W.device)]


def unembed_bias(bridge, answer: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
    """The unembedding bias's share of the metric [*A] (zero for GPT-2, which has none)."""
    b_U = getattr(bridge, "b_U", None)
    if b_U is None:
        return torch.zeros(answer.shape, device=bridge.W_U.device)
    b_U = b_U.detach()
    out = b_U[answer.to(b_U.device)]
    return out if counterfactual is None else out - b_U[counterfactual.to(b_U.device)]


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
