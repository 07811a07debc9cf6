"""attribution.findings.dla_error: the paper's dataset-level DLA error (last position, input token, centred
unembedding) against run_analysis.py's definition written out; our all-positions variant against surgery."""

from __future__ import annotations

import pytest
import torch

from attribution import findings as fnd
from attribution.dla import nmae as dla_nmae
from attribution.findings import base as fbase
from tests.findings.reference import (
    hf_head_effects,
    paper_head_dla,
    paper_nmae,
)


@pytest.mark.parametrize("pair", ["ln_pair", "lnfree_pair"])
def test_head_effects_are_the_papers(pair, tokens, request):
    bridge, hf = request.getfixturevalue(pair)
    dla, de = fnd.head_direct_effects(bridge, tokens)
    ref_dla, ref_de = paper_head_dla(hf, tokens)
    B, L, H = tokens.shape[0], hf.config.n_layer, hf.config.n_head
    assert dla.shape == de.shape == (B, L, H)
    scale = ref_de.abs().mean()
    assert scale > 1e-6
    assert (de.reshape(B, -1) - ref_de).abs().max() < 1e-4 * scale
    assert (dla.reshape(B, -1) - ref_dla).abs().max() < 1e-4 * scale


def test_dataset_dla_error_is_the_papers(ln_pair, lnfree_pair, tokens, monkeypatch):
    monkeypatch.setattr(fbase, "MAX_BATCH", 4)  # aggregation over two batches
    ln = fnd.dataset_dla_error(ln_pair[0], tokens)
    lf = fnd.dataset_dla_error(lnfree_pair[0], tokens)
    assert ln["positions"] == "last" and ln["n_predictions"] == tokens.shape[0]
    per_head, nmae = paper_nmae(*paper_head_dla(ln_pair[1], tokens))
    L, H = ln_pair[1].config.n_layer, ln_pair[1].config.n_head
    assert torch.tensor(ln["per_head"], dtype=torch.float64).sub(per_head.reshape(L, H)).abs().max() < 1e-4
    assert ln["nmae"] == pytest.approx(nmae, rel=1e-4) and nmae > 0.01
    assert lf["nmae"] < 1e-9 and max(max(r) for r in lf["per_head"]) < 1e-9
    # Not our old definition (every position, the next token, the raw W_U).
    old_dla, old_de = hf_head_effects(ln_pair[1], tokens)
    assert abs(dla_nmae(old_dla, old_de) - nmae) > 0.01
    # ... which is still there as our variant.
    all_pos = fnd.dataset_dla_error(ln_pair[0], tokens, positions="all")
    assert all_pos["n_predictions"] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert all_pos["definition"].startswith("our variant")
    assert all_pos["nmae"] == pytest.approx(dla_nmae(old_dla, old_de), rel=1e-3)


@pytest.mark.parametrize("pair", ["ln_pair", "lnfree_pair"])
def test_all_positions_variant_matches_surgery(pair, tokens, request):
    bridge, hf = request.getfixturevalue(pair)
    dla, de = fnd.head_direct_effects(bridge, tokens, positions="all")
    ref_dla, ref_de = hf_head_effects(hf, tokens)
    assert dla.shape == ref_dla.shape == (6, 23, 2, 4)
    scale = ref_de.abs().mean()
    assert scale > 1e-6
    assert (de - ref_de).abs().max() < 1e-3 * scale + 1e-6
    assert (dla - ref_dla).abs().max() < 1e-3 * scale + 1e-6
