"""Edge attribution patching (EAP, Syed et al. 2023) and its integrated-gradients form (EAP-IG, Hanna et al.
2024): a score for every edge between two components of the residual-stream graph.

Writers put a vector into the residual stream: the token embedding, each head's output (z @ W_O per head),
each MLP's output.  Readers take the residual stream in: each head's query, key and value input (through
its layer's ln1), each MLP's input (through ln2) and the logits (through the final LN).  An edge u -> v
exists when v reads after u writes: a head of layer l feeds layer l's MLP and every later layer.

The score of u -> v estimates the change of the metric when only v's copy of u's output is patched from
the corrupted run to the clean one (denoising, as attribution.atp), to first order:
    (clean_u - corrupt_u) . d metric / d input_v,
summed over positions, batch-mean, normalised by clean minus corrupted metric.  The gradient into one
reader's input is its own path only: a head's query input is ln1's vector-Jacobian product of that head's
d metric / d q @ W_Q[h]^T, so the readers of a layer sum to the gradient through its LN.  Hence every
writer's outgoing scores sum to its AtP node score (tested).  EAP-IG averages the reader gradients over
`ig_steps` runs whose input embeddings lie on the straight line from the corrupted to the clean prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attribution import hooks
from attribution.metric import apply_ln
from attribution.patching import capture, metric_runs, normaliser
from attribution.tasks import Task
from models.ln_free import FixedLayerNorm

F64 = torch.float64
QKV = ("q", "k", "v")


@dataclass
class EdgeScores:
    """Edge scores [n_writers, n_readers] (NaN where there is no edge) with the writers' and readers' labels."""

    writers: list[str]      # "embed", "L0H1", "L0 MLP", ...
    readers: list[str]      # "L1H0 q", "L1H0 k", "L1H0 v", "L1 MLP", "logits"
    scores: np.ndarray
    method: str             # "EAP" or "EAP-IG (n steps)"

    def top(self, n: int) -> list[dict]:
        """The n edges of largest |score|: writer, reader, score."""
        flat = np.where(np.isfinite(self.scores), np.abs(self.scores), -1.0).ravel()
        order = np.argsort(-flat, kind="stable")[:n]
        W, R = self.scores.shape
        return [{"writer": self.writers[i // R], "reader": self.readers[i % R], "score": float(self.scores.flat[i])}
                for i in order if flat[i] >= 0]


def writers(L: int, H: int) -> list[tuple[str, float]]:
    """Each writer's label and when it writes (the embedding: -1; layer l's heads: l, its MLP: l + 0.5)."""
    return [("embed", -1.0)] + [x for i in range(L) for x in [*((f"L{i}H{h}", i) for h in range(H)),
                                                           (f"L{i} MLP", i + 0.5)]]


def readers(L: int, H: int) -> list[tuple[str, float]]:
    """Each reader's label and when it reads (layer l's attention: l - 0.25, its MLP: l + 0.25, logits: L)."""
    return [x for i in range(L) for x in [*((f"L{i}H{h} {c}", i - 0.25) for h in range(H) for c in QKV),
                                          (f"L{i} MLP", i + 0.25)]] + [("logits", float(L))]


def edge_mask(L: int, H: int) -> np.ndarray:
    """[n_writers, n_readers] True where the writer writes before the reader reads."""
    w = np.array([t for _, t in writers(L, H)])
    r = np.array([t for _, t in readers(L, H)])
    return w[:, None] < r[None, :]


def ln_vjp(ln: torch.nn.Module, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d metric / d x for y = ln(x) given d metric / d y = u [..., B, T, d] (broadcast over leading axes),
    in float64: the LN's vector-Jacobian product at x (affine for an LN-free model's FixedLayerNorm)."""
    x, g = x.to(F64), u.to(F64) * ln.weight.detach().to(F64)
    if isinstance(ln, FixedLayerNorm):
        return (g - g.mean(-1, keepdim=True)) / ln.sigma
    mu = x.mean(-1, keepdim=True)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    xhat = (x - mu) / sigma
    return (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) / sigma


def _writer_outputs(bridge, acts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each writer's output [B, T, d] (float64) from a pass's activations, in `writers` order."""
    L = bridge.cfg.n_layers
    W_O = bridge.W_O.detach().to(F64)
    out = [acts[hooks.EMBED].to(F64) + acts[hooks.POS_EMBED].to(F64)]
    for i in range(L):
        heads = torch.einsum("bthe,hed->hbtd", acts[hooks.z(i)].to(F64), W_O[i])
        out += [*heads, acts[hooks.mlp_out(i)].to(F64)]
    return out


def writer_names(L: int) -> list[str]:
    return [hooks.EMBED, hooks.POS_EMBED] + [f(i) for i in range(L) for f in (hooks.z, hooks.mlp_out)]


def _reader_grads(bridge, task: Task, tokens: torch.Tensor, embed: torch.Tensor | None) -> list[torch.Tensor]:
    """d (batch-mean metric) / d input of every reader [B, T, d] (float64), in `readers` order, from one
    forward and backward pass of `tokens` (with the token embeddings replaced by `embed` when given)."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    acts: dict[str, torch.Tensor] = {}

    def leaf(x, hook):  # differentiable even if the weights are frozen
        return x.detach().clone().requires_grad_(True)

    def token_embed(x, hook):  # EAP-IG's interpolated embeddings go in here
        return leaf(x if embed is None else embed.to(x), hook)

    def keep(name):  # a fresh tensor: an LN input's gradient is then its LN's path only, not the skip's
        def hook(x, hook):
            acts[name] = x.clone()
            return acts[name]
        return hook

    wanted = [hooks.FINAL_LN_IN] + [f(i) for i in range(L) for f in (hooks.q, hooks.k, hooks.v)] + \
        [hooks.ln_in(i, "ln2") for i in range(L)]
    fwd = [(hooks.EMBED, token_embed), (hooks.POS_EMBED, leaf)] + \
        [(n, keep(n)) for n in wanted + [hooks.resid_pre(i) for i in range(L)]]
    metric = metric_runs(bridge, task, tokens, fwd, grad=True).mean()
    grads = dict(zip(wanted, torch.autograd.grad(metric, [acts[n] for n in wanted], allow_unused=True), strict=True))
    out = []
    for i in range(L):
        ln1 = bridge.blocks[i].ln1.original_component
        x = acts[hooks.resid_pre(i)].detach()
        for h in range(H):
            for c, W in zip(QKV, (bridge.W_Q, bridge.W_K, bridge.W_V), strict=True):
                g = grads[getattr(hooks, c)(i)]
                g = torch.zeros_like(x, dtype=F64) if g is None else g[:, :, h].to(F64) @ W[i, h].detach().to(F64).T
                out.append(ln_vjp(ln1, x, g))
        out.append(grads[hooks.ln_in(i, "ln2")].to(F64))
    out.append(grads[hooks.FINAL_LN_IN].to(F64))
    return out


def edge_attribution(bridge, task: Task, ig_steps: int = 1) -> EdgeScores:
    """Every edge's score (see the module docstring): EAP with ig_steps = 1, EAP-IG with more (the reader
    gradients averaged over the inputs corrupt + k / ig_steps (clean - corrupt), k = 1..ig_steps)."""
    if task.corrupt is None:
        raise ValueError("edge attribution needs a corrupted prompt")
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    clean_metric, clean = capture(bridge, task.clean, writer_names(L), task)
    corrupt_metric, corrupt = capture(bridge, task.corrupt, writer_names(L), task)
    norm = normaliser(clean_metric.mean().item(), corrupt_metric.mean().item())
    deltas = [a - b for a, b in zip(_writer_outputs(bridge, clean), _writer_outputs(bridge, corrupt), strict=True)]
    if ig_steps == 1:
        grads = _reader_grads(bridge, task, task.corrupt, None)
    else:
        e_clean, e_corrupt = clean[hooks.EMBED], corrupt[hooks.EMBED]
        grads = None
        for k in range(1, ig_steps + 1):
            step = _reader_grads(bridge, task, task.corrupt, e_corrupt + k / ig_steps * (e_clean - e_corrupt))
            grads = step if grads is None else [a + b for a, b in zip(grads, step, strict=True)]
        grads = [g / ig_steps for g in grads]
    mask = edge_mask(L, H)
    scores = np.full(mask.shape, np.nan)
    for w, delta in enumerate(deltas):
        for r in np.flatnonzero(mask[w]):
            scores[w, r] = float((delta * grads[r]).sum()) / norm
    return EdgeScores([x for x, _ in writers(L, H)], [x for x, _ in readers(L, H)], scores,
                      "EAP" if ig_steps == 1 else f"EAP-IG ({ig_steps} steps)")
