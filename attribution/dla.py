"""Direct logit attribution (DLA), the true direct effect (DE) and the DLA error (NMAE).

DLA of a component c (its output at the metric position, a vector in the final
residual stream) is its share of the metric through the final LN with the scale
frozen at the clean run's value:
    DLA(c) = centre(c) / scale . (w_lnf * d),   d = W_U[:, answer] - W_U[:, counterfactual].
For an LN-free model the "scale" is the constant sigma, so DLA is exact.  The
true direct effect removes c from the final residual only and recomputes the
final LN live:  DE(c) = metric(x) - metric(x - c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.tasks import Task


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


def final_ln(bridge) -> torch.nn.Module:
    """The model's own final LN (nn.LayerNorm, or FixedLayerNorm on LN-free models)."""
    return bridge.ln_final.original_component


def unembed_bias(bridge, task: Task) -> torch.Tensor:
    b_U = getattr(bridge, "b_U", None)
    if b_U is None:
        return torch.zeros(task.answer.shape[0])
    out = b_U[task.answer]
    return out - b_U[task.counterfactual] if task.counterfactual is not None else out


def metric_from_resid(bridge, task: Task, resid: torch.Tensor) -> torch.Tensor:
    """Metric [B, ...] from final-residual vectors [B, ..., d] with the final LN computed live."""
    dirn = task.direction(bridge.W_U)  # [B, d]
    out = final_ln(bridge)(resid)
    shape = (dirn.shape[0],) + (1,) * (resid.dim() - 2) + (dirn.shape[1],)
    bias = unembed_bias(bridge, task).reshape((-1,) + (1,) * (resid.dim() - 2))
    return (out * dirn.reshape(shape)).sum(-1) + bias


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


@torch.no_grad()
def direct_attribution(bridge, cache, task: Task, top_k_neurons: int = 10) -> DLAResult:
    cfg, pos = bridge.cfg, task.position
    L = cfg.n_layers
    ln = final_ln(bridge)
    dirn = task.direction(bridge.W_U)                       # [B, d]
    scale = cache["ln_final.hook_scale"][:, pos]            # [B, 1] frozen (constant sigma when LN-free)
    u = ln.weight * dirn / scale                            # [B, d]: DLA(c) = centre(c) . u

    z = torch.stack([cache[f"blocks.{i}.attn.hook_z"][:, pos] for i in range(L)], 1)  # [B, L, H, dh]
    heads_out = torch.einsum("blhe,lhed->blhd", z, bridge.W_O)                         # [B, L, H, d]
    mlp_out = torch.stack([cache[f"blocks.{i}.hook_mlp_out"][:, pos] for i in range(L)], 1)  # [B, L, d]
    B = z.shape[0]
    vectors = {
        "embed": cache["hook_embed"][:, pos],
        "pos_embed": cache["hook_pos_embed"][:, pos],
        "attn_biases": bridge.b_O.sum(0).expand(B, -1),
    }

    def dla(c: torch.Tensor) -> torch.Tensor:
        shape = (B,) + (1,) * (c.dim() - 2) + (u.shape[1],)
        return (_centre(c) * u.reshape(shape)).sum(-1)

    other = {k: dla(v) for k, v in vectors.items()}
    other["final_biases"] = (ln.bias * dirn).sum(-1) + unembed_bias(bridge, task)

    resid = cache[f"blocks.{L - 1}.hook_resid_post"][:, pos]  # [B, d]
    metric = metric_from_resid(bridge, task, resid)
    de_heads = metric[:, None, None] - metric_from_resid(bridge, task, resid[:, None, None] - heads_out)
    de_mlp = metric[:, None] - metric_from_resid(bridge, task, resid[:, None] - mlp_out)

    post = torch.stack([cache[f"blocks.{i}.mlp.hook_post"][:, pos] for i in range(L)], 1)  # [B, L, n]
    w_u = torch.einsum("lnd,bd->bln", _centre(bridge.W_out), u)
    neuron_dla = (post * w_u).mean(0)                                                       # [L, n]
    k = min(top_k_neurons, neuron_dla.numel())
    idx = neuron_dla.abs().flatten().topk(k).indices
    n_per = neuron_dla.shape[1]
    neurons = [(f"L{int(i) // n_per}N{int(i) % n_per}", float(neuron_dla.flatten()[i])) for i in idx]

    streams = [cache[f"blocks.{i}.hook_resid_pre"][:, pos] for i in range(L)] + [resid]
    lens = torch.stack([metric_from_resid(bridge, task, s).mean() for s in streams])
    return DLAResult(dla(heads_out), dla(mlp_out), other, de_heads, de_mlp, neurons, metric, lens)


def nmae(dla: torch.Tensor, de: torch.Tensor) -> float:
    """Normalised mean absolute error sum |DLA - DE| / sum |DE| over all entries (prompts x components)."""
    denom = de.abs().sum()
    return float((dla - de).abs().sum() / denom) if denom > 0 else float("nan")
