"""Activation patching (the ground truth): clean activations patched into the corrupted run.

The patched runs of a sweep are batched: each forward pass carries several copies
of the corrupted batch, and each copy gets a different component patched.  The
result is normalised as (patched - corrupt) / (clean - corrupt), so 1 means the
component alone restores the clean behaviour and 0 means it does nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from attribution import hooks
from attribution.errors import AnalysisCancelled, AttributionInputError
from attribution.metric import from_resid
from attribution.tasks import Task

# A patch: (hook name, index into the activation after the batch dim), e.g. ("blocks.0.attn.hook_z", (p, h)).
Patch = tuple[str, tuple]
MEMORY_SHARE = 0.25  # share of free memory the copies of one patched pass may use
MAX_COPIES = 256
ALL = slice(None)


def capture(bridge, tokens: torch.Tensor, names: list[str], task: Task | None = None):
    """Logits (or, given `task`, the per-sequence metric) and the named activations of one no-grad pass."""
    acts: dict[str, torch.Tensor] = {}
    fwd = [(n, recorder(acts, n)) for n in names]
    if task is not None:
        return metric_runs(bridge, task, tokens, fwd), acts
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=fwd)
    return logits, acts


def recorder(acts: dict[str, torch.Tensor], name: str, detach: bool = True):
    """A forward hook that stores its activation in acts[name]: keyed by the name asked for, since
    TransformerLens reports aliases under their canonical name."""
    def hook(x, hook):
        acts[name] = x.detach() if detach else x
        return x
    return hook


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the final residual is known (skips the unembedding)."""


def metric_runs(bridge, task: Task, tokens: torch.Tensor, fwd_hooks: list, grad: bool = False) -> torch.Tensor:
    """Per-sequence metric (float64) of a forward pass, read from the final residual at the metric position
    through the model's own final LN, computed in float64: the [batch, T, d_vocab] logits are never formed."""
    box = {}

    def stop(x, hook):
        box["resid"] = x[:, task.position]
        raise _Stop

    with torch.set_grad_enabled(grad):
        try:
            bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks + [(hooks.FINAL_LN_IN, stop)])
        except _Stop:
            pass
        resid = box["resid"]
        reps = resid.shape[0] // task.answer.shape[0]
        per_copy = resid.view(reps, -1, resid.shape[-1]).transpose(0, 1)  # [B, reps, d]
        return from_resid(bridge, per_copy, task.answer, task.counterfactual, torch.float64).T.reshape(-1)


def first_difference(task: Task) -> int:
    """First position where any clean and corrupted prompt differ: patches before it change nothing."""
    diff = (task.clean != task.corrupt).any(0).nonzero()
    return int(diff[0]) if len(diff) else task.clean.shape[1]


def normaliser(clean: float, corrupt: float) -> float:
    diff = clean - corrupt
    if abs(diff) < 1e-6:
        raise AttributionInputError(
            "The clean and corrupted prompts give the same metric, so patching effects cannot be "
            "normalised; choose a corrupted prompt that changes the answer.")
    return diff


@dataclass
class Baseline:
    """What patching starts from, out of the two unpatched passes: the clean activations to patch in, the
    corrupted residual entering every layer (where a patched run starts), both batch-mean metrics (float64),
    and (when known) the corrupted metric of each prompt [B], from which per-prompt effects are measured."""

    clean: dict[str, torch.Tensor]
    corrupt_resid: list[torch.Tensor]
    clean_metric: float
    corrupt_metric: float
    corrupt_per_prompt: torch.Tensor | None = None

    @property
    def norm(self) -> float:
        return normaliser(self.clean_metric, self.corrupt_metric)


def baseline(bridge, task: Task, names: list[str]) -> Baseline:
    """One clean and one corrupted forward pass (when no analysis has made them already)."""
    resid = [hooks.resid_pre(i) for i in range(bridge.cfg.n_layers)]
    clean_metric, clean = capture(bridge, task.clean, sorted(set(names)), task)
    corrupt_metric, corrupt = capture(bridge, task.corrupt, resid, task)
    return Baseline(clean, [corrupt[n] for n in resid], clean_metric.mean().item(), corrupt_metric.mean().item(),
                    corrupt_metric)


def copies_per_pass(bridge, task: Task) -> int:
    """Patched copies of the batch per forward pass: a share of free memory over one copy's working set
    (one layer's activations without gradients: residual-sized tensors, the MLP, the attention scores)."""
    from models.loading import available_bytes

    c, (B, T) = bridge.cfg, task.corrupt.shape
    per_copy = B * T * (16 * c.d_model + 2 * c.d_mlp + 3 * c.n_heads * T) * bridge.W_U.element_size()
    device = bridge.W_U.device
    free = available_bytes(str(device) if device.type == "cuda" else "cpu")
    return int(max(1, min(MAX_COPIES, MEMORY_SHARE * free // per_copy)))


def _patcher(name: str, todo: list[tuple[int, tuple]], clean: torch.Tensor, B: int):
    def hook(x, hook):
        x = x.clone()
        for j, index in todo:
            x[(slice(j * B, (j + 1) * B),) + index] = clean[(ALL,) + index]
        return x
    return hook


@torch.no_grad()
def run_patches(bridge, task: Task, base: Baseline, patches: list[Patch], progress: Callable[[float], None] | None = None,
                should_stop: Callable[[], bool] | None = None, lock=None, per_prompt: bool = False) -> torch.Tensor:
    """Batch-mean metric (float64) [len(patches)] of the corrupted run with each single patch applied (with
    `per_prompt`, each prompt's metric [len(patches), B]).

    Patches run layer by layer, several per forward pass (copies of the batch), and each pass starts from
    the corrupted residual entering its layer: the unpatched prefix is never re-run, and the pass stops
    at the final residual (no unembedding).  `lock` (the model's) is held for each pass, not the whole
    sweep, so another thread's short pass on the same model waits for one pass at most."""
    B = task.corrupt.shape[0]
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, (name, _) in enumerate(patches):
        by_layer[hooks.layer_of(name)].append(i)
    per_pass = copies_per_pass(bridge, task)
    # Each pass holds patches of one layer only, so that it runs just the layers from there on.
    chunks = [ids[j:j + per_pass] for _, ids in sorted(by_layer.items()) for j in range(0, len(ids), per_pass)]
    out = torch.empty((len(patches), B) if per_prompt else len(patches), dtype=torch.float64)
    done = 0
    for idx in chunks:
        if should_stop is not None and should_stop():
            raise AnalysisCancelled("activation patching: cancelled")
        by_hook: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for j, i in enumerate(idx):
            name, index = patches[i]
            by_hook[name].append((j, index))
        first = hooks.layer_of(patches[idx[0]][0])
        x = base.corrupt_resid[first].repeat(len(idx), 1, 1)
        with lock or nullcontext():  # the final LN too: another thread's hooks may sit there
            with bridge.hooks(fwd_hooks=[(n, _patcher(n, t, base.clean[n], B)) for n, t in by_hook.items()]):
                for block in bridge.blocks[first:]:
                    x = block(x)
                    x = x[0] if isinstance(x, tuple) else x
            per_copy = x[:, task.position].view(len(idx), B, -1).transpose(0, 1)       # [B, copies, d]
            metric = from_resid(bridge, per_copy, task.answer, task.counterfactual, torch.float64)
        out[idx] = (metric.T if per_prompt else metric.mean(0)).cpu()
        done += len(idx)
        if progress:
            progress(done / len(patches))
    return out


def sweep_patches(cfg, T: int, kind: str) -> tuple[list[Patch], tuple[int, ...]]:
    """The patches of one sweep and the shape of its result."""
    L, H = cfg.n_layers, cfg.n_heads
    if kind == "resid":
        return [(hooks.resid_pre(i), (p,)) for i in range(L) for p in range(T)], (L, T)
    if kind == "heads":
        return [(hooks.z(i), (ALL, h)) for i in range(L) for h in range(H)], (L, H)
    if kind == "heads_pos":
        return [(hooks.z(i), (p, h)) for i in range(L) for h in range(H) for p in range(T)], (L, H, T)
    if kind == "mlp":
        return [(hooks.mlp_out(i), (ALL,)) for i in range(L)], (L,)
    if kind == "mlp_pos":
        return [(hooks.mlp_out(i), (p,)) for i in range(L) for p in range(T)], (L, T)
    raise ValueError(kind)


SWEEP_HOOKS = {"resid": hooks.resid_pre, "heads": hooks.z, "heads_pos": hooks.z, "mlp": hooks.mlp_out,
               "mlp_pos": hooks.mlp_out}


def activation_patching(bridge, task: Task, kinds=("resid", "heads", "mlp"),
                        progress: Callable[[float, str], None] | None = None, base: Baseline | None = None,
                        select: dict[str, list[int]] | None = None,
                        should_stop: Callable[[], bool] | None = None, lock=None,
                        per_prompt: dict | None = None) -> dict[str, torch.Tensor]:
    """Normalised patching results (float64) for each sweep kind: resid [L,T], heads [L,H], heads_pos [L,H,T],
    mlp [L], mlp_pos [L,T].  With `select` ({kind: flat indices}) only those entries are patched and the
    others are NaN (AtP-guided verification); without it, every entry (the full sweep).

    Given a dict, `per_prompt` is filled with each prompt's unnormalised effect (its patched minus its
    corrupted metric), batch first ([B, L, H] ...; NaN where nothing was patched): the batch's results are
    their mean over the normaliser."""
    L, T = bridge.cfg.n_layers, task.clean.shape[1]
    if base is None:
        base = baseline(bridge, task, [SWEEP_HOOKS[k](i) for k in kinds for i in range(L)])
    norm, start, B = base.norm, first_difference(task), task.corrupt.shape[0]
    if per_prompt is not None and base.corrupt_per_prompt is None:
        raise ValueError("per-prompt effects need the baseline's per-prompt corrupted metric")
    effect, todo = {}, []  # each prompt's patched minus corrupted metric [n patches, B]
    for kind in kinds:
        patches, shape = sweep_patches(bridge.cfg, T, kind)
        chosen = range(len(patches)) if select is None else select[kind]
        effect[kind] = torch.full((len(patches), B), 0.0 if select is None else math.nan, dtype=torch.float64)
        for i in chosen:
            index = patches[i][1]
            # A patch at a position before the first difference copies the corrupted value: effect exactly 0.
            if isinstance(index[0], int) and index[0] < start:
                effect[kind][i] = 0.0
            else:
                todo.append((kind, i, patches[i]))
    if todo:
        report = (lambda f: progress(f, "activation patching")) if progress else None
        metric = run_patches(bridge, task, base, [p for _, _, p in todo], report, should_stop, lock,
                             per_prompt=True)
        corrupt = base.corrupt_per_prompt
        for (kind, i, _), m in zip(todo, metric, strict=True):
            # Patched minus corrupted, per prompt when the baseline has them; else the batch means'.
            effect[kind][i] = m - corrupt.to(m) if corrupt is not None else m.mean() - base.corrupt_metric
    out = {}
    for kind in kinds:
        shape = sweep_patches(bridge.cfg, T, kind)[1]
        out[kind] = (effect[kind].mean(1) / norm).view(shape)
        if per_prompt is not None:
            per_prompt[kind] = effect[kind].T.reshape((B,) + shape).numpy()
    return out


def top_k(estimates: dict[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    """The k components with the largest |estimate| over every kind together ({kind: estimate}, all in units
    of the normalised metric), as {kind: flat indices}: what AtP-guided verification patches."""
    flat = torch.cat([e.flatten().abs() for e in estimates.values()])
    chosen = flat.topk(min(k, flat.numel())).indices.tolist()
    bounds, start = {}, 0
    for kind, e in estimates.items():
        bounds[kind] = (start, start + e.numel())
        start += e.numel()
    return {kind: [i - lo for i in chosen if lo <= i < hi] for kind, (lo, hi) in bounds.items()}
