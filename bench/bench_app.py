"""App latency on the demo pair, against the floor of importing its dependencies.

    .venv/bin/python -m bench.bench_app

Measures, in one run on this machine:
  * floor: bare `import torch, transformers, transformer_lens, streamlit` in a fresh interpreter;
  * cold start: `streamlit run app.py` started -> first complete view in headless Chromium
    (the "6. Summary" header and every figure rendered);
  * change: a new prompt entered (the custom task's prompt) -> the complete view again.
Prints the times and the differences to the goals (cold start within 2 s of the floor; <= 1.5 s per change).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.test_app_browser import CHROMIUM_ARGS, free_port

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import torch, transformers, transformer_lens, streamlit"


def import_floor(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return min(times)


def wait_complete(page, timeout_ms: int = 300_000) -> None:
    page.get_by_text("6. Summary").wait_for(timeout=timeout_ms)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 8",
                           timeout=timeout_ms)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
    # During a rerun Streamlit marks the previous run's elements stale until they are redrawn.
    page.wait_for_function("document.querySelectorAll('[data-stale=\"true\"]').length === 0", timeout=timeout_ms)


def main() -> None:
    from playwright.sync_api import sync_playwright

    floor = import_floor()
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            wait_complete(page)
            cold = time.perf_counter() - t0
            prompt = page.get_by_label("Prompt", exact=True)
            changes = []
            for text in ("In the beginning God created the sea and the",
                         "In the beginning God created the land and the"):
                prompt.fill(text)
                t = time.perf_counter()
                prompt.press("Control+Enter")
                # Complete: the new prompt is shown and every figure is drawn again.
                page.get_by_text(text).first.wait_for(timeout=120_000)
                wait_complete(page)
                changes.append(time.perf_counter() - t)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    change = min(changes)
    print("| measurement | seconds | goal |")
    print("|---|---|---|")
    print(f"| import floor (torch, transformers, transformer_lens, streamlit) | {floor:.2f} | |")
    print(f"| cold start to complete view | {cold:.2f} | <= floor + 2 = {floor + 2:.2f} |")
    print(f"| cold start minus floor | {cold - floor:.2f} | <= 2 |")
    print(f"| new prompt to complete view | {change:.2f} | <= 1.5 |")


if __name__ == "__main__":
    main()
