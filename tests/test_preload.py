"""The app's opening pair, loaded as its server starts (models/preload.py), and the server's module."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import ModelSpecError, load_bridge, preload

ROOT = Path(__file__).resolve().parents[1]


def test_served_module_is_light_and_its_start_up_preloads_the_pair():
    """`streamlit run app.py` imports app.py to find the server: that import must not wait for torch, and the
    server's start-up (its ASGI lifespan) must load the pair that the command line opens on."""
    script = """
import sys
sys.argv = ["app.py", "--lnfree", "demo-lnfree"]
import app
print("torch imported:", "torch" in sys.modules)
from starlette.testclient import TestClient
with TestClient(app.app) as client:
    from models import preload
    lnfree = preload.take("demo-lnfree", "float32", "cpu")
    base = lnfree.info.ln_base()
    ln = preload.take(base, "float32", "cpu")
    print("preloaded:", lnfree.info.spec, ln.info.spec, bool(lnfree.info.ln_free), bool(ln.info.ln_free))
    print("again:", preload.take("demo-lnfree", "float32", "cpu"))
    print("health:", client.get("/_stcore/health").text)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout
    assert "torch imported: False" in out
    assert "preloaded: demo-lnfree demo True False" in out
    assert "again: None" in out  # handed over once: the page's model cache keeps it from then on
    assert "health: ok" in out


def test_each_model_is_handed_over_once_and_a_miss_drops_the_rest(tiny_ln_dir, tiny_lnfree_dir):
    ln, lnfree = str(tiny_ln_dir), str(tiny_lnfree_dir)
    preload.start(["--ln", ln, "--lnfree", lnfree]).join()
    model = preload.take(lnfree, "float32", "cpu")
    assert model.info.spec == lnfree and model.info.ln_free
    assert preload.take(lnfree, "bfloat16", "cpu") is None  # another dtype: the view moved on
    assert preload.take(ln, "float32", "cpu") is None  # so the LN model was dropped


def test_take_waits_for_a_load_in_progress(tiny_ln_dir, tiny_lnfree_dir):
    ln, lnfree = str(tiny_ln_dir), str(tiny_lnfree_dir)
    thread = preload.start(["--ln", ln, "--lnfree", lnfree, "--dtype", "float64"])
    assert preload.take(lnfree, "float64", "cpu").info.spec == lnfree
    model = preload.take(ln, "float64", "cpu")
    assert model.info.spec == ln and not model.info.ln_free
    assert next(model.bridge.parameters()).dtype == torch.float64
    thread.join()


def test_a_failed_preload_is_left_to_the_page(tiny_lnfree_dir, tmp_path):
    """The preload forgets a failure; the page's own load of the same spec then reports it in one sentence."""
    missing, lnfree = str(tmp_path / "nowhere"), str(tiny_lnfree_dir)
    preload.start(["--ln", missing, "--lnfree", lnfree]).join()
    assert preload.take(lnfree, "float32", "cpu") is not None
    assert preload.take(missing, "float32", "cpu") is None
    with pytest.raises(ModelSpecError):
        load_bridge(missing)
    preload.start(["--dtype"]).join()  # a command line the page reports: nothing preloaded, nothing waits
    assert preload.take("demo-lnfree", "float32", "cpu") is None
