"""The app served for real on 127.0.0.1 and opened in headless Chromium (Debian's), via Playwright."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed"),
    pytest.mark.skipif(not (ROOT / "models" / "demo-lnfree" / "model.safetensors").exists(),
                       reason="the demo pair is not built"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(tmp_path, *app_args: str, script: str = "app.py"):
    """`streamlit run app.py [-- app_args]` (from the checkout, so with its .streamlit/config.toml) on a free
    loopback port: yields (url, process) once healthy."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", *(("--", *app_args) if app_args else ())],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not come up: " + (tmp_path / "streamlit.log").read_text()[-2000:])
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def served_app(tmp_path):
    with serve(tmp_path) as (url, _):
        yield url


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_app_in_chromium(served_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1200}, accept_downloads=True)
        page.goto(served_app)
        # The default view computes on the demo pair without any click.
        expect(page.get_by_text("4. Summary")).to_be_visible(timeout=240_000)
        expect(page.get_by_text("Activation patching: top-20 by |AtP*|", exact=False)).to_be_visible(
            timeout=240_000)  # the last stage is done
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        assert page.locator(".js-plotly-plot").count() >= 8
        for text in ("1. Predictions", "2. Direct logit attribution"):
            expect(page.get_by_text(text)).to_be_visible()
        expect(page.get_by_text("LN-free: DLA error (NMAE vs true direct effect)")).to_be_visible()
        assert page.locator("[data-testid='stException']").count() == 0
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        # Sections 4-9 are tabs, drawn when opened; the open one is in the URL (a shared link reopens it).
        assert page.locator(".js-plotly-plot").count() == 8 and page.get_by_text("6. Attention pattern").count() == 0
        page.get_by_role("tab", name="Attention pattern").click()
        expect(page.get_by_text("6. Attention pattern")).to_be_visible(timeout=60_000)
        expect(page.locator(".js-plotly-plot")).to_have_count(9, timeout=60_000)
        expect(page).to_have_url(re.compile(r"tab=Attention(\+|%20)pattern"), timeout=10_000)

        button = page.get_by_role("button", name="HTML").first
        button.scroll_into_view_if_needed()
        with page.expect_download(timeout=60_000) as info:
            button.click()
        saved = tmp_path / "dla_heads.html"
        info.value.save_as(saved)
        html = saved.read_text()
        # Self-contained: plotly.js is inlined (megabytes), no external <script src=...>.
        assert len(html) > 1_000_000 and "Plotly.newPlot" in html
        assert not re.search(r"<script[^>]*\bsrc=", html)

        # A new prompt: its predictions and DLA replace the old ones, then the rest follows.
        page.goto(served_app + "/?task=custom")
        prompt = page.get_by_label("Prompt", exact=True)
        prompt.fill("And David spake unto Saul, Take thy rod, and stretch out thine hand. And David said unto")
        prompt.press("Control+Enter")  # as long as the preset's corrupted prompt (20 tokens)
        expect(page.get_by_text("And David spake unto Saul", exact=False)).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Activation patching: top-20 by |AtP*|", exact=False)).to_be_visible(
            timeout=120_000)
        assert page.locator("[data-testid='stException']").count() == 0
        browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_cancel_in_chromium(served_app):
    """A long verification (full per-position sweeps) shows its progress under the finished panels, and
    Cancel stops it, keeping them."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        page.goto(served_app + "/?task=induction&n_prompts=32&seq_len=60&full_sweeps=true&per_position=true")
        cancel = page.get_by_role("button", name="Cancel analysis", exact=True)
        expect(cancel).to_be_visible(timeout=240_000)
        expect(page.get_by_text("LN-free: DLA error (NMAE vs true direct effect)")).to_be_visible()
        cancel.click()
        expect(page.get_by_text("Cancelled after", exact=False)).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Run the rest")).to_be_visible()
        expect(page.get_by_text("LN-free: DLA error (NMAE vs true direct effect)")).to_be_visible()
        assert page.locator("[data-testid='stException']").count() == 0
        browser.close()


def test_an_idle_server_is_idle(tmp_path):
    """After a complete view, the server spends (almost) no CPU: no file watcher scanning the checkout
    (.venv included) for changes.  Opened from the command line on an LN-free directory alone, which pairs
    with the base it records."""
    from playwright.sync_api import expect, sync_playwright

    lnfree = ROOT / "models" / "demo-lnfree"
    with serve(tmp_path, "--lnfree", str(lnfree)) as (url, proc):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(url)
            expect(page.get_by_text("Activation patching: top-20 by |AtP*|", exact=False)).to_be_visible(
                timeout=240_000)  # the whole analysis is done
            expect(page.get_by_role("heading", name=f"LN-free: {lnfree}", exact=True)).to_be_visible()
            expect(page.get_by_role("heading", name="LN: demo", exact=True)).to_be_visible()
            time.sleep(3)  # let the run finish sending
            before = cpu_seconds(proc.pid)
            time.sleep(20)
            idle = cpu_seconds(proc.pid) - before
            browser.close()
    assert idle < 1.0, f"the idle server used {idle:.2f} CPU-seconds in 20 s"


def test_two_sessions_analysing_at_once_get_their_own_numbers(served_app, tmp_path):
    """Two browser sessions change their view back and forth while the other's analysis runs on the same
    cached models: every page completes without an error and shows the numbers that its view gives when
    computed alone."""
    from playwright.sync_api import expect, sync_playwright

    from attribution import Settings, compare
    from models import load_bridge

    views = [[(2, 8), (3, 12), (4, 6), (2, 10)], [(4, 10), (2, 8), (3, 6), (5, 12)]]  # (n_prompts, seq_len)
    ln, lnfree = load_bridge("demo"), load_bridge("demo-lnfree")
    alone = {v: compare(ln, lnfree, Settings(task="induction", n_prompts=v[0], seq_len=v[1]))
             for rounds in views for v in rounds}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pages = [browser.new_context().new_page() for _ in views]  # a context each: two sessions
        for rnd in range(len(views[0])):
            for page, rounds in zip(pages, views, strict=True):  # both start before either is waited for
                n, t = rounds[rnd]
                page.goto(f"{served_app}/?task=induction&n_prompts={n}&seq_len={t}")
            for page, rounds in zip(pages, views, strict=True):
                try:
                    expect(page.get_by_text("Activation patching: top-20 by |AtP*|", exact=False)).to_be_visible(
                        timeout=240_000)
                except AssertionError:
                    raise AssertionError((tmp_path / "streamlit.log").read_text()[-6000:]) from None
                # Read the numbers once the page is settled: a rerun may be redrawing them (seen once under load:
                # the patching caption up, no metric in the page yet).
                expect(page.get_by_test_id("stMetricValue").nth(3)).to_be_visible(timeout=60_000)
                page.wait_for_function("document.querySelectorAll('[data-stale=\"true\"]').length === 0",
                                       timeout=60_000)
                log = (tmp_path / "streamlit.log").read_text()
                assert page.locator("[data-testid='stException']").count() == 0, log[-6000:]
                assert page.locator("[data-testid='stAlertContentError']").count() == 0, log[-6000:]
                shown = page.get_by_test_id("stMetricValue").all_inner_texts()[:4]
                want = alone[rounds[rnd]]
                expected = [f"{x:.3f}" for x in (want.ln.metric_clean, want.ln.metric_corrupt,
                                                   want.lnfree.metric_clean, want.lnfree.metric_corrupt)]
                assert shown == expected, (rounds[rnd], shown, expected)
        browser.close()


def test_the_browser_never_sees_a_traceback(tmp_path):
    """An unexpected error (a bug) shows a generic message in the page; its message and traceback go to
    the server's log only (the shipped config's client.showErrorDetails)."""
    from playwright.sync_api import expect, sync_playwright

    script = tmp_path / "fails.py"
    script.write_text("raise RuntimeError('internal detail at /very/secret/path')\n")
    with serve(tmp_path, script=str(script)) as (url, _):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("[data-testid='stException']")).to_be_visible(timeout=60_000)
            text = page.locator("body").inner_text()
            browser.close()
    assert "secret" not in text and "Traceback" not in text and "RuntimeError" not in text, text
    log = (tmp_path / "streamlit.log").read_text()
    assert "Traceback" in log and "/very/secret/path" in log
