"""attribution.findings.calibration: entropy and ECE against their definitions and the HF model; ECE as the
paper's analyse_models.py (10 equal-width bins, np.digitize)."""

from __future__ import annotations

import math

import numpy as np
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


def paper_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """analyse_models.py's calculate_ece_with_ci (its ECE, without the interval), written out with numpy."""
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            ece += mask.sum() / len(conf) * abs(conf[mask].mean() - correct[mask].mean())
    return float(ece)


@pytest.mark.parametrize("spec", ["demo", "demo-lnfree"])
def test_ece_is_the_papers_with_10_bins(demo_pair, spec):
    bridge, hf = demo_pair[spec]
    tokens = fnd.heldout_tokens(bridge.tokenizer, 64, 8, bos="prepend")  # as the demo pair was trained
    out = fnd.calibration(bridge, tokens)                     # the default: the paper's 10 bins
    with torch.no_grad():
        s = ref_stats(hf(tokens).logits, tokens)
    conf, correct = s["confidence"].flatten().numpy(), s["correct"].flatten().numpy()
    assert out["n_bins"] == 10 and len(out["bins"]) == 10
    assert out["ece"] == pytest.approx(paper_ece(conf, correct), abs=1e-6)
    assert [b["lo"] for b in out["bins"]] == np.linspace(0, 1, 11)[:-1].tolist()
    assert abs(paper_ece(conf, correct, 15) - paper_ece(conf, correct)) > 1e-4   # 15 bins (the old default) differ
    assert fnd.calibration(bridge, tokens, n_bins=15)["ece"] == pytest.approx(paper_ece(conf, correct, 15), abs=1e-6)


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
