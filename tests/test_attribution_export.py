"""Report, plots and export: the numbers in figures, tables and JSON are the analysis's numbers; the CLI
writes every format and turns a user's mistake into one line on stderr with exit code 2."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from attribution import AttributionInputError, ExportUnavailable, Settings, attention_pattern, compare
from attribution.export import export, figure_table, write_figure
from attribution.plots import FIGURES, attention_figure
from attribution.results import agreement
from models import load_bridge

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--task", "induction", "--n-prompts", "2", "--seq-len", "4", "--no-per-position"]


@pytest.fixture(scope="module")
def pair(tiny_ln_dir, tiny_lnfree_dir):
    ln = load_bridge(str(tiny_ln_dir))
    lnfree = load_bridge(str(tiny_lnfree_dir))
    seen = []
    result = compare(ln, lnfree, Settings(n_prompts=2, seq_len=4),
                     lambda f, text: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0  # progress is monotone and finishes
    return result, ln, lnfree


def test_agreement_metrics_by_hand():
    est, truth = np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.5, 2.6, 2.5, -4.0])
    a = agreement(est, truth, k=2)
    assert a["mae"] == pytest.approx(np.abs(est - truth).mean())
    assert a["pearson"] == pytest.approx(np.corrcoef(est, truth)[0, 1])
    assert a["spearman"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 4, 3, 1])[0, 1])
    assert a["topk_recall"] == 0.5  # top-2 |est|: {3, 2}; |truth|: {3, 1}
    assert math.isnan(agreement(np.ones(3), truth[:3])["pearson"])


def test_json_has_the_issue_keys(pair):
    data = json.loads(json.dumps(pair[0].to_json(), allow_nan=False))
    for side in ("ln", "lnfree"):
        for key in ("dla_nmae", "metric_clean", "metric_corrupt", "atp_pearson", "atp_spearman",
                    "atp_topk_recall", "atp_mae", "atpstar_pearson", "atpstar_spearman", "dla_heads",
                    "patch_heads", "atp_heads", "atpstar_heads", "de_heads"):
            assert key in data[side], key
        assert np.allclose(data[side]["dla_heads"], getattr(pair[0], side).dla_heads)
    assert data["settings"]["task"] == "induction"
    assert data["lnfree"]["ln_free"] is True and data["ln"]["ln_free"] is False
    # where each sigma comes from: the fixture's checkpoint records its sigmas
    assert data["lnfree"]["sigma_source"] == "stored" and data["ln"]["sigma_source"] is None
    assert data["lnfree"]["sigmas"] == pytest.approx(pair[2].info.sigmas, rel=0, abs=0)
    assert data["ln"]["sigmas"] is None


def test_figures_show_the_results(pair):
    p = pair[0]
    for name, make in FIGURES.items():
        fig = make(p)
        assert isinstance(fig, go.Figure), name
        rows = figure_table(name, p)
        assert rows and all(r.keys() == rows[0].keys() for r in rows), name
    fig = FIGURES["dla_heads"](p)
    assert np.allclose(fig.data[0].z, p.ln.dla_heads) and np.allclose(fig.data[1].z, p.lnfree.dla_heads)
    bound = max(np.abs(p.ln.dla_heads).max(), np.abs(p.lnfree.dla_heads).max())
    assert fig.layout.coloraxis.cmax == pytest.approx(bound) and fig.layout.coloraxis.cmin == pytest.approx(-bound)
    assert f"{p.ln.dla_nmae:.2%}" in FIGURES["dla_vs_de"](p).layout.title.text
    rows = figure_table("dla_heads", p)
    assert rows[0]["dla"] == pytest.approx(float(p.ln.dla_heads[0, 0]))


def test_attention_pattern(pair):
    p, ln, lnfree = pair
    pat, toks = attention_pattern(ln, p.settings, 1, 2)
    assert pat.shape == (len(toks), len(toks))
    assert np.allclose(pat.sum(-1), 1, atol=1e-5) and np.allclose(np.triu(pat, 1), 0)
    pat2, toks2 = attention_pattern(lnfree, p.settings, 1, 2)
    assert isinstance(attention_figure(pat, toks, pat2, toks2, 1, 2), go.Figure)
    with pytest.raises(AttributionInputError, match="does not exist"):
        attention_pattern(ln, p.settings, 5, 0)


def test_export_csv_and_html_in_process(pair, tmp_path):
    p = pair[0]
    paths = export(p, "all", "csv", tmp_path / "csv")
    assert len(paths) == len(FIGURES)
    with open(tmp_path / "csv" / "patch_resid.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == "ln"]
    # Components AtP-guided verification did not patch are empty cells (NaN in the results).
    for row in rows:
        want = float(p.ln.patch_resid[int(row["layer"]), int(row["position"])])
        assert (row["patch"] == "") == math.isnan(want)
        if row["patch"]:
            assert float(row["patch"]) == pytest.approx(want, abs=1e-6)
    assert any(row["patch"] for row in rows) and any(not row["patch"] for row in rows)
    (html,) = export(p, "dla_heads", "html", tmp_path / "f.html")
    text = html.read_text()
    assert not re.search(r"<script[^>]*src=", text) and len(text) > 1_000_000  # plotly.js embedded, offline


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("BROWSER_PATH"),
                    reason="kaleido needs chromium for PNG/SVG")
def test_export_png_svg(pair, tmp_path):
    fig = FIGURES["logit_lens"](pair[0])
    png = write_figure(fig, tmp_path / "f.png", "png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = write_figure(fig, tmp_path / "f.svg", "svg")
    assert "<svg" in svg.read_text()[:500]


def test_missing_browser_is_one_sentence(monkeypatch, tmp_path):
    def fail(*a, **k):
        raise RuntimeError("Kaleido requires Chrome to be installed.")
    monkeypatch.setattr(go.Figure, "to_image", fail)
    with pytest.raises(ExportUnavailable, match="install Debian's chromium"):
        write_figure(go.Figure(), tmp_path / "x.png", "png")


def test_kaleido_rendering_before_its_script_loaded_is_tried_again(monkeypatch, tmp_path):
    calls = []

    def flaky(*a, **k):  # kaleido's JavascriptError text when its tab is not ready
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        return b"\x89PNG..."
    monkeypatch.setattr(go.Figure, "to_image", flaky)
    monkeypatch.setattr("attribution.export.image_export_problem", lambda: None)
    assert write_figure(go.Figure(), tmp_path / "x.png", "png").read_bytes() == b"\x89PNG..." and len(calls) == 2
    calls.clear()

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
    monkeypatch.setattr(go.Figure, "to_image", broken)
    with pytest.raises(RuntimeError, match="kaleido_scopes"):  # twice: a real failure, not hidden
        write_figure(go.Figure(), tmp_path / "y.png", "png")
    assert len(calls) == 2


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "attribution.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_and_html(tiny_ln_dir, tiny_lnfree_dir, tmp_path):
    out = tmp_path / "r.json"
    r = _cli("--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), *SMALL, "--format", "json",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["lnfree"]["dla_nmae"] < 1e-3 and np.array(data["ln"]["patch_heads"]).shape == (2, 4)
    r = _cli("--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), "--task", "custom",
             "--prompt", "When Mary and John went to the store, John gave a drink to", "--answer", " Mary",
             "--counterfactual", " John", "--corrupt", "When Mary and John went to the store, Mary gave a drink to",
             "--figure", "atp_vs_patch", "--format", "html", "--out", str(tmp_path / "a.html"))
    assert r.returncode == 0, r.stderr
    assert "plotly" in (tmp_path / "a.html").read_text()[:200_000].lower()


@pytest.mark.parametrize("extra, message", [
    (["--task", "custom", "--prompt", "When Mary", "--answer", " Marygold"], "is not a single token"),
    (["--task", "custom", "--prompt", "When Mary", "--answer", " Mary", "--corrupt", "When Mary and John"],
     "corrupted prompt is"),
])
def test_cli_user_errors_exit_2_one_line(tiny_ln_dir, tiny_lnfree_dir, tmp_path, extra, message):
    r = _cli("--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), *extra, "--format", "json",
             "--out", str(tmp_path / "x.json"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_model_exit_2(tmp_path):
    r = _cli("--ln", str(tmp_path / "nope"), "--lnfree", "demo-lnfree", "--format", "json",
             "--out", str(tmp_path / "x.json"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], r.stderr


def test_custom_without_corrupt_has_dla_but_no_patching(pair):
    from attribution import analyse
    from attribution.results import PairResults

    _, ln, _ = pair
    s = Settings(task="custom", prompt="When Mary and John went", answer=" to")
    r = analyse(ln, s)
    assert np.isnan(r.patch_heads).all() and np.isnan(r.atp_heads).all() and math.isnan(r.metric_corrupt)
    total = r.dla_heads.sum() + r.dla_mlp.sum() + sum(r.dla_other.values())
    assert total == pytest.approx(r.metric_clean, abs=1e-5)
    p = PairResults(s, r, r)
    json.dumps(p.to_json(), allow_nan=False)  # NaN becomes null
    for name, make in FIGURES.items():
        make(p)
        figure_table(name, p)


def test_bundle_holds_every_figure_its_numbers_and_the_summary(pair):
    """The app's "Download all (zip)": every figure as HTML (and PNG/SVG with a browser) with its CSV, the
    summary table, and the JSON of every number."""
    import io
    import zipfile

    from attribution.export import bundle, image_export_problem, results_json
    from attribution.tables import summary_rows

    p = pair[0]
    zf = zipfile.ZipFile(io.BytesIO(bundle(p, "atp")))
    names = set(zf.namelist())
    images = image_export_problem() is None
    for fig in FIGURES:
        assert {f"{fig}.html", f"{fig}.csv"} <= names
        assert ({f"{fig}.png", f"{fig}.svg"} <= names) == images
    assert json.loads(zf.read("results.json")) == json.loads(results_json(p))
    summary = {r["quantity"]: r for r in csv.DictReader(io.StringIO(zf.read("summary.csv").decode()))}
    ln_col = f"LN: {p.ln.spec}"
    assert float(summary["DLA NMAE vs direct effect"][ln_col]) == pytest.approx(p.ln.dla_nmae, rel=1e-12)
    assert float(summary["cost (forward-pass equivalents)"][ln_col]) == p.ln.cost["total"]
    rows = summary_rows(p)
    assert [r["quantity"] for r in rows] == list(summary)
    assert float(summary["patched components"][ln_col]) == sum(
        np.isfinite(getattr(p.ln, f"patch_{k}")).sum() for k in ("heads", "resid", "mlp"))


def _tree(root: Path) -> dict:
    """Every file under `root` with its bytes: what a failed export must leave as it was."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, out, message", [
    (["--top-k", "0"], "r.json", "top-k must be a whole number >= 1"),
    (["--top-k", "-3"], "r.json", "top-k must be a whole number >= 1"),
    (["--verify-top", "-1"], "r.json", "verify-top must be a whole number >= 1"),
    (["--n-prompts", "0"], "r.json", "n-prompts must be a whole number >= 1"),
    ([], "folder", "is a directory; give a file name"),
    (["--figure", "dla_heads", "--format", "html"], "folder", "is a directory; give a file name"),
    (["--figure", "all", "--format", "csv"], "kept.txt", "is a file; it must be a directory"),
    ([], "kept.txt/r.json", "which is a file"),
    (["--figure", "all", "--format", "csv"], "kept.txt/a/b", "which is a file"),
])
def test_bad_flags_and_paths_fail_before_loading(tmp_path, capsys, extra, out, message):
    """Checked before any model is loaded (a model that cannot load proves it), one line, nothing changed."""
    from attribution.export import main

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "old.json").write_text("{}")
    (tmp_path / "kept.txt").write_text("the user's file")
    before = _tree(tmp_path)
    fmt = [] if "--format" in extra else ["--format", "json"]
    code = main(["--ln", str(tmp_path / "no-such-model"), "--lnfree", "demo-lnfree", *extra, *fmt,
                 "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert _tree(tmp_path) == before


def test_unwritable_out_fails_before_loading(tmp_path, capsys, monkeypatch):
    """(os.access is patched: tests may run as root, for whom every folder is writable.)"""
    from attribution import export as export_mod

    monkeypatch.setattr(os, "access", lambda *a: False)
    code = export_mod.main(["--ln", str(tmp_path / "no-such-model"), "--lnfree", "demo-lnfree",
                            "--format", "json", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not writable" in err[0], err


def test_a_full_disk_at_the_end_is_one_sentence(tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys, monkeypatch):
    import errno

    from attribution import export as export_mod

    def full(text, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(export_mod, "write_text", full)
    code = export_mod.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), *SMALL,
                            "--format", "json", "--out", str(tmp_path / "r.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert code == 2 and err == [f"error: could not write {tmp_path / 'r.json'}: No space left on device"]


def test_cli_swapped_pair_is_one_sentence(tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys):
    from attribution.export import main

    code = main(["--ln", str(tiny_lnfree_dir), "--lnfree", str(tiny_ln_dir), *SMALL, "--format", "json",
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "swapped" in err[0] and not (tmp_path / "r.json").exists()
