"""plotly figures, one function per figure; each comparison is drawn LN | LN-free on one colour scale (the
heatmaps with a third panel, LN-free minus LN, on the same scale).

Every figure function takes (pair, method): `method` ("atp" or "atp*") chooses which attribution-patching
estimate the AtP figures show; it is a view choice, so it changes no computed number.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attribution.results import ModelResults, PairResults

DIVERGING = "RdBu"
LN_COLOUR, LNFREE_COLOUR = "#1f77b4", "#d62728"


def _models(pair: PairResults) -> list[tuple[str, ModelResults]]:
    return [(f"LN: {pair.ln.spec}", pair.ln), (f"LN-free: {pair.lnfree.spec}", pair.lnfree)]


def _bound(*arrays) -> float:
    vals = np.concatenate([np.abs(np.asarray(a, float)).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    return float(vals.max()) if vals.size and vals.max() > 0 else 1.0


def position_labels(tokens: list[str]) -> list[str]:
    """Unique axis labels: plotly merges repeated category names, so prefix the position."""
    return [f"{i}: {t!r}"[: 24] for i, t in enumerate(tokens)]


def _heatmap_pair(pair: PairResults, get: Callable[[ModelResults], np.ndarray], title: str,
                  x_title: str, y_title: str = "layer", x_labels: Callable[[ModelResults], list] | None = None,
                  colour_title: str = "") -> go.Figure:
    """LN | LN-free | LN-free minus LN (the last when both have the same shape), on one colour scale."""
    models = _models(pair)
    arrays = [np.asarray(get(m), float) for _, m in models]
    panels = [(name, m, z) for (name, m), z in zip(models, arrays, strict=True)]
    if arrays[0].shape == arrays[1].shape:
        panels.append(("LN-free minus LN", models[0][1], arrays[1] - arrays[0]))
    bound = _bound(*(z for _, _, z in panels))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[name for name, _, _ in panels],
                        horizontal_spacing=0.08 if len(panels) == 3 else 0.12)
    for col, (_, m, z) in enumerate(panels, start=1):
        x = x_labels(m) if x_labels else list(range(z.shape[1]))
        fig.add_trace(go.Heatmap(z=z, x=x, y=list(range(z.shape[0])), coloraxis="coloraxis",
                                 hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:.4g}}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text=x_title, row=1, col=col)
        fig.update_yaxes(title_text=y_title, autorange="reversed", row=1, col=col)
    fig.update_layout(title=title, coloraxis=dict(colorscale=DIVERGING, cmin=-bound, cmax=bound, cmid=0,
                                                  colorbar=dict(title=colour_title)))
    return fig


def metric_name(pair: PairResults) -> str:
    m = pair.ln
    return f"logit({m.answer!r}) - logit({m.counterfactual!r})" if m.counterfactual else f"logit({m.answer!r})"


def dla_heads(pair: PairResults, method: str = "atp*") -> go.Figure:
    return _heatmap_pair(pair, lambda m: m.dla_heads, f"Direct logit attribution per head ({pair.settings.task})",
                         "head", colour_title="DLA")


def dla_layers(pair: PairResults, method: str = "atp*") -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=[n for n, _ in _models(pair)], shared_yaxes=True)
    for col, (_, m) in enumerate(_models(pair), start=1):
        layers = [f"L{i}" for i in range(len(m.dla_mlp))]
        fig.add_trace(go.Bar(x=layers, y=m.dla_heads.sum(1), name="attention (all heads)",
                             marker_color=LN_COLOUR, showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Bar(x=layers, y=m.dla_mlp, name="MLP", marker_color=LNFREE_COLOUR,
                             showlegend=col == 1), row=1, col=col)
    fig.update_layout(title=f"DLA per layer, metric {metric_name(pair)}", barmode="group",
                      yaxis_title="DLA")
    return fig


def dla_vs_de(pair: PairResults, method: str = "atp*") -> go.Figure:
    names = [f"{n}<br>NMAE {m.dla_nmae:.2%}" for n, m in _models(pair)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=names)
    for col, (_, m) in enumerate(_models(pair), start=1):
        L, H = m.dla_heads.shape
        labels = [f"L{i}H{h}" for i in range(L) for h in range(H)]
        de, dla = m.de_heads.ravel(), m.dla_heads.ravel()
        b = _bound(de, dla)
        fig.add_trace(go.Scatter(x=de, y=dla, mode="markers", text=labels, name="heads",
                                 marker_color=LN_COLOUR, showlegend=col == 1,
                                 hovertemplate="%{text}<br>DE %{x:.4g}<br>DLA %{y:.4g}<extra></extra>"),
                      row=1, col=col)
        fig.add_trace(go.Scatter(x=[-b, b], y=[-b, b], mode="lines", line=dict(dash="dot", color="grey"),
                                 name="DLA = DE", showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="true direct effect", row=1, col=col)
        fig.update_yaxes(title_text="DLA", row=1, col=col)
    fig.update_layout(title=f"DLA vs true direct effect per head: NMAE LN {pair.ln.dla_nmae:.2%}, "
                            f"LN-free {pair.lnfree.dla_nmae:.2%}")
    return fig


def _estimate(m: ModelResults, method: str, kind: str) -> np.ndarray:
    return getattr(m, f"{'atpstar' if method == 'atp*' else 'atp'}_{kind}")


def _method_name(method: str) -> str:
    return "AtP*" if method == "atp*" else "AtP"


def _patched(pair: PairResults) -> str:
    return f" ({pair.ln.patching}; blank: not patched)" if pair.ln.patching.startswith("top") else ""


def patch_heads(pair: PairResults, method: str = "atp*") -> go.Figure:
    return _heatmap_pair(pair, lambda m: m.patch_heads, "Activation patching per head (all positions), "
                         f"normalised (patched - corrupt) / (clean - corrupt){_patched(pair)}", "head",
                         colour_title="patch")


def atp_heads(pair: PairResults, method: str = "atp*") -> go.Figure:
    return _heatmap_pair(pair, lambda m: _estimate(m, method, "heads"),
                         f"{_method_name(method)} estimate per head (all positions), normalised", "head",
                         colour_title=_method_name(method))


def patch_resid(pair: PairResults, method: str = "atp*") -> go.Figure:
    return _heatmap_pair(pair, lambda m: m.patch_resid, f"Activation patching of resid_pre (layer x position)"
                         f"{_patched(pair)}",
                         "position", x_labels=lambda m: position_labels(m.str_tokens), colour_title="patch")


def atp_resid(pair: PairResults, method: str = "atp*") -> go.Figure:
    return _heatmap_pair(pair, lambda m: _estimate(m, method, "resid"),
                         f"{_method_name(method)} estimate of resid_pre patching (layer x position)", "position",
                         x_labels=lambda m: position_labels(m.str_tokens), colour_title=_method_name(method))


def atp_vs_patch(pair: PairResults, method: str = "atp*") -> go.Figure:
    key = "atpstar" if method == "atp*" else "atp"
    titles = []
    for name, m in _models(pair):
        a = m.agreement.get(key, {})
        titles.append(f"{name}<br>Pearson {a.get('pearson', float('nan')):.3f}, "
                      f"Spearman {a.get('spearman', float('nan')):.3f}, "
                      f"top-k recall {a.get('topk_recall', float('nan')):.2f}")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, (_, m) in enumerate(_models(pair), start=1):
        L, H = m.patch_heads.shape
        labels = [f"L{i}H{h}" for i in range(L) for h in range(H)]
        x, y = m.patch_heads.ravel(), np.asarray(_estimate(m, method, "heads"), float).ravel()
        b = _bound(x, y)
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", text=labels, name="heads", marker_color=LN_COLOUR,
                                 showlegend=col == 1,
                                 hovertemplate="%{text}<br>patch %{x:.4g}<br>estimate %{y:.4g}<extra></extra>"),
                      row=1, col=col)
        fig.add_trace(go.Scatter(x=[-b, b], y=[-b, b], mode="lines", line=dict(dash="dot", color="grey"),
                                 name="estimate = patch", showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="activation patching", row=1, col=col)
        fig.update_yaxes(title_text=_method_name(method), row=1, col=col)
    fig.update_layout(title=f"{_method_name(method)} vs activation patching, per head (all positions){_patched(pair)}")
    return fig


def logit_lens(pair: PairResults, method: str = "atp*") -> go.Figure:
    fig = go.Figure()
    for (name, m), colour in zip(_models(pair), (LN_COLOUR, LNFREE_COLOUR), strict=True):
        L = len(m.logit_lens) - 1
        x = [f"resid_pre {i}" for i in range(L)] + [f"resid_post {L - 1}"]
        fig.add_trace(go.Scatter(x=x, y=m.logit_lens, mode="lines+markers", name=name, line_color=colour))
    fig.update_layout(title=f"Logit lens: {metric_name(pair)} read through the final LN at each layer",
                      xaxis_title="residual stream", yaxis_title="metric")
    return fig


def attention_figure(pattern_ln, tokens_ln, pattern_lnfree, tokens_lnfree, layer: int, head: int) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=["LN", "LN-free"], horizontal_spacing=0.15)
    for col, (p, toks) in enumerate(((pattern_ln, tokens_ln), (pattern_lnfree, tokens_lnfree)), start=1):
        labels = position_labels(toks)
        fig.add_trace(go.Heatmap(z=np.asarray(p), x=labels, y=labels, coloraxis="coloraxis",
                                 hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="key", row=1, col=col)
        fig.update_yaxes(title_text="query", autorange="reversed", row=1, col=col)
    fig.update_layout(title=f"Attention pattern of L{layer}H{head}",
                      coloraxis=dict(colorscale="Blues", cmin=0, cmax=1))
    return fig


FIGURES: dict[str, Callable[[PairResults, str], go.Figure]] = {
    "dla_heads": dla_heads,
    "dla_layers": dla_layers,
    "dla_vs_de": dla_vs_de,
    "patch_heads": patch_heads,
    "atp_heads": atp_heads,
    "patch_resid": patch_resid,
    "atp_resid": atp_resid,
    "atp_vs_patch": atp_vs_patch,
    "logit_lens": logit_lens,
}
