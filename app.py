"""lnfree workbench: an LN model and its LN-free twin, side by side.

    streamlit run app.py [-- --ln SPEC --lnfree SPEC --vanilla SPEC --dtype DTYPE --device DEVICE]

Opens on the demo pair, or on the pair given after `--` (an LN-free directory alone pairs with its
recorded base; --vanilla puts the pair's vanilla fine-tuning control in the left column).  The view
(pair, task, prompt, settings) is kept in the URL's query parameters, so a bookmarked or shared link
opens the same view.  Layout and widgets only: loading lives in models/,
every number in attribution/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from functools import partial

import streamlit as st

if __name__ != "__main__":
    # Imported, not run: `streamlit run app.py` serves this module's `app`, and runs this file as __main__ for
    # each browser session.  The server's start-up imports the analysis stack and loads the opening pair in
    # the background (models/preload.py), while the browser fetches the page.
    import contextlib

    @contextlib.asynccontextmanager
    async def start_up(_app):
        from models import preload

        preload.start(sys.argv[1:])
        yield

    app = st.App(__file__, lifespan=start_up)
else:  # the page, for one session
    # The page shell first: on a cold start the imports below (torch, transformers, TransformerLens, plotly) take
    # seconds, once per server process; the browser shows this meanwhile instead of a blank page.
    st.set_page_config(page_title="lnfree workbench", layout="wide")
    _starting = st.empty() if "attribution.report" not in sys.modules else None
    if _starting is not None:
        _starting.info("Starting the workbench: importing torch, transformers and TransformerLens (once per server).")

    import pandas as pd
    import torch

    from attribution import (
        AttributionInputError,
        PairResults,
        Settings,
        analyse,
        attention_pattern,
        intervals,
        plots,
        provenance,
        twins,
        view,
    )
    from attribution import export as exporting
    from attribution.circuits import (
        circuit_graphs,
        circuits_json,
        edges_table,
        faithfulness_curves,
        faithfulness_table,
        pair_circuits,
    )
    from attribution.findings import BOS_PROTOCOLS, pair_findings, summary_table
    from attribution.findings.base import default_bos
    from attribution.findings.plots import FINDINGS_FIGURES
    from attribution.jobs import LRU, PairJob, all_threads
    from attribution.report import STAGE_TEXT
    from attribution.tables import figure_table, summary_rows, table_csv
    from attribution.tasks import PRESET
    from models import PAIRS, ModelSpecError, load_bridge, preload
    from models.loading import DTYPES
    from models.registry import VANILLA

    if _starting is not None:
        _starting.empty()

    CUSTOM_PAIR = "Custom (hub names or local directories)"
    PAIR_LABELS = {f"{ln}  |  {lnfree}": (ln, lnfree) for ln, lnfree in PAIRS.items()}
    DEFAULT_PAIR = next(label for label, pair in PAIR_LABELS.items() if pair == view.DEMO_PAIR)
    TASK_HELP = {
        "custom": "Your prompt, answer and counterfactual (and optionally a corrupted prompt). The preset: both demo "
                  "models copy the name that followed 'David said unto' before (a copy behaviour, like induction); "
                  "in the corrupted prompt that name is Moses, and both then prefer ' Moses'.",
        "induction": "Repeated random tokens; corrupted: the second copy replaced by fresh tokens.",
        "ioi": "Indirect object identification; corrupted: the names swapped. The demo pair has no IOI circuit "
               "(its metric is below 0: it prefers the repeated name): use GPT-2 for this task.",
    }

    USER_ERRORS = (ModelSpecError, AttributionInputError)
    GRACE_S = 1.0  # a stage done within this of the one before is drawn with it
    SHORT_S = 1.0  # how long the first drawing waits for the rest of an analysis after its numbers: the demo
    # pair's whole analysis fits in it, so its page is drawn once, complete (each redraw costs the browser ~1 s)
    # Every widget's first value; the opening view is induction, which the demo pair gets right.
    DEFAULTS = {"pair": DEFAULT_PAIR, "ln_spec": view.DEMO_PAIR[0], "lnfree_spec": view.DEMO_PAIR[1], "task": "induction",
                **PRESET, "position": -1, "n_prompts": 8, "seq_len": 20, "top_k": 10, "per_position": False,
                "full_sweeps": False, "verify_top": Settings.verify_top, "live": True, "vanilla_spec": "",
                "left": "original", "tab": "Summary"}
    # Sections 4-9, one tab each (by label without its number).
    TABS = {title.split(". ", 1)[1]: title for title in list(view.PANELS)[3:]}
    # What each choice widget offers (also what a link or the command line may choose).
    CHOICES = {"pair": [*PAIR_LABELS, CUSTOM_PAIR], "dtype": list(DTYPES), "task": list(TASK_HELP),
               "method": ["atp*", "atp"], "device": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "left": ["original", "vanilla"], "tab": list(TABS)}
    LEFT = {"original": "the LN model it came from", "vanilla": "its vanilla control (fine-tuned alike, LN kept)"}


def initial_view() -> list[str]:
    """Once per browser session, before the widgets exist: the command line's pair, then the URL's view.
    Returns what of them was not usable (kept, so each rerun of the page still says it)."""
    if "view_problems" in st.session_state:
        return st.session_state["view_problems"]
    try:
        values, problems = view.from_launch_args(sys.argv[1:], CHOICES, CUSTOM_PAIR)
    except argparse.ArgumentError as err:
        values, problems = {}, [f"The command line after `--` is not usable ({err}); give --ln SPEC --lnfree SPEC."]
    from_url, more = view.from_query(st.query_params.to_dict(), CHOICES)
    st.session_state.update({**values, **from_url})
    st.session_state["view_problems"] = problems + more
    return problems + more


def share_view() -> None:
    """Keep the current view in the URL (what a bookmark or a shared link reopens)."""
    st.query_params.from_dict(view.to_query(st.session_state, list(CHOICES)))


@st.cache_resource(max_entries=2, show_spinner="Loading model...")
def get_model(spec: str, dtype: str, device: str):
    """At most two models stay loaded (one pair), so switching pairs does not accumulate memory.  The opening
    pair comes from the server's start-up (models/preload.py)."""
    return preload.take(spec, dtype, device) or load_bridge(spec, dtype, device)


@st.cache_resource
def result_store() -> dict:
    """Shared by every session: the analyses of recent views (running or done), the circuits, the findings."""
    return {"jobs": LRU(8, evict=lambda job: job.cancel("superseded")), "findings": LRU(8), "circuits": LRU(8),
            "single": LRU(8)}


def get_job(ln_spec: str, lnfree_spec: str, dtype: str, device: str, settings: Settings) -> PairJob:
    """The view's analysis, started in the background if new.  The job this session showed before is
    cancelled (its finished stages are kept), and resumed if the session comes back to it."""
    ln, lnfree = get_model(ln_spec, dtype, device), get_model(lnfree_spec, dtype, device)
    job = result_store()["jobs"].get((ln_spec, lnfree_spec, dtype, device, settings),
                                     lambda: PairJob(ln, lnfree, settings))
    previous = st.session_state.get("job")
    if previous is not None and previous is not job:
        previous.cancel("superseded")
    st.session_state["job"] = job
    if job.cancelled == "superseded":
        job.start()
    return job


def wait_for(job: PairJob, grace: float, text: str) -> None:
    """Block (with a progress bar) until the job has a first stage done and then up to `grace` seconds
    more for the rest (or until it stops)."""
    bar = st.progress(0.0, text=text)
    done = time.monotonic() if job.stage is not None else None
    while job.running and not job.cancelled and (done is None or time.monotonic() - done < grace):
        job.wait(0.05)
        bar.progress(*progress_args(job))
        if done is None and job.stage is not None:
            done = time.monotonic()
    bar.empty()


def progress_args(job: PairJob) -> tuple[float, str]:
    fraction, text = job.progress
    return min(max(fraction, 0.0), 1.0), text


def follow(job: PairJob, shown: str | None) -> None:
    """The running analysis's progress, Cancel, and (with live updates) a wait for its next stage, then
    a rerun of the page to show it (a stage that ends within GRACE_S of the one before is shown with
    it: each rerun redraws every figure).  The wait is the page run's last step and only moves the bar, so
    any widget change interrupts it at once, and the analysis goes on in the background meanwhile."""
    cols = st.columns([5, 1, 1])
    bar = cols[0].progress(*progress_args(job))
    if cols[1].button("Cancel analysis", key="cancel", help="Stop the running analysis; what is shown stays."):
        job.cancel("user")
        st.rerun()
    cols[2].button("Refresh", key="refresh", help="Show what the analysis has done so far.")
    if not st.session_state.get("live", True):
        return
    changed = None  # when the job got past the stage shown: the page reruns GRACE_S later, or at its end
    while job.running and not job.cancelled and (changed is None or time.monotonic() - changed < GRACE_S):
        job.wait(0.25)
        bar.progress(*progress_args(job))  # also where a widget change interrupts this run
        if changed is None and job.stage != shown:
            changed = time.monotonic()
    st.rerun()


def job_state(job: PairJob, shown: str | None) -> None:
    """Below the panels: what is still running (with Cancel), what was cancelled, what failed."""
    if isinstance(job.error, USER_ERRORS):
        st.error(str(job.error))
    elif job.error is not None:
        raise job.error
    elif job.cancelled:
        st.warning(f"Cancelled after {STAGE_TEXT[job.stage] if job.stage else 'nothing'}: the panels show "
                   f"what was done; the rest was not computed.")
        if st.button("Run the rest", key="resume"):
            job.start()
            st.rerun()
    elif job.stage != shown:  # it got further while the page was drawn
        st.rerun()
    elif job.running:
        follow(job, shown)


# A resource (read, never changed): cache_data would copy it per call, and warn when the server imports this file.
@st.cache_resource(max_entries=64, show_spinner=False)
def get_pattern(spec: str, dtype: str, device: str, settings: tuple, layer: int, head: int):
    return attention_pattern(get_model(spec, dtype, device), Settings(**dict(settings)), layer, head)


def get_findings(ln_spec: str, lnfree_spec: str, dtype: str, device: str, n_seq: int, bos: str, progress) -> dict:
    def compute():
        return pair_findings(get_model(ln_spec, dtype, device), get_model(lnfree_spec, dtype, device), n_seq,
                             progress=progress, bos=bos)

    return result_store()["findings"].get((ln_spec, lnfree_spec, dtype, device, n_seq, bos), compute)


def progress_to(bar):
    return lambda fraction, text: bar.progress(min(max(fraction, 0.0), 1.0), text=text)


def sidebar() -> tuple[str, str, str, str, Settings, str, str, tuple[str, str] | None]:
    """The view: specs, dtype, device, settings, AtP method, what the left column is (LEFT's key), and the
    model a pair with a vanilla control leaves out of the columns (LEFT's key and spec; None without one)."""
    sb = st.sidebar
    sb.title("lnfree workbench")
    for key, value in DEFAULTS.items():  # where the command line or the URL has not set them
        st.session_state.setdefault(key, value)
    label = sb.selectbox("Model pair (LN | LN-free)", CHOICES["pair"], key="pair")
    if label == CUSTOM_PAIR:
        ln_spec = sb.text_input("LN model", key="ln_spec",
                                help="Hub name or local directory; leave empty to use the LN-free model's base")
        lnfree_spec = sb.text_input("LN-free model", help="Hub name or a directory written by `python -m "
                                    "lnfree.remove`", key="lnfree_spec")
        vanilla = sb.text_input("Vanilla control (optional)", key="vanilla_spec", help="The same fine-tuning "
                                "with LN kept: a hub release or a directory written by `python -m lnfree.remove "
                                "--keep-ln`; the paper compares the LN-free model with it")
    else:
        ln_spec, lnfree_spec = PAIR_LABELS[label]
        vanilla = VANILLA.get(ln_spec, "")
    left, third = "original", None
    if vanilla.strip():
        left = sb.radio("Left column", CHOICES["left"], format_func=LEFT.get, key="left",
                        help="Against the vanilla control, what differs is LN removal alone, not the fine-tuning")
        third = ("original", ln_spec) if left == "vanilla" else ("vanilla", vanilla.strip())
        if left == "vanilla":
            ln_spec = vanilla.strip()
    dtype = sb.selectbox("dtype", CHOICES["dtype"], key="dtype",
                         help="Every number is read out in float64 from the model's activations.")
    device = sb.selectbox("device", CHOICES["device"], key="device")

    sb.header("Task")
    task = sb.radio("Task", CHOICES["task"], horizontal=True, label_visibility="collapsed", key="task")
    sb.caption(TASK_HELP[task])
    fields = {}
    if task == "custom":
        fields["prompt"] = sb.text_area("Prompt", key="prompt")
        fields["answer"] = sb.text_input("Answer", key="answer")
        fields["counterfactual"] = sb.text_input("Counterfactual", key="counterfactual")
        fields["corrupt"] = sb.text_area("Corrupted prompt (optional)", key="corrupt")
        fields["position"] = int(sb.number_input("Metric position (-1 = last)", step=1, key="position"))
    else:
        fields["n_prompts"] = sb.slider("Prompts", *view.RANGES["n_prompts"], key="n_prompts")
        if task == "induction":
            fields["seq_len"] = sb.slider("Length of each random copy", *view.RANGES["seq_len"], key="seq_len")
    sb.header("Settings")
    top_k = sb.slider("Top-k", *view.RANGES["top_k"], key="top_k")
    method = sb.radio("Attribution patching", CHOICES["method"], horizontal=True,
                      format_func={"atp": "AtP", "atp*": "AtP*"}.get, key="method")
    per_position = sb.checkbox("Also patch each head and MLP at each position", key="per_position",
                               help="Per-position estimates, checked by patching like the others.")
    full = sb.checkbox("Full activation-patching sweeps", key="full_sweeps",
                       help="Patch every component (L x H heads, L x positions residuals, ...), not only the "
                            "ones AtP* ranks highest: slow on large models.")
    sb.checkbox("Live updates", key="live", help="Show each stage of a running analysis as it is done "
                "(off: the page shows what is done when it is drawn; 'Refresh' shows more).")
    verify_top = Settings.verify_top if full else sb.slider(
        "Components checked by patching (largest |AtP*|)", *view.RANGES["verify_top"], key="verify_top")
    settings = Settings(task=task, top_k=top_k, per_position=per_position, full_sweeps=full,
                        verify_top=verify_top, **fields)
    return ln_spec, lnfree_spec, dtype, device, settings, method, left, third


def export_manifest(pair: PairResults, ctx: tuple, figure_name: str, fmt: str, circuits: dict | None = None) -> dict:
    """The manifest of one download (attribution.provenance), made when it is clicked; `circuits` records the
    edge attribution it holds ({"ig_steps", "edges"})."""
    ln_spec, lnfree_spec, dtype, device, method = ctx
    return provenance.manifest(pair, get_model(ln_spec, dtype, device), get_model(lnfree_spec, dtype, device),
                               method=method, dtype=dtype, device=device, figure=figure_name, fmt=fmt,
                               out=f"{figure_name}.{fmt}", circuits=circuits)


def figure_download(fig, fmt: str, pair: PairResults | None, ctx: tuple | None, name: str,
                    circuits: dict | None = None) -> bytes:
    if pair is None or ctx is None:  # attention and findings figures: not an attribution.export figure
        return exporting.figure_bytes(fig, fmt)
    return exporting.figure_file(fig, fmt, export_manifest(pair, ctx, name, fmt, circuits))


def bundle_download(pair: PairResults, ctx: tuple, shown: tuple[dict, dict] | None) -> bytes:
    """Everything of the view in one zip, with the circuits when they were found for this view."""
    if shown is None:
        return exporting.bundle(pair, ctx[-1], export_manifest(pair, ctx, "all", "zip"))
    found, record = shown
    return exporting.bundle(pair, ctx[-1], export_manifest(pair, ctx, "all", "zip", record), found, record["edges"])


def download_row(fig, name: str, table: list[dict] | None, key: str, pair: PairResults | None = None,
                 circuits: dict | None = None) -> None:
    """HTML / PNG / SVG of a figure (with the manifest of how it was made, for the analysis's and the
    circuits' figures: `circuits` records the edge attribution) and the CSV of its numbers; the files are
    made on click."""
    ctx = st.session_state.get("export_ctx") if pair is not None else None
    cols = st.columns(4)
    cols[0].download_button("HTML", partial(figure_download, fig, "html", pair, ctx, name, circuits),
                            f"{name}.html", "text/html", key=f"{key}-html", on_click="ignore")
    problem = exporting.image_export_problem()
    for col, fmt, mime in ((cols[1], "png", "image/png"), (cols[2], "svg", "image/svg+xml")):
        col.download_button(fmt.upper(), partial(figure_download, fig, fmt, pair, ctx, name, circuits),
                            f"{name}.{fmt}", mime, key=f"{key}-{fmt}", on_click="ignore",
                            disabled=problem is not None, help=problem)
    if table:
        cols[3].download_button("CSV", partial(table_csv, table), f"{name}.csv", "text/csv",
                                key=f"{key}-csv", on_click="ignore")


def figure(pair: PairResults, method: str, name: str, caption: str = "") -> None:
    fig = plots.FIGURES[name](pair, method)
    st.plotly_chart(fig, key=f"fig-{name}")
    if caption:
        st.caption(caption)
    download_row(fig, name, figure_table(name, pair), key=name, pair=pair)


SIGMA_SOURCE = {
    "stored": "Each LN's frozen sigma as recorded in the checkpoint (lnfree_sigmas).",
    "implied": "The checkpoint stores each LN as gamma / sigma only: sigma is chosen so that mean |gamma| = 1 "
               "(the same function; DLA and DE do not depend on the choice).",
}


def corrupted_metric(slot, res) -> None:
    """The corrupted prompts' metric, which the attribution stage computes (its corrupted pass)."""
    if math.isfinite(res.metric_corrupt):
        slot.metric("metric, corrupted", f"{res.metric_corrupt:.3f}")
    elif res.stage == "numbers":
        slot.metric("metric, corrupted", "...", help="Computed with attribution patching (its corrupted pass).")
    else:
        slot.metric("metric, corrupted", "n/a", help="This view has no corrupted prompt.")


def predictions(pair: PairResults) -> list:
    """The predictions panel; returns the corrupted metric's slots, filled again when a later stage is done."""
    slots = []
    st.caption(f"Metric: {plots.metric_name(pair)}. First clean prompt: "
               + "".join(pair.ln.str_tokens).replace("\n", " "))
    cols = st.columns(2)
    for col, label, res in ((cols[0], "LN", pair.ln), (cols[1], "LN-free", pair.lnfree)):
        with col:
            st.subheader(f"{label}: `{res.spec}`")
            if res.sigma_source in SIGMA_SOURCE:
                st.caption(SIGMA_SOURCE[res.sigma_source])
            m = st.columns(2)
            m[0].metric("metric, clean", f"{res.metric_clean:.3f}")
            slots.append(m[1].empty())
            corrupted_metric(slots[-1], res)
            table = pd.DataFrame(res.top_tokens, columns=["next token", "probability"])
            st.dataframe(table, hide_index=True, key=f"top-{label}")
    return slots


def attention_panel(ln_spec, lnfree_spec, dtype, device, key: tuple, pair: PairResults) -> None:
    n_layers, n_heads = pair.ln.dla_heads.shape
    cols = st.columns(2)
    layer = cols[0].number_input("Layer", 0, n_layers - 1, n_layers - 1, key="layer")
    head = cols[1].number_input("Head", 0, n_heads - 1, 0, key="head")
    (p_ln, tok_ln), (p_lf, tok_lf) = (
        # Kept by the analysis (no pass), unless too large to keep: then one pass of the first prompt.
        attention_pattern(get_model(spec, dtype, device), pair.settings, int(layer), int(head), res)
        if res.attention is not None else get_pattern(spec, dtype, device, key, int(layer), int(head))
        for spec, res in ((ln_spec, pair.ln), (lnfree_spec, pair.lnfree)))
    fig = plots.attention_figure(p_ln, tok_ln, p_lf, tok_lf, int(layer), int(head))
    st.plotly_chart(fig, key="fig-attention")
    download_row(fig, f"attention_L{layer}H{head}", None, key="attention")


def get_circuits(ln_spec: str, lnfree_spec: str, dtype: str, device: str, settings: Settings, ig_steps: int) -> dict:
    def compute():
        return pair_circuits(get_model(ln_spec, dtype, device), get_model(lnfree_spec, dtype, device), settings,
                             ig_steps)

    return result_store()["circuits"].get((ln_spec, lnfree_spec, dtype, device, settings, ig_steps), compute)


def circuits_json_download(pair: PairResults, found: dict, record: dict) -> bytes:
    manifest = export_manifest(pair, st.session_state["export_ctx"], "all", "json", record)
    return json.dumps({**circuits_json(found), "manifest": manifest}, allow_nan=False).encode()


def circuits_panel(pair: PairResults, ln_spec: str, lnfree_spec: str, dtype: str, device: str) -> None:
    """Edge attribution and circuit faithfulness on both models; run on request, cached.  What is shown is
    kept for the zip (session_state["circuits_shown"]: the view it belongs to, the result, its record)."""
    settings = pair.settings
    if settings.task == "custom" and not settings.corrupt:
        st.info("No corrupted prompt: edge attribution needs one (the sidebar's 'Corrupted prompt').")
        return
    cols = st.columns([2, 2, 2, 1])
    method = cols[0].radio("Edge scores", ["EAP", "EAP-IG"], horizontal=True, key="circuits_method",
                           help="EAP: the gradient at the corrupted prompts; EAP-IG: averaged along the "
                                "straight line from the corrupted to the clean input embeddings")
    steps = 1 if method == "EAP" else int(cols[1].slider("EAP-IG steps", 2, 16, 5, key="circuits_steps"))
    n = int(cols[2].slider("Edges drawn", 5, 100, 20, key="circuits_edges"))
    want = (ln_spec, lnfree_spec, dtype, device, settings, steps)
    if cols[3].button("Find circuits", key="circuits_run"):
        st.session_state["circuits_for"] = want
    if st.session_state.get("circuits_for") != want:
        return
    with st.spinner("Edge attribution and faithfulness on both models..."):
        result = get_circuits(*want)
    record = {"ig_steps": steps, "edges": n}  # the manifest's record: --circuits --ig-steps --circuit-edges
    st.session_state["circuits_shown"] = (want[:-1], result, record)
    agree = result.get("agreement")
    if agree:
        st.caption(f"{result['method']}: LN against LN-free edge scores over {agree['n']} edges: Spearman "
                   f"{agree['spearman']:.3f}, top-{agree['k']} overlap {agree['topk_overlap']:.2f}. Cost, in "
                   f"forward passes of the batch: LN {result['ln']['cost']}, LN-free {result['lnfree']['cost']}.")
    fig = circuit_graphs(result, n)
    st.plotly_chart(fig, key="fig-circuit-graphs")
    table = edges_table(result, n)
    download_row(fig, "circuit_graphs", table, key="circuit-graphs", pair=pair, circuits=record)
    st.dataframe(pd.DataFrame(table), hide_index=True, key="circuit-edges")
    fig = faithfulness_curves(result)
    st.plotly_chart(fig, key="fig-faithfulness")
    download_row(fig, "faithfulness", faithfulness_table(result), key="faithfulness", pair=pair, circuits=record)
    st.download_button("Circuits JSON (every edge score)", partial(circuits_json_download, pair, result, record),
                       "circuits.json", "application/json", on_click="ignore", key="circuits-json")


def findings_panel(ln_spec: str, lnfree_spec: str, dtype: str, device: str) -> None:
    """Dataset-level analyses over held-out text; run on request, cancellable, cached."""
    cols = st.columns([2, 2, 1, 1])
    n_seq = cols[0].slider("Held-out sequences", 4, 128, 32, key="findings_n_seq")
    st.session_state.setdefault("findings_bos", default_bos(ln_spec, lnfree_spec))  # the demo pair: BOS
    bos = cols[1].radio("First token", list(BOS_PROTOCOLS), key="findings_bos", help="; ".join(
        f"{name}: {what}" for name, what in BOS_PROTOCOLS.items()), horizontal=True)
    if cols[2].button("Run dataset analyses", key="findings_run"):
        st.session_state["findings_for"] = (ln_spec, lnfree_spec, dtype, device, n_seq, bos)
    if cols[3].button("Cancel", key="findings_cancel"):  # the click's rerun interrupts a running analysis
        st.session_state.pop("findings_for", None)
    if st.session_state.get("findings_for") != (ln_spec, lnfree_spec, dtype, device, n_seq, bos):
        return
    st.caption(f"Definitions of the paper's code; first token: {BOS_PROTOCOLS[bos]}.")
    bar = st.progress(0.0, text="Analysing held-out text...")
    try:  # Cancel works through Streamlit: its click's rerun stops this script mid-analysis
        result = get_findings(ln_spec, lnfree_spec, dtype, device, n_seq, bos, progress_to(bar))
    finally:
        bar.empty()
    table = pd.DataFrame(summary_table(result))
    st.dataframe(table, hide_index=True, key="findings-summary")
    cols = st.columns(2)
    cols[0].download_button("Findings CSV", table.to_csv(index=False), "findings.csv", "text/csv",
                            on_click="ignore", key="findings-csv")
    cols[1].download_button("Findings JSON", json.dumps(result, indent=1), "findings.json",
                            "application/json", on_click="ignore", key="findings-json")
    for name, make in FINDINGS_FIGURES.items():
        fig = make(result)
        st.plotly_chart(fig, key=f"fig-findings-{name}")
        download_row(fig, f"findings_{name}", None, key=f"findings-{name}")


def main() -> None:
    all_threads()  # this page run's computations (findings, circuits, a pattern) are not a small job's
    problems = initial_view()
    ln_spec, lnfree_spec, dtype, device, settings, method, left, third = sidebar()
    share_view()
    for problem in problems:
        st.error(problem)
    st.title("LayerNorm vs LN-free")
    st.caption("Direct logit attribution is exact without LayerNorm; attribution patching is "
               f"checked against activation patching. Left: {LEFT[left]}. Right: the LN-free model.")
    status = st.container()
    try:
        base = get_model(lnfree_spec, dtype, device).info.ln_base
        ln_spec = ln_spec.strip() or base()
        if third is not None and not third[1].strip():  # the original of a custom pair: the recorded base
            third = (third[0], base())
        job = get_job(ln_spec, lnfree_spec, dtype, device, settings)
    except USER_ERRORS as err:
        st.error(str(err))
        st.stop()
    with status:  # the page has nothing to show before the first stage
        wait_for(job, 0.0, "Computing predictions and DLA...")
    pair = job.results
    if pair is None:  # failed or cancelled before the first numbers
        with status:
            job_state(job, None)
        return
    slots = numbers(pair)  # sent to the browser at once, before any figure
    with status:  # an analysis done within SHORT_S is drawn once, complete (each redraw costs about a second)
        wait_for(job, SHORT_S, "Computing attribution patching...")
    pair = job.results
    for slot, res in zip(slots, (pair.ln, pair.lnfree), strict=True):  # known now if the analysis went on
        corrupted_metric(slot, res)
    panels(pair, method, ln_spec, lnfree_spec, dtype, device, third)
    with status:  # last: the page above is complete as far as the analysis has gone
        job_state(job, pair.ln.stage)


def numbers(pair: PairResults) -> list:
    """The first stage's numbers, drawn before anything else: predictions, the metric and DLA's error
    (returns the slots of the corrupted metric, which a later stage computes)."""
    section("1. Predictions")
    slots = predictions(pair)
    section("2. Direct logit attribution")
    m = st.columns(2)
    m[0].metric("LN: DLA error (NMAE vs true direct effect)", f"{pair.ln.dla_nmae:.1%}")
    m[1].metric("LN-free: DLA error (NMAE vs true direct effect)", f"{pair.lnfree.dla_nmae:.2e}")
    return slots


def section(title: str) -> None:
    st.header(title)
    st.caption(view.PANELS[title])


def panels(pair: PairResults, method: str, ln_spec: str, lnfree_spec: str, dtype: str, device: str,
           third: tuple[str, str] | None = None) -> None:
    """Every panel below numbers(), each as complete as the analysis's stage allows (later stages' panels
    say so)."""
    st.session_state["export_ctx"] = (ln_spec, lnfree_spec, dtype, device, method)  # for the manifests
    figure(pair, method, "dla_heads")
    figure(pair, method, "dla_layers")
    figure(pair, method, "dla_vs_de", "Each point is a head: frozen-scale DLA against the change in the metric "
                              "when that head's output is removed from the final residual stream.")
    section("3. Activation patching vs attribution patching")
    patching_panel(pair, method)
    problem = exporting.image_export_problem()
    if problem:
        st.error(problem)  # PNG/SVG buttons stay disabled; HTML, CSV and JSON still work
    # Sections 4-9 are tabs, and only the open one is drawn: every figure on the page costs the browser
    # about 0.1 s at each redraw, and the page is redrawn at every stage of an analysis.
    tabs = dict(zip(TABS, st.tabs(list(TABS), key="tab", on_change="rerun"), strict=True))
    for name, tab in tabs.items():
        if tab.open:
            with tab:
                section(TABS[name])
                tab_panel(name, pair, method, ln_spec, lnfree_spec, dtype, device, third)


def tab_panel(name: str, pair: PairResults, method: str, ln_spec: str, lnfree_spec: str, dtype: str, device: str,
              third: tuple[str, str] | None) -> None:
    if name == "Summary":
        summary_panel(pair, ln_spec, lnfree_spec, dtype, device, third)
    elif name == "Logit lens":
        figure(pair, method, "logit_lens")
    elif name == "Attention pattern":
        attention_panel(ln_spec, lnfree_spec, dtype, device, tuple(sorted(dataclasses.asdict(pair.settings).items())),
                        pair)
    elif name == "Where the twins differ":
        twins_panel(pair)
    elif name == "Circuits":
        circuits_panel(pair, ln_spec, lnfree_spec, dtype, device)
    else:
        findings_panel(ln_spec, lnfree_spec, dtype, device)


def summary_panel(pair: PairResults, ln_spec: str, lnfree_spec: str, dtype: str, device: str,
                  third: tuple[str, str] | None) -> None:
    summary = summary_rows(pair, three_way(pair, third, dtype, device))
    st.dataframe(pd.DataFrame(summary).set_index("quantity"), key="summary")
    cols = st.columns(2)
    cols[0].download_button("Summary CSV", table_csv(summary), "summary.csv", "text/csv", on_click="ignore")
    shown = st.session_state.get("circuits_shown")
    with_circuits = shown[1:] if shown and shown[0] == (ln_spec, lnfree_spec, dtype, device, pair.settings) else None
    cols[1].download_button("Download all (zip)", partial(bundle_download, pair, st.session_state["export_ctx"],
                                                          with_circuits),
                            "lnfree_workbench.zip", "application/zip", on_click="ignore", key="zip-all",
                            help="Every figure (HTML, PNG, SVG) with its CSV, the JSON of all numbers and the "
                                 "manifest" + (", and the circuits of the Circuits tab" if with_circuits else
                                               "; the circuits too once the Circuits tab has found them"))


def get_single(spec: str, dtype: str, device: str, settings: Settings):
    return result_store()["single"].get((spec, dtype, device, settings),
                                        lambda: analyse(get_model(spec, dtype, device), settings))


def three_way(pair: PairResults, third: tuple[str, str] | None, dtype: str, device: str) -> list:
    """The summary's middle column, on request: the model of the pair's family that the columns leave out
    (the original LN model or the vanilla control), analysed with the same settings."""
    if third is None or pair.ln.stage != "verification":
        return []
    which, spec = third
    want = (spec, dtype, device, pair.settings)
    if st.button(f"Add {LEFT[which]} (`{spec}`) to the summary", key="three_way_run",
                 help="The paper compares the LN-free model with the vanilla control; this puts the original, "
                      "the vanilla control and the LN-free model side by side"):
        st.session_state["three_way_for"] = want
    if st.session_state.get("three_way_for") != want:
        return []
    with st.spinner(f"Analysing {spec}..."):
        return [(which, get_single(*want))]


def twins_panel(pair: PairResults) -> None:
    agree = twins.twin_agreement(pair)
    k = pair.settings.top_k
    iv = pair.intervals.get("twins", {})
    rows = []
    for name, a in agree.items():
        row = {"quantity": twins.QUANTITIES[name][0], "components": a["n"], "Spearman": a["spearman"],
               "Pearson": a["pearson"], f"top-{k} overlap": a["topk_overlap"]}
        for stat, label in (("spearman", "Spearman"), ("topk_overlap", f"top-{k} overlap")):
            bounds = iv.get(name, {}).get(stat, {})
            row.update({f"{label} low": bounds.get("low"), f"{label} high": bounds.get("high")})
        rows.append(row)
    if "note" in pair.intervals:
        st.caption(f"No bootstrap intervals: {pair.intervals['note']}.")
    else:
        st.caption(f"low / high: {pair.intervals['level']:.0%} bootstrap interval over the "
                   f"{pair.intervals['n_prompts']} prompts.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="twins-agreement")
    names = list(agree)
    name = st.selectbox("Largest changes in", names, format_func=lambda n: twins.QUANTITIES[n][0],
                        key="twins-quantity")
    movers = twins.top_movers(pair, name, n=10)
    st.dataframe(pd.DataFrame(movers), hide_index=True, key="twins-movers")
    cols = st.columns(2)
    cols[0].download_button("Agreement CSV", table_csv(rows), "twins_agreement.csv", "text/csv", on_click="ignore")
    cols[1].download_button("Largest changes CSV", table_csv(movers), f"twins_{name}.csv", "text/csv",
                            on_click="ignore")


def patching_panel(pair: PairResults, method: str) -> None:
    if pair.settings.task == "custom" and not pair.settings.corrupt:
        st.info("No corrupted prompt: attribution and activation patching need one (the sidebar's "
                "'Corrupted prompt').")
        return
    if pair.ln.stage == "numbers":
        st.info("Attribution patching (AtP, AtP*) is not done yet (see the status at the top); its figures "
                "appear here when it is.")
        return
    figure(pair, method, "atp_heads")
    figure(pair, method, "atp_resid")
    if pair.ln.stage != "verification":
        st.info("Activation patching (the ground truth: " + ("every component" if pair.settings.full_sweeps else
                f"the {pair.settings.verify_top} components AtP* ranks highest") + ") is not done yet (see the "
                "status at the top); its figures and the agreement statistics appear here when it is.")
        return
    st.caption(f"Activation patching: {pair.ln.patching} over heads, residual positions and MLPs "
               f"(the sidebar's 'Full activation-patching sweeps' patches every component). Agreement is "
               f"over {pair.ln.agreement['over']}.")
    figure(pair, method, "patch_heads")
    figure(pair, method, "atp_vs_patch")
    figure(pair, method, "patch_resid")
    intervals_table(pair)


def fmt_interval(value, low, high) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and math.isfinite(low) else "")


def intervals_table(pair: PairResults) -> None:
    """Every agreement number with its 95% bootstrap interval over prompts, and LN-free minus LN's."""
    iv = pair.intervals
    if "note" in iv:
        st.caption(f"No bootstrap intervals: {iv['note']} (the induction task's 'Prompts' slider sets how many).")
        return
    rows = intervals.interval_rows(iv)
    shown = [{"statistic": r["statistic"], **{col: fmt_interval(r[col], r[f"{col} low"], r[f"{col} high"])
                                             for col in ("LN", "LN-free", "LN-free minus LN")}} for r in rows]
    st.markdown(f"**Agreement with {iv['level']:.0%} bootstrap intervals** over the {iv['n_prompts']} prompts "
                f"({iv['n_boot']} resamples, the same for both models; an interval of LN-free minus LN that "
                "excludes 0 is a difference beyond prompt-to-prompt noise).")
    st.dataframe(pd.DataFrame(shown), hide_index=True, key="intervals")
    st.download_button("Intervals CSV", table_csv(rows), "agreement_intervals.csv", "text/csv", on_click="ignore")


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:  # e.g. a bad layer/head or a model failing on a later step
        st.error(str(err))
