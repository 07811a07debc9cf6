"""One call per model (`analyse`) or per LN / LN-free pair (`compare`): every number the app, the export
CLI and the plots show (attribution.results).

An analysis makes one clean forward pass (cached: the predictions, the metric and DLA / DE read from
it), one corrupted forward pass with gradients and its backward passes (AtP, AtP*), and activation
patching that starts from those two passes: by default it checks the components AtP* ranks highest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from attribution import hooks, tasks
from attribution.atp import attribution_patching, corrupted_run, grad_names
from attribution.dla import direct_attribution, nmae
from attribution.errors import AttributionInputError
from attribution.patching import Baseline, activation_patching, capture, sweep_patches, top_k
from attribution.results import ModelResults, PairResults, Settings, agreements

if TYPE_CHECKING:
    from models import LoadedModel

Progress = Callable[[float, str], None] | None
ShouldStop = Callable[[], bool] | None
MEMORY_SHARE = 0.5  # share of free memory one analysis may plan to use


def _tok_str(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def dla_names(n_layers: int) -> list[str]:
    """The clean activations DLA, DE and the logit lens read."""
    per_layer = (hooks.z, hooks.mlp_out, hooks.mlp_post, hooks.resid_pre)
    return [hooks.EMBED, hooks.POS_EMBED, hooks.resid_post(n_layers - 1)] + \
        [f(i) for i in range(n_layers) for f in per_layer]


def analysis_bytes(bridge, task: tasks.Task) -> int:
    """A bound on the memory one analysis holds at its peak: the clean cache, the corrupted pass's
    autograd graph and gradients (model dtype), AtP*'s float64 differences and q / k tangents, and the
    QK fix's pattern chunk."""
    c, (B, T) = bridge.cfg, task.clean.shape
    per_position_layer = (26 * c.d_model + 6 * c.d_mlp + 6 * c.n_heads * T) * bridge.W_U.element_size() \
        + 10 * c.d_model * 8
    return int(B * T * c.n_layers * per_position_layer + 2 * 2**24 * 8)


def check_memory(bridge, task: tasks.Task) -> None:
    from models.loading import available_bytes

    device = bridge.W_U.device
    need, free = analysis_bytes(bridge, task), available_bytes(str(device) if device.type == "cuda" else "cpu")
    if need > MEMORY_SHARE * free:
        B, T = task.clean.shape
        raise AttributionInputError(
            f"This analysis ({B} prompts x {T} tokens) needs about {need / 2**30:.1f} GiB but "
            f"{free / 2**30:.1f} GiB is free; use fewer or shorter prompts, or bfloat16.")


class Clock:
    """Wall time of each stage of an analysis, reported in forward-pass equivalents (the clean pass = 1)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def forward_equivalents(self) -> dict[str, float]:
        unit = self.seconds["clean forward"]
        out = {k: round(v / unit, 2) for k, v in self.seconds.items()}
        return dict(out, total=round(sum(self.seconds.values()) / unit, 2))


def analyse(model: LoadedModel, settings: Settings, progress: Progress = None,
            should_stop: ShouldStop = None) -> ModelResults:
    """Every result for one model on the task that `settings` describes."""
    def say(f: float, text: str) -> None:
        if progress:
            progress(min(1.0, max(0.0, f)), f"{model.spec}: {text}")

    with model.lock:  # no other thread's pass sees this analysis's hooks
        return _analyse(model, settings, say, should_stop)


def _analyse(model: LoadedModel, settings: Settings, say, should_stop: ShouldStop) -> ModelResults:
    bridge, info = model.bridge, model.info
    tok = bridge.tokenizer
    task = tasks.build(tok, settings, bridge.cfg.n_ctx)
    check_memory(bridge, task)
    L, H, T = bridge.cfg.n_layers, bridge.cfg.n_heads, task.clean.shape[1]
    clock = Clock()
    say(0.0, "forward pass")
    clean_names = sorted(set(dla_names(L) + (grad_names(L, True) if task.corrupt is not None else [])))
    with torch.no_grad(), clock("clean forward"):
        logits, cache = bridge.run_with_cache(task.clean, names_filter=clean_names)
    probs = logits[0, task.position].double().softmax(-1)
    top = probs.topk(min(settings.top_k, probs.numel()))
    top_tokens = [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    del logits
    with clock("dla"):
        d = direct_attribution(bridge, cache, task, settings.top_k)
    metric_clean = float(d.metric.mean())
    nan = math.nan
    res = dict(patch_heads=np.full((L, H), nan), patch_resid=np.full((L, T), nan), patch_mlp=np.full(L, nan),
               atp_heads=np.full((L, H), nan), atpstar_heads=np.full((L, H), nan),
               atp_resid=np.full((L, T), nan), atpstar_resid=np.full((L, T), nan), atp_mlp=np.full(L, nan),
               atpstar_mlp=np.full(L, nan), agreement={}, metric_corrupt=nan, patching="")
    passes = {"full_forward": 1, "backward": 0, "patched_runs": 0}
    if task.corrupt is not None:
        say(0.2, "attribution patching")
        with clock("corrupted forward"):
            run = corrupted_run(bridge, task, star=True)
        base = Baseline({n: cache[n] for n in grad_names(L, True)},
                        [run.acts[hooks.resid_pre(i)].detach() for i in range(L)], metric_clean, run.metric.item())
        with clock("atp"):
            atp = attribution_patching(bridge, task, star=True, base=base, run=run)
        del run, cache
        kinds = ("resid", "heads", "mlp") + (("heads_pos", "mlp_pos") if settings.per_position else ())
        select = None if settings.full_sweeps else top_k({k: atp["star_" + k] for k in kinds}, settings.verify_top)
        say(0.4, "activation patching")
        with clock("activation patching"):
            patch = activation_patching(bridge, task, kinds, lambda f, text: say(0.4 + 0.6 * f, text), base,
                                        select, should_stop)
        passes = {"full_forward": 2, "backward": 1 + L,
                  "patched_runs": sum(len(sweep_patches(bridge.cfg, T, k)[0]) if select is None else len(select[k])
                                      for k in kinds)}
        res = dict(patch_heads=_np(patch["heads"]), patch_resid=_np(patch["resid"]), patch_mlp=_np(patch["mlp"]),
                   atp_heads=_np(atp["heads"]), atpstar_heads=_np(atp["star_heads"]),
                   atp_resid=_np(atp["resid"]), atpstar_resid=_np(atp["star_resid"]), atp_mlp=_np(atp["mlp"]),
                   atpstar_mlp=_np(atp["star_mlp"]), metric_corrupt=base.corrupt_metric,
                   patching="full sweeps" if select is None else f"top-{settings.verify_top} by |AtP*|")
        if settings.per_position:
            res.update(patch_heads_pos=_np(patch["heads_pos"]), atp_heads_pos=_np(atp["heads_pos"]),
                       atpstar_heads_pos=_np(atp["star_heads_pos"]), patch_mlp_pos=_np(patch["mlp_pos"]),
                       atp_mlp_pos=_np(atp["mlp_pos"]), atpstar_mlp_pos=_np(atp["star_mlp_pos"]))
        res["agreement"] = agreements(res, settings.top_k, pooled=select is not None)
    say(1.0, "done")
    return ModelResults(
        spec=info.spec, ln_free=bool(info.ln_free), metric_clean=metric_clean, top_tokens=top_tokens,
        dla_heads=_np(d.heads.mean(0)), dla_mlp=_np(d.mlp.mean(0)),
        dla_other={k: float(v.mean()) for k, v in d.other.items()},
        de_heads=_np(d.de_heads.mean(0)), de_mlp=_np(d.de_mlp.mean(0)), dla_nmae=nmae(d.heads, d.de_heads),
        dla_nmae_mlp=nmae(d.mlp, d.de_mlp), dla_neurons=d.neurons, logit_lens=_np(d.logit_lens),
        str_tokens=_tok_str(tok, task.clean[0]), answer=tok.decode([int(task.answer[0])]),
        counterfactual="" if task.counterfactual is None else tok.decode([int(task.counterfactual[0])]),
        passes=passes, cost=clock.forward_equivalents(), **res)


def compare(ln: LoadedModel, lnfree: LoadedModel, settings: Settings, progress: Progress = None,
            should_stop: ShouldStop = None) -> PairResults:
    """`analyse` on both models with the same settings (same prompts when the tokenizers agree)."""
    def half(offset: float):
        return (lambda f, text: progress(offset + f / 2, text)) if progress else None

    return PairResults(settings, analyse(ln, settings, half(0.0), should_stop),
                       analyse(lnfree, settings, half(0.5), should_stop))


def attention_pattern(model: LoadedModel, settings: Settings, layer: int, head: int) -> tuple[np.ndarray, list[str]]:
    """One head's attention pattern [T, T] on the first clean prompt, and its token strings."""
    bridge = model.bridge
    cfg = bridge.cfg
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise AttributionInputError(
            f"Head L{layer}H{head} does not exist; the model has {cfg.n_layers} layers x {cfg.n_heads} heads.")
    task = tasks.build(bridge.tokenizer, settings, cfg.n_ctx)
    name = hooks.pattern(layer)
    with model.lock:
        _, acts = capture(bridge, task.clean[:1], [name])
    return _np(acts[name][0, head]), _tok_str(bridge.tokenizer, task.clean[0])
