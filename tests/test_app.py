"""The Streamlit app through streamlit.testing's AppTest: every panel, every task, every error path."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from attribution import Settings, compare, intervals, twins, view
from models import load_bridge
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
HEADERS = ["1. Predictions", "2. Direct logit attribution", "3. Activation patching vs attribution patching"]
TABS = {"Summary": "4. Summary", "Logit lens": "5. Logit lens", "Attention pattern": "6. Attention pattern",
        "Where the twins differ": "7. Where the twins differ", "Circuits": "8. Circuits",
        "Dataset-level findings": "9. Dataset-level findings"}
needs_demo_pair = pytest.mark.skipif(
    not (ROOT / "models" / "demo-lnfree" / "model.safetensors").exists(), reason="the demo pair is not built")


@pytest.fixture(autouse=True)
def no_analysis_outlives_its_test():
    """Background analyses end with their test (a thread still in torch at exit aborts the process)."""
    yield
    for thread in threading.enumerate():
        if thread.name == "pair-analysis":
            thread.join(120)


def figures(at: AppTest) -> list[str]:
    """The names of the figures on the page (their keys are fig-NAME)."""
    return [chart.proto.id.split("-fig-", 1)[1] for chart in at.get("plotly_chart")]


def app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=600)


def use_pair(at: AppTest, ln: str, lnfree: str, **widgets) -> AppTest:
    """Preset widget values through session state, so the first run already uses them."""
    at.session_state["pair"] = "Custom (hub names or local directories)"
    at.session_state["ln_spec"] = ln
    at.session_state["lnfree_spec"] = lnfree
    for key, value in widgets.items():
        at.session_state[key] = value
    return at


def complete(at: AppTest) -> AppTest:
    """After a run: wait for the view's background analysis, then run the page again to show all of it
    (what a browser's page does by itself: its progress fragment reruns the page after each stage)."""
    job = at.session_state["job"] if "job" in at.session_state else None
    if job is not None:
        while job.running:
            job.wait(1.0)
        at.run()
    return at


def assert_complete(at: AppTest) -> None:
    """No error, sections 1-3, and the open tab's section (only the open one of sections 4-9 is drawn)."""
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert [h.value for h in at.main.header] == [*HEADERS, TABS[at.session_state["tab"]]]


def open_tab(at: AppTest, name: str) -> AppTest:
    """Open one of sections 4-9 (what clicking its tab does: the page reruns with it open)."""
    at.session_state["tab"] = name
    return at.run()


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@needs_demo_pair
def test_default_view_shows_demo_pair_numbers():
    """The opening view: induction on the demo pair, which both models get right (the corrupted prompts
    lower the metric), with every number the analysis's own."""
    at = complete(app().run())
    assert_complete(at)
    pair = compare(load_bridge("demo"), load_bridge("demo-lnfree"), Settings(task="induction", per_position=False))
    assert all(r.metric_clean > r.metric_corrupt for r in (pair.ln, pair.lnfree))
    assert all(r.top_tokens[0][0] == r.answer for r in (pair.ln, pair.lnfree))
    assert metric(at, "LN: DLA error (NMAE vs true direct effect)") == f"{pair.ln.dla_nmae:.1%}"
    assert metric(at, "LN-free: DLA error (NMAE vs true direct effect)") == f"{pair.lnfree.dla_nmae:.2e}"
    assert pair.lnfree.dla_nmae < 1e-5
    clean = [m.value for m in at.metric if m.label == "metric, clean"]
    assert clean == [f"{pair.ln.metric_clean:.3f}", f"{pair.lnfree.metric_clean:.3f}"]
    summary = at.dataframe[-1].value
    assert summary.loc["DLA NMAE vs direct effect"].tolist() == pytest.approx(
        [pair.ln.dla_nmae, pair.lnfree.dla_nmae], abs=1e-9)
    assert summary.loc["AtP* Spearman"].tolist() == pytest.approx(
        [pair.ln.agreement["atpstar"]["spearman"], pair.lnfree.agreement["atpstar"]["spearman"]], abs=1e-9)
    top = at.dataframe[0].value
    assert top["next token"].tolist() == [t for t, _ in pair.ln.top_tokens]
    # The agreement numbers' bootstrap intervals: attribution.intervals' own (tests/test_intervals.py).
    rows = intervals.interval_rows(pair.intervals)
    table = next(d.value for d in at.main.dataframe if "LN-free minus LN" in d.value.columns)
    assert table["statistic"].tolist() == [r["statistic"] for r in rows] and len(rows) == 7
    assert table["LN-free minus LN"].tolist() == [
        f"{r['LN-free minus LN']:.3f} [{r['LN-free minus LN low']:.3f}, {r['LN-free minus LN high']:.3f}]"
        for r in rows]
    # Where the twins differ: the agreement table and the largest changes are attribution.twins' own
    # (tested against their definitions in tests/test_twins.py); choosing a quantity computes nothing new.
    assert "twins-quantity" not in [s.key for s in at.selectbox]  # not drawn until its tab is open
    open_tab(at, "Where the twins differ")
    assert_complete(at)
    agree = twins.twin_agreement(pair)
    shown = next(d.value for d in at.main.dataframe if "components" in d.value.columns)
    assert shown["Spearman"].tolist() == pytest.approx([a["spearman"] for a in agree.values()], nan_ok=True)
    assert shown["components"].tolist() == [a["n"] for a in agree.values()]
    assert shown["Spearman low"].tolist() == pytest.approx(
        [pair.intervals["twins"][name]["spearman"]["low"] for name in agree], nan_ok=True)
    at.selectbox(key="twins-quantity").set_value("atpstar_heads").run()
    movers = next(d.value for d in at.main.dataframe if "lnfree_minus_ln" in d.value.columns)
    want = twins.top_movers(pair, "atpstar_heads")
    assert movers["component"].tolist() == [m["component"] for m in want]
    assert movers["lnfree_minus_ln"].tolist() == pytest.approx([m["lnfree_minus_ln"] for m in want])
    for name, title in TABS.items():  # each section says how to read it (sections 4-9 in their tabs)
        open_tab(at, name)
        assert_complete(at)
        captions = [c.value for c in at.main.caption]
        assert all(view.PANELS[t] in captions for t in [*HEADERS, title])
    assert set(view.PANELS) == {*HEADERS, *TABS.values()}


@needs_demo_pair
@pytest.mark.parametrize("task", ["induction", "ioi"])
def test_other_tasks(task):
    at = complete(app().run())
    complete(at.sidebar.radio(key="task").set_value(task).run())
    assert_complete(at)


@needs_demo_pair
def test_attention_head_and_method_switch():
    at = complete(app().run())
    open_tab(at, "Attention pattern")
    assert "attention" in figures(at)
    complete(at.number_input(key="head").set_value(1).run())
    assert_complete(at)
    complete(at.sidebar.radio(key="method").set_value("atp").run())
    assert_complete(at)


def test_unknown_model_is_an_error_not_a_traceback(tiny_ln_dir):
    at = complete(use_pair(app(), "no-such-model", str(tiny_ln_dir)).run())
    assert not at.exception
    assert len(at.error) == 1 and "Unknown model" in at.error[0].value


def test_missing_directory_is_an_error(tiny_ln_dir, tmp_path):
    at = complete(use_pair(app(), str(tiny_ln_dir), str(tmp_path / "nowhere")).run())
    assert not at.exception
    assert len(at.error) == 1 and "does not exist" in at.error[0].value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("answer", " Zyzzogeton Quaxle", "single token"),
        ("prompt", "", "empty"),
        ("corrupt", "Mary", "length"),
        ("prompt", "When Mary and John went to the store, " * 40 + "John gave a drink to", "context"),
    ],
)
def test_custom_task_input_errors(tiny_ln_dir, tiny_lnfree_dir, field, value, message):
    ioi = {"prompt": "When Mary and John went to the store, John gave a drink to", "answer": " Mary",
           "counterfactual": " John", "corrupt": "When Mary and John went to the store, Mary gave a drink to"}
    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), task="custom", **{**ioi, field: value}).run())
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value.lower()


@pytest.mark.parametrize("bos", ["packed", "prepend"])
def test_findings_panel_on_tiny_pair(tiny_ln_dir, tiny_lnfree_dir, bos):
    from attribution.findings import compare_findings, heldout_tokens, summary_table

    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), task="induction", n_prompts=2,
                           seq_len=6, findings_n_seq=4, findings_bos=bos, tab="Dataset-level findings").run())
    assert_complete(at)
    complete(at.button(key="findings_run").click().run())
    assert not at.exception and not at.error
    assert any(bos in c.value for c in at.caption if c.value.startswith("Definitions of the paper's code"))
    shown = next(d.value for d in at.main.dataframe if "paper" in d.value.columns)
    ln = load_bridge(str(tiny_ln_dir)).bridge
    lf = load_bridge(str(tiny_lnfree_dir)).bridge
    tokens = [heldout_tokens(b.tokenizer, b.cfg.n_ctx, 4, bos=bos) for b in (ln, lf)]
    expected = summary_table(compare_findings(ln, lf, *tokens))
    assert shown["metric"].tolist() == [r["metric"] for r in expected]
    for column in ("ln", "lnfree"):
        assert shown[column].tolist() == pytest.approx([r[column] for r in expected], rel=1e-5, nan_ok=True)


def zip_help(at: AppTest) -> str:
    """The help text of the summary's "Download all (zip)" button (it says whether the circuits are in it)."""
    return next(b.proto.help for b in at.get("download_button") if b.proto.label == "Download all (zip)")


def test_circuits_panel_on_tiny_pair(tiny_ln_dir, tiny_lnfree_dir):
    from attribution.circuits import edges_table, pair_circuits

    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), task="induction", n_prompts=2,
                           seq_len=6, circuits_edges=5).run())
    assert_complete(at)
    assert "once the Circuits tab has found them" in zip_help(at)
    open_tab(at, "Circuits")
    assert not any(d for d in at.main.dataframe if "writer" in d.value.columns)  # on request only
    complete(at.button(key="circuits_run").click().run())
    assert not at.exception and not at.error
    settings = Settings(task="induction", n_prompts=2, seq_len=6, per_position=False)
    want = edges_table(pair_circuits(load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir)), settings), 5)
    shown = next(d.value for d in at.main.dataframe if "writer" in d.value.columns)
    assert shown["writer"].tolist() == [r["writer"] for r in want]
    assert shown["score"].tolist() == pytest.approx([r["score"] for r in want], rel=1e-5)
    assert any(c.value.startswith("EAP: LN against LN-free edge scores") for c in at.main.caption)
    # What is shown goes into the zip ("Download all") with its record for the manifest.
    view_key, found, record = at.session_state["circuits_shown"]
    assert view_key[-1] == settings and record == {"ig_steps": 1, "edges": 5}
    assert edges_table(found, 5) == want
    open_tab(at, "Summary")
    assert "and the circuits of the Circuits tab" in zip_help(at)
    open_tab(at, "Circuits")
    at.radio(key="circuits_method").set_value("EAP-IG").run()  # a new method: on request again
    assert not any(d for d in at.main.dataframe if "writer" in d.value.columns)
    complete(at.button(key="circuits_run").click().run())
    assert any(c.value.startswith("EAP-IG (5 steps)") for c in at.main.caption) and not at.exception


def test_missing_chromium_is_an_error_with_what_to_install(tiny_ln_dir, tiny_lnfree_dir, monkeypatch):
    from attribution import export

    monkeypatch.setattr(export, "image_export_problem", lambda: export.CHROMIUM_HINT)
    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), task="induction", n_prompts=2, seq_len=6).run())
    assert not at.exception
    assert [e.value for e in at.error] == [export.CHROMIUM_HINT]
    assert "apt-get install chromium" in export.CHROMIUM_HINT


def test_not_enough_memory_is_an_error(tiny_ln_dir, tiny_lnfree_dir, monkeypatch):
    from models import loading

    monkeypatch.setattr(loading, "available_bytes", lambda device: 1024)
    # A trailing slash is a new spec string, so the app's model cache cannot answer from memory.
    at = complete(use_pair(app(), str(tiny_ln_dir) + "/", str(tiny_lnfree_dir) + "/").run())
    assert not at.exception
    assert len(at.error) == 1 and "needs about" in at.error[0].value and "bfloat16" in at.error[0].value


def test_empty_ln_field_pairs_an_lnfree_dir_with_its_recorded_base(tmp_path, tokenizer, tiny_ln_dir, tiny_sigmas):
    from tests.conftest import tiny_model, write_lnfree

    model = tiny_model(tokenizer)
    model.config.lnfree_base = str(tiny_ln_dir)
    write_lnfree(model, tiny_sigmas, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    at = complete(use_pair(app(), "", str(tmp_path), task="induction", n_prompts=2, seq_len=6).run())
    assert_complete(at)
    assert at.subheader[0].value == f"LN: `{tiny_ln_dir}`"
    # Without a recorded base the empty field is a user error, not a traceback.
    at = complete(use_pair(app(), "", str(tiny_ln_dir), task="induction").run())
    assert not at.exception and "records no base model" in at.error[0].value


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_every_dtype_the_app_offers_gives_the_analysis_numbers(dtype, tiny_ln_dir, tiny_lnfree_dir):
    """Each dtype in the selector: a complete view whose DLA errors are the analysis's own in that dtype."""
    settings = dict(task="induction", n_prompts=2, seq_len=6)
    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), dtype=dtype, **settings).run())
    assert_complete(at)
    pair = compare(load_bridge(str(tiny_ln_dir), dtype), load_bridge(str(tiny_lnfree_dir), dtype),
                   Settings(**settings, per_position=False))
    assert metric(at, "LN: DLA error (NMAE vs true direct effect)") == f"{pair.ln.dla_nmae:.1%}"
    assert metric(at, "LN-free: DLA error (NMAE vs true direct effect)") == f"{pair.lnfree.dla_nmae:.2e}"
    assert pair.lnfree.dla_nmae < 1e-9


def test_full_sweeps_patch_every_component(tiny_ln_dir, tiny_lnfree_dir):
    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), task="induction", n_prompts=2,
                           seq_len=6, verify_top=3).run())
    assert_complete(at)
    assert any("top-3 by |AtP*|" in c.value for c in at.main.caption)
    complete(at.sidebar.checkbox(key="full_sweeps").check().run())
    assert_complete(at)
    assert any("full sweeps" in c.value for c in at.main.caption)


def test_the_command_line_opens_the_app_on_a_pair(tiny_ln_dir, tiny_lnfree_dir, monkeypatch):
    """`streamlit run app.py -- --ln SPEC --lnfree SPEC` (what `make app LN=... LNFREE=...` runs)."""
    monkeypatch.setattr(sys, "argv", ["app.py", "--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir),
                                      "--dtype", "bfloat16"])
    at = app()
    at.session_state["task"], at.session_state["n_prompts"], at.session_state["seq_len"] = "induction", 2, 6
    complete(at.run())
    assert_complete(at)
    assert at.sidebar.selectbox(key="pair").value.startswith("Custom")
    assert [s.value for s in at.subheader[:2]] == [f"LN: `{tiny_ln_dir}`", f"LN-free: `{tiny_lnfree_dir}`"]
    assert at.sidebar.selectbox(key="dtype").value == "bfloat16"
    monkeypatch.setattr(sys, "argv", ["app.py", "--device", "tpu"])
    at = complete(app().run())
    assert "--device 'tpu' is not available here" in at.error[0].value and not at.exception


def test_the_vanilla_control_on_the_left(tiny_ln_dir, tiny_lnfree_dir, tokenizer, tmp_path, monkeypatch):
    """`--vanilla SPEC` (or the sidebar's field) puts the vanilla control in the left column, with every panel
    computed on it; the radio goes back to the original LN model; the URL keeps the choice."""
    vanilla = tmp_path / "vanilla"
    tiny_model(tokenizer, seed=3).save_pretrained(vanilla)
    tokenizer.save_pretrained(vanilla)
    monkeypatch.setattr(sys, "argv", ["app.py", "--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir),
                                      "--vanilla", str(vanilla)])
    at = app()
    # (seq_len 5: the app's analyses are shared by the whole process, and other tests time their own.)
    at.session_state["task"], at.session_state["n_prompts"], at.session_state["seq_len"] = "induction", 2, 5
    complete(at.run())
    assert_complete(at)
    assert [s.value for s in at.subheader[:2]] == [f"LN: `{vanilla}`", f"LN-free: `{tiny_lnfree_dir}`"]
    assert any("Left: its vanilla control" in c.value for c in at.main.caption)
    settings = Settings(task="induction", n_prompts=2, seq_len=5, per_position=False)
    alone = compare(load_bridge(str(vanilla)), load_bridge(str(tiny_lnfree_dir)), settings)
    clean = [m.value for m in at.metric if m.label == "metric, clean"]
    assert clean == [f"{alone.ln.metric_clean:.3f}", f"{alone.lnfree.metric_clean:.3f}"]
    assert metric(at, "LN: DLA error (NMAE vs true direct effect)") == f"{alone.ln.dla_nmae:.1%}"
    assert at.query_params["left"] == "vanilla" and at.query_params["vanilla_spec"] == str(vanilla)
    # Three-way: the original LN model, on request, as the summary's middle column.
    complete(at.button(key="three_way_run").click().run())
    assert not at.exception and not at.error
    summary = at.dataframe[-1].value
    original = compare(load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir)), settings).ln
    assert list(summary.columns) == [f"LN: {vanilla}", f"original: {tiny_ln_dir}", f"LN-free: {tiny_lnfree_dir}"]
    assert summary.loc["metric (clean)"].tolist() == pytest.approx(
        [alone.ln.metric_clean, original.metric_clean, alone.lnfree.metric_clean])
    assert summary.loc["AtP* Spearman"].tolist()[1] == pytest.approx(original.agreement["atpstar"]["spearman"])
    at.sidebar.radio(key="left").set_value("original")
    complete(at.run())
    assert_complete(at)
    assert at.subheader[0].value == f"LN: `{tiny_ln_dir}`"


def test_the_url_holds_the_view(tiny_ln_dir, tiny_lnfree_dir):
    """A link's query parameters open the same view, and the page writes its view back into the URL."""
    at = app()
    for key, value in {"pair": "Custom (hub names or local directories)", "ln_spec": str(tiny_ln_dir),
                       "lnfree_spec": str(tiny_lnfree_dir), "task": "ioi", "n_prompts": "3", "method": "atp",
                       "full_sweeps": "true", "tab": "Logit lens"}.items():
        at.query_params[key] = value
    complete(at.run())
    assert_complete(at)
    assert at.main.header[-1].value == "5. Logit lens" and "logit_lens" in figures(at)  # the link's open tab
    assert at.sidebar.radio(key="task").value == "ioi" and at.sidebar.slider(key="n_prompts").value == 3
    assert at.sidebar.radio(key="method").value == "atp" and at.sidebar.checkbox(key="full_sweeps").value
    assert any("full sweeps" in c.value for c in at.main.caption)
    assert at.query_params["task"] == "ioi" and at.query_params["top_k"] == "10"
    # A bad parameter is one sentence; the rest of the link still applies.
    at = app()
    at.query_params.update({"pair": "Custom (hub names or local directories)", "ln_spec": str(tiny_ln_dir),
                            "lnfree_spec": str(tiny_lnfree_dir), "task": "induction", "n_prompts": "999",
                            "seq_len": "6", "colour": "blue", "tab": "Plots"})
    complete(at.run())
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The link's n_prompts='999' is not a whole number in 1..32; it was ignored.",
        "The link's colour='blue' is not a setting of this page; it was ignored.",
        f"The link's tab='Plots' is not one of {', '.join(TABS)}; it was ignored."]
    assert at.main.header[-1].value == "4. Summary"
    assert at.sidebar.slider(key="seq_len").value == 6 and at.sidebar.slider(key="n_prompts").value == 8


def test_view_parsing_against_its_definition():
    from attribution import view

    choices = {"task": ["custom", "ioi"], "dtype": ["float32"], "device": ["cpu"]}
    values, problems = view.from_query({"task": "ioi", "prompt": "a b", "position": "-2", "per_position": "true",
                                        "top_k": "x", "dtype": "float8"}, choices)
    assert values == {"task": "ioi", "prompt": "a b", "position": -2, "per_position": True}
    assert len(problems) == 2 and "top_k='x'" in problems[0] and "float8" in problems[1]
    values, problems = view.from_launch_args(["--lnfree", "/runs/x"], choices, "custom pair")
    assert values == {"pair": "custom pair", "ln_spec": "", "lnfree_spec": "/runs/x"} and problems == []
    assert view.to_query({"task": "ioi", "full_sweeps": False, "other": 1}, ["task"]) == {"task": "ioi",
                                                                                          "full_sweeps": "false"}


def test_numbers_come_first_and_cancel_keeps_them(tiny_ln_dir, tiny_lnfree_dir, monkeypatch):
    """Predictions, DLA and AtP are on the page while activation patching still runs; a view option
    changes nothing computed; Cancel leaves a consistent page, and 'Run the rest' completes it (with
    live updates: the page follows the job to its end by itself)."""
    from attribution import report
    from attribution.errors import AnalysisCancelled

    settings = dict(task="induction", n_prompts=2, seq_len=6)
    pair = compare(load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir)),
                   Settings(**settings, per_position=False))
    gate, real = threading.Event(), report.activation_patching

    def gated(*args, **kwargs):  # verification waits for the test (or for a cancel)
        should_stop = args[6]
        while not gate.wait(0.05):
            if should_stop():
                raise AnalysisCancelled("cancelled")
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "activation_patching", gated)
    try:
        staged_then_cancelled(tiny_ln_dir, tiny_lnfree_dir, settings, pair, gate)
    finally:
        gate.set()


def staged_then_cancelled(tiny_ln_dir, tiny_lnfree_dir, settings, pair, gate) -> None:
    # Without live updates a page run shows what is done and returns (with them, it waits for each stage).
    at = use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), live=False, **settings).run()
    job = at.session_state["job"]
    assert job.stage in (None, "numbers", "attribution"), "a finished analysis of this view exists already"
    while job.stage != "attribution":
        job.wait(0.5)
    at.run()
    assert not at.exception and not at.error
    assert_complete(at)
    assert "dla_heads" in figures(at) and "atp_heads" in figures(at) and "patch_heads" not in figures(at)
    assert any("Activation patching (the ground truth" in i.value for i in at.info)
    assert metric(at, "LN: DLA error (NMAE vs true direct effect)") == f"{pair.ln.dla_nmae:.1%}"
    shown = job.results
    np.testing.assert_allclose(shown.ln.atpstar_heads, pair.ln.atpstar_heads, atol=1e-9)
    assert np.isnan(shown.ln.patch_heads).all()

    at.sidebar.radio(key="method").set_value("atp").run()  # a view option: the same job runs on
    assert at.session_state["job"] is job and job.running and not at.exception

    at.button(key="cancel").click().run()
    while job.running:
        job.wait(0.5)
    at.run()
    assert not at.exception and not at.error and job.stage == "attribution"
    assert [w.value.split(":")[0] for w in at.warning] == ["Cancelled after attribution patching (AtP, AtP*)"]
    assert "atp_heads" in figures(at) and "patch_heads" not in figures(at)
    assert metric(at, "LN: DLA error (NMAE vs true direct effect)") == f"{pair.ln.dla_nmae:.1%}"

    gate.set()
    at.sidebar.checkbox(key="live").check()
    at.button(key="resume").click().run()
    assert_complete(at)
    assert not at.warning and "patch_heads" in figures(at)
    np.testing.assert_allclose(job.results.ln.patch_heads, pair.ln.patch_heads, atol=1e-9, equal_nan=True)


def test_an_analysis_done_while_the_first_numbers_wait_shows_the_corrupted_metric(tiny_ln_dir, tiny_lnfree_dir):
    """The corrupted metric comes with attribution patching, after the first numbers are drawn: when the
    whole analysis ends during the page's wait that follows them (the page is then drawn once, complete),
    the predictions panel shows it (it showed 'nan', found by the two-session browser test)."""
    settings = dict(task="induction", n_prompts=2, seq_len=6)
    pair = compare(load_bridge(str(tiny_ln_dir)), load_bridge(str(tiny_lnfree_dir)),
                   Settings(**settings, per_position=False))
    at = use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), live=False, **settings).run()
    assert not at.exception and not at.error
    if not at.session_state["job"].complete:
        pytest.skip("the tiny pair's analysis outlasted the page's wait on this machine (it takes ~0.1 s)")
    shown = [m.value for m in at.metric if m.label == "metric, corrupted"]
    assert shown == [f"{pair.ln.metric_corrupt:.3f}", f"{pair.lnfree.metric_corrupt:.3f}"]
    assert "patch_heads" in figures(at)


def test_a_swapped_pair_is_one_sentence(tiny_ln_dir, tiny_lnfree_dir):
    at = use_pair(app(), str(tiny_lnfree_dir), str(tiny_ln_dir)).run()
    assert not at.exception
    assert len(at.error) == 1 and "swapped" in at.error[0].value


def test_custom_task_without_a_corrupted_prompt_shows_what_needs_none(tiny_ln_dir, tiny_lnfree_dir):
    """Predictions, DLA, the logit lens and attention need no corrupted prompt; patching says what it needs."""
    at = complete(use_pair(app(), str(tiny_ln_dir), str(tiny_lnfree_dir), task="custom",
                           prompt="When Mary and John went to the store, John gave a drink to", answer=" Mary",
                           counterfactual=" John", corrupt="").run())
    assert_complete(at)
    assert set(figures(at)) == {"dla_heads", "dla_layers", "dla_vs_de"}
    assert set(figures(open_tab(at, "Logit lens"))) == {"dla_heads", "dla_layers", "dla_vs_de", "logit_lens"}
    assert set(figures(open_tab(at, "Attention pattern"))) == {"dla_heads", "dla_layers", "dla_vs_de", "attention"}
    assert_complete(at)
    assert any("No corrupted prompt" in i.value for i in at.info)
    assert [m.value for m in at.metric if m.label == "metric, corrupted"] == ["n/a", "n/a"]
    assert any("as recorded in the checkpoint" in c.value for c in at.caption)  # the fixture stores sigmas
    assert metric(at, "LN-free: DLA error (NMAE vs true direct effect)")
