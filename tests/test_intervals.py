"""Bootstrap intervals over prompts (attribution.intervals): the resampling against closed forms, each
prompt's own values against an analysis of that prompt alone, and the batch value against the analysis's."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from attribution import intervals, tasks
from attribution.atp import attribution_patching
from attribution.patching import activation_patching
from attribution.report import compare
from attribution.results import ModelResults, Settings
from attribution.twins import twin_agreement
from models import load_bridge

KINDS = ("heads", "resid", "mlp", "heads_pos", "mlp_pos")


def test_resampled_means_match_the_closed_form():
    """The bootstrap distribution of a mean has mean x-bar and variance var(x) / n (ddof 0) exactly; its
    95% percentile interval is x-bar +- 1.96 sd / sqrt(n) for a large n."""
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    w = intervals.resample_weights(len(x), 20_000, seed=0)
    assert np.allclose(w.sum(1), 1.0) and np.allclose(w * len(x), np.round(w * len(x)))  # counts over n
    means = w @ x
    se = x.std() / math.sqrt(len(x))
    assert means.mean() == pytest.approx(x.mean(), abs=0.02 * se)
    assert means.std() == pytest.approx(se, rel=0.03)
    iv = intervals.interval(x.mean(), means)
    assert iv["low"] == pytest.approx(x.mean() - 1.96 * se, abs=0.06 * se)
    assert iv["high"] == pytest.approx(x.mean() + 1.96 * se, abs=0.06 * se)
    assert iv["resamples"] == 20_000 and iv["value"] == x.mean()


def test_a_model_statistic_that_is_a_mean_gets_its_closed_form_interval():
    """With every true direct effect 1, DLA's NMAE is the mean over prompts of each prompt's mean |DLA - 1|:
    its interval through model_statistics is a mean's."""
    B, L, H = 300, 2, 3
    rng = np.random.default_rng(2)
    dla = 1 + rng.normal(0, 0.5, size=(B, L, H))
    m = ModelResults.__new__(ModelResults)
    m.per_prompt, m.agreement = {"dla_heads": dla, "de_heads": np.ones((B, L, H))}, {}
    w = intervals.resample_weights(B, 20_000, seed=0)
    nmae = intervals.model_statistics(m, w, k=3)["dla_nmae"]
    per_prompt = np.abs(dla - 1).mean((1, 2))
    se = per_prompt.std() / math.sqrt(B)
    assert nmae.std() == pytest.approx(se, rel=0.03)
    iv = intervals.interval(per_prompt.mean(), nmae)
    assert iv["low"] == pytest.approx(per_prompt.mean() - 1.96 * se, abs=0.06 * se)
    assert iv["high"] == pytest.approx(per_prompt.mean() + 1.96 * se, abs=0.06 * se)


def test_row_statistics_match_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    y[:, :4] += 2 * x[:, :4]
    from attribution.results import agreement

    got = intervals._compare(x, y, k=4)
    for r in range(5):
        want = agreement(x[r], y[r], k=4)
        assert got["pearson"][r] == pytest.approx(want["pearson"], abs=1e-12)
        assert got["spearman"][r] == pytest.approx(want["spearman"], abs=1e-12)
        assert got["topk_recall"][r] == want["topk_recall"]


@pytest.fixture(scope="module")
def models(tiny_ln_dir, tiny_lnfree_dir):
    # float64, so that one prompt alone and the batch agree to rounding (float32 batching moves ~1e-6)
    return load_bridge(str(tiny_ln_dir), "float64"), load_bridge(str(tiny_lnfree_dir), "float64")


@pytest.fixture(scope="module", params=[False, True], ids=["top-k verification", "full sweeps"])
def analysed(request, models):
    settings = Settings(n_prompts=4, seq_len=5, top_k=5, full_sweeps=request.param)
    return compare(*models, settings)


def one_prompt(task: tasks.Task, b: int) -> tasks.Task:
    cut = slice(b, b + 1)
    return dataclasses.replace(task, clean=task.clean[cut], corrupt=task.corrupt[cut], answer=task.answer[cut],
                               counterfactual=task.counterfactual[cut])


def test_each_prompts_values_are_an_analysis_of_that_prompt_alone(models, analysed):
    """Weights that pick one prompt give, for every quantity, what AtP, AtP* and activation patching give
    when run on that prompt alone (with its own normaliser and its own GradDrop)."""
    for model, res in zip(models, (analysed.ln, analysed.lnfree), strict=True):
        task = tasks.build(model.bridge.tokenizer, analysed.settings, model.bridge.cfg.n_ctx)
        B = task.clean.shape[0]
        for b in range(B):
            alone = one_prompt(task, b)
            atp = attribution_patching(model.bridge, alone, star=True)
            patch = activation_patching(model.bridge, alone, KINDS)
            e = intervals.estimates(res.per_prompt, np.eye(B)[b:b + 1])
            for kind in KINDS:
                np.testing.assert_allclose(e["atp_" + kind][0], atp[kind].numpy(), rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(e["atpstar_" + kind][0], atp["star_" + kind].numpy(), rtol=1e-7, atol=1e-9)
                mine, alone_patch = e["patch_" + kind][0], patch[kind].numpy()
                done = np.isfinite(mine)  # top-k verification patched some components only
                assert done.any()
                np.testing.assert_allclose(mine[done], alone_patch[done], rtol=1e-6, atol=1e-8)


def test_the_whole_batch_gives_the_analysis_own_numbers(analysed):
    w = np.full((1, analysed.settings.n_prompts), 1 / analysed.settings.n_prompts)
    for res in (analysed.ln, analysed.lnfree):
        e = intervals.estimates(res.per_prompt, w)
        for name in ("dla_heads", "de_heads", "dla_mlp", *(f"{m}_{kind}" for m in ("atp", "atpstar", "patch")
                                                          for kind in KINDS)):
            np.testing.assert_allclose(e[name][0], getattr(res, name), rtol=1e-9, atol=1e-12, err_msg=name)
    iv = intervals.pair_intervals(analysed, n_boot=200)
    assert iv["n_prompts"] == 4 and iv["n_boot"] == 200
    for side, res in (("ln", analysed.ln), ("lnfree", analysed.lnfree)):
        assert iv[side]["dla_nmae"]["value"] == pytest.approx(res.dla_nmae, rel=1e-9)
        for method in ("atp", "atpstar"):
            for stat in ("pearson", "spearman", "topk_recall"):
                got, want = iv[side][f"{method}_{stat}"]["value"], res.agreement[method][stat]
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12) or (math.isnan(got) and math.isnan(want))
        for v in iv[side].values():
            assert v["resamples"] == 0 or v["low"] <= v["high"]
    for stat, v in iv["lnfree_minus_ln"].items():
        assert v["value"] == pytest.approx(iv["lnfree"][stat]["value"] - iv["ln"][stat]["value"], abs=1e-12)
    agree = twin_agreement(analysed)
    for name, d in iv["twins"].items():
        assert d["spearman"]["value"] == pytest.approx(agree[name]["spearman"], abs=1e-9)
        assert d["topk_overlap"]["value"] == agree[name]["topk_overlap"]
    assert "dla_heads" in iv["twins"] and "patch_heads" in iv["twins"]


def test_intervals_are_seeded_and_exported(analysed):
    a = intervals.pair_intervals(analysed, n_boot=100)
    assert a == intervals.pair_intervals(analysed, n_boot=100)
    assert a != intervals.pair_intervals(analysed, n_boot=100, seed=1)
    data = json.loads(json.dumps(analysed.to_json(), allow_nan=False, default=float))
    assert data["intervals"]["level"] == 0.95 and data["intervals"]["n_boot"] == intervals.N_BOOT
    assert len(data["ln"]["metric_per_prompt"]["clean"]) == 4
    assert "per_prompt" not in data["ln"]
    rows = intervals.interval_rows(a)
    assert rows[0]["statistic"] == "DLA NMAE vs direct effect" and {"LN low", "LN-free minus LN high"} <= set(rows[0])


def test_one_prompt_has_no_interval(models):
    from tests.test_report_numbers import IOI

    pair = compare(*models, IOI)
    iv = intervals.pair_intervals(pair)
    assert iv["n_prompts"] == 1 and "no interval" in iv["note"] and "ln" not in iv
    assert intervals.interval_rows(iv) == []


def test_the_zip_holds_the_intervals(analysed, monkeypatch):
    import csv
    import io
    import zipfile

    from attribution import export

    monkeypatch.setattr(export, "image_export_problem", lambda: "no images")  # PNG / SVG: test_attribution_export
    zf = zipfile.ZipFile(io.BytesIO(export.bundle(analysed)))
    rows = list(csv.DictReader(io.StringIO(zf.read("agreement_intervals.csv").decode())))
    want = intervals.interval_rows(analysed.intervals)
    assert [r["statistic"] for r in rows] == [w["statistic"] for w in want]
    assert [float(r["LN-free minus LN low"]) for r in rows] == pytest.approx([w["LN-free minus LN low"] for w in want])
    assert json.loads(zf.read("results.json"))["intervals"]["lnfree"]["atp_pearson"]["value"] == pytest.approx(
        analysed.lnfree.agreement["atp"]["pearson"])


def test_without_per_position_no_per_position_values_are_kept(models):
    pair = compare(*models, Settings(n_prompts=3, seq_len=4, per_position=False))
    assert not [k for k in pair.ln.per_prompt if "_pos" in k] and "atp_sets_heads" in pair.ln.per_prompt
    iv = intervals.pair_intervals(pair, n_boot=50)
    assert iv["ln"]["atpstar_pearson"]["value"] == pytest.approx(pair.ln.agreement["atpstar"]["pearson"], rel=1e-9)
