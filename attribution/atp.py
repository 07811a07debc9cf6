"""Attribution patching: AtP and AtP* (Kramar et al. 2024), in the denoising direction.

AtP estimates the effect of patching a component's clean activation into the
corrupted run by the first-order term  grad_corrupt(metric) . (clean - corrupt),
for every component at once: one clean forward, one corrupted forward, one backward.

AtP* adds two fixes:
- QK fix: where a patched activation feeds an attention softmax directly, the
  attention pattern is recomputed exactly and only the pattern -> metric map is
  linearised.  A head's output (hook_z) already contains its exact pattern, so
  this changes the resid_pre estimates (the patched residual enters layer l's
  queries and keys); for heads it is a no-op.  What it replaces is the part of
  the linear estimate that goes through layer l's queries and keys,
  g_q . J_q dresid + g_k . J_k dresid with J the Jacobian through layer l's live
  ln1 (a torch.func.jvp); with LN removed, J dresid is exactly the change of q / k.
- GradDrop: for each layer l, the estimate is recomputed with the gradient that
  flows from layer l back into the residual stream (through ln1 and ln2's inputs)
  set to zero, and the magnitude is the mean of |estimate| over all L layers
  (Kramar divide by L - 1; dividing by L keeps a node that no drop affects at its
  AtP value); this exposes effects that cancel between paths.  Kramar's AtP* is an unsigned
  ranking score; we keep the sign of the QK-fixed estimate so that it can be
  drawn and correlated like the other signed results.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from attribution import hooks
from attribution.metric import apply_ln, work_dtype
from attribution.patching import Baseline, capture, metric_runs, recorder
from attribution.tasks import Task

CHUNK_ELEMENTS = 2**24  # bound on the [B, H, P, T, T] pattern tensor of the QK fix


@dataclass
class GradRun:
    """The corrupted forward pass with gradients: the batch-mean metric (float64, with its graph), the named
    activations (differentiable), GradDrop's keep flag per layer (its hooks read them in the backward), and
    each prompt's metric [B] (detached)."""

    metric: torch.Tensor
    acts: dict[str, torch.Tensor]
    keep: list[float]
    per_prompt: torch.Tensor | None = None


def grad_names(n_layers: int, star: bool) -> list[str]:
    """The activations AtP (and, with star, AtP*) reads: resid_pre, z, mlp_out (and q, k, pattern)."""
    main = [f(i) for i in range(n_layers) for f in (hooks.z, hooks.resid_pre, hooks.mlp_out)]
    qk = [f(i) for i in range(n_layers) for f in (hooks.q, hooks.k, hooks.pattern)] if star else []
    return main + qk


def corrupted_run(bridge, task: Task, star: bool = True, names: list[str] | None = None) -> GradRun:
    """The corrupted forward pass with gradients, recording `names` (default: what AtP / AtP* read)."""
    L = bridge.cfg.n_layers
    names = grad_names(L, star) if names is None else names
    acts: dict[str, torch.Tensor] = {}
    keep = [1.0] * L

    def leaf(x, hook):  # makes activations differentiable even if the weights are frozen
        return x.detach().requires_grad_(True)

    def drop(i):  # a fresh tensor, so the hook sees only the gradient through this LN (not the skip path)
        def hook(x, hook):
            x = x.clone()
            x.register_hook(lambda g: g * keep[i])
            return x
        return hook

    fwd = [(hooks.EMBED, leaf), (hooks.POS_EMBED, leaf)] + [(n, recorder(acts, n, detach=False)) for n in names]
    if star:
        fwd += [(hooks.ln_in(i, ln), drop(i)) for i in range(L) for ln in ("ln1", "ln2")]
    metric = metric_runs(bridge, task, task.corrupt, fwd, grad=True)
    return GradRun(metric.mean(), acts, keep, metric.detach())


def pattern_deltas(q_co, k_co, q_cl, k_cl, positions: range) -> torch.Tensor:
    """Exact change of a layer's attention patterns [B, H, P, T, T] when the residual at each position p
    is patched: row p gets the clean query, column p the clean key (queries/keys are per position)."""
    B, T, H, dh = q_co.shape
    q_co, k_co, q_cl, k_cl = (x.transpose(1, 2) for x in (q_co, k_co, q_cl, k_cl))  # [B, H, T, dh]
    scale = dh ** -0.5
    s_co = q_co @ k_co.transpose(-1, -2) * scale                   # [B, H, T, T]
    col = q_co @ k_cl.transpose(-1, -2) * scale                    # [B, H, t, p]: query t . clean key p
    row = q_cl @ k_co.transpose(-1, -2) * scale                    # [B, H, p, s]: clean query p . key s
    diag = (q_cl * k_cl).sum(-1) * scale                           # [B, H, p]
    ps = torch.tensor(list(positions))
    idx = torch.arange(T)
    is_col = (idx[None, :] == ps[:, None])                         # [P, T]: s == p
    s_new = s_co[:, :, None].expand(B, H, len(ps), T, T)
    # column p of variant p: query t . clean key p
    colv = col[..., ps].permute(0, 1, 3, 2)                        # [B, H, P, t]
    s_new = torch.where(is_col[None, None, :, None, :], colv[..., None], s_new)
    # row p of variant p: clean query p . keys (clean key at p itself)
    rowv = row[:, :, ps]                                           # [B, H, P, s]
    rowv = torch.where(is_col[None, None], diag[:, :, ps, None], rowv)
    is_row = is_col                                                # t == p, same mask on the t axis
    s_new = torch.where(is_row[None, None, :, :, None], rowv[:, :, :, None, :], s_new)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a_new = s_new.masked_fill(~causal, float("-inf")).softmax(-1)
    a_co = s_co.masked_fill(~causal, float("-inf")).softmax(-1)
    return a_new - a_co[:, :, None]


# torch's forward-AD level is one per process, not per thread: two jvp calls at once (two sessions' analyses
# of two different models) end each other's level ("no level exists").  A jvp here is short; take turns.
_FORWARD_AD = threading.Lock()


def qk_tangents(bridge, layer: int, x: torch.Tensor, dx: torch.Tensor,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """J_q dx and J_k dx [B, T, H, d_head] (in `dtype`): the change of layer `layer`'s queries and keys
    linearised at its input x [B, T, d] (through its live ln1; affine when LN-free) in direction dx."""
    ln = bridge.blocks[layer].ln1.original_component
    W_Q, W_K = bridge.W_Q[layer].detach().to(dtype), bridge.W_K[layer].detach().to(dtype)
    b_Q, b_K = bridge.b_Q[layer].detach().to(dtype), bridge.b_K[layer].detach().to(dtype)

    def qk(resid):
        h = apply_ln(ln, resid, dtype)
        return (torch.einsum("btd,hde->bthe", h, W_Q) + b_Q, torch.einsum("btd,hde->bthe", h, W_K) + b_K)

    with _FORWARD_AD:
        _, tangents = torch.func.jvp(qk, (x.to(dtype),), (dx.to(dtype),))
    return tangents


def _qk_term(dA_fn, g_pattern: torch.Tensor, T: int, B: int, H: int) -> torch.Tensor:
    """Sum over (h, t, s) of dA(p) * dmetric/dpattern for every prompt b and position p, for each of several
    pattern gradients g_pattern [sets, B, H, T, T] -> [sets, B, T] (float64); dA is computed once, chunked
    over p, in g_pattern's dtype."""
    step = max(1, CHUNK_ELEMENTS // max(1, B * H * T * T))
    out = []
    for start in range(0, T, step):
        dA = dA_fn(range(start, min(T, start + step)))
        out.append(torch.einsum("bhpts,kbhts->kbp", dA, g_pattern).double())
    return torch.cat(out, dim=2)


def attribution_patching(bridge, task: Task, star: bool = True, base: Baseline | None = None,
                         run: GradRun | None = None, per_prompt: dict | None = None) -> dict[str, torch.Tensor]:
    """Normalised AtP (and AtP*) estimates (float64): heads [L,H], heads_pos [L,H,T], resid [L,T], mlp [L],
    mlp_pos [L,T]; with star, the same keys prefixed 'star_'.  `base` (the clean activations and both
    metrics) and `run` (the corrupted pass with gradients) are made here unless an analysis passes its own.

    Given a dict, `per_prompt` is filled with each prompt's own estimates, unnormalised (the change of that
    prompt's metric), batch first: the same keys for AtP ([B, L, H] ...), "qk_resid" (resid with the QK fix,
    whose sign AtP* keeps) and "sets_<key>" [L, B, ...] (GradDrop's estimate with layer l's gradient
    dropped).  The batch's estimates are their means, so any resample of prompts can be re-estimated."""
    cfg = bridge.cfg
    L, H = cfg.n_layers, cfg.n_heads
    B, T = task.corrupt.shape
    names = grad_names(L, star)
    main = grad_names(L, False)
    run = corrupted_run(bridge, task, star) if run is None else run
    if base is None:
        clean_metric, clean = capture(bridge, task.clean, names, task)
        base = Baseline(clean, [run.acts[hooks.resid_pre(i)].detach() for i in range(L)],
                        clean_metric.mean().item(), run.metric.item(), run.per_prompt)
    metric, acts, keep, clean, norm = run.metric, run.acts, run.keep, base.clean, base.norm
    # Estimates are accumulated in float64 from the model's activations and gradients, per prompt: the
    # gradient of the batch-mean metric is each prompt's own over B, so the batch sums them.
    delta = {n: clean[n].double() - acts[n].detach().double() for n in main}

    def dot(grads, name, dims):
        return (grads[name].double() * delta[name]).sum(dims)

    def estimates(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # [B, L, ...]
        z = torch.stack([dot(grads, hooks.z(i), 3).transpose(1, 2) for i in range(L)], dim=1)  # [B, L, H, T]
        r = torch.stack([dot(grads, hooks.resid_pre(i), 2) for i in range(L)], dim=1)
        m = torch.stack([dot(grads, hooks.mlp_out(i), 2) for i in range(L)], dim=1)
        return {"heads_pos": z, "resid": r, "mlp_pos": m}

    def grads_with(drop: int | None, full_set: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The gradients with layer `drop`'s dropped.  Given the full set (no drop), the backward starts at
        the residual entering layer drop + 1, with the full set's gradient there: everything above that
        layer sees the same gradient with or without the drop (all of a layer's effect on the metric goes
        through the residual above it), so it is copied, and GradDrop's L backward passes cost about
        (L + 1) / 2 full ones."""
        for i in range(L):
            keep[i] = 0.0 if i == drop else 1.0
        wanted, start, g_start = names, metric, None
        if full_set is not None and drop is not None and drop < L - 1:
            start = acts[hooks.resid_pre(drop + 1)]
            wanted, g_start = [n for n in names if hooks.layer_of(n) <= drop], full_set[hooks.resid_pre(drop + 1)]
        inputs = [acts[n] for n in wanted]
        gs = torch.autograd.grad(start, inputs, g_start, retain_graph=True, allow_unused=True)
        out = {n: (torch.zeros_like(a) if g is None else g) for n, a, g in zip(wanted, inputs, gs, strict=True)}
        return {n: out[n] if n in out else full_set[n] for n in names}

    def full(e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(e, heads=e["heads_pos"].sum(-1), mlp=e["mlp_pos"].sum(-1))

    def batch(e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.sum(0) for k, v in e.items()}

    def keep_per_prompt(key: str, v: torch.Tensor) -> None:
        if per_prompt is not None:
            per_prompt[key] = (v * B).detach().cpu().numpy()

    if not star:
        plain = full(estimates(grads_with(None)))
        for k, v in plain.items():
            keep_per_prompt(k, v)
        return {k: (v / norm).detach() for k, v in batch(plain).items()}

    # The q/k change that the linear estimate of a resid_pre patch contains: J_qk . delta_resid.  The QK
    # fix's large tensors (tangents, pattern changes) are in the model's precision, at least float32.
    dtype = work_dtype(bridge)
    tangents = [qk_tangents(bridge, i, acts[hooks.resid_pre(i)].detach(), delta[hooks.resid_pre(i)], dtype)
                for i in range(L)]
    # Gradient set 0 is AtP's; set 1 + l drops layer l's gradient (GradDrop).  Each set keeps its linear
    # estimates, their q/k part, and its pattern gradients for the exact QK term.
    sets, lin_qk, g_pattern, g_full = [], [], [], None
    for drop in [None, *range(L)]:
        g = grads_with(drop, g_full)
        g_full = g if drop is None else g_full
        sets.append(full(estimates(g)))
        lin_qk.append(torch.stack([(g[hooks.q(i)].to(dtype) * tangents[i][0] + g[hooks.k(i)].to(dtype)
                                    * tangents[i][1]).sum((2, 3)).double() for i in range(L)], dim=1))  # [B, L, T]
        g_pattern.append([g[hooks.pattern(i)] for i in range(L)])
    del g, g_full
    keep[:] = [1.0] * L
    # The exact pattern change of each resid_pre patch, once per layer for every gradient set that differs
    # there: a drop below layer i leaves layer i's gradients as set 0's.
    exact = torch.zeros(len(sets), B, L, T, dtype=torch.float64)
    for i in range(L):
        pairs = tuple(x.to(dtype) for x in (acts[hooks.q(i)].detach(), acts[hooks.k(i)].detach(),
                                            clean[hooks.q(i)], clean[hooks.k(i)]))
        differ = [0, *range(i + 1, len(sets))]  # set 1 + l drops layer l: it differs from set 0 where l >= i
        grads = torch.stack([g_pattern[j][i] for j in differ]).to(dtype)      # [sets, B, H, T, T]
        exact[differ, :, i] = _qk_term(lambda ps, a=pairs: pattern_deltas(*a, ps), grads, T, B, H)
        exact[1:i + 1, :, i] = exact[0, :, i]
    plain = dict(sets[0])  # AtP, before the QK fix
    for j, e in enumerate(sets):
        e["resid"] = e["resid"] - lin_qk[j] + exact[j]
    for k, v in plain.items():
        keep_per_prompt(k, v)
    keep_per_prompt("qk_resid", sets[0]["resid"])
    for k in sets[0]:
        keep_per_prompt("sets_" + k, torch.stack([e[k] for e in sets[1:]]))  # [L, B, ...]
    totals = [batch(e) for e in sets]
    out = batch(plain)
    out["qk_resid"] = totals[0]["resid"]
    for k, v in totals[0].items():
        out["star_" + k] = torch.sign(v) * sum(e[k].abs() for e in totals[1:]) / L
    return {k: (v / norm).detach() for k, v in out.items()}
