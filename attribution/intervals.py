"""Bootstrap intervals over prompts for every agreement number of an analysis.

Each agreement number (AtP and AtP* against activation patching, DLA against the true direct effect, the
LN model's attributions against the LN-free twin's) is a statistic of a batch of prompts.  Resampling the
prompts with replacement and recomputing the statistic from each prompt's own values
(ModelResults.per_prompt) gives its percentile bootstrap interval.  A resample is a row of weights (each
prompt's count over the batch size), so the batch estimates of every resample are one matrix product; the
normaliser (clean minus corrupted metric) and AtP*'s GradDrop are recomputed per resample, as the analysis
computes them for the batch.  Both models of a pair get the same resamples, so LN-free minus LN has a
paired interval.
"""

from __future__ import annotations

import math

import numpy as np

from attribution.results import ModelResults, PairResults
from attribution.twins import QUANTITIES

N_BOOT = 1000
LEVEL = 0.95
KINDS = ("heads", "resid", "mlp", "heads_pos", "mlp_pos")
METHODS = {"atp": "AtP", "atpstar": "AtP*"}
STATISTICS = ("pearson", "spearman", "topk_recall")
METHOD_NOTE = "percentile bootstrap over prompts (both models resampled alike)"


def resample_weights(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_prompts]: each row a resample with replacement, as each prompt's count / n_prompts."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=n_boot) / n_prompts


def _mean(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Weighted means over prompts: w [R, B], x [B, ...] -> [R, ...]."""
    return np.tensordot(w, x, axes=(1, 0))


def estimates(pp: dict[str, np.ndarray], w: np.ndarray) -> dict[str, np.ndarray]:
    """Every batch quantity of one model at each resample w [R, B], as report.Analysis computes it for the
    batch: dla_heads / de_heads / dla_mlp means, and atp_, atpstar_, patch_<kind> normalised by the
    resample's own clean minus corrupted metric."""
    out = {k: _mean(w, pp[k]) for k in ("dla_heads", "de_heads", "dla_mlp", "de_mlp") if k in pp}
    if "corrupt" not in pp or "atp_heads" not in pp:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = _mean(w, pp["clean"]) - _mean(w, pp["corrupt"])                 # [R]

        def per(x):
            return x / norm.reshape((-1,) + (1,) * (x.ndim - 1))

        for kind in KINDS:
            if "atp_" + kind not in pp:
                continue
            out["atp_" + kind] = per(_mean(w, pp["atp_" + kind]))
            sign = np.sign(_mean(w, pp["atp_qk_resid" if kind == "resid" else "atp_" + kind]))
            drops = pp["atp_sets_" + kind]                                      # [L, B, ...]
            out["atpstar_" + kind] = per(sign * sum(np.abs(_mean(w, d)) for d in drops) / len(drops))
            if "patch_" + kind in pp:
                out["patch_" + kind] = per(_mean(w, pp["patch_" + kind]))
    return out


def _flat(x: np.ndarray, R: int) -> np.ndarray:
    return x.reshape(R, -1)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of [R, n] arrays (NaN where a row is constant)."""
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (xc * yc).sum(1) / np.sqrt((xc**2).sum(1) * (yc**2).sum(1))


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy import stats  # on first use: its 0.5 s import need not delay the app's first numbers
    return _pearson(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1))


def _top_overlap(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Row-wise share of the k entries largest in |x| that are among the k largest in |y|."""
    def top(a):
        mask = np.zeros(a.shape, bool)
        np.put_along_axis(mask, np.argsort(-np.abs(a), axis=1, kind="stable")[:, :k], True, axis=1)
        return mask
    return (top(x) & top(y)).sum(1) / k


def _compare(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Pearson, Spearman and top-k overlap of each row pair over the columns finite in every row."""
    R = x.shape[0]
    x, y = _flat(x, R), _flat(y, R)
    ok = np.isfinite(x).all(0) & np.isfinite(y).all(0)
    x, y = x[:, ok], y[:, ok]
    n = x.shape[1]
    if n == 0:
        return {s: np.full(R, math.nan) for s in STATISTICS}
    k = min(k, n)
    if n < 2:
        return {"pearson": np.full(R, math.nan), "spearman": np.full(R, math.nan), "topk_recall": _top_overlap(x, y, k)}
    return {"pearson": _pearson(x, y), "spearman": _spearman(x, y), "topk_recall": _top_overlap(x, y, k)}


def model_statistics(m: ModelResults, w: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The model's agreement numbers at each resample w [R, B] ([R] each): DLA's NMAE against the direct
    effect, and AtP's and AtP*'s Pearson / Spearman / top-k recall against activation patching, over what
    the analysis's own agreement is over (every head, or every patched component)."""
    pp, R = m.per_prompt, w.shape[0]
    out = {}
    if "dla_heads" in pp:
        err = np.abs(pp["dla_heads"] - pp["de_heads"]).reshape(len(pp["dla_heads"]), -1).sum(1)
        size = np.abs(pp["de_heads"]).reshape(len(pp["de_heads"]), -1).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["dla_nmae"] = (w @ err) / (w @ size)
    e = estimates(pp, w)
    kinds = [kind for kind in KINDS if "patch_" + kind in e]
    if not kinds:
        return out
    pooled = m.agreement.get("over") == "patched components"
    over = kinds if pooled else ["heads"]
    truth = np.concatenate([_flat(e["patch_" + kind], R) for kind in over], axis=1)
    for method in METHODS:
        est = np.concatenate([_flat(e[f"{method}_{kind}"], R) for kind in over], axis=1)
        for name, values in _compare(est, truth, k).items():
            out[f"{method}_{name}"] = values
    return out


def twin_statistics(pair: PairResults, w: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Spearman and top-k overlap of LN against LN-free at each resample, for every paired quantity."""
    a, b = estimates(pair.ln.per_prompt, w), estimates(pair.lnfree.per_prompt, w)
    out = {}
    for name in QUANTITIES:
        if name in a and name in b and a[name].shape == b[name].shape and np.isfinite(a[name]).any():
            both = _compare(a[name], b[name], pair.settings.top_k)
            out[name] = {"spearman": both["spearman"], "topk_overlap": both["topk_recall"]}
    return out


def interval(sample: float, values: np.ndarray, level: float = LEVEL) -> dict:
    """The sample's value and the percentile interval of its resampled values (NaN resamples left out:
    `resamples` says how many were used)."""
    ok = values[np.isfinite(values)]
    lo, hi = (np.percentile(ok, [50 * (1 - level), 50 * (1 + level)]) if len(ok) else (math.nan, math.nan))
    return {"value": float(sample), "low": float(lo), "high": float(hi), "resamples": int(len(ok))}


def pair_intervals(pair: PairResults, n_boot: int = N_BOOT, level: float = LEVEL, seed: int | None = None) -> dict:
    """Bootstrap intervals for every agreement number of the pair: each model's (model_statistics), LN
    against LN-free per quantity (twin_statistics), and LN-free minus LN of each model's.  The value of
    each is the whole batch's (the analysis's own number).  A batch of one prompt has none."""
    B = len(pair.ln.per_prompt.get("clean", ()))
    head = {"method": METHOD_NOTE, "level": level, "n_boot": n_boot, "n_prompts": B}
    if B < 2 or len(pair.lnfree.per_prompt.get("clean", ())) != B:
        return dict(head, note="one prompt: no interval over prompts" if B < 2 else
                    "the two models have different numbers of prompts: no paired intervals")
    seed = pair.settings.seed if seed is None else seed
    w = np.concatenate([np.full((1, B), 1 / B), resample_weights(B, n_boot, seed)])  # row 0: the batch itself
    k = pair.settings.top_k
    ln, lnfree = model_statistics(pair.ln, w, k), model_statistics(pair.lnfree, w, k)

    def iv(values):
        return interval(values[0], values[1:], level)

    out = dict(head, ln={s: iv(v) for s, v in ln.items()}, lnfree={s: iv(v) for s, v in lnfree.items()},
               lnfree_minus_ln={s: iv(lnfree[s] - ln[s]) for s in ln if s in lnfree})
    out["twins"] = {name: {s: iv(v) for s, v in d.items()} for name, d in twin_statistics(pair, w).items()}
    return out


STAT_NAMES = {"pearson": "Pearson", "spearman": "Spearman", "topk_recall": "top-k recall"}
STAT_LABELS = {"dla_nmae": "DLA NMAE vs direct effect",
               **{f"{m}_{s}": f"{label} {STAT_NAMES[s]}" for m, label in METHODS.items() for s in STATISTICS}}


def interval_rows(intervals: dict) -> list[dict]:
    """One row per agreement number: each model's value and interval, and LN-free minus LN's."""
    rows = []
    for stat, label in STAT_LABELS.items():
        if stat not in intervals.get("ln", {}):
            continue
        row = {"statistic": label}
        for col, side in (("LN", "ln"), ("LN-free", "lnfree"), ("LN-free minus LN", "lnfree_minus_ln")):
            v = intervals[side].get(stat) or {}
            row.update({col: v.get("value"), f"{col} low": v.get("low"), f"{col} high": v.get("high")})
        rows.append(row)
    return rows
