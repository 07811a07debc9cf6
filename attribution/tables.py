"""The numbers behind every figure as rows (one dict per row, the same keys in every row), the summary
table, and CSV text: what the CSV exports, the app's tables and the zip bundle hold."""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from attribution.errors import AttributionInputError
from attribution.results import ModelResults, PairResults


def _models(pair: PairResults):
    return [("ln", pair.ln), ("lnfree", pair.lnfree)]


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _heads_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        L, H = m.dla_heads.shape
        for i in range(L):
            for h in range(H):
                rows.append({"model": name, "spec": m.spec, "layer": i, "head": h,
                             "dla": _num(m.dla_heads[i, h]), "de": _num(m.de_heads[i, h]),
                             "patch": _num(m.patch_heads[i, h]), "atp": _num(m.atp_heads[i, h]),
                             "atpstar": _num(m.atpstar_heads[i, h])})
    return rows


def _resid_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        star = m.atpstar_resid if m.atpstar_resid is not None else m.atp_resid * math.nan
        for i in range(m.patch_resid.shape[0]):
            for p in range(m.patch_resid.shape[1]):
                rows.append({"model": name, "spec": m.spec, "layer": i, "position": p, "token": m.str_tokens[p],
                             "patch": _num(m.patch_resid[i, p]), "atp": _num(m.atp_resid[i, p]),
                             "atpstar": _num(star[i, p])})
    return rows


def _layer_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        for i in range(len(m.dla_mlp)):
            rows.append({"model": name, "spec": m.spec, "layer": i, "attn_dla": _num(m.dla_heads[i].sum()),
                         "mlp_dla": _num(m.dla_mlp[i]), "mlp_de": _num(m.de_mlp[i]),
                         "mlp_patch": _num(m.patch_mlp[i]),
                         "mlp_atp": _num(m.atp_mlp[i]) if m.atp_mlp is not None else None})
    return rows


def _lens_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        L = len(m.logit_lens) - 1
        for i, v in enumerate(m.logit_lens):
            stream = f"resid_pre {i}" if i < L else f"resid_post {L - 1}"
            rows.append({"model": name, "spec": m.spec, "stream": stream, "metric": _num(v)})
    return rows


DIFFERENCE = "lnfree - ln"  # the `model` of the rows holding LN-free minus LN (the third heatmap panel)


def _with_difference(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """rows plus, for every component both models have (matched on `keys`), a row of LN-free minus LN."""
    ln = {tuple(r[k] for k in keys): r for r in rows if r["model"] == "ln"}
    out = list(rows)
    for r in rows:
        other = ln.get(tuple(r[k] for k in keys)) if r["model"] == "lnfree" else None
        if other is None:
            continue
        d = {**other, "model": DIFFERENCE, "spec": ""}
        for v in values:
            a, b = other[v], r[v]
            d[v] = None if a is None or b is None else b - a
        out.append(d)
    return out


def _heads_diff_rows(pair: PairResults) -> list[dict]:
    return _with_difference(_heads_rows(pair), ("layer", "head"), ("dla", "de", "patch", "atp", "atpstar"))


def _resid_diff_rows(pair: PairResults) -> list[dict]:
    rows = _resid_rows(pair)
    if pair.ln.patch_resid.shape != pair.lnfree.patch_resid.shape:  # other prompts: no position-wise difference
        return rows
    return _with_difference(rows, ("layer", "position"), ("patch", "atp", "atpstar"))


TABLES = {"dla_heads": _heads_diff_rows, "dla_vs_de": _heads_rows, "patch_heads": _heads_diff_rows,
          "atp_heads": _heads_diff_rows, "atp_vs_patch": _heads_rows, "dla_layers": _layer_rows,
          "patch_resid": _resid_diff_rows, "atp_resid": _resid_diff_rows, "logit_lens": _lens_rows}


def figure_table(name: str, pair: PairResults) -> list[dict]:
    """The numbers behind figure `name`, one dict per row (the same columns in every row)."""
    if name not in TABLES:
        raise AttributionInputError(f"Unknown figure {name!r}; choose from {', '.join(TABLES)}.")
    return TABLES[name](pair)


def table_csv(rows: list[dict]) -> str:
    """Rows (dicts with the same keys) as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()



def summary_rows(pair: PairResults, extra: list[tuple[str, ModelResults]] = ()) -> list[dict]:
    """One row per headline number (metric, DLA error, AtP and AtP* agreement with activation patching:
    over every head with full sweeps, else over the patched components; the analysis's cost), one column
    per model: the pair's LN model, then `extra` ((label, results) of other models on the same settings,
    e.g. the vanilla control), then the LN-free model."""
    k = pair.settings.top_k
    cols = {}
    for label, res in (("LN", pair.ln), *extra, ("LN-free", pair.lnfree)):
        a, s = res.agreement.get("atp", {}), res.agreement.get("atpstar", {})
        cols[f"{label}: {res.spec}"] = {
            "metric (clean)": res.metric_clean, "metric (corrupted)": res.metric_corrupt,
            "DLA NMAE vs direct effect": res.dla_nmae,
            "AtP Pearson": a.get("pearson"), "AtP Spearman": a.get("spearman"),
            f"AtP top-{k} recall": a.get("topk_recall"), "AtP MAE": a.get("mae"),
            "AtP* Pearson": s.get("pearson"), "AtP* Spearman": s.get("spearman"),
            f"AtP* top-{k} recall": s.get("topk_recall"), "AtP* MAE": s.get("mae"),
            "patched components": float(sum(np.isfinite(getattr(res, f"patch_{kind}")).sum()
                                            for kind in ("heads", "resid", "mlp"))),
            "cost (forward-pass equivalents)": res.cost.get("total"),
        }
    names = list(next(iter(cols.values())))
    return [{"quantity": n, **{model: _num_or_none(c[n]) for model, c in cols.items()}} for n in names]


def _num_or_none(x) -> float | None:
    return None if x is None else _num(x)
