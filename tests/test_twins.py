"""Where the twins differ (attribution.twins): every number against a definition written out here."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from attribution import plots
from attribution.export import results_json
from attribution.tables import DIFFERENCE, figure_table, table_csv
from attribution.twins import QUANTITIES, difference, ranking_agreement, top_movers, twin_agreement
from tests.test_attribution_export import pair  # noqa: F401 (the module fixture: a real tiny pair)


def spearman_by_hand(a, b) -> float:
    """Pearson correlation of the ranks (no ties in the cases used)."""
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))


def test_ranking_agreement_by_hand():
    a = np.array([0.5, -3.0, 1.0, np.nan, 2.0, 0.1])
    b = np.array([0.4, 1.0, -2.5, 7.0, 2.2, 0.0])
    r = ranking_agreement(a, b, k=2)
    keep = [0, 1, 2, 4, 5]  # the NaN component is left out
    assert r["n"] == 5 and r["k"] == 2
    assert r["spearman"] == pytest.approx(spearman_by_hand(a[keep], b[keep]))
    assert r["pearson"] == pytest.approx(np.corrcoef(a[keep], b[keep])[0, 1])
    # top-2 by |a|: components 1 (3.0) and 4 (2.0); by |b| (finite in both): 2 (2.5) and 4 (2.2): one shared.
    assert r["topk_overlap"] == 0.5
    assert math.isnan(ranking_agreement(np.ones(3), np.arange(3.0), 2)["spearman"])  # a constant has no ranking


def test_differences_top_movers_and_agreement_of_a_real_pair(pair):  # noqa: F811
    p = pair[0]
    ln, lnfree = p.ln, p.lnfree
    assert np.array_equal(difference(p, "dla_heads"), lnfree.dla_heads - ln.dla_heads, equal_nan=True)
    movers = top_movers(p, "dla_heads", n=3)
    L, H = ln.dla_heads.shape
    by_hand = sorted(((abs(lnfree.dla_heads[i, h] - ln.dla_heads[i, h]), f"L{i}H{h}", i, h)
                      for i in range(L) for h in range(H)), reverse=True)[:3]
    assert [m["component"] for m in movers] == [label for _, label, _, _ in by_hand]
    for m, (_, _, i, h) in zip(movers, by_hand, strict=True):
        assert m["ln"] == ln.dla_heads[i, h] and m["lnfree"] == lnfree.dla_heads[i, h]
        assert m["lnfree_minus_ln"] == pytest.approx(lnfree.dla_heads[i, h] - ln.dla_heads[i, h])
        # rank by |value| within each model, 1 = the largest
        assert m["rank_ln"] == 1 + int((np.abs(ln.dla_heads) > abs(ln.dla_heads[i, h])).sum())
        assert m["rank_lnfree"] == 1 + int((np.abs(lnfree.dla_heads) > abs(lnfree.dla_heads[i, h])).sum())
    agree = twin_agreement(p)
    assert set(agree) <= set(QUANTITIES) and "dla_heads" in agree and "atp_resid" in agree
    assert agree["dla_heads"]["spearman"] == pytest.approx(spearman_by_hand(ln.dla_heads.ravel(),
                                                                            lnfree.dla_heads.ravel()))
    # Patching ran on AtP*'s top components only: the statistic is over those patched in both models.
    both = np.isfinite(ln.patch_heads) & np.isfinite(lnfree.patch_heads)
    assert agree["patch_heads"]["n"] == both.sum() < ln.patch_heads.size
    # The JSON export holds the same numbers.
    data = json.loads(results_json(p))
    assert data["twins"]["agreement"]["dla_heads"]["spearman"] == pytest.approx(agree["dla_heads"]["spearman"])
    assert data["twins"]["top_movers"]["dla_heads"][0]["component"] == movers[0]["component"]


def test_heatmaps_have_a_difference_panel_on_one_scale_and_its_numbers_in_the_csv(pair):  # noqa: F811
    p = pair[0]
    fig = plots.FIGURES["atp_heads"](p, "atp*")
    assert len(fig.data) == 3 and fig.layout.annotations[2].text == "LN-free minus LN"
    diff = p.lnfree.atpstar_heads - p.ln.atpstar_heads
    assert np.allclose(fig.data[2].z, diff)
    bound = max(np.abs(a).max() for a in (p.ln.atpstar_heads, p.lnfree.atpstar_heads, diff))
    assert fig.layout.coloraxis.cmax == pytest.approx(bound)  # the three panels share one scale
    rows = list(csv.DictReader(io.StringIO(table_csv(figure_table("atp_heads", p)))))
    assert {r["model"] for r in rows} == {"ln", "lnfree", DIFFERENCE}
    for r in rows:
        if r["model"] == DIFFERENCE:
            i, h = int(r["layer"]), int(r["head"])
            assert float(r["atpstar"]) == pytest.approx(diff[i, h], abs=1e-9)
            assert float(r["dla"]) == pytest.approx(p.lnfree.dla_heads[i, h] - p.ln.dla_heads[i, h], abs=1e-9)
    resid = [r for r in figure_table("patch_resid", p) if r["model"] == DIFFERENCE]
    assert len(resid) == p.ln.patch_resid.size
    unpatched = [r for r in resid if r["patch"] is None]
    assert unpatched and len(unpatched) == int((~np.isfinite(p.lnfree.patch_resid - p.ln.patch_resid)).sum())
