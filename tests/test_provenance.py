"""Every export carries its manifest (attribution.provenance), and --from-manifest makes the same numbers."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from attribution import Settings, provenance
from attribution.export import bundle, export, image_export_problem
from tests.test_attribution_export import pair  # noqa: F401 (the module fixture: a real tiny pair)
from tests.test_lnfree_cli import ENV
from tests.test_models import ROOT


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "attribution.export", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_manifest_records_the_export_and_reproduces_its_numbers(tiny_ln_dir, tiny_lnfree_dir, tmp_path):
    first = tmp_path / "first.json"
    proc = export_cli("--ln", tiny_ln_dir, "--lnfree", tiny_lnfree_dir, "--task", "induction", "--n-prompts", 2,
                      "--seq-len", 5, "--seed", 3, "--format", "json", "--out", first)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(first.read_text())
    m = data["manifest"]
    assert m["models"]["ln"]["spec"] == str(tiny_ln_dir) and m["models"]["lnfree"]["ln_free"] is True
    for side, d in (("ln", tiny_ln_dir), ("lnfree", tiny_lnfree_dir)):
        assert m["models"][side]["weights_sha256"] == {"model.safetensors": sha256(d / "model.safetensors")}
    assert m["settings"] == data["settings"] and m["settings"]["seed"] == 3 and m["dtype"] == "float32"
    assert m["prompt_tokens"] == data["ln"]["str_tokens"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert m["workbench"]["commit"] == head.strip() and m["workbench"]["version"]
    assert "--seed 3" in m["command"] and "--seq-len 5" in m["command"]
    # The manifest alone makes the same export again: every number equal, bit for bit.
    again = tmp_path / "again.json"
    proc = export_cli("--from-manifest", first, "--out", again)
    assert proc.returncode == 0, proc.stderr[-2000:]
    redo = json.loads(again.read_text())
    for key in ("ln", "lnfree"):  # all but the wall times of the stages
        assert {k: v for k, v in redo[key].items() if k != "cost"} == \
            {k: v for k, v in data[key].items() if k != "cost"}, key
        assert redo[key]["cost"].keys() == data[key]["cost"].keys()
    for key in ("twins", "settings", "intervals"):
        assert redo[key] == data[key], key
    assert {k: v for k, v in redo["manifest"].items() if k not in ("out", "command")} == \
        {k: v for k, v in m.items() if k not in ("out", "command")}
    # Weights that changed since are said, in one warning line.
    moved = tmp_path / "lnfree"
    shutil.copytree(tiny_lnfree_dir, moved)
    m["models"]["lnfree"]["spec"] = str(moved)
    m["models"]["lnfree"]["weights_sha256"] = {"model.safetensors": "0" * 64}
    (tmp_path / "edited.manifest.json").write_text(json.dumps(m))
    proc = export_cli("--from-manifest", tmp_path / "edited.manifest.json", "--out", tmp_path / "third.json")
    assert proc.returncode == 0 and "are not the ones the manifest records" in proc.stderr


def test_circuits_export_and_come_back_from_their_manifest(tiny_ln_dir, tiny_lnfree_dir, tmp_path):
    from attribution.circuits import pair_circuits
    from models import load_bridge

    first = tmp_path / "c.json"
    proc = export_cli("--ln", tiny_ln_dir, "--lnfree", tiny_lnfree_dir, "--task", "induction", "--n-prompts", 2,
                      "--seq-len", 5, "--circuits", "--ig-steps", 3, "--format", "json", "--out", first)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(first.read_text())
    assert data["manifest"]["circuits"] == {"ig_steps": 3, "edges": 20}
    assert "--circuits --ig-steps 3 --circuit-edges 20" in data["manifest"]["command"]
    want = pair_circuits(load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir)),
                         Settings(**data["settings"]), ig_steps=3)
    assert data["circuits"]["method"] == "EAP-IG (3 steps)"
    assert np.allclose(np.array(data["circuits"]["lnfree"]["scores"], dtype=float), want["lnfree"]["scores"],
                       equal_nan=True, rtol=1e-12, atol=0)
    proc = export_cli("--from-manifest", first, "--out", tmp_path / "again.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    redo = json.loads((tmp_path / "again.json").read_text())["circuits"]
    for side in ("ln", "lnfree"):
        assert redo[side]["scores"] == data["circuits"][side]["scores"]
        assert redo[side]["faithfulness"] == data["circuits"][side]["faithfulness"]
    html = tmp_path / "figs"
    proc = export_cli("--from-manifest", first, "--figure", "all", "--format", "html", "--out", html)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert provenance.read(html / "circuit_graphs.html")["circuits"]["ig_steps"] == 3
    assert (html / "faithfulness.html").exists()
    proc = export_cli("--ln", tiny_ln_dir, "--lnfree", tiny_lnfree_dir, "--figure", "faithfulness", "--format", "csv",
                      "--out", tmp_path / "f.csv")
    assert proc.returncode == 2 and "needs --circuits" in proc.stderr and proc.stderr.count("\n") == 1


def test_the_zip_holds_the_circuits_and_comes_back_from_its_manifest(tiny_ln_dir, tiny_lnfree_dir, tmp_path,
                                                                      monkeypatch, capsys):
    """`--format zip` (the app's "Download all") with --circuits: the circuit figures and their CSVs beside
    the others, every edge score in results.json, the manifest recording them; the zip's own manifest makes
    the same zip's numbers again.  In process, with PNG / SVG off (test_every_format_carries_the_manifest
    covers them), so that kaleido does not draw two dozen images."""
    import csv

    from attribution import export as exporting
    from attribution.circuits import edges_table, faithfulness_table

    monkeypatch.setattr(exporting, "image_export_problem", lambda: "no images")
    first = tmp_path / "all.zip"
    assert exporting.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), "--task", "induction",
                           "--n-prompts", "2", "--seq-len", "5", "--circuits", "--circuit-edges", "4",
                           "--format", "zip", "--out", str(first)]) == 0
    zf = zipfile.ZipFile(first)
    names = set(zf.namelist())
    assert {"manifest.json", "results.json", "summary.csv", "circuit_graphs.html", "circuit_graphs.csv",
            "faithfulness.html", "faithfulness.csv", "atp_heads.html", "atp_heads.csv"} <= names
    m = json.loads(zf.read("manifest.json"))
    assert m["format"] == "zip" and m["circuits"] == {"ig_steps": 1, "edges": 4}
    assert "--format zip" in m["command"] and "--circuit-edges 4" in m["command"]
    results = json.loads(zf.read("results.json"))
    assert results["manifest"] == m and results["circuits"]["method"] == "EAP"
    assert provenance.read(tmp_path / "all.zip") == m
    rows = list(csv.DictReader(io.StringIO(zf.read("circuit_graphs.csv").decode())))
    want = edges_table(results["circuits"], 4)
    assert len(rows) == len(want) == 8 and [r["writer"] for r in rows] == [r["writer"] for r in want]
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in want], rel=1e-12)
    curve = list(csv.DictReader(io.StringIO(zf.read("faithfulness.csv").decode())))
    assert len(curve) == len(faithfulness_table(results["circuits"]))
    (tmp_path / "graphs.html").write_bytes(zf.read("circuit_graphs.html"))
    assert provenance.read(tmp_path / "graphs.html")["circuits"]["edges"] == 4
    again = tmp_path / "again.zip"
    assert exporting.main(["--from-manifest", str(first), "--out", str(again)]) == 0
    redo = json.loads(zipfile.ZipFile(again).read("results.json"))
    for side in ("ln", "lnfree"):
        assert redo["circuits"][side]["scores"] == results["circuits"][side]["scores"]
        assert {k: v for k, v in redo[side].items() if k != "cost"} == \
            {k: v for k, v in results[side].items() if k != "cost"}
    capsys.readouterr()
    assert exporting.main(["--from-manifest", str(first), "--figure", "atp_heads", "--out",
                           str(tmp_path / "one.zip")]) == 2
    err = capsys.readouterr().err
    assert "--format zip holds every figure" in err and err.count("\n") == 1 and not (tmp_path / "one.zip").exists()


def test_every_format_carries_the_manifest(pair, tmp_path, monkeypatch):  # noqa: F811
    p, ln, lnfree = pair
    m = provenance.manifest(p, ln, lnfree, method="atp*", dtype="float32", device="cpu", figure="atp_heads",
                            fmt="html", out="x")
    formats = ["html", "csv", "json"] + (["svg", "png"] if image_export_problem() is None else [])
    for fmt in formats:
        (path,) = export(p, "atp_heads", fmt, tmp_path / f"f.{fmt}", manifest=m)
        assert provenance.read(path) == m, fmt
        if fmt == "csv":
            assert provenance.read(path.with_name(path.name + ".manifest.json")) == m
            assert "manifest" not in path.read_text()  # the CSV itself stays plain rows
    folder = export(p, "all", "csv", tmp_path / "all", manifest=m)
    assert provenance.read(tmp_path / "all" / "manifest.json") == m and provenance.read(folder[0]) == m
    import attribution.export

    monkeypatch.setattr(attribution.export, "image_export_problem", lambda: "no images")  # (PNG / SVG: above)
    with zipfile.ZipFile(io.BytesIO(bundle(p, "atp*", m))) as zf:
        assert json.loads(zf.read("manifest.json")) == m
        assert json.loads(zf.read("results.json"))["manifest"] == m
        (tmp_path / "zipped.html").write_bytes(zf.read("atp_heads.html"))
    assert provenance.read(tmp_path / "zipped.html") == m


def test_a_file_without_a_manifest_is_one_sentence(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text('{"a": 1}')
    proc = export_cli("--from-manifest", plain, "--out", tmp_path / "x.json")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "holds no lnfree export manifest" in lines[0]
    proc = export_cli("--format", "json", "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "--ln and --lnfree are needed" in proc.stderr
    with pytest.raises(Exception, match="holds no lnfree export manifest"):
        provenance.read(tmp_path / "plain.json")
