"""App latency, against the floor of importing its dependencies, in headless Chromium.

    .venv/bin/python -m bench.bench_app [--no-small]

Measures, in one run on this machine:
  * floor: bare `import torch, transformers, transformer_lens, streamlit` in a fresh interpreter;
  * the least any page must do before the demo's first numbers, in a fresh interpreter without a server or
    a browser: the floor's imports, loading the pair (which imports what the floor's lazy imports leave
    out), the opening view's first stage;
  * demo pair, cold start (the median of --starts server starts): `streamlit run app.py` started -> the
    first numbers (predictions and DLA of the opening view) and -> the complete view (activation patching
    done);
  * demo pair, a new prompt (the custom task's; the median of --prompts changes, each to a prompt not seen
    before) -> its predictions and DLA, and -> the complete view;
  * with the small stand-in (a random gpt2-small-shaped pair, as bench.bench_engine builds it), opened from
    the command line: a new view (induction, 8 prompts x 20-token copies: the default view) -> complete,
    in forward-pass equivalents of one forward pass of the same batch (timed after the server stops).
Prints a markdown table with each goal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.test_app_browser import CHROMIUM_ARGS, free_port

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import torch, transformers, transformer_lens, streamlit"
LEAST = f"""{IMPORTS}
from attribution import Settings
from attribution.report import PairAnalysis
from models import load_bridge
PairAnalysis(load_bridge("demo"), load_bridge("demo-lnfree"), Settings(per_position=False)).run("numbers")
"""
DLA_LABEL = "LN-free: DLA error (NMAE vs true direct effect)"
VERIFIED = "Activation patching: top-"  # the caption above the patching figures, once verification is done
# The page is checked every 50 ms, by reading the DOM's text (textContent) without forcing a layout:
# Playwright's default (every animation frame) and its text locators (which check visibility) read the
# page's layout, which takes CPU from the app it measures on a small machine.
POLL_MS = 50
# New prompts, each as long as the preset's corrupted prompt (20 tokens), so that every panel can be drawn,
# and each different from the others and from the preset: a view seen before is drawn from the app's cache.
PROMPTS = [f"And David said unto Saul, Take thy {thing}, and stretch out thine arm. And David said unto"
           for thing in ("staff", "sword", "spear", "bow", "shield", "cup", "robe", "crown", "horn", "stone")]


def fresh_run(code: str, repeats: int = 3) -> float:
    """The fastest of `repeats` runs of `code` in a fresh interpreter."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - t)
    return min(times)


def wait_numbers(page, text: str, timeout_ms: int = 300_000) -> None:
    """The predictions (their caption shows `text`, the prompt) and the DLA metrics are drawn, not stale
    (the figures below them may still be on their way)."""
    page.wait_for_function(
        """([text, label]) => {
             const fresh = e => !e.closest('[data-stale="true"]');
             const caption = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
                               .filter(e => e.textContent.includes('First clean prompt') && e.textContent.includes(text));
             const dla = [...document.querySelectorAll('[data-testid="stMetric"]')]
                           .filter(e => e.textContent.includes(label));
             return caption.length > 0 && caption.every(fresh) && dla.length > 0 && dla.every(fresh); }""",
        arg=[text, DLA_LABEL], timeout=timeout_ms, polling=POLL_MS)


def wait_complete(page, timeout_ms: int = 600_000) -> None:
    """Activation patching's caption is up, the figures are drawn and nothing on the page is stale."""
    page.wait_for_function(
        """(verified) =>
             [...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
               .some(e => e.textContent.includes(verified))
             && document.querySelectorAll('.js-plotly-plot .main-svg').length >= 10
             && document.querySelectorAll('[data-stale="true"]').length === 0""",
        arg=VERIFIED, timeout=timeout_ms, polling=POLL_MS)


def start_server(*app_args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true", *(("--", *app_args) if app_args else ())], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.05)


def cold_start(browser) -> tuple[float, float, subprocess.Popen, str]:
    """Seconds from `streamlit run` to the opening view's first numbers, and to its complete view; the
    server is left running (returned with its URL)."""
    t0 = time.perf_counter()
    proc, url = start_server()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        wait_numbers(page, "")
        first = time.perf_counter() - t0
        wait_complete(page)
        page.close()
    except BaseException:
        stop(proc)
        raise
    return first, time.perf_counter() - t0, proc, url


def demo(browser, starts: int, prompts: int) -> dict:
    firsts, colds = [], []
    for _ in range(starts):
        first, cold, proc, url = cold_start(browser)
        firsts.append(first)
        colds.append(cold)
        if len(firsts) < starts:
            stop(proc)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url + "/?task=custom")
        wait_complete(page)
        prompt = page.get_by_label("Prompt", exact=True)
        numbers, complete = [], []
        for text in PROMPTS[:prompts]:
            prompt.fill(text)
            t = time.perf_counter()
            prompt.press("Control+Enter")
            wait_numbers(page, text)
            numbers.append(time.perf_counter() - t)
            wait_complete(page)
            complete.append(time.perf_counter() - t)
        page.close()
    finally:
        stop(proc)
    return {"first": firsts, "cold": colds, "numbers": numbers, "complete": complete}


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def small_stand_in(browser) -> dict:
    import torch

    from attribution import Settings, tasks
    from bench.bench_engine import build_pair, forward_seconds
    from models import load_bridge

    with tempfile.TemporaryDirectory() as tmp:
        ln_dir, lf_dir = build_pair("small", Path(tmp))
        proc, url = start_server("--ln", str(ln_dir), "--lnfree", str(lf_dir))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url + "/?task=ioi&n_prompts=1")  # loads both models (and warms them up)
            wait_complete(page)
            t = time.perf_counter()
            page.goto(url + "/?task=induction")
            wait_complete(page)
            view = time.perf_counter() - t
            page.close()
        finally:
            stop(proc)
        model = load_bridge(str(ln_dir))
        task = tasks.build(model.bridge.tokenizer, Settings(task="induction"), model.bridge.cfg.n_ctx)
        with torch.no_grad():
            forward = forward_seconds(model.bridge, task.clean)
    return {"view": view, "forward": forward}


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-small", action="store_true", help="skip the gpt2-small-shaped stand-in")
    parser.add_argument("--starts", type=int, default=3, help="cold starts of the demo pair (median reported)")
    parser.add_argument("--prompts", type=int, default=6, choices=range(1, len(PROMPTS) + 1), metavar="N",
                        help=f"prompt changes on the demo pair, at most {len(PROMPTS)} (median reported)")
    args = parser.parse_args()
    floor, least = fresh_run(IMPORTS), fresh_run(LEAST)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        d = demo(browser, args.starts, args.prompts)
        small = None if args.no_small else small_stand_in(browser)
        browser.close()
    print("| measurement | seconds | goal |")
    print("|---|---|---|")
    print(f"| import floor (torch, transformers, transformer_lens, streamlit) | {floor:.2f} | |")
    print(f"| the least a page must do before the demo's first numbers (imports, loading the pair, its first "
          f"stage; no server, no browser) | {least:.2f} (floor + {least - floor:.2f}) | |")
    first, cold = statistics.median(d["first"]), statistics.median(d["cold"])
    print(f"| demo: cold start to the first numbers (median of {len(d['first'])}: {spread(d['first'])}) | "
          f"{first:.2f} (floor + {first - floor:.2f}) | <= floor + 2 |")
    print(f"| demo: cold start to the complete view (median of {len(d['cold'])}: {spread(d['cold'])}) | "
          f"{cold:.2f} (floor + {cold - floor:.2f}) | |")
    print(f"| demo: new prompt to predictions + DLA (median of {len(d['numbers'])}: {spread(d['numbers'])}) | "
          f"{statistics.median(d['numbers']):.2f} | <= 0.5 |")
    print(f"| demo: new prompt to the complete view (median of {len(d['complete'])}: {spread(d['complete'])}) | "
          f"{statistics.median(d['complete']):.2f} | <= 1.5 |")
    if small:
        print(f"| small stand-in: new view (induction 8 x 20) to complete | {small['view']:.2f} = "
              f"{small['view'] / small['forward']:.1f} forward-pass equivalents "
              f"(one pass: {small['forward']:.3f} s) | <= 50 fwd-eq |")


if __name__ == "__main__":
    main()
