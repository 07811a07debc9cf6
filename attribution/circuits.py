"""Circuits of an LN model and its LN-free twin: edge attribution (attribution.edges) on both, their top
edges as graphs side by side, how faithful each model's circuit is as it grows, and how alike the two
models' edge scores are.  The result is plain values (JSON), like the findings'."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attribution import edges, tasks
from attribution.errors import AttributionInputError
from attribution.patching import capture
from attribution.results import Settings, jsonable
from attribution.twins import ranking_agreement
from models import check_pair

if TYPE_CHECKING:
    from models import LoadedModel

SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500)  # circuit sizes (edges) of the faithfulness curve
POSITIVE, NEGATIVE, NODE = "#1f77b4", "#d62728", "#7f7f7f"


def model_circuits(model: LoadedModel, settings: Settings, ig_steps: int = 1) -> dict:
    """Edge scores, the faithfulness curve and their cost (forward-pass equivalents) for one model."""
    bridge = model.bridge
    task = tasks.build(bridge.tokenizer, settings, bridge.cfg.n_ctx)
    if task.corrupt is None:
        raise AttributionInputError("Circuits need a corrupted prompt (the sidebar's 'Corrupted prompt').")
    with model.lock:
        start = time.perf_counter()
        capture(bridge, task.clean, [], task)
        unit = time.perf_counter() - start
        start = time.perf_counter()
        result = edges.edge_attribution(bridge, task, ig_steps)
        scoring = time.perf_counter() - start
        start = time.perf_counter()
        n_edges = int(np.isfinite(result.scores).sum())
        curve = edges.faithfulness(bridge, task, result, [n for n in SIZES if n < n_edges] + [n_edges])
        faithful = time.perf_counter() - start
    return {"spec": model.info.spec, "writers": result.writers, "readers": result.readers,
            "scores": result.scores, "faithfulness": curve,
            "cost": {"edge scores": round(scoring / unit, 2), "faithfulness curve": round(faithful / unit, 2)}}


def pair_circuits(ln: LoadedModel, lnfree: LoadedModel, settings: Settings, ig_steps: int = 1) -> dict:
    """model_circuits of both models, with the same settings, and how alike their edge scores are."""
    check_pair(ln.info, lnfree.info)
    a, b = model_circuits(ln, settings, ig_steps), model_circuits(lnfree, settings, ig_steps)
    out = {"method": "EAP" if ig_steps == 1 else f"EAP-IG ({ig_steps} steps)", "ig_steps": ig_steps,
           "settings": {"task": settings.task, "n_prompts": settings.n_prompts, "seed": settings.seed},
           "ln": a, "lnfree": b}
    if a["scores"].shape == b["scores"].shape:
        out["agreement"] = ranking_agreement(a["scores"], b["scores"], settings.top_k)
    return out


def top_edges(side: dict, n: int) -> list[dict]:
    return edges.EdgeScores(side["writers"], side["readers"], np.asarray(side["scores"], float), "").top(n)


def circuits_json(result: dict) -> dict:
    """The result as strict JSON values (every edge score, by writer and reader)."""
    return jsonable(result)


def edges_table(result: dict, n: int) -> list[dict]:
    """The top-n edges of each model: model, rank, writer, reader, score."""
    return [{"model": side["spec"], "rank": rank, **edge} for key in ("ln", "lnfree")
            for side in [result[key]] for rank, edge in enumerate(top_edges(side, n), start=1)]


def faithfulness_table(result: dict) -> list[dict]:
    return [{"model": result[key]["spec"], **point} for key in ("ln", "lnfree") for point in result[key]["faithfulness"]]


def _node(label: str) -> str:
    """The component a writer or reader label belongs to ("L1H0 q" -> "L1H0")."""
    return label.split()[0] if "H" in label.split()[0] else label


def _layout(writers: list[str], n_heads: int) -> dict[str, tuple[float, float]]:
    """x, y of each component: the embedding at the bottom, then per layer its heads in a row and its MLP
    above them, the logits on top."""
    pos = {"embed": ((n_heads - 1) / 2, 0.0)}
    for label in writers[1:]:
        layer = int(label[1:].split("H")[0].split()[0])
        if label.endswith("MLP"):
            pos[label] = ((n_heads - 1) / 2, 2 + 2 * layer)
        else:
            pos[label] = (float(label.split("H")[1]), 1 + 2 * layer)
    pos["logits"] = ((n_heads - 1) / 2, 1 + 2 * (len(writers) - 1) / (n_heads + 1))
    return pos


def circuit_graphs(result: dict, n: int = 20) -> go.Figure:
    """Each model's top-n edges by |score| drawn on its components, side by side: blue adds to the metric,
    red takes from it, line width by |score| (one scale for both)."""
    names = [f"{label}: {result[key]['spec']}" for key, label in (("ln", "LN"), ("lnfree", "LN-free"))]
    fig = make_subplots(rows=1, cols=2, subplot_titles=names, horizontal_spacing=0.05)
    tops = [top_edges(result[key], n) for key in ("ln", "lnfree")]
    biggest = max([abs(e["score"]) for top in tops for e in top] or [1.0])
    for col, (key, top) in enumerate(zip(("ln", "lnfree"), tops, strict=True), start=1):
        writers = result[key]["writers"]
        n_heads = sum(1 for w in writers if w.startswith("L0H"))
        pos = _layout(writers, n_heads)
        for e in top:
            (x0, y0), (x1, y1) = pos[_node(e["writer"])], pos[_node(e["reader"])]
            fig.add_trace(go.Scatter(
                x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
                text=f"{e['writer']} -> {e['reader']}: {e['score']:.4g}",
                line=dict(width=0.5 + 6 * abs(e["score"]) / biggest,
                          color=POSITIVE if e["score"] > 0 else NEGATIVE)), row=1, col=col)
        used = {_node(e["writer"]) for e in top} | {_node(e["reader"]) for e in top}
        labels = list(pos)
        fig.add_trace(go.Scatter(
            x=[pos[x][0] for x in labels], y=[pos[x][1] for x in labels], mode="markers+text", text=labels,
            textposition="top center", showlegend=False, hoverinfo="text",
            marker=dict(size=[12 if x in used else 6 for x in labels],
                        color=["black" if x in used else NODE for x in labels])), row=1, col=col)
        fig.update_xaxes(visible=False, row=1, col=col)
        fig.update_yaxes(visible=False, row=1, col=col)
    fig.update_layout(title=f"Top {n} edges by |{result['method']} score| (normalised: 1 = the clean - corrupted "
                            "metric gap); blue raises the metric, red lowers it", height=650)
    return fig


def faithfulness_curves(result: dict) -> go.Figure:
    """The share of the clean - corrupted metric gap that the top-n edges recover, against n, both models."""
    fig = go.Figure()
    for key, label, colour in (("ln", "LN", POSITIVE), ("lnfree", "LN-free", NEGATIVE)):
        curve = result[key]["faithfulness"]
        fig.add_trace(go.Scatter(x=[p["edges"] for p in curve], y=[p["recovered"] for p in curve],
                                 mode="lines+markers", name=f"{label}: {result[key]['spec']}",
                                 line=dict(color=colour)))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_xaxes(type="log", title_text="edges kept (top by |score|; every other edge ablated)")
    fig.update_yaxes(title_text="metric recovered (0: corrupted, 1: clean)")
    fig.update_layout(title=f"Faithfulness of the {result['method']} circuit")
    return fig


CIRCUIT_FIGURES = {"circuit_graphs": circuit_graphs, "faithfulness": faithfulness_curves}


def circuit_figure(name: str, result: dict, n: int) -> go.Figure:
    """A CIRCUIT_FIGURES figure of `result` (the graphs drawn with each model's top-n edges)."""
    return circuit_graphs(result, n) if name == "circuit_graphs" else CIRCUIT_FIGURES[name](result)


def circuit_tables(result: dict, n: int) -> dict[str, list[dict]]:
    """The numbers of each circuit figure (its CSV)."""
    return {"circuit_graphs": edges_table(result, n), "faithfulness": faithfulness_table(result)}
