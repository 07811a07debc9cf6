"""Plotly figures of the findings: each takes the compare_findings dict, LN | LN-free side by side.

Both panels of a figure share their axes (or colour scale), so heights and
colours compare directly between the two models.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

MODELS = (("ln", "LN"), ("lnfree", "LN-free"))
COLORS = {"pos0": "#d62728", "rest": "#1f77b4", "delta_ce": "#ff7f0e", "delta_entropy": "#2ca02c",
          "accuracy": "#1f77b4"}


def _pair(titles: list[str], shared_y: bool = True, **kw) -> go.Figure:
    return make_subplots(rows=1, cols=2, subplot_titles=titles, shared_yaxes=shared_y,
                         horizontal_spacing=0.08, **kw)


def _finite_max(*grids) -> float:
    vals = [v for g in grids for row in g for v in row if v is not None and math.isfinite(v)]
    return max(vals) if vals else 1.0


def norms_figure(result: dict) -> go.Figure:
    """Mean L2 norm of the centred residual stream at each point, at position 0 and at the other positions."""
    fig = _pair([label for _, label in MODELS])
    for col, (key, _) in enumerate(MODELS, start=1):
        n = result[key]["norms"]
        for series, name in (("pos0", "position 0"), ("rest", "positions 1+")):
            fig.add_trace(go.Scatter(x=n["labels"], y=n[series], name=name, mode="lines+markers",
                                     line={"color": COLORS[series]}, legendgroup=series, showlegend=col == 1,
                                     hovertemplate="%{x}: %{y:.4g}<extra>" + name + "</extra>"), 1, col)
    fig.update_yaxes(title_text="mean L2 norm of the residual stream", col=1)
    fig.update_layout(title="First-token residual norms", height=420)
    return fig


MAX_CELL_LABELS = 400  # per panel; bigger grids (GPT-2 large / xl) get hover text only


def _heatmap_pair(result: dict, section: str, field: str, title: str, colorbar: str, zmax: float,
                  subtitle, fmt: str, tickformat: str = "") -> go.Figure:
    titles = [f"{label}: {subtitle(result[key][section])}" for key, label in MODELS]
    fig = _pair(titles)
    for col, (key, _) in enumerate(MODELS, start=1):
        z = result[key][section][field]
        label = len(z) * len(z[0]) <= MAX_CELL_LABELS
        text = [[("" if v is None or not math.isfinite(v) or not label else format(v, fmt)) for v in row]
                for row in z]
        fig.add_trace(go.Heatmap(z=z, x=list(range(len(z[0]))), y=list(range(len(z))), coloraxis="coloraxis",
                                 text=text, texttemplate="%{text}",
                                 hovertemplate="layer %{y}, head %{x}: %{z:.4g}<extra></extra>"), 1, col)
    fig.update_layout(title=title, height=420,
                      coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": zmax,
                                 "colorbar": {"title": {"text": colorbar}, "tickformat": tickformat}})
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed", col=1)
    fig.update_yaxes(autorange="reversed")
    return fig


def sink_figure(result: dict) -> go.Figure:
    """Per head: the share of (sequence, query) pairs whose attention on position 0 is > threshold."""
    thr = result["ln"]["sinks"]["threshold"]
    return _heatmap_pair(result, "sinks", "per_head", f"Attention sinks (share of queries with attention on the "
                         f"first token > {thr:g})", "sink share", 1.0, lambda s: f"sink rate {s['rate']:.1%}",
                         ".2f", ".0%")


def dla_error_figure(result: dict) -> go.Figure:
    """Per head: NMAE between frozen-scale DLA and the true direct effect over the dataset."""
    zmax = _finite_max(result["ln"]["dla_error"]["per_head"], result["lnfree"]["dla_error"]["per_head"])
    return _heatmap_pair(result, "dla_error", "per_head", "DLA error per head (NMAE vs true direct effect)",
                         "NMAE", max(zmax, 1e-12), lambda s: "NMAE n/a" if s["nmae"] is None else f"NMAE {s['nmae']:.2%}", ".1%", ".0%")


def reliability_figure(result: dict) -> go.Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal (bar opacity ~ log count)."""
    titles = [f"{label}: ECE {result[key]['calibration']['ece']:.4f}, entropy "
              f"{result[key]['calibration']['entropy']:.3f} nats" for key, label in MODELS]
    fig = _pair(titles, shared_xaxes=True)
    for col, (key, _) in enumerate(MODELS, start=1):
        bins = result[key]["calibration"]["bins"]
        full = [b for b in bins if b["count"]]
        top = max([b["count"] for b in full] + [2])
        opacity = [0.25 + 0.75 * math.log(b["count"] + 1) / math.log(top + 1) for b in full]  # faint = few
        fig.add_trace(go.Bar(x=[(b["lo"] + b["hi"]) / 2 for b in full], y=[b["accuracy"] for b in full],
                             width=[b["hi"] - b["lo"] for b in full], name="accuracy",
                             marker={"color": COLORS["accuracy"], "opacity": opacity,
                                     "line": {"width": 1, "color": "white"}},
                             customdata=[[b["confidence"], b["count"]] for b in full], legendgroup="acc",
                             showlegend=col == 1,
                             hovertemplate="accuracy %{y:.3f}<br>mean confidence %{customdata[0]:.3f}"
                                           "<br>%{customdata[1]} predictions<extra></extra>"), 1, col)
        fig.add_trace(go.Scatter(x=[b["confidence"] for b in full], y=[b["accuracy"] for b in full],
                                 mode="markers", name="mean confidence", marker={"color": "black", "size": 6},
                                 legendgroup="conf", showlegend=col == 1,
                                 hovertemplate="confidence %{x:.3f}, accuracy %{y:.3f}<extra></extra>"), 1, col)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                 line={"dash": "dash", "color": "grey"}, legendgroup="diag",
                                 showlegend=col == 1, hoverinfo="skip"), 1, col)
    fig.update_xaxes(range=[0, 1], title_text="top-1 confidence")
    fig.update_yaxes(range=[0, 1])
    fig.update_yaxes(title_text="accuracy", col=1)
    fig.update_layout(title="Calibration (reliability diagram)", height=420, bargap=0)
    return fig


def neurons_figure(result: dict) -> go.Figure:
    """Per confidence-neuron candidate, mean-ablated alone: the median per-token |change| in CE and in
    output entropy, with the interquartile range as error bars (the paper's box plots' boxes)."""
    fig = _pair([label for _, label in MODELS])
    for col, (key, _) in enumerate(MODELS, start=1):
        rows = result[key]["ablation"]["per_neuron"]
        names = [f"N{p['neuron']}" for p in rows]
        for field, name in (("delta_ce", "|delta CE|"), ("delta_entropy", "|delta entropy|")):
            med = [p[f"median_abs_{field}"] for p in rows]
            fig.add_trace(go.Bar(x=names, y=med, name="median " + name + " (nats)", marker={"color": COLORS[field]},
                                 error_y={"type": "data", "symmetric": False,
                                          "array": [p[f"q3_abs_{field}"] - m for p, m in zip(rows, med, strict=True)],
                                          "arrayminus": [m - p[f"q1_abs_{field}"] for p, m in zip(rows, med, strict=True)]},
                                 legendgroup=field, showlegend=col == 1,
                                 hovertemplate="%{x}: median %{y:.4g} nats<extra>" + name + "</extra>"), 1, col)
    layer = result["ln"]["ablation"]["layer"]
    fig.update_yaxes(title_text="per-token |change| when mean-ablated (nats)", col=1)
    fig.update_xaxes(title_text=f"layer {layer} neurons, each ablated alone")
    fig.update_layout(title="Confidence-neuron candidates: mean ablation (median, IQR)", barmode="group", height=420)
    return fig


FINDINGS_FIGURES = {
    "norms": norms_figure,
    "sinks": sink_figure,
    "reliability": reliability_figure,
    "dla_error": dla_error_figure,
    "neurons": neurons_figure,
}
