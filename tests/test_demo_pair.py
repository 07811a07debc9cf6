"""The shipped demo pair (models/demo, models/demo-lnfree): shapes, recorded quality, induction heads."""

from __future__ import annotations

import json
import math

import pytest

from lnfree.quality import induction_losses, token_losses
from models import load_hf
from models.corpus import load_passages, pack
from tests.test_models import ROOT, run_inspect

DEMO = ROOT / "models" / "demo"


def test_demo_model_size_and_quality():

    model, tok, info = load_hf("demo")
    report = json.loads((DEMO / "training.json").read_text())
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (4, 256, 4, 256, 8192)
    assert not info.ln_free and info.twin == "demo-lnfree"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    held = pack(tok(load_passages("heldout"))["input_ids"], eot, cfg.n_positions, bos=True)  # as it was trained
    ce = token_losses(model, held, batch_size=64).mean().item()
    assert ce < math.log(cfg.vocab_size) - 3.0  # far better than uniform (9.01 nats)
    assert ce == pytest.approx(report["heldout_ce"], abs=1e-3)  # the README's number
    # The reported induction numbers are what the model does, and it has induction heads (README).
    ind = induction_losses(model, cfg.vocab_size, bos_id=eot)
    assert ind == pytest.approx(report["induction"], abs=1e-3)
    assert ind["second_copy"] < ind["first_copy"] - 5  # far below: induction


def test_demo_lnfree_is_ln_free_and_keeps_induction():
    """The shipped twin: its recorded held-out CE (the README's) and the base's induction heads."""

    model, tok, info = load_hf("demo-lnfree")
    run = json.loads((ROOT / "models" / "demo-lnfree" / "run.json").read_text())
    assert info.ln_free and info.base == "demo" and set(info.sigmas) == {
        *(f"blocks.{i}.ln{k}" for i in range(4) for k in (1, 2)), "ln_final"}
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert run["recipe"]["bos"] == 1  # removed on chunks that start with EOT, as the base was trained
    held = pack(tok(load_passages("heldout"))["input_ids"], eot, model.config.n_positions, bos=True)
    assert token_losses(model, held, batch_size=64).mean().item() == pytest.approx(run["heldout_ce_final"], abs=1e-3)
    ind = induction_losses(model, model.config.vocab_size, bos_id=eot)
    assert ind["second_copy"] < ind["first_copy"] - 5


def test_inspect_cli_demo():
    out = json.loads(run_inspect("demo").stdout)
    assert out["spec"] == "demo" and out["n_layers"] == 4 and out["ln_free"] is False


def test_the_presets_do_what_the_app_says_on_both_demo_models():
    """The custom preset: both models' top-1 is the answer and the corrupted prompt lowers the metric; the
    induction task (the opening view): the same for its batch.  The IOI task: the demo has no IOI circuit
    (the app says so): it prefers the repeated name, a metric below 0, where a model with the circuit has
    one well above it."""
    from attribution import Settings, compare
    from attribution.tasks import PRESET
    from models import load_bridge

    ln, lnfree = load_bridge("demo"), load_bridge("demo-lnfree")
    custom = compare(ln, lnfree, Settings(task="custom", **PRESET, per_position=False))
    induction = compare(ln, lnfree, Settings(task="induction", per_position=False))
    for pair in (custom, induction):
        for res in (pair.ln, pair.lnfree):
            assert res.top_tokens[0][0] == res.answer
            assert res.metric_clean > res.metric_corrupt + 5
    ioi = compare(ln, lnfree, Settings(task="ioi", per_position=False))
    assert all(r.metric_clean < 0 for r in (ioi.ln, ioi.lnfree))
