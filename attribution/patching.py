"""Activation patching (the ground truth): clean activations patched into the corrupted run.

The patched runs of a sweep are batched: each forward pass carries several copies
of the corrupted batch, and each copy gets a different component patched.  The
result is normalised as (patched - corrupt) / (clean - corrupt), so 1 means the
component alone restores the clean behaviour and 0 means it does nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from attribution import hooks
from attribution.errors import AttributionInputError
from attribution.metric import from_resid
from attribution.tasks import Task

# A patch: (hook name, index into the activation after the batch dim), e.g. ("blocks.0.attn.hook_z", (p, h)).
Patch = tuple[str, tuple]
ELEMENT_BUDGET = 2**25  # floats of activations per forward pass; bounds the copies per pass
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
    """Per-sequence metric of a forward pass, read from the final residual at the metric position
    through the model's own final LN: the [batch, T, d_vocab] logits are never formed."""
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
        return from_resid(bridge, per_copy, task.answer, task.counterfactual).T.reshape(-1)


def first_difference(task: Task) -> int:
    """First position where any clean and corrupted prompt differ: patches before it change nothing."""
    diff = (task.clean != task.corrupt).any(0).nonzero()
    return int(diff[0]) if len(diff) else task.clean.shape[1]


def baselines(bridge, task: Task) -> tuple[float, float]:
    """Batch-mean metric of the clean and the corrupted run."""
    return (metric_runs(bridge, task, task.clean, []).mean().item(),
            metric_runs(bridge, task, task.corrupt, []).mean().item())


def normaliser(clean: float, corrupt: float) -> float:
    diff = clean - corrupt
    if abs(diff) < 1e-6:
        raise AttributionInputError(
            "The clean and corrupted prompts give the same metric, so patching effects cannot be "
            "normalised; choose a corrupted prompt that changes the answer.")
    return diff


def run_patches(bridge, task: Task, clean_acts: dict[str, torch.Tensor], patches: list[Patch],
                progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Batch-mean metric [len(patches)] of the corrupted run with each single patch applied."""
    B, T = task.corrupt.shape
    per_pass = max(1, ELEMENT_BUDGET // (B * T * bridge.cfg.d_model * 4))
    out = []
    for start in range(0, len(patches), per_pass):
        chunk = patches[start:start + per_pass]
        by_hook: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for j, (name, index) in enumerate(chunk):
            by_hook[name].append((j, index))

        def patcher(name, todo):
            def hook(x, hook):
                x = x.clone()
                for j, index in todo:
                    x[(slice(j * B, (j + 1) * B),) + index] = clean_acts[name][(ALL,) + index]
                return x
            return hook

        tokens = task.corrupt.repeat(len(chunk), 1)
        fwd = [(n, patcher(n, t)) for n, t in by_hook.items()]
        out.append(metric_runs(bridge, task, tokens, fwd).view(len(chunk), B).mean(1))
        if progress:
            progress(min(1.0, (start + len(chunk)) / len(patches)))
    return torch.cat(out)


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
                        progress: Callable[[float, str], None] | None = None) -> dict[str, torch.Tensor]:
    """Normalised patching results for each sweep kind (resid [L,T], heads [L,H], heads_pos [L,H,T], ...)."""
    L, T = bridge.cfg.n_layers, task.clean.shape[1]
    names = sorted({SWEEP_HOOKS[k](i) for k in kinds for i in range(L)})
    _, clean_acts = capture(bridge, task.clean, names)
    clean, corrupt = baselines(bridge, task)
    norm = normaliser(clean, corrupt)
    start = first_difference(task)
    out = {}
    for n, kind in enumerate(kinds):
        patches, shape = sweep_patches(bridge.cfg, T, kind)
        # A patch at a position before the first difference copies the corrupted value: effect exactly 0.
        todo = [i for i, (_, index) in enumerate(patches) if not isinstance(index[0], int) or index[0] >= start]
        report = (lambda f, n=n, kind=kind: progress((n + f) / len(kinds), f"patching {kind}")) if progress \
            else None
        result = torch.zeros(len(patches))
        if todo:
            result[todo] = (run_patches(bridge, task, clean_acts, [patches[i] for i in todo], report) - corrupt) / norm
        out[kind] = result.view(shape)
    return out
