"""attribution.findings.compare, its CLI and figures."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

from attribution import findings as fnd
from attribution.findings.plots import FINDINGS_FIGURES


def test_compare_findings_and_figures(ln_pair, lnfree_pair, tokens):
    result = fnd.compare_findings(ln_pair[0], lnfree_pair[0], tokens[:3, :16], tokens[:3, :16], k=2)
    json.dumps(result, allow_nan=False)
    neurons = result["settings"]["ablated_neurons"]
    assert len(neurons) == 2 and result["settings"]["n_bins"] == 10
    assert result["settings"]["definitions"] == "the paper's code" and result["settings"]["variants"] == {}
    assert result["ln"]["ablation"]["neurons"] == result["lnfree"]["ablation"]["neurons"] == neurons
    assert [c["neuron"] for c in result["ln"]["neurons"]] == neurons
    assert result["lnfree"]["dla_error"]["nmae"] < 1e-5 < result["ln"]["dla_error"]["nmae"]
    for key in ("ln", "lnfree"):   # no variant unless asked for
        assert "dla_error_all" not in result[key] and "head_mean" not in result[key]["sinks"]
        assert "signed" not in result[key]["ablation"]
    table = {r["metric"]: r for r in fnd.summary_table(result)}
    assert not any("variant" in m for m in table)
    assert table["DLA error (NMAE over heads)"]["ln"] == result["ln"]["dla_error"]["nmae"]
    assert table["attention-sink rate"]["lnfree"] == result["lnfree"]["sinks"]["rate"]
    top = result["ln"]["ablation"]["per_neuron"][0]
    assert table["top confidence neuron ablated: median |delta CE|"]["ln"] == top["median_abs_delta_ce"]
    assert table["residual norm at position 0, final"]["ln"] == result["ln"]["norms"]["pos0_final"]
    for name, make in FINDINGS_FIGURES.items():
        fig = make(result)
        assert isinstance(fig, go.Figure), name
        assert {t.xaxis for t in fig.data} == {"x", "x2"}, name      # LN | LN-free panels
    heat = FINDINGS_FIGURES["dla_error"](result)
    assert {t.coloraxis for t in heat.data} == {"coloraxis"}     # one shared colour scale
    top = max(max(r) for m in ("ln", "lnfree") for r in result[m]["dla_error"]["per_head"])
    assert heat.layout.coloraxis.cmax == pytest.approx(top)
    norms = FINDINGS_FIGURES["norms"](result)
    assert norms.layout.yaxis2.matches == "y"                    # shared y scale
    assert list(norms.data[0].y) == result["ln"]["norms"]["pos0"]
    bars = FINDINGS_FIGURES["neurons"](result)
    assert list(bars.data[0].y) == [p["median_abs_delta_ce"] for p in result["ln"]["ablation"]["per_neuron"]]


def test_variants_are_marked(ln_pair, lnfree_pair, tokens):
    result = fnd.compare_findings(ln_pair[0], lnfree_pair[0], tokens[:2, :16], tokens[:2, :16], k=2, variants=True)
    json.dumps(result, allow_nan=False)
    assert result["settings"]["variants"] == fnd.VARIANTS
    for key in ("ln", "lnfree"):
        r = result[key]
        assert r["sinks"]["head_mean"]["definition"].startswith("our variant")
        assert r["ablation"]["signed"]["definition"].startswith("our variant")
        assert r["dla_error_all"]["definition"].startswith("our variant")
        assert r["dla_error_all"]["n_predictions"] == 2 * 15 and r["dla_error"]["n_predictions"] == 2
    rows = fnd.summary_table(result)
    marked = [r for r in rows if r["metric"].startswith("[our variant]")]
    assert len(marked) == 4 and rows[-4:] == marked and all(r["paper"] == "" for r in marked)
    assert marked[-1]["ln"] == result["ln"]["dla_error_all"]["nmae"]


def test_pair_findings_bos_protocol(tiny_ln_dir, tiny_lnfree_dir):
    """The app's call, pair_findings(ln, lnfree, n_seq, ...), with the BOS switch: recorded, and it changes
    the sequences the findings see."""
    from models import load_bridge

    ln, lf = load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir))
    packed = fnd.pair_findings(ln, lf, 2, seq_len=16)
    bos = fnd.pair_findings(ln, lf, 2, seq_len=16, bos="prepend")
    assert packed["settings"]["bos"] == "packed" and bos["settings"]["bos"] == "prepend"
    assert bos["settings"]["bos_protocol"] == fnd.BOS_PROTOCOLS["prepend"]
    tokens = fnd.heldout_tokens(ln.bridge.tokenizer, 16, 2, bos="prepend")
    assert bos["ln"]["norms"] == fnd.first_token_norms(ln.bridge, tokens)
    assert bos["ln"]["norms"]["pos0"] != packed["ln"]["norms"]["pos0"]
    with pytest.raises(fnd.FindingsInputError, match="BOS protocol"):
        fnd.pair_findings(ln, lf, 2, seq_len=16, bos="eot")


def test_cli_writes_json_and_figures(tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys):
    from attribution.findings import cli as findings_cli

    out, figs = tmp_path / "r.json", tmp_path / "figs"
    rc = findings_cli.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), "--n-seq", "2",
                            "--seq-len", "16", "--k", "2", "--out", str(out), "--figures", str(figs)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["n_seq"] == 2 and result["settings"]["seq_len"] == 16
    assert result["settings"]["source"] == "demo" and result["settings"]["bos"] == "packed"
    assert result["models"] == {"ln": str(tiny_ln_dir), "lnfree": str(tiny_lnfree_dir), "lnfree_is_ln_free": True,
                                "ln_is_ln_free": False}
    assert result["lnfree"]["dla_error"]["nmae"] < 1e-5
    printed = capsys.readouterr().out
    assert "DLA error (NMAE over heads)" in printed and "[our variant]" not in printed
    assert printed.splitlines()[0] == f"BOS protocol: packed ({fnd.BOS_PROTOCOLS['packed']})"
    for name in FINDINGS_FIGURES:
        html = (figs / f"{name}.html").read_text()
        assert "Plotly.newPlot" in html and len(html) > 1_000_000   # plotly.js embedded: works offline


def test_cli_analyses_the_demo_pair_with_bos_by_default(tmp_path, capsys):
    """The demo pair was trained on chunks that start with <|endoftext|>, so its default protocol is prepend
    (the paper's packed chunks stay the default for other models, above)."""
    from attribution.findings import cli as findings_cli
    from attribution.findings.base import default_bos

    assert default_bos("demo") == "prepend" and default_bos("gpt2") == "packed"
    assert default_bos("/runs/demo-vanilla", "demo-lnfree") == "prepend"  # the twin decides, not the LN slot
    out = tmp_path / "demo.json"
    rc = findings_cli.main(["--ln", "demo", "--lnfree", "demo-lnfree", "--n-seq", "1", "--seq-len", "16", "--k", "1",
                            "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["settings"]["bos"] == "prepend"
    assert capsys.readouterr().out.splitlines()[0].startswith("BOS protocol: prepend")


def test_cli_bos_prepend_and_variants(tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys):
    from attribution.findings import cli as findings_cli

    out = tmp_path / "r.json"
    rc = findings_cli.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), "--n-seq", "2",
                            "--seq-len", "16", "--k", "2", "--bos", "prepend", "--variants", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["bos"] == "prepend" and result["settings"]["variants"] == fnd.VARIANTS
    assert "dla_error_all" in result["ln"]
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("BOS protocol: prepend (<|endoftext|> prepended")
    assert "[our variant] DLA error, all positions" in printed


@pytest.mark.parametrize("argv, message", [
    (["--bos", "first"], "BOS protocol"),
    (["--n-seq", "0"], "--n-seq"),
    (["--threshold", "2"], "--threshold"),
    (["--seq-len", "1000"], "context"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys):
    from attribution.findings import cli as findings_cli

    rc = findings_cli.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir),
                            "--out", str(tmp_path / "r.json")] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_cli_unknown_model_exits_2(tmp_path, capsys):
    from attribution.findings import cli as findings_cli

    rc = findings_cli.main(["--ln", str(tmp_path / "missing"), "--lnfree", "demo-lnfree",
                            "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_python_m_attribution_findings_runs_as_a_process(tiny_ln_dir, tiny_lnfree_dir, tmp_path):
    """The README's command form, `python -m attribution.findings`, as a real process."""
    import subprocess
    import sys

    out = tmp_path / "f.json"
    proc = subprocess.run([sys.executable, "-m", "attribution.findings", "--ln", str(tiny_ln_dir), "--lnfree",
                           str(tiny_lnfree_dir), "--n-seq", "2", "--seq-len", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["lnfree"]["dla_error"]["nmae"] < 1e-9
    assert "DLA error (NMAE over heads)" in proc.stdout


@pytest.mark.parametrize("out, figures, source, message", [
    ("folder", None, "demo", "--out {tmp}/folder is a directory"),
    ("r.json", "kept.txt", "demo", "--figures {tmp}/kept.txt is a file"),
    ("kept.txt/r.json", None, "demo", "which is a file"),
    ("new/r.json", None, "demo", "does not exist"),
    ("r.json", None, "folder", "is not a regular file"),
    ("r.json", None, "pipe", "is not a regular file"),
    ("r.json", None, "missing.txt", "No such file"),
    ("r.json", None, "--threshold nan", "--threshold"),
])
def test_cli_bad_paths_fail_before_loading(out, figures, source, message, tmp_path, capsys):
    """Checked before a model loads (the model cannot load: the check must come first); the user's files
    unchanged; a named pipe as --source is refused by its type, never opened (opening it would block)."""
    import os

    from attribution.findings import cli as findings_cli

    (tmp_path / "folder").mkdir()
    (tmp_path / "kept.txt").write_text("the user's file")
    os.mkfifo(tmp_path / "pipe")
    extra = source.split() if source.startswith("--") else ["--source", str(tmp_path / source)]
    if source == "demo":
        extra = []
    argv = ["--ln", str(tmp_path / "no-model"), "--lnfree", "demo-lnfree", "--out", str(tmp_path / out), *extra]
    rc = findings_cli.main(argv + (["--figures", str(tmp_path / figures)] if figures else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert (tmp_path / "kept.txt").read_text() == "the user's file" and not (tmp_path / "r.json").exists()
