"""One call per model (`analyse`) or per LN / LN-free pair (`compare`): every number the app,
the export CLI and the plots show, as numpy arrays in plain dataclasses."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

from attribution import hooks, tasks
from attribution.atp import attribution_patching
from attribution.dla import direct_attribution, nmae
from attribution.errors import AttributionInputError
from attribution.patching import activation_patching, capture

if TYPE_CHECKING:
    from models import LoadedModel

Progress = Callable[[float, str], None] | None


@dataclass(frozen=True)
class Settings:
    """What is computed (the cache key of a result); how it is shown (AtP or AtP*) is the plots' `method`."""

    task: str = "induction"          # "induction" | "ioi" | "custom"
    prompt: str = ""
    answer: str = ""
    counterfactual: str = ""
    corrupt: str = ""                # custom task; optional (no patching without it)
    n_prompts: int = 8               # induction / ioi batch size
    seq_len: int = 20                # induction: length of each random copy
    position: int = -1               # metric position (custom task only)
    top_k: int = 10                  # top-k recall k, top-k predictions, top-k neurons
    seed: int = 0
    per_position: bool = True        # also patch each head / MLP at each position (L*H*T runs)


@dataclass
class ModelResults:
    spec: str
    ln_free: bool
    metric_clean: float
    metric_corrupt: float
    top_tokens: list[tuple[str, float]]
    dla_heads: np.ndarray            # [L, H] mean over the batch
    dla_mlp: np.ndarray              # [L]
    dla_other: dict[str, float]      # embed, pos_embed, attn_biases, final_biases
    de_heads: np.ndarray             # [L, H]
    de_mlp: np.ndarray               # [L]
    dla_nmae: float                  # sum |DLA - DE| / sum |DE| over prompts x heads
    patch_heads: np.ndarray          # [L, H] normalised
    patch_resid: np.ndarray          # [L, T]
    patch_mlp: np.ndarray            # [L]
    atp_heads: np.ndarray
    atpstar_heads: np.ndarray
    atp_resid: np.ndarray            # [L, T]
    agreement: dict
    logit_lens: np.ndarray           # [L + 1]
    str_tokens: list[str]
    # Beyond the core contract:
    dla_nmae_mlp: float = math.nan
    dla_neurons: list[tuple[str, float]] = field(default_factory=list)
    atpstar_resid: np.ndarray | None = None      # [L, T]
    atp_mlp: np.ndarray | None = None            # [L]
    atpstar_mlp: np.ndarray | None = None        # [L]
    patch_heads_pos: np.ndarray | None = None    # [L, H, T]
    atp_heads_pos: np.ndarray | None = None
    atpstar_heads_pos: np.ndarray | None = None
    patch_mlp_pos: np.ndarray | None = None      # [L, T]
    atp_mlp_pos: np.ndarray | None = None
    answer: str = ""
    counterfactual: str = ""

    def to_dict(self) -> dict:
        out = {k: jsonable(v) for k, v in asdict(self).items()}
        for method in ("atp", "atpstar"):
            for key in ("pearson", "spearman", "topk_recall", "mae"):
                out[f"{method}_{key}"] = jsonable(self.agreement.get(method, {}).get(key, math.nan))
        return out


@dataclass
class PairResults:
    settings: Settings
    ln: ModelResults
    lnfree: ModelResults

    def to_json(self) -> dict:
        return {"ln": self.ln.to_dict(), "lnfree": self.lnfree.to_dict(), "settings": asdict(self.settings)}


def jsonable(v):
    """`v` with numpy arrays as lists and every non-finite float as None (strict JSON has no NaN)."""
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, float | np.floating):
        return None if not math.isfinite(float(v)) else float(v)
    return v


def agreement(estimate: np.ndarray, truth: np.ndarray, k: int = 10) -> dict[str, float]:
    """Pearson, Spearman, top-k recall (of the k largest |truth| among the k largest |estimate|), MAE."""
    e, t = np.asarray(estimate, float).ravel(), np.asarray(truth, float).ravel()
    ok = np.isfinite(e) & np.isfinite(t)
    e, t = e[ok], t[ok]
    nan = {"pearson": math.nan, "spearman": math.nan, "topk_recall": math.nan, "mae": math.nan}
    if len(e) == 0:
        return nan
    k = min(k, len(e))
    top_e, top_t = set(np.argsort(-np.abs(e))[:k]), set(np.argsort(-np.abs(t))[:k])
    out = {"topk_recall": len(top_e & top_t) / k, "mae": float(np.abs(e - t).mean())}
    if len(e) < 2 or e.std() == 0 or t.std() == 0:
        return dict(out, pearson=math.nan, spearman=math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["pearson"] = float(stats.pearsonr(e, t)[0])
        out["spearman"] = float(stats.spearmanr(e, t)[0])
    return out


def _tok_str(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def analyse(model: LoadedModel, settings: Settings, progress: Progress = None) -> ModelResults:
    """Every result for one model on the task that `settings` describes."""
    bridge, info = model.bridge, model.info
    def say(f: float, text: str) -> None:
        if progress:
            progress(min(1.0, max(0.0, f)), text)

    tok = bridge.tokenizer
    task = tasks.build(tok, settings, bridge.cfg.n_ctx)
    L, H, T = bridge.cfg.n_layers, bridge.cfg.n_heads, task.clean.shape[1]
    say(0.0, f"{info.spec}: forward pass")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(task.clean)
    probs = logits[0, task.position].float().softmax(-1)
    top = probs.topk(min(settings.top_k, probs.numel()))
    top_tokens = [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    d = direct_attribution(bridge, cache, task, settings.top_k)
    del cache
    metric_clean = float(task.metric(logits).mean())
    nan = math.nan
    res = dict(patch_heads=np.full((L, H), nan), patch_resid=np.full((L, T), nan), patch_mlp=np.full(L, nan),
               atp_heads=np.full((L, H), nan), atpstar_heads=np.full((L, H), nan),
               atp_resid=np.full((L, T), nan), atpstar_resid=np.full((L, T), nan), atp_mlp=np.full(L, nan),
               atpstar_mlp=np.full(L, nan), agreement={}, metric_corrupt=nan)
    if task.corrupt is not None:
        kinds = ("resid", "heads", "mlp") + (("heads_pos", "mlp_pos") if settings.per_position else ())
        say(0.1, f"{info.spec}: activation patching")
        patch = activation_patching(bridge, task, kinds,
                                    lambda f, text: say(0.1 + 0.7 * f, f"{info.spec}: {text}"))
        say(0.8, f"{info.spec}: attribution patching")
        atp = attribution_patching(bridge, task, star=True)
        with torch.no_grad():
            metric_corrupt = float(task.metric(bridge(task.corrupt)).mean())
        res = dict(patch_heads=_np(patch["heads"]), patch_resid=_np(patch["resid"]), patch_mlp=_np(patch["mlp"]),
                   atp_heads=_np(atp["heads"]), atpstar_heads=_np(atp["star_heads"]),
                   atp_resid=_np(atp["resid"]), atpstar_resid=_np(atp["star_resid"]), atp_mlp=_np(atp["mlp"]),
                   atpstar_mlp=_np(atp["star_mlp"]), metric_corrupt=metric_corrupt)
        if settings.per_position:
            res.update(patch_heads_pos=_np(patch["heads_pos"]), atp_heads_pos=_np(atp["heads_pos"]),
                       atpstar_heads_pos=_np(atp["star_heads_pos"]), patch_mlp_pos=_np(patch["mlp_pos"]),
                       atp_mlp_pos=_np(atp["mlp_pos"]))
        res["agreement"] = _agreements(res, settings.top_k)
    say(1.0, f"{info.spec}: done")
    return ModelResults(
        spec=info.spec, ln_free=bool(info.ln_free), metric_clean=metric_clean, top_tokens=top_tokens,
        dla_heads=_np(d.heads.mean(0)), dla_mlp=_np(d.mlp.mean(0)),
        dla_other={k: float(v.mean()) for k, v in d.other.items()},
        de_heads=_np(d.de_heads.mean(0)), de_mlp=_np(d.de_mlp.mean(0)), dla_nmae=nmae(d.heads, d.de_heads),
        dla_nmae_mlp=nmae(d.mlp, d.de_mlp), dla_neurons=d.neurons, logit_lens=_np(d.logit_lens),
        str_tokens=_tok_str(tok, task.clean[0]), answer=tok.decode([int(task.answer[0])]),
        counterfactual="" if task.counterfactual is None else tok.decode([int(task.counterfactual[0])]),
        **res)


def _agreements(r: dict, k: int) -> dict:
    """{"atp": heads, "atpstar": heads, "by_component": {component: {"atp": ..., "atpstar": ...}}}."""
    by = {
        "heads": {"atp": agreement(r["atp_heads"], r["patch_heads"], k),
                  "atpstar": agreement(r["atpstar_heads"], r["patch_heads"], k)},
        "resid": {"atp": agreement(r["atp_resid"], r["patch_resid"], k),
                  "atpstar": agreement(r["atpstar_resid"], r["patch_resid"], k)},
        "mlp": {"atp": agreement(r["atp_mlp"], r["patch_mlp"], k),
                "atpstar": agreement(r["atpstar_mlp"], r["patch_mlp"], k)},
    }
    if "patch_heads_pos" in r:
        by["heads_pos"] = {"atp": agreement(r["atp_heads_pos"], r["patch_heads_pos"], k),
                           "atpstar": agreement(r["atpstar_heads_pos"], r["patch_heads_pos"], k)}
        by["mlp_pos"] = {"atp": agreement(r["atp_mlp_pos"], r["patch_mlp_pos"], k)}
    return {"atp": by["heads"]["atp"], "atpstar": by["heads"]["atpstar"], "by_component": by}


def compare(ln: LoadedModel, lnfree: LoadedModel, settings: Settings, progress: Progress = None) -> PairResults:
    """`analyse` on both models with the same settings (same prompts when the tokenizers agree)."""
    def half(offset: float):
        return (lambda f, text: progress(offset + f / 2, text)) if progress else None

    return PairResults(settings, analyse(ln, settings, half(0.0)), analyse(lnfree, settings, half(0.5)))


def attention_pattern(model: LoadedModel, settings: Settings, layer: int, head: int) -> tuple[np.ndarray, list[str]]:
    """One head's attention pattern [T, T] on the first clean prompt, and its token strings."""
    bridge = model.bridge
    cfg = bridge.cfg
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise AttributionInputError(
            f"Head L{layer}H{head} does not exist; the model has {cfg.n_layers} layers x {cfg.n_heads} heads.")
    task = tasks.build(bridge.tokenizer, settings, cfg.n_ctx)
    name = hooks.pattern(layer)
    _, acts = capture(bridge, task.clean[:1], [name])
    return _np(acts[name][0, head]), _tok_str(bridge.tokenizer, task.clean[0])
