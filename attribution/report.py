"""One call per model (`analyse`) or per LN / LN-free pair (`compare`): every number the app, the export
CLI and the plots show (attribution.results).

An analysis makes one clean forward pass (cached: the predictions, the metric and DLA / DE read from
it), one corrupted forward pass with gradients and its backward passes (AtP, AtP*), and activation
patching that starts from those two passes: by default it checks the components AtP* ranks highest.
Those are its three stages (`Analysis`, `PairAnalysis`), callable one at a time so that the app can
show each stage's numbers while the next one runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from attribution import hooks, tasks
from attribution.atp import attribution_patching, corrupted_run, grad_names
from attribution.dla import direct_attribution, nmae
from attribution.errors import AnalysisCancelled, AttributionInputError
from attribution.patching import Baseline, activation_patching, capture, sweep_patches, top_k
from attribution.results import ModelResults, PairResults, Settings, agreements
from models import check_pair

if TYPE_CHECKING:
    from models import LoadedModel

Progress = Callable[[float, str], None] | None
ShouldStop = Callable[[], bool] | None
MEMORY_SHARE = 0.5  # share of free memory one analysis may plan to use
MAX_PATTERN_ELEMENTS = 2**23  # first-prompt attention patterns kept up to 32 MiB (float32): the app keeps 8 views


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
    autograd graph and gradients (model dtype), the attention-pattern gradients that AtP*'s GradDrop keeps
    for the QK fix (the full set's, and for each dropped layer l those of layers <= l: 1 + (L + 1) / 2 sets
    a layer on average), AtP*'s float64 differences and q / k tangents, and the QK fix's pattern chunk."""
    c, (B, T) = bridge.cfg, task.clean.shape
    pattern_grad_sets = 1 + (c.n_layers + 2) // 2
    per_position_layer = (26 * c.d_model + 6 * c.d_mlp + (6 + pattern_grad_sets) * c.n_heads * T) \
        * bridge.W_U.element_size() + 10 * c.d_model * 8
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


STAGES = ("numbers", "attribution", "verification")
STAGE_WEIGHT = {"numbers": 0.1, "attribution": 0.3, "verification": 0.6}  # share of a whole run, for progress
STAGE_TEXT = {"numbers": "predictions, metric and DLA", "attribution": "attribution patching (AtP, AtP*)",
              "verification": "activation patching"}


def analyse(model: LoadedModel, settings: Settings, progress: Progress = None,
            should_stop: ShouldStop = None) -> ModelResults:
    """Every result for one model on the task that `settings` describes (all stages of an Analysis)."""
    analysis = Analysis(model, settings)
    for stage in STAGES:
        analysis.run(stage, progress and _within(progress, _stage_start(stage), STAGE_WEIGHT[stage]), should_stop)
    return analysis.results


def _stage_start(stage: str) -> float:
    return sum(STAGE_WEIGHT[s] for s in STAGES[:STAGES.index(stage)])


def _within(progress, offset: float, share: float):
    """`progress` for a part of a run that starts at `offset` and is `share` of it."""
    return lambda f, text: progress(offset + share * f, text)


class Analysis:
    """One model's analysis in three stages, each its own call, so that a caller can show one stage's
    numbers while the next one runs:

    - "numbers": one clean forward pass: predictions, the metric, DLA and DE, the logit lens;
    - "attribution": the corrupted pass with gradients and its backward passes: AtP and AtP*;
    - "verification": activation patching from those two passes (the components AtP* ranks highest,
      or full sweeps).

    The task is built and its memory checked when the Analysis is made, so bad input fails before
    any pass.  Each pass holds the model's lock (no other thread's pass sees its hooks): the first two
    stages hold it throughout, verification pass by pass.  `results` is the ModelResults so far (`stage` names the last one
    done); a cancelled verification can be run again and reuses the first two stages.
    """

    def __init__(self, model: LoadedModel, settings: Settings):
        self.model, self.settings = model, settings
        self.task = tasks.build(model.bridge.tokenizer, settings, model.bridge.cfg.n_ctx)
        check_memory(model.bridge, self.task)
        self.clock = Clock()
        self.results: ModelResults | None = None
        self._cache = self._base = self._atp = None

    @property
    def done(self) -> list[str]:
        return [] if self.results is None else list(STAGES[:STAGES.index(self.results.stage) + 1])

    def run(self, stage: str, progress: Progress = None, should_stop: ShouldStop = None) -> ModelResults:
        """Run `stage` (the earlier ones first if they have not run); a stage already done is not rerun."""
        for earlier in STAGES[:STAGES.index(stage) + 1]:
            if earlier in self.done:
                continue
            def say(f: float, text: str) -> None:
                if progress:
                    progress(min(1.0, max(0.0, f)), f"{self.model.spec}: {text}")
            if should_stop is not None and should_stop():
                raise AnalysisCancelled(f"{STAGE_TEXT[earlier]}: cancelled")
            say(0.0, STAGE_TEXT[earlier])
            # Verification takes the lock pass by pass (it is the long stage); the others, whole.
            with nullcontext() if earlier == "verification" else self.model.lock:
                new = getattr(self, "_" + earlier)(say, should_stop)
            new["cost"] = self.clock.forward_equivalents()
            self.results = dataclasses.replace(self.results, **new) if self.results else ModelResults(**new)
            say(1.0, STAGE_TEXT[earlier] + ": done")
        return self.results

    def _numbers(self, say, should_stop) -> dict:
        bridge, task, tok, clock = self.model.bridge, self.task, self.model.bridge.tokenizer, self.clock
        L, H, T = bridge.cfg.n_layers, bridge.cfg.n_heads, task.clean.shape[1]
        clean_names = sorted(set(dla_names(L) + (grad_names(L, True) if task.corrupt is not None else [])))
        keep = T * T * L * H <= MAX_PATTERN_ELEMENTS
        patterns: dict[str, torch.Tensor] = {}

        def first_prompt(x, hook):  # the attention view reads these, so a head switch runs no pass
            patterns[hook.name] = x[0].detach().float().cpu()

        with torch.no_grad(), clock("clean forward"), \
                bridge.hooks(fwd_hooks=[(hooks.pattern(i), first_prompt) for i in range(L)] if keep else []):
            logits, cache = bridge.run_with_cache(task.clean, names_filter=clean_names)
        probs = logits[0, task.position].double().softmax(-1)
        top = probs.topk(min(self.settings.top_k, probs.numel()))
        del logits
        with clock("dla"):
            d = direct_attribution(bridge, cache, task, self.settings.top_k)
        if task.corrupt is not None:  # what the later stages patch in
            self._cache = {n: cache[n] for n in grad_names(L, True)}
        nan = math.nan
        return dict(
            spec=self.model.info.spec, ln_free=bool(self.model.info.ln_free), stage="numbers",
            sigmas=self.model.info.sigmas, sigma_source=self.model.info.sigma_source,
            metric_clean=float(d.metric.mean()), metric_corrupt=nan,
            top_tokens=[(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)],
            dla_heads=_np(d.heads.mean(0)), dla_mlp=_np(d.mlp.mean(0)),
            dla_other={k: float(v.mean()) for k, v in d.other.items()},
            de_heads=_np(d.de_heads.mean(0)), de_mlp=_np(d.de_mlp.mean(0)), dla_nmae=nmae(d.heads, d.de_heads),
            dla_nmae_mlp=nmae(d.mlp, d.de_mlp), dla_neurons=d.neurons, logit_lens=_np(d.logit_lens),
            str_tokens=_tok_str(tok, task.clean[0]), answer=tok.decode([int(task.answer[0])]),
            counterfactual="" if task.counterfactual is None else tok.decode([int(task.counterfactual[0])]),
            attention=np.stack([patterns[hooks.pattern(i)].numpy() for i in range(L)]) if keep else None,
            patch_heads=np.full((L, H), nan), patch_resid=np.full((L, T), nan), patch_mlp=np.full(L, nan),
            atp_heads=np.full((L, H), nan), atpstar_heads=np.full((L, H), nan),
            atp_resid=np.full((L, T), nan), atpstar_resid=np.full((L, T), nan), atp_mlp=np.full(L, nan),
            atpstar_mlp=np.full(L, nan), agreement={},
            passes={"full_forward": 1, "backward": 0, "patched_runs": 0},
            per_prompt={"clean": _np(d.metric), "dla_heads": _np(d.heads), "de_heads": _np(d.de_heads),
                        "dla_mlp": _np(d.mlp), "de_mlp": _np(d.de_mlp)})

    def _attribution(self, say, should_stop) -> dict:
        bridge, task, L = self.model.bridge, self.task, self.model.bridge.cfg.n_layers
        if task.corrupt is None:  # nothing to attribute without a corrupted prompt
            return {"stage": "attribution"}
        with self.clock("corrupted forward"):
            run = corrupted_run(bridge, task, star=True)
        self._base = Baseline(self._cache, [run.acts[hooks.resid_pre(i)].detach() for i in range(L)],
                              self.results.metric_clean, run.metric.item(), run.per_prompt)
        self._cache = None
        per_prompt = {}
        with self.clock("atp"):
            atp = attribution_patching(bridge, task, star=True, base=self._base, run=run, per_prompt=per_prompt)
        # Per-position values only where the analysis reports them (GradDrop's are L x the heads' at xl scale).
        per_prompt = {"corrupt": _np(run.per_prompt), **{"atp_" + k: v for k, v in per_prompt.items()
                                                         if self.settings.per_position or "_pos" not in k}}
        del run
        self._atp = atp
        out = dict(stage="attribution", metric_corrupt=self._base.corrupt_metric,
                   per_prompt={**self.results.per_prompt, **per_prompt},
                   atp_heads=_np(atp["heads"]), atpstar_heads=_np(atp["star_heads"]), atp_resid=_np(atp["resid"]),
                   atpstar_resid=_np(atp["star_resid"]), atp_mlp=_np(atp["mlp"]), atpstar_mlp=_np(atp["star_mlp"]),
                   passes={"full_forward": 2, "backward": 1 + L, "patched_runs": 0})
        if self.settings.per_position:
            T = task.clean.shape[1]
            out.update(atp_heads_pos=_np(atp["heads_pos"]), atpstar_heads_pos=_np(atp["star_heads_pos"]),
                       atp_mlp_pos=_np(atp["mlp_pos"]), atpstar_mlp_pos=_np(atp["star_mlp_pos"]),
                       patch_heads_pos=np.full((L, bridge.cfg.n_heads, T), math.nan),
                       patch_mlp_pos=np.full((L, T), math.nan))
        return out

    def _verification(self, say, should_stop) -> dict:
        bridge, task, settings, atp = self.model.bridge, self.task, self.settings, self._atp
        if task.corrupt is None:
            return {"stage": "verification"}
        T = task.clean.shape[1]
        kinds = ("resid", "heads", "mlp") + (("heads_pos", "mlp_pos") if settings.per_position else ())
        select = None if settings.full_sweeps else top_k({k: atp["star_" + k] for k in kinds}, settings.verify_top)
        per_prompt = {}
        with self.clock("activation patching"):
            patch = activation_patching(bridge, task, kinds, say, self._base, select, should_stop, self.model.lock,
                                        per_prompt)
        self._base = self._atp = None  # what only this stage needed
        r = self.results
        out = dict(stage="verification", patch_heads=_np(patch["heads"]), patch_resid=_np(patch["resid"]),
                   per_prompt={**r.per_prompt, **{"patch_" + k: v for k, v in per_prompt.items()}},
                   patch_mlp=_np(patch["mlp"]),
                   patching="full sweeps" if select is None else f"top-{settings.verify_top} by |AtP*|",
                   passes=dict(r.passes, patched_runs=sum(
                       len(sweep_patches(bridge.cfg, T, k)[0]) if select is None else len(select[k]) for k in kinds)))
        if settings.per_position:
            out.update(patch_heads_pos=_np(patch["heads_pos"]), patch_mlp_pos=_np(patch["mlp_pos"]))
        arrays = {k: v for k, v in vars(r).items() if isinstance(v, np.ndarray)}
        out["agreement"] = agreements({**arrays, **out}, settings.top_k, pooled=select is not None)
        return out


class PairAnalysis:
    """An Analysis of each model of a pair with the same settings (same prompts when the tokenizers
    agree), run stage by stage: both models' numbers, then both models' attribution, then verification.
    `results` is the pair as of the last stage both models have done (never one model ahead)."""

    def __init__(self, ln: LoadedModel, lnfree: LoadedModel, settings: Settings):
        check_pair(ln.info, lnfree.info)  # an LN model and its LN-free twin, or one sentence
        self.settings = settings
        self.sides = (Analysis(ln, settings), Analysis(lnfree, settings))
        self._done: dict[str, PairResults] = {}

    @property
    def stage(self) -> str | None:
        return next(reversed(self._done), None)

    @property
    def results(self) -> PairResults | None:
        return self._done.get(self.stage)

    def run(self, stage: str, progress: Progress = None, should_stop: ShouldStop = None) -> PairResults:
        """Run `stage` on both models (the earlier stages first); `progress` gets the share of a whole run."""
        for earlier in STAGES[:STAGES.index(stage) + 1]:
            share = STAGE_WEIGHT[earlier] / 2
            for side, analysis in enumerate(self.sides):
                part = progress and _within(progress, _stage_start(earlier) + share * side, share)
                analysis.run(earlier, part, should_stop)
            if earlier not in self._done:
                self._done[earlier] = PairResults(self.settings, *(a.results for a in self.sides))
        return self.results


def compare(ln: LoadedModel, lnfree: LoadedModel, settings: Settings, progress: Progress = None,
            should_stop: ShouldStop = None) -> PairResults:
    """Every result for both models of a pair (all stages of a PairAnalysis)."""
    return PairAnalysis(ln, lnfree, settings).run(STAGES[-1], progress, should_stop)


def attention_pattern(model: LoadedModel, settings: Settings, layer: int, head: int,
                      results: ModelResults | None = None) -> tuple[np.ndarray, list[str]]:
    """One head's attention pattern [T, T] on the first clean prompt, and its token strings: read from
    `results` when the analysis kept the patterns, else from one pass of that prompt."""
    bridge = model.bridge
    cfg = bridge.cfg
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise AttributionInputError(
            f"Head L{layer}H{head} does not exist; the model has {cfg.n_layers} layers x {cfg.n_heads} heads.")
    if results is not None and results.attention is not None:
        return results.attention[layer, head].astype(np.float64), results.str_tokens
    task = tasks.build(bridge.tokenizer, settings, cfg.n_ctx)
    name = hooks.pattern(layer)
    with model.lock:
        _, acts = capture(bridge, task.clean[:1], [name])
    return _np(acts[name][0, head]), _tok_str(bridge.tokenizer, task.clean[0])
