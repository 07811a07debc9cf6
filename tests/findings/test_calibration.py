"""attribution.findings.calibration: entropy and ECE against their definitions and the HF model."""

from __future__ import annotations

import math

import pytest
import torch

from attribution import findings as fnd
from attribution.findings import base as fbase
from tests.findings.reference import (
    ref_ece,
    ref_stats,
)


def test_entropy_and_ece_on_hand_made_logits():
    # Four predictions over three tokens; one has confidence exactly 1 (the last bin's closed edge).
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.2], [1.0, 1.0, 3.0], [200.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 2, 1])
    out = fnd.calibration_from_logits(logits, targets, n_bins=4)
    probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits.tolist()]
    entropy = sum(-sum(p * math.log(p) for p in row if p > 0) for row in probs) / 4
    conf = [max(row) for row in probs]
    correct = [float(row.index(max(row)) == t) for row, t in zip(probs, targets.tolist(), strict=True)]
    ece, counts = ref_ece(conf, correct, 4)
    assert conf[3] == 1.0 and counts == [0, 1, 0, 3]
    assert out["entropy"] == pytest.approx(entropy, abs=1e-6)
    assert out["ece"] == pytest.approx(ece, abs=1e-6)
    assert [b["count"] for b in out["bins"]] == counts
    assert out["bins"][0]["accuracy"] is None
    ce = sum(-math.log(row[t]) for row, t in zip(probs, targets.tolist(), strict=True)) / 4   # includes a 200-nat miss
    assert out["ce"] == pytest.approx(ce, rel=1e-6)


def test_calibration_matches_hf_model(ln_pair, tokens, monkeypatch):
    bridge, hf = ln_pair
    monkeypatch.setattr(fbase, "MAX_BATCH", 4)  # 6 sequences in two batches
    out = fnd.calibration(bridge, tokens, n_bins=10)
    with torch.no_grad():
        s = ref_stats(hf(tokens).logits, tokens)
    ece, counts = ref_ece(s["confidence"].flatten().tolist(), s["correct"].flatten().tolist(), 10)
    assert out["n_predictions"] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert out["entropy"] == pytest.approx(float(s["entropy"].mean()), abs=1e-5)
    assert out["ce"] == pytest.approx(float(s["ce"].mean()), abs=1e-5)
    assert out["ece"] == pytest.approx(ece, abs=1e-6)
    assert out["accuracy"] == pytest.approx(float(s["correct"].mean()), abs=1e-9)
    assert [b["count"] for b in out["bins"]] == counts
