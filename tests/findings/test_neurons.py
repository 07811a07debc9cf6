"""attribution.findings.neurons: the paper's candidate criterion and per-token ablation effects against
their definitions written out from the HF model (tests/findings/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from attribution import findings as fnd
from tests.findings.reference import (
    PLANTED,
    hf_mlp_ablation,
    paper_ablation,
    paper_neuron_scores,
    ref_stats,
)


@pytest.mark.parametrize("pair", ["ln_pair", "lnfree_pair"])
def test_candidates_are_the_papers_ranking(pair, request):
    bridge, hf = request.getfixturevalue(pair)
    cands = fnd.confidence_neurons(bridge, k=5)
    score, norm, var = paper_neuron_scores(hf)
    ref = torch.sort(score, descending=True).indices[:5].tolist()
    assert [c["neuron"] for c in cands] == ref
    for c in cands:
        n = c["neuron"]
        assert c["score"] == pytest.approx(float(score[n]), rel=1e-4)
        assert c["w_out_norm"] == pytest.approx(float(norm[n]), rel=1e-5)
        assert c["logit_var"] == pytest.approx(float(var[n]), rel=1e-4)
    assert set(cands[0]) == {"neuron", "layer", "w_out_norm", "logit_var", "score"}


def test_planted_confidence_neuron_is_found(planted):
    for name in ("ln", "lnfree"):
        cands = fnd.confidence_neurons(planted[name][0], k=3)
        assert cands[0]["neuron"] == PLANTED, name
        assert cands[0]["logit_var"] < 1e-10 < cands[1]["logit_var"]          # it writes into the null space
        assert cands[0]["score"] > cands[1]["score"] > cands[2]["score"] > 0


def test_ablation_is_the_papers_per_token_median(ln_pair, tokens):
    bridge, hf = ln_pair
    neurons = [c["neuron"] for c in fnd.confidence_neurons(bridge, k=2)]
    out = fnd.ablate_neurons(bridge, tokens, neurons)
    assert out["neurons"] == neurons and "signed" not in out
    assert out["n_predictions"] == tokens.shape[0] * (tokens.shape[1] - 1)
    for row, n, mean in zip(out["per_neuron"], neurons, out["mean_activation"], strict=True):
        ref = paper_ablation(hf, tokens, n)
        assert row["neuron"] == n
        assert mean == pytest.approx(ref["mean_activation"], rel=1e-5)
        # The mean is over the predicting positions 0..T-2, not all positions (our old definition).
        assert abs(ref["mean_all_positions"] - ref["mean_activation"]) > 1e-3 * abs(ref["mean_activation"])
        scale = ref["q3_abs_delta_ce"]
        assert scale > 1e-6
        for key in ("median_abs_delta_ce", "q1_abs_delta_ce", "q3_abs_delta_ce", "median_abs_delta_entropy",
                    "q1_abs_delta_entropy", "q3_abs_delta_entropy"):
            assert row[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-6), key
        # The median |change| is not the signed mean change (our old number).
        assert abs(abs(ref["signed_delta_ce"]) - row["median_abs_delta_ce"]) > 0.05 * row["median_abs_delta_ce"]
    with torch.no_grad():
        before = ref_stats(hf(tokens).logits, tokens)
    assert out["ce_before"] == pytest.approx(float(before["ce"].mean()), abs=1e-5)
    assert out["entropy_before"] == pytest.approx(float(before["entropy"].mean()), abs=1e-5)


def test_planted_neuron_acts_with_ln_only(planted, tokens):
    ln = fnd.ablate_neurons(planted["ln"][0], tokens, [PLANTED])["per_neuron"][0]
    ref = paper_ablation(planted["ln"][1], tokens, PLANTED)
    assert ln["median_abs_delta_entropy"] == pytest.approx(ref["median_abs_delta_entropy"], rel=1e-3)
    assert ln["median_abs_delta_entropy"] > 1e-3             # with LN it acts through the final LN's scale
    lf = fnd.ablate_neurons(planted["lnfree"][0], tokens, [PLANTED])["per_neuron"][0]
    assert lf["q3_abs_delta_entropy"] < 1e-5 and lf["q3_abs_delta_ce"] < 1e-5   # LN-free: null space only


def test_signed_variant_matches_torch_hooks(planted, tokens):
    bridge, hf = planted["ln"]
    neurons = [PLANTED, 3]
    out = fnd.ablate_neurons(bridge, tokens, neurons, signed=True)["signed"]
    assert out["definition"].startswith("our variant")
    for group, got in [(neurons, out["joint"]), ([PLANTED], out["per_neuron"][0]), ([3], out["per_neuron"][1])]:
        before, after = (ref_stats(lg, tokens) for lg in hf_mlp_ablation(hf, tokens, group))
        assert got["delta_ce"] == pytest.approx(float((after["ce"] - before["ce"]).mean()), abs=1e-5)
        assert got["delta_entropy"] == pytest.approx(float((after["entropy"] - before["entropy"]).mean()), abs=1e-5)
    assert abs(out["per_neuron"][0]["delta_entropy"]) > 1e-3


def test_ablation_in_an_earlier_layer_matches_torch_hooks(ln_pair, tokens):
    bridge, hf = ln_pair
    out = fnd.ablate_neurons(bridge, tokens, [5], layer=0)["per_neuron"][0]
    before, after = (ref_stats(lg, tokens) for lg in hf_mlp_ablation(hf, tokens, [5], layer=0))
    d = (after["ce"] - before["ce"]).abs().flatten().sort().values
    n = len(d)
    median = float(d[(n - 1) // 2] + d[n // 2]) / 2           # n is even: the mean of the middle two
    assert out["median_abs_delta_ce"] == pytest.approx(median, rel=1e-3, abs=1e-7)
    assert median > 1e-6 and not math.isnan(out["q3_abs_delta_ce"])
