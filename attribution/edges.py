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
from attribution.errors import AttributionInputError
from attribution.metric import apply_ln, work_dtype
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


def ln_vjp(ln: torch.nn.Module, x: torch.Tensor, u: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """d metric / d x for y = ln(x) given d metric / d y = u [..., B, T, d] (broadcast over leading axes),
    in `dtype`: the LN's vector-Jacobian product at x (affine for an LN-free model's FixedLayerNorm)."""
    # In place on one [..., B, T, d] tensor: the cotangents of 3H readers are the big operand here.
    x, g = x.to(dtype), u.to(dtype) * ln.weight.detach().to(dtype)
    g.sub_(g.mean(-1, keepdim=True))
    if isinstance(ln, FixedLayerNorm):
        return g.div_(ln.sigma)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    xhat = (x - x.mean(-1, keepdim=True)) / sigma
    # mean(g * xhat) is unchanged by centring g first, since xhat has mean 0
    dot = torch.einsum("...btd,btd->...bt", g, xhat)[..., None] / x.shape[-1]
    return g.addcmul_(xhat.expand_as(g), dot.expand_as(g), value=-1).div_(sigma)


def _writer_outputs(bridge, acts: dict[str, torch.Tensor], dtype: torch.dtype = F64) -> list[torch.Tensor]:
    """Each writer's output [B, T, d] (in `dtype`) from a pass's activations, in `writers` order."""
    L = bridge.cfg.n_layers
    W_O = bridge.W_O.detach().to(dtype)
    out = [acts[hooks.EMBED].to(dtype) + acts[hooks.POS_EMBED].to(dtype)]
    for i in range(L):
        heads = torch.einsum("bthe,hed->hbtd", acts[hooks.z(i)].to(dtype), W_O[i])
        out += [*heads, acts[hooks.mlp_out(i)].to(dtype)]
    return out


def writer_names(L: int) -> list[str]:
    return [hooks.EMBED, hooks.POS_EMBED] + [f(i) for i in range(L) for f in (hooks.z, hooks.mlp_out)]


@dataclass
class _GradPass:
    """One forward and backward pass: its per-prompt metric, the activations it kept (every LN input; with
    `writers`, each writer's activation too) and d (batch-mean metric) / d each reader's hooked input."""

    metric: torch.Tensor
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]


def _grad_pass(bridge, task: Task, tokens: torch.Tensor, embed: torch.Tensor | None, writers: bool) -> _GradPass:
    """The pass behind the reader gradients, of `tokens` (with the token embeddings replaced by `embed` when
    given).  With `writers` it also keeps the writers' activations, so that EAP's corrupted run is this one."""
    L = bridge.cfg.n_layers
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

    def record(name, then=None):  # a writer's activation, as it enters the residual stream
        def hook(x, hook):
            acts[name] = x.detach()
            return then(x, hook) if then else x
        return hook

    wanted = [hooks.FINAL_LN_IN] + [f(i) for i in range(L) for f in (hooks.q, hooks.k, hooks.v)] + \
        [hooks.ln_in(i, "ln2") for i in range(L)]
    fwd = [(n, keep(n)) for n in wanted + [hooks.resid_pre(i) for i in range(L)]]
    if writers:
        fwd += [(hooks.EMBED, record(hooks.EMBED, token_embed)), (hooks.POS_EMBED, record(hooks.POS_EMBED, leaf))]
        fwd += [(f(i), record(f(i))) for i in range(L) for f in (hooks.z, hooks.mlp_out)]
    else:
        fwd += [(hooks.EMBED, token_embed), (hooks.POS_EMBED, leaf)]
    metric = metric_runs(bridge, task, tokens, fwd, grad=True)
    grads = torch.autograd.grad(metric.mean(), [acts[n] for n in wanted], allow_unused=True)
    return _GradPass(metric.detach(), acts, dict(zip(wanted, grads, strict=True)))


def _reader_grads(bridge, run: _GradPass, dtype: torch.dtype = F64):
    """d (batch-mean metric) / d input of every reader (in `dtype`) from one pass, in `readers` order, as
    (layer, [n, B, T, d]): per layer its heads' q, k, v inputs (n = 3H), then its MLP's (n = 1), and last
    the logits' (layer L).  One layer at a time, so that only one layer's reader gradients are held."""
    L, H, d_head = bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_head
    grads = run.grads
    for i in range(L):
        ln1 = bridge.blocks[i].ln1.original_component
        x = run.acts[hooks.resid_pre(i)].detach()
        # d metric / d ln1's output along each head's q, k, v path: [H, 3, B, T, d], then through ln1
        g = torch.stack([_or_zeros(grads[getattr(hooks, c)(i)], x, H, d_head, dtype) for c in QKV])  # [3, B, T, H, dh]
        W = torch.stack([w[i].detach().to(dtype) for w in (bridge.W_Q, bridge.W_K, bridge.W_V)])  # [3, H, d, dh]
        yield i, ln_vjp(ln1, x, torch.einsum("cbthe,chde->hcbtd", g, W).flatten(0, 1), dtype)     # [3H, B, T, d]
        yield i, grads[hooks.ln_in(i, "ln2")].to(dtype)[None]
    yield L, grads[hooks.FINAL_LN_IN].to(dtype)[None]


def _or_zeros(g: torch.Tensor | None, x: torch.Tensor, H: int, d_head: int, dtype: torch.dtype) -> torch.Tensor:
    """A q / k / v gradient in `dtype` ([B, T, H, d_head]), zeros where nothing depends on it."""
    return torch.zeros(x.shape[:2] + (H, d_head), dtype=dtype) if g is None else g.to(dtype)


def score_bytes(bridge, task: Task) -> int:
    """The memory edge attribution holds at its peak: every writer's output in both runs and their change,
    and one layer's reader gradients (twice: as computed and laid out for the contraction)."""
    c, (B, T) = bridge.cfg, task.clean.shape
    size = torch.empty((), dtype=work_dtype(bridge)).element_size()
    return (3 * (1 + c.n_layers * (c.n_heads + 1)) + 2 * (3 * c.n_heads + 1)) * B * T * c.d_model * size


def check_memory(bridge, task: Task) -> None:
    from models.loading import available_bytes

    device = bridge.W_U.device
    need, free = score_bytes(bridge, task), available_bytes(str(device) if device.type == "cuda" else "cpu")
    if need > 0.5 * free:
        B, T = task.clean.shape
        raise AttributionInputError(
            f"Edge attribution of {B} prompts x {T} tokens needs about {need / 2**30:.1f} GiB but "
            f"{free / 2**30:.1f} GiB is free; use fewer or shorter prompts.")


def edge_attribution(bridge, task: Task, ig_steps: int = 1) -> EdgeScores:
    """Every edge's score (see the module docstring): EAP with ig_steps = 1, EAP-IG with more (the reader
    gradients averaged over the inputs corrupt + k / ig_steps (clean - corrupt), k = 1..ig_steps).

    Cost: a clean pass and one forward and backward pass per step (EAP takes the corrupted writers' outputs
    from its gradient pass; EAP-IG needs a corrupted pass more).  Each writer's change meets each reader's
    gradient position by position in the model's precision (at least float32) and is summed over positions
    in float64."""
    if task.corrupt is None:
        raise AttributionInputError("Edge attribution needs a corrupted prompt.")
    if ig_steps < 1:
        raise AttributionInputError(f"EAP-IG needs at least 1 step, not {ig_steps}.")
    check_memory(bridge, task)
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    dtype = work_dtype(bridge)
    clean_metric, clean = capture(bridge, task.clean, writer_names(L), task)
    first = None
    if ig_steps == 1:
        first = _grad_pass(bridge, task, task.corrupt, None, writers=True)
        corrupt_metric, corrupt = first.metric, first.acts
    else:
        corrupt_metric, corrupt = capture(bridge, task.corrupt, writer_names(L), task)
    norm = normaliser(clean_metric.mean().item(), corrupt_metric.mean().item())
    # [B * T, n_writers, d]: positions first, so that each position's writers meet its readers' gradients
    deltas = torch.stack([(a - b).flatten(0, 1) for a, b in zip(_writer_outputs(bridge, clean, dtype),
                                                                _writer_outputs(bridge, corrupt, dtype), strict=True)],
                         dim=1)
    e_clean, e_corrupt = clean[hooks.EMBED], corrupt[hooks.EMBED]
    del clean, corrupt
    R = len(readers(L, H))
    total = torch.zeros(deltas.shape[1], R, dtype=F64)
    for k in range(1, ig_steps + 1):
        run = first if first is not None else _grad_pass(
            bridge, task, task.corrupt, e_corrupt + k / ig_steps * (e_clean - e_corrupt), writers=False)
        first, start = None, 0
        for layer, g in _reader_grads(bridge, run, dtype):
            # Scores are linear in the gradients; only the writers up to this layer's MLP can feed its readers.
            w = min(deltas.shape[1], 1 + (layer + 1) * (H + 1))
            per_position = torch.bmm(deltas[:, :w], g.flatten(1, 2).permute(1, 2, 0))  # [B * T, w, n]
            total[:w, start:start + len(g)] += per_position.sum(0, dtype=F64)
            start += len(g)
        del run
    scores = np.where(edge_mask(L, H), total.numpy() / ig_steps / norm, np.nan)
    return EdgeScores([x for x, _ in writers(L, H)], [x for x, _ in readers(L, H)], scores,
                      "EAP" if ig_steps == 1 else f"EAP-IG ({ig_steps} steps)")


def faithfulness(bridge, task: Task, result: EdgeScores, sizes: list[int]) -> list[dict]:
    """How much of the metric the circuit of the top-n edges (by |score|) recovers (circuit_recovery), for
    each n in `sizes`: one forward pass of the batch each."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    mask = edge_mask(L, H)
    order = np.argsort(-np.where(mask, np.abs(np.nan_to_num(result.scores)), -1.0).ravel(), kind="stable")
    base = _Baseline(bridge, task)
    out = []
    for n in sizes:
        n = min(n, int(mask.sum()))
        keep = np.zeros(mask.size, bool)
        keep[order[:n]] = True
        out.append({"edges": n, **base.recovery(keep.reshape(mask.shape))})
    return out


def circuit_recovery(bridge, task: Task, keep: np.ndarray) -> dict:
    """The metric of the clean prompts with every edge outside `keep` ([n_writers, n_readers] bool) ablated:
    its reader gets the writer's corrupted output in place of its output in this run (exactly, not
    linearised).  "recovered" is it normalised so that the corrupted metric is 0 and the clean one 1."""
    return _Baseline(bridge, task).recovery(keep)


class _Baseline:
    """The clean and corrupted metrics and the corrupted writer outputs that circuit runs start from."""

    def __init__(self, bridge, task: Task):
        names = writer_names(bridge.cfg.n_layers)
        clean_metric, _ = capture(bridge, task.clean, names, task)
        corrupt_metric, corrupt = capture(bridge, task.corrupt, names, task)
        self.bridge, self.task = bridge, task
        self.clean, self.corrupt = clean_metric.mean().item(), corrupt_metric.mean().item()
        self.norm = normaliser(self.clean, self.corrupt)
        self.corrupt_out = torch.stack(_writer_outputs(bridge, corrupt))                 # [W, B, T, d]

    def recovery(self, keep: np.ndarray) -> dict:
        cfg = self.bridge.cfg
        ablate = torch.from_numpy(edge_mask(cfg.n_layers, cfg.n_heads) & ~keep).to(F64)  # [W, R]
        metric = _circuit_metric(self.bridge, self.task, self.corrupt_out, ablate).mean().item()
        return {"metric": metric, "recovered": (metric - self.corrupt) / self.norm}


@torch.no_grad()
def _circuit_metric(bridge, task: Task, corrupt_out: torch.Tensor, ablate: torch.Tensor) -> torch.Tensor:
    """Per-prompt metric of the clean prompts with each reader's input minus sum over its ablated writers of
    (their output in this run - their corrupted output): ablate [W, R] weights each writer per reader."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    W_O = bridge.W_O.detach().to(F64)
    diffs: list[torch.Tensor] = []       # this run's writer outputs minus their corrupted ones, as they come
    state = {}
    readers_of = {i: i * (3 * H + 1) for i in range(L)}  # layer i's first reader: its 3H head inputs, then MLP
    logits = L * (3 * H + 1)

    def removed(r0: int, r1: int) -> torch.Tensor:  # [r1 - r0, B, T, d]
        return torch.einsum("wr,wbtd->rbtd", ablate[: len(diffs), r0:r1], torch.stack(diffs))

    def embed(x, hook):
        state["embed"] = x.to(F64)
        return x

    def pos_embed(x, hook):
        diffs.append(state.pop("embed") + x.to(F64) - corrupt_out[0])
        return x

    def resid_pre(i):
        def hook(x, hook):
            state["x"] = x
            return x
        return hook

    def qkv(i, part):
        W = {"q": bridge.W_Q, "k": bridge.W_K, "v": bridge.W_V}[part][i].detach().to(F64)
        b = {"q": bridge.b_Q, "k": bridge.b_K, "v": bridge.b_V}[part][i].detach().to(F64)
        ln1 = bridge.blocks[i].ln1.original_component
        c = QKV.index(part)  # the part's readers are every third of the layer's head readers

        def hook(x, hook):
            if state.get("ln1_layer") != i:  # once per layer: all its heads' q, k and v inputs through ln1
                r0 = readers_of[i]
                inputs = state["x"].to(F64)[None] - removed(r0, r0 + 3 * H)               # [3H, B, T, d]
                state["ln1"], state["ln1_layer"] = apply_ln(ln1, inputs, F64), i
            new = torch.einsum("hbtd,hde->bthe", state["ln1"][c::3], W) + b
            return new.to(x.dtype)
        return hook

    def z(i):
        def hook(x, hook):
            heads = torch.einsum("bthe,hed->hbtd", x.to(F64), W_O[i])
            start = 1 + i * (H + 1)
            diffs.extend(heads[h] - corrupt_out[start + h] for h in range(H))
            return x
        return hook

    def mlp_in(i):
        def hook(x, hook):
            r = readers_of[i] + 3 * H
            return (x.to(F64) - removed(r, r + 1)[0]).to(x.dtype)
        return hook

    def mlp_out(i):
        def hook(x, hook):
            diffs.append(x.to(F64) - corrupt_out[(i + 1) * (H + 1)])
            return x
        return hook

    def final_in(x, hook):
        return (x.to(F64) - removed(logits, logits + 1)[0]).to(x.dtype)

    fwd = [(hooks.EMBED, embed), (hooks.POS_EMBED, pos_embed), (hooks.FINAL_LN_IN, final_in)]
    for i in range(L):
        fwd += [(hooks.resid_pre(i), resid_pre(i)), (hooks.z(i), z(i)), (hooks.ln_in(i, "ln2"), mlp_in(i)),
                (hooks.mlp_out(i), mlp_out(i))] + [(getattr(hooks, p)(i), qkv(i, p)) for p in QKV]
    return metric_runs(bridge, task, task.clean, fwd)
