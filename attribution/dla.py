"""Direct logit attribution (DLA), the true direct effect (DE) and the DLA error (NMAE).

DLA of a component c (its output at the metric position, a vector in the final
residual stream) is its share of the metric through the final LN with the scale
frozen at the clean run's value:
    DLA(c) = centre(c) / scale . (w_lnf * d),   d = W_U[:, answer] - W_U[:, counterfactual].
For an LN-free model the "scale" is the constant sigma, so DLA is exact.  The
true direct effect removes c from the final residual only and recomputes the
final LN live:  DE(c) = metric(x) - metric(x - c).  Both are computed in float64
from the cached activations, whatever the model's dtype, and the scale is
recomputed from the cached final residual in float64 (`effects`, shared with
the dataset-level finding), so LN-free DLA equals DE to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution import hooks
from attribution.metric import direction, final_ln, final_ln_scale, from_resid, unembed_bias
from attribution.tasks import Task

F64 = torch.float64


@dataclass
class DLAResult:
    heads: torch.Tensor          # [B, L, H]
    mlp: torch.Tensor            # [B, L]
    other: dict[str, torch.Tensor]  # name -> [B]: embed, pos_embed, attn_biases, final_biases
    de_heads: torch.Tensor       # [B, L, H]
    de_mlp: torch.Tensor         # [B, L]
    neurons: list[tuple[str, float]]  # top-k MLP neurons by |mean DLA|: ("L{l}N{n}", value)
    metric: torch.Tensor         # [B] the metric recomputed from the final residual
    logit_lens: torch.Tensor     # [L + 1] batch-mean metric read at resid_pre 0..L-1 and resid_post L-1

    @property
    def total(self) -> torch.Tensor:
        """Sum of every component's DLA [B]; equals `metric` (exactly for LN-free, frozen scale for LN)."""
        return (self.heads.sum((1, 2)) + self.mlp.sum(1) + sum(self.other.values()))


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def dla_direction(bridge, resid: torch.Tensor, answer: torch.Tensor, counterfactual: torch.Tensor | None):
    """u [*A, d] (float64) with DLA(c) = centre(c) . u: the final LN's gain times the metric's
    unembedding direction, over the final LN's scale at the final residual `resid` [*A, d] (frozen)."""
    gain = final_ln(bridge).weight.detach().to(F64)
    return gain * direction(bridge.W_U, answer, counterfactual).to(F64) / final_ln_scale(bridge, resid)


def _over(x: torch.Tensor, extra: int) -> torch.Tensor:
    """x [*A, d] reshaped to [*A, 1 (x extra), d] to broadcast over component dimensions."""
    return x.reshape(x.shape[:-1] + (1,) * extra + x.shape[-1:])


def effects(bridge, resid: torch.Tensor, components: torch.Tensor, answer: torch.Tensor,
            counterfactual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-scale DLA and true direct effect, both float64 [*A, *C], of component vectors [*A, *C, d]
    that are part of the final residual `resid` [*A, d]."""
    c = components.to(F64)
    extra = c.dim() - resid.dim()
    u = dla_direction(bridge, resid, answer, counterfactual)
    dla = (_centre(c) * _over(u, extra)).sum(-1)
    x = resid.to(F64)
    metric = from_resid(bridge, x, answer, counterfactual, F64)
    de = metric.reshape(metric.shape + (1,) * extra) - from_resid(bridge, _over(x, extra) - c, answer,
                                                                   counterfactual, F64)
    return dla, de


@torch.no_grad()
def direct_attribution(bridge, cache, task: Task, top_k_neurons: int = 10) -> DLAResult:
    cfg, pos = bridge.cfg, task.position
    L = cfg.n_layers
    ans, cf = task.answer, task.counterfactual
    resid = cache[hooks.resid_post(L - 1)][:, pos]                                      # [B, d]
    u = dla_direction(bridge, resid, ans, cf)                                            # [B, d]
    z = torch.stack([cache[hooks.z(i)][:, pos] for i in range(L)], 1).to(F64)           # [B, L, H, dh]
    heads_out = torch.einsum("blhe,lhed->blhd", z, bridge.W_O.detach().to(F64))          # [B, L, H, d]
    mlp_out = torch.stack([cache[hooks.mlp_out(i)][:, pos] for i in range(L)], 1)      # [B, L, d]
    dla_heads, de_heads = effects(bridge, resid, heads_out, ans, cf)
    dla_mlp, de_mlp = effects(bridge, resid, mlp_out, ans, cf)

    B = z.shape[0]
    vectors = {"embed": cache[hooks.EMBED][:, pos], "pos_embed": cache[hooks.POS_EMBED][:, pos],
               "attn_biases": bridge.b_O.detach().sum(0).expand(B, -1)}
    other = {k: (_centre(v.to(F64)) * u).sum(-1) for k, v in vectors.items()}
    ln = final_ln(bridge)
    bias = (ln.bias.detach().to(F64) * direction(bridge.W_U, ans, cf).to(F64)).sum(-1)
    other["final_biases"] = bias + unembed_bias(bridge, ans, cf).to(F64)

    post = torch.stack([cache[hooks.mlp_post(i)][:, pos] for i in range(L)], 1).to(F64)  # [B, L, n]
    w_u = torch.einsum("lnd,bd->bln", _centre(bridge.W_out.detach().to(F64)), u)
    neuron_dla = (post * w_u).mean(0)                                                   # [L, n]
    k = min(top_k_neurons, neuron_dla.numel())
    idx = neuron_dla.abs().flatten().topk(k).indices
    n_per = neuron_dla.shape[1]
    neurons = [(f"L{int(i) // n_per}N{int(i) % n_per}", float(neuron_dla.flatten()[i])) for i in idx]

    metric = from_resid(bridge, resid, ans, cf, F64)
    streams = [cache[hooks.resid_pre(i)][:, pos] for i in range(L)] + [resid]
    lens = torch.stack([from_resid(bridge, s, ans, cf, F64).mean() for s in streams])
    return DLAResult(dla_heads, dla_mlp, other, de_heads, de_mlp, neurons, metric, lens)


def nmae(dla: torch.Tensor, de: torch.Tensor) -> float:
    """Normalised mean absolute error sum |DLA - DE| / sum |DE| over all entries (prompts x components)."""
    denom = de.abs().sum()
    return float((dla - de).abs().sum() / denom) if denom > 0 else float("nan")
