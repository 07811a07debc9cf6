"""The results of an analysis, as numpy arrays in plain dataclasses, and how they are compared:
Settings (what is computed: a result's cache key), ModelResults, PairResults, agreement statistics."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property

import numpy as np


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
    per_position: bool = True        # also patch / verify each head and MLP at each position
    verify_top: int = 20             # patching checks the components with the largest |AtP*| ...
    full_sweeps: bool = False        # ... unless every component is patched (L*H (*T) runs per sweep)


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
    atpstar_mlp_pos: np.ndarray | None = None
    answer: str = ""
    counterfactual: str = ""
    patching: str = ""               # "full sweeps" or "top-k by |AtP*|": which components were patched
    passes: dict = field(default_factory=dict)  # full forward passes, backward passes, patched runs
    cost: dict = field(default_factory=dict)    # each stage's wall time in forward-pass equivalents
    stage: str = "verification"      # the last stage done (report.STAGES): later stages' arrays are NaN
    sigmas: dict | None = None       # LN-free: each LN's frozen sigma, by TransformerLens name
    sigma_source: str | None = None  # "stored" (recorded in the checkpoint) or "implied" (mean |gamma| = 1)
    attention: np.ndarray | None = field(default=None, repr=False)  # [L, H, T, T] first prompt; not exported
    # Each prompt's own values, batch first (unnormalised; report.Analysis names them): what the bootstrap
    # intervals (attribution.intervals) resample.  Exported: the two metrics only.
    per_prompt: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = {f.name: jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in ("attention", "per_prompt")}
        out["metric_per_prompt"] = {k: jsonable(self.per_prompt[k]) for k in ("clean", "corrupt")
                                    if k in self.per_prompt}
        for method in ("atp", "atpstar"):
            for key in ("pearson", "spearman", "topk_recall", "mae"):
                out[f"{method}_{key}"] = jsonable(self.agreement.get(method, {}).get(key, math.nan))
        return out


@dataclass
class PairResults:
    settings: Settings
    ln: ModelResults
    lnfree: ModelResults

    @cached_property
    def intervals(self) -> dict:
        """Bootstrap intervals over prompts of every agreement number (attribution.intervals), once per result."""
        from attribution.intervals import pair_intervals

        return pair_intervals(self)

    def to_json(self) -> dict:
        from attribution.twins import twins_json

        return {"ln": self.ln.to_dict(), "lnfree": self.lnfree.to_dict(), "settings": asdict(self.settings),
                "twins": twins_json(self), "intervals": self.intervals}


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
    from scipy import stats  # on first use: its 0.5 s import need not delay the app's first numbers
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


def agreements(r: dict, k: int, pooled: bool = False) -> dict:
    """{"atp": ..., "atpstar": ..., "over": what they are over, "by_component": {component: {"atp": ...,
    "atpstar": ...}}}: over every head with full sweeps; with AtP-guided verification (`pooled`), over
    the patched components of every kind together (the few of each kind alone say little)."""
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
        by["mlp_pos"] = {"atp": agreement(r["atp_mlp_pos"], r["patch_mlp_pos"], k),
                         "atpstar": agreement(r["atpstar_mlp_pos"], r["patch_mlp_pos"], k)}
    if not pooled:
        return {"atp": by["heads"]["atp"], "atpstar": by["heads"]["atpstar"], "over": "heads", "by_component": by}
    kinds = [kind for kind in ("heads", "resid", "mlp", "heads_pos", "mlp_pos") if f"patch_{kind}" in r]
    truth = np.concatenate([np.ravel(r[f"patch_{kind}"]) for kind in kinds])
    return {"atp": agreement(np.concatenate([np.ravel(r[f"atp_{kind}"]) for kind in kinds]), truth, k),
            "atpstar": agreement(np.concatenate([np.ravel(r[f"atpstar_{kind}"]) for kind in kinds]), truth, k),
            "over": "patched components", "by_component": by}
