"""attribution.findings.dla_error: per-head DLA and direct effects against surgery on the HF model."""

from __future__ import annotations

import pytest
import torch

from attribution import findings as fnd
from attribution.dla import nmae as dla_nmae
from attribution.findings import base as fbase
from tests.findings.reference import (
    hf_head_effects,
)


@pytest.mark.parametrize("pair", ["ln_pair", "lnfree_pair"])
def test_head_direct_effect_matches_surgery(pair, tokens, request):
    bridge, hf = request.getfixturevalue(pair)
    dla, de = fnd.head_direct_effects(bridge, tokens)
    ref_dla, ref_de = hf_head_effects(hf, tokens)
    assert dla.shape == ref_dla.shape == (6, 23, 2, 4)
    scale = ref_de.abs().mean()
    assert scale > 1e-6
    assert (de - ref_de).abs().max() < 1e-3 * scale + 1e-6
    assert (dla - ref_dla).abs().max() < 1e-3 * scale + 1e-6


def test_dataset_dla_error_zero_lnfree_positive_ln(ln_pair, lnfree_pair, tokens, monkeypatch):
    monkeypatch.setattr(fbase, "MAX_BATCH", 4)  # aggregation over two batches
    ln = fnd.dataset_dla_error(ln_pair[0], tokens)
    lf = fnd.dataset_dla_error(lnfree_pair[0], tokens)
    assert lf["nmae"] < 1e-5 and max(max(r) for r in lf["per_head"]) < 1e-5
    assert ln["nmae"] > 0.01
    # The per-head and overall ratios equal those of the plain-torch arrays (sum |DLA - DE| / sum |DE|).
    ref_dla, ref_de = hf_head_effects(ln_pair[1], tokens)
    per_head = (ref_dla - ref_de).abs().sum((0, 1)) / ref_de.abs().sum((0, 1))
    assert torch.tensor(ln["per_head"], dtype=torch.float64).sub(per_head).abs().max() < 1e-3
    assert ln["nmae"] == pytest.approx(dla_nmae(ref_dla, ref_de), rel=1e-3)
    assert ln["n_predictions"] == 6 * 23
