"""attribution.findings.first_token: residual norms and attention sinks against the HF model's outputs."""

from __future__ import annotations

import pytest
import torch

from attribution import findings as fnd
from tests.findings.reference import (
    final_residual,
)


@pytest.mark.parametrize("pair", ["ln_pair", "lnfree_pair"])
def test_first_token_norms_match_hidden_states(pair, tokens, request):
    bridge, hf = request.getfixturevalue(pair)
    out = fnd.first_token_norms(bridge, tokens)
    x_final, hf_out = final_residual(hf, tokens)
    L = hf.config.n_layer
    streams = list(hf_out.hidden_states[:L]) + [x_final]   # resid_pre 0..L-1, then the input of ln_f
    assert out["layers"] == list(range(L + 1))
    for i, s in enumerate(streams):
        norms = s.double().norm(dim=-1)
        assert out["pos0"][i] == pytest.approx(float(norms[:, 0].mean()), rel=1e-5)
        assert out["rest"][i] == pytest.approx(float(norms[:, 1:].mean()), rel=1e-5)


def test_sink_rate_matches_output_attentions(ln_pair, tokens):
    bridge, hf = ln_pair
    with torch.no_grad():
        att = torch.stack(hf(tokens, output_attentions=True).attentions, 1).double()  # [B, L, H, q, k]
    first = att[..., 1:, 0]                          # attention on position 0 from queries 1..T-1
    a = first.mean(-1)                               # [B, L, H]
    # A threshold in the widest gap between sorted values of the middle half: some heads above, some
    # below, and none within float32 rounding of it.
    v = a.flatten().sort().values
    n = len(v)
    k = max(range(n // 4, 3 * n // 4), key=lambda i: v[i + 1] - v[i])
    assert v[k + 1] - v[k] > 1e-5
    threshold = float(v[k] + v[k + 1]) / 2
    out = fnd.attention_sink_rate(bridge, tokens, threshold=threshold)
    sink = (a >= threshold).double()
    assert 0 < out["rate"] < 1
    assert out["rate"] == pytest.approx(float(sink.mean()), abs=1e-12)
    assert torch.tensor(out["per_head"], dtype=torch.float64).sub(sink.mean(0)).abs().max() < 1e-12
    assert torch.tensor(out["mean_attention"], dtype=torch.float64).sub(a.mean(0)).abs().max() < 1e-6
    q_rate = (first >= threshold).double().mean(-1).mean(0)
    assert torch.tensor(out["query_rate"], dtype=torch.float64).sub(q_rate).abs().max() < 1e-12
