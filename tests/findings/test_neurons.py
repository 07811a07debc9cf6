"""attribution.findings.neurons: the planted confidence neuron is found; mean ablation against torch hooks."""

from __future__ import annotations

import pytest
import torch

from attribution import findings as fnd
from tests.findings.reference import (
    PLANTED,
    hf_mlp_ablation,
    ref_stats,
)


def test_planted_confidence_neuron_is_found(planted):
    ln_bridge, _ = planted["ln"]
    lf_bridge, lf_hf = planted["lnfree"]
    cands = fnd.confidence_neurons(ln_bridge, k=3)
    assert [c["neuron"] for c in cands][0] == PLANTED
    assert cands[0]["effective_unembed_proj"] < 1e-4 and cands[0]["norm_ratio"] > 1
    assert cands[0]["score"] > cands[1]["score"] > 0
    # The effective projection, recomputed through the LN-free model's own (linear) ln_f and lm_head.
    W_out = lf_hf.transformer.h[-1].mlp.c_proj.weight.detach()          # [d_mlp, d]
    d = W_out.shape[1]
    with torch.no_grad():
        def spread(w):
            logits = lf_hf.lm_head(lf_hf.transformer.ln_f(w) - lf_hf.transformer.ln_f(torch.zeros(d)))
            return logits - logits.mean(-1, keepdim=True)
        typical = spread(torch.eye(d)).pow(2).sum(-1).mean().sqrt()      # mean over a basis = ||A||_F^2 / d
        ref = spread(W_out).norm(dim=-1) / W_out.norm(dim=-1) / typical
    mine = fnd.unembed_projection(lf_bridge, lf_bridge.W_out[-1])
    assert (mine - ref).abs().max() < 1e-4 * ref.max()
    # sigma cancels: the LN model (same gamma) gives the same values.
    assert (fnd.unembed_projection(ln_bridge, ln_bridge.W_out[-1]) - mine).abs().max() < 1e-4 * ref.max()


def test_mean_ablation_matches_torch_hooks(planted, tokens):
    bridge, hf = planted["ln"]
    neurons = [PLANTED, 3]
    out = fnd.ablate_neurons(bridge, tokens, neurons, individually=True)
    for group, got in [(neurons, out), ([PLANTED], out["per_neuron"][0]), ([3], out["per_neuron"][1])]:
        clean, ablated = hf_mlp_ablation(hf, tokens, group)
        before, after = ref_stats(clean, tokens), ref_stats(ablated, tokens)
        d_ce = float(after["ce"].mean() - before["ce"].mean())
        d_ent = float(after["entropy"].mean() - before["entropy"].mean())
        assert got["delta_ce"] == pytest.approx(d_ce, abs=1e-5)
        assert got["delta_entropy"] == pytest.approx(d_ent, abs=1e-5)
    assert out["entropy_before"] == pytest.approx(float(before["entropy"].mean()), abs=1e-5)
    assert out["ce_before"] == pytest.approx(float(before["ce"].mean()), abs=1e-5)
    # With LN the planted neuron matters through the final LN's scale ...
    assert abs(out["per_neuron"][0]["delta_entropy"]) > 1e-3
    # ... LN-free it writes only into the null space, so ablating it changes nothing.
    lf = fnd.ablate_neurons(planted["lnfree"][0], tokens, [PLANTED])
    assert abs(lf["delta_entropy"]) < 1e-5 and abs(lf["delta_ce"]) < 1e-5


def test_mean_ablation_in_an_earlier_layer_matches_torch_hooks(ln_pair, tokens):
    bridge, hf = ln_pair
    neurons = list(range(0, 256, 2))  # half the layer: a clear effect on the random tiny model
    out = fnd.ablate_neurons(bridge, tokens, neurons, layer=0)
    before, after = (ref_stats(lg, tokens) for lg in hf_mlp_ablation(hf, tokens, neurons, layer=0))
    assert out["delta_ce"] == pytest.approx(float(after["ce"].mean() - before["ce"].mean()), abs=2e-6)
    assert out["delta_entropy"] == pytest.approx(
        float(after["entropy"].mean() - before["entropy"].mean()), abs=2e-6)
    assert abs(out["delta_ce"]) > 1e-3
