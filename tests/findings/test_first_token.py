"""attribution.findings.first_token: residual norms and attention sinks against the paper's definitions,
written out from the HF model (tests/findings/reference.py)."""

from __future__ import annotations

import pytest
import torch

from attribution import findings as fnd
from tests.findings.reference import paper_norm_streams, paper_sink_rate


@pytest.mark.parametrize("pair", ["ln_pair", "lnfree_pair"])
def test_first_token_norms_are_the_papers_centred_norms(pair, tokens, request):
    bridge, hf = request.getfixturevalue(pair)
    out = fnd.first_token_norms(bridge, tokens)
    streams = paper_norm_streams(hf, tokens)
    L = hf.config.n_layer
    assert out["labels"] == ["embed", "pos_embed"] + [f"resid_{w} {i}" for i in range(L) for w in ("mid", "post")] \
        + ["ln_final"]
    assert len(streams) == len(out["labels"]) and out["centred"] is True
    for i, s in enumerate(streams):
        norms = s.norm(dim=-1)                                    # [B, T]
        assert out["pos0"][i] == pytest.approx(float(norms[:, 0].mean()), rel=1e-5), out["labels"][i]
        assert out["rest"][i] == pytest.approx(float(norms[:, 1:].mean()), rel=1e-5), out["labels"][i]
        assert out["pos0_std"][i] == pytest.approx(float(norms[:, 0].std()), rel=1e-4, abs=1e-6)
        assert out["rest_std"][i] == pytest.approx(float(norms[:, 1:].std()), rel=1e-4, abs=1e-6)
    final = out["labels"].index(f"resid_post {L - 1}")
    assert out["pos0_final"] == out["pos0"][final] and out["rest_final"] == out["rest"][final]
    assert out["pos0_peak"] == max(out["pos0"][2:-1])
    # The paper's norms are of the centred stream; the uncentred norms (our old definition) differ here.
    x = hf.transformer.wte(tokens).detach().double()
    assert abs(float(x.norm(dim=-1)[:, 0].mean()) - out["pos0"][0]) > 1e-3 * out["pos0"][0]


def test_sink_rate_is_the_papers(ln_pair, tokens):
    bridge, hf = ln_pair
    with torch.no_grad():
        att = hf(tokens, output_attentions=True).attentions          # L x [B, H, q, k]
    first = torch.stack(att, 1).double()[..., 0]                     # [B, L, H, q]
    # A threshold in a gap of the attention values on position 0 (none within float32 rounding of it),
    # among the queries where some but not all heads are above it.
    v = first[..., 1:].flatten().sort().values
    n = len(v)
    k = max(range(n // 4, 3 * n // 4), key=lambda i: v[i + 1] - v[i])
    assert v[k + 1] - v[k] > 1e-5
    threshold = float(v[k] + v[k + 1]) / 2
    out = fnd.attention_sink_rate(bridge, tokens, threshold=threshold)
    rate, per_head = paper_sink_rate(att, threshold)
    assert 0 < out["rate"] < 1 and "head_mean" not in out
    assert out["rate"] == pytest.approx(rate, abs=1e-12)
    assert torch.tensor(out["per_head"], dtype=torch.float64).sub(per_head).abs().max() < 1e-12
    # Query 0 counts (always a sink) and each query is thresholded: not our old head-mean definition.
    old = (first[..., 1:].mean(-1) >= threshold).double().mean()
    assert abs(out["rate"] - float(old)) > 0.01
    assert out["rate"] > float((first[..., 1:] > threshold).double().mean())
    # At the default threshold too.
    assert fnd.attention_sink_rate(bridge, tokens)["rate"] == pytest.approx(paper_sink_rate(att)[0], abs=1e-12)


def test_sink_rate_head_mean_variant(ln_pair, tokens):
    bridge, hf = ln_pair
    with torch.no_grad():
        att = torch.stack(hf(tokens, output_attentions=True).attentions, 1).double()  # [B, L, H, q, k]
    a = att[..., 1:, 0].mean(-1)                                  # [B, L, H]: mean over queries 1..T-1
    v = a.flatten().sort().values
    n = len(v)
    k = max(range(n // 4, 3 * n // 4), key=lambda i: v[i + 1] - v[i])
    threshold = float(v[k] + v[k + 1]) / 2
    out = fnd.attention_sink_rate(bridge, tokens, threshold=threshold, head_mean=True)["head_mean"]
    sink = (a >= threshold).double()
    assert 0 < out["rate"] < 1 and out["definition"].startswith("our variant")
    assert out["rate"] == pytest.approx(float(sink.mean()), abs=1e-12)
    assert torch.tensor(out["per_head"], dtype=torch.float64).sub(sink.mean(0)).abs().max() < 1e-12
    assert torch.tensor(out["mean_attention"], dtype=torch.float64).sub(a.mean(0)).abs().max() < 1e-6
