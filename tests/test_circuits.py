"""Circuits of a pair (attribution.circuits): both models' edge scores, faithfulness curves, figures, tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attribution import circuits, edges, tasks
from attribution.results import Settings
from models import load_bridge

SETTINGS = Settings(n_prompts=3, seq_len=4, top_k=5)


@pytest.fixture(scope="module")
def pair(tiny_ln_dir, tiny_lnfree_dir):
    ln, lnfree = load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir))
    return ln, lnfree, circuits.pair_circuits(ln, lnfree, SETTINGS)


def test_both_models_edge_scores_and_curves_are_the_engines(pair):
    ln, lnfree, result = pair
    assert result["method"] == "EAP" and set(result) >= {"ln", "lnfree", "agreement"}
    for model, side in ((ln, result["ln"]), (lnfree, result["lnfree"])):
        task = tasks.build(model.bridge.tokenizer, SETTINGS, model.bridge.cfg.n_ctx)
        want = edges.edge_attribution(model.bridge, task)
        np.testing.assert_array_equal(side["scores"], want.scores)
        n_edges = int(np.isfinite(want.scores).sum())
        curve = side["faithfulness"]
        assert [p["edges"] for p in curve] == [n for n in circuits.SIZES if n < n_edges] + [n_edges]
        assert curve[-1]["recovered"] == pytest.approx(1.0, abs=1e-5)  # every edge kept: the clean run
        assert curve[2] == {"edges": 5, **edges.circuit_recovery(model.bridge, task, top_mask(want, 5))}
        assert set(side["cost"]) == {"edge scores", "faithfulness curve"} and side["cost"]["edge scores"] > 0
    from attribution.twins import ranking_agreement

    assert result["agreement"] == ranking_agreement(result["ln"]["scores"], result["lnfree"]["scores"], 5)


def top_mask(result: edges.EdgeScores, n: int) -> np.ndarray:
    keep = np.zeros(result.scores.shape, bool)
    for e in result.top(n):
        keep[result.writers.index(e["writer"]), result.readers.index(e["reader"])] = True
    return keep


def test_figures_tables_and_json(pair):
    _, _, result = pair
    table = circuits.edges_table(result, 4)
    assert len(table) == 8 and [r["rank"] for r in table] == [1, 2, 3, 4] * 2
    assert table[0]["score"] == circuits.top_edges(result["ln"], 1)[0]["score"]
    fig = circuits.circuit_graphs(result, 4)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 8 and all("->" in t.text for t in lines)
    shown = {t.text.split(":")[0] for t in lines}
    assert shown == {f"{r['writer']} -> {r['reader']}" for r in table}
    curves = circuits.faithfulness_curves(result)
    assert [list(t.y) for t in curves.data] == [[p["recovered"] for p in result[k]["faithfulness"]]
                                                for k in ("ln", "lnfree")]
    assert len(circuits.faithfulness_table(result)) == sum(len(result[k]["faithfulness"]) for k in ("ln", "lnfree"))
    data = json.loads(json.dumps(circuits.circuits_json(result), allow_nan=False))
    assert len(data["ln"]["scores"]) == len(data["ln"]["writers"]) and data["ig_steps"] == 1


def test_eap_ig_of_the_pair(pair):
    ln, lnfree, _ = pair
    result = circuits.pair_circuits(ln, lnfree, SETTINGS, ig_steps=3)
    assert result["method"] == "EAP-IG (3 steps)"
    task = tasks.build(ln.bridge.tokenizer, SETTINGS, ln.bridge.cfg.n_ctx)
    np.testing.assert_array_equal(result["ln"]["scores"], edges.edge_attribution(ln.bridge, task, 3).scores)
