"""Fixtures of the findings tests: held-out tokens and tiny LN / LN-free / planted-neuron models."""

from __future__ import annotations

import pytest

from attribution import findings as fnd
from models import load_bridge, load_hf
from tests.conftest import write_lnfree
from tests.findings.reference import planted_model


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return fnd.heldout_tokens(tokenizer, n_ctx=24, n_seq=6)


@pytest.fixture(scope="module")
def ln_pair(tiny_ln_dir):
    bridge = load_bridge(str(tiny_ln_dir)).bridge
    return bridge, load_hf(str(tiny_ln_dir))[0]


@pytest.fixture(scope="module")
def lnfree_pair(tiny_lnfree_dir):
    bridge = load_bridge(str(tiny_lnfree_dir)).bridge
    return bridge, load_hf(str(tiny_lnfree_dir))[0]


@pytest.fixture(scope="session")
def demo_pair():
    """The demo pair (bridge, HF model) each: a trained model with confident predictions and, with BOS, sinks."""
    return {spec: (load_bridge(spec).bridge, load_hf(spec)[0]) for spec in ("demo", "demo-lnfree")}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer, tiny_sigmas):
    ln_dir, lf_dir = tmp_path_factory.mktemp("planted_ln"), tmp_path_factory.mktemp("planted_lnfree")
    model = planted_model(tokenizer)
    model.save_pretrained(ln_dir)
    write_lnfree(model, tiny_sigmas, lf_dir)
    for p in (ln_dir, lf_dir):
        tokenizer.save_pretrained(p)
    return {name: (load_bridge(str(p)).bridge, load_hf(str(p))[0]) for name, p in (("ln", ln_dir), ("lnfree", lf_dir))}
