"""Where the two twins differ: LN-free minus LN for every paired quantity, how well the two models' rankings
of components agree (Spearman, top-k overlap), and the components whose attribution moves most.

A quantity is paired when both models have it with the same shape (per-position quantities need the same
prompts, i.e. the same tokenizer); NaN entries (components activation patching did not run) are left out
of every statistic.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from attribution.results import ModelResults, PairResults

# Result field -> (what it is, its component axes).
QUANTITIES = {
    "dla_heads": ("DLA per head", "heads"),
    "de_heads": ("true direct effect per head", "heads"),
    "patch_heads": ("activation patching per head", "heads"),
    "atp_heads": ("AtP per head", "heads"),
    "atpstar_heads": ("AtP* per head", "heads"),
    "patch_resid": ("activation patching of resid_pre", "resid"),
    "atp_resid": ("AtP of resid_pre", "resid"),
    "atpstar_resid": ("AtP* of resid_pre", "resid"),
    "dla_mlp": ("DLA per MLP", "mlp"),
    "patch_mlp": ("activation patching per MLP", "mlp"),
}


def paired(pair: PairResults, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Both models' arrays of `name`, or None when one lacks it or their shapes differ."""
    a, b = getattr(pair.ln, name, None), getattr(pair.lnfree, name, None)
    if a is None or b is None:
        return None
    a, b = np.asarray(a, float), np.asarray(b, float)
    return (a, b) if a.shape == b.shape else None


def difference(pair: PairResults, name: str) -> np.ndarray | None:
    """LN-free minus LN of `name` (NaN where either is NaN), or None when the two are not paired."""
    both = paired(pair, name)
    return None if both is None else both[1] - both[0]


def ranking_agreement(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """How alike two models' attributions over the same components are: Spearman and Pearson correlation,
    and the top-k overlap (the share of the k components largest in |a| that are among the k largest in
    |b|), over the components finite in both."""
    from scipy import stats  # on first use: its 0.5 s import need not delay the app's first numbers
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n, k = len(a), min(k, len(a))
    out = {"n": n, "k": k, "spearman": math.nan, "pearson": math.nan,
           "topk_overlap": math.nan if k == 0 else
           len(set(np.argsort(-np.abs(a), kind="stable")[:k]) & set(np.argsort(-np.abs(b), kind="stable")[:k])) / k}
    if n >= 2 and a.std() > 0 and b.std() > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["spearman"] = float(stats.spearmanr(a, b)[0])
            out["pearson"] = float(stats.pearsonr(a, b)[0])
    return out


def twin_agreement(pair: PairResults) -> dict[str, dict]:
    """ranking_agreement of LN against LN-free for every paired quantity with finite values."""
    out = {}
    for name in QUANTITIES:
        both = paired(pair, name)
        if both is not None and np.isfinite(both[0]).any():
            out[name] = ranking_agreement(*both, pair.settings.top_k)
    return out


def component_labels(m: ModelResults, name: str) -> list[str]:
    """A label per entry of `name`'s array, in ravel order: L1H2, L1 @3 ' the', L1 MLP."""
    kind = QUANTITIES[name][1]
    arr = np.asarray(getattr(m, name))
    if kind == "heads":
        return [f"L{i}H{h}" for i in range(arr.shape[0]) for h in range(arr.shape[1])]
    if kind == "resid":
        return [f"L{i} @{p} {m.str_tokens[p]!r}" for i in range(arr.shape[0]) for p in range(arr.shape[1])]
    return [f"L{i} MLP" for i in range(arr.shape[0])]


def top_movers(pair: PairResults, name: str, n: int = 10) -> list[dict]:
    """The n components whose `name` changes most (largest |LN-free - LN|), with both values and their ranks
    by |value| in each model (1: the largest)."""
    both = paired(pair, name)
    if both is None:
        return []
    a, b = (x.ravel() for x in both)
    labels = component_labels(pair.ln, name)
    diff = b - a
    ok = np.flatnonzero(np.isfinite(diff))

    def ranks(x):
        order = ok[np.argsort(-np.abs(x[ok]), kind="stable")]
        return {int(i): r for r, i in enumerate(order, start=1)}

    ra, rb = ranks(a), ranks(b)
    top = ok[np.argsort(-np.abs(diff[ok]), kind="stable")[:n]]
    return [{"component": labels[i], "ln": float(a[i]), "lnfree": float(b[i]), "lnfree_minus_ln": float(diff[i]),
             "rank_ln": ra[int(i)], "rank_lnfree": rb[int(i)]} for i in top]


def twins_json(pair: PairResults, n: int = 10) -> dict:
    """The twin comparison as plain values: agreement per quantity and its top movers."""
    from attribution.results import jsonable

    return jsonable({"agreement": twin_agreement(pair),
                     "top_movers": {name: top_movers(pair, name, n) for name in QUANTITIES
                                    if paired(pair, name) is not None}})
