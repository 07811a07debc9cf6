"""Edge attribution (attribution.edges) on tiny models in float64: each edge's score against the derivative
of the metric when only that reader's copy of the writer's output moves, and every writer's edges against
its AtP node score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution import edges, hooks, tasks
from attribution.atp import attribution_patching
from attribution.metric import apply_ln
from attribution.patching import capture, metric_runs
from attribution.results import Settings
from models import load_bridge

SETTINGS = Settings(n_prompts=3, seq_len=4)


@pytest.fixture(scope="module", params=["ln", "lnfree"])
def model(request, tiny_ln_dir, tiny_lnfree_dir):
    path = tiny_ln_dir if request.param == "ln" else tiny_lnfree_dir
    m = load_bridge(str(path), "float64")
    task = tasks.build(m.bridge.tokenizer, SETTINGS, m.bridge.cfg.n_ctx)
    return m.bridge, task, edges.edge_attribution(m.bridge, task)


def test_ln_vjp_is_autograds(tiny_ln_dir, tiny_lnfree_dir):
    for path in (tiny_ln_dir, tiny_lnfree_dir):
        ln = load_bridge(str(path), "float64").bridge.blocks[1].ln1.original_component
        x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
        u = torch.randn(2, 5, 64, dtype=torch.float64)
        (want,) = torch.autograd.grad(apply_ln(ln, x), x, u)
        torch.testing.assert_close(edges.ln_vjp(ln, x.detach(), u), want, rtol=1e-10, atol=1e-12)


def test_the_graph_has_every_edge_forward_in_time_and_no_other():
    L, H = 2, 2
    mask = edges.edge_mask(L, H)
    w = [x for x, _ in edges.writers(L, H)]
    r = [x for x, _ in edges.readers(L, H)]
    assert w == ["embed", "L0H0", "L0H1", "L0 MLP", "L1H0", "L1H1", "L1 MLP"]
    assert r[:7] == ["L0H0 q", "L0H0 k", "L0H0 v", "L0H1 q", "L0H1 k", "L0H1 v", "L0 MLP"] and r[-1] == "logits"
    edge = {(a, b) for i, a in enumerate(w) for j, b in enumerate(r) if mask[i, j]}
    assert ("embed", "L0H0 q") in edge and ("L0H1", "L0 MLP") in edge and ("L0H1", "L1H0 v") in edge
    assert ("L0H0", "L0H1 q") not in edge and ("L0 MLP", "L0H0 k") not in edge and ("L1 MLP", "L1 MLP") not in edge
    assert all((a, "logits") in edge for a in w)
    # embed feeds all 15 readers; each layer-0 head 9; layer 0's MLP 8; each layer-1 head 2; layer 1's MLP 1
    assert mask.sum() == len(edge) == 15 + 2 * 9 + 8 + 2 * 2 + 1


def edge_derivative(bridge, task, writer: str, reader: str) -> float:
    """d metric / d eps when the reader's input alone becomes input + eps (clean - corrupt) of the writer's
    output, on the corrupted prompts, normalised: computed by moving that one input in a forward pass."""
    L = bridge.cfg.n_layers
    names = edges.writer_names(L)
    clean_metric, clean = capture(bridge, task.clean, names, task)
    corrupt_metric, corrupt = capture(bridge, task.corrupt, names, task)
    labels = [x for x, _ in edges.writers(L, bridge.cfg.n_heads)]
    i = labels.index(writer)
    delta = (edges._writer_outputs(bridge, clean)[i] - edges._writer_outputs(bridge, corrupt)[i]).detach()
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    seen = {}

    def record(x, hook):
        seen["x"] = x
        return x

    def move_input(x, hook):  # only this LN's input moves: the skip path keeps the original
        return x + eps * delta

    if reader == "logits":
        fwd = [(hooks.FINAL_LN_IN, move_input)]
    elif reader.endswith("MLP"):
        fwd = [(hooks.ln_in(int(reader[1:reader.index(" ")]), "ln2"), move_input)]
    else:  # one head's query, key or value: recompute it from the moved residual through ln1
        head, part = reader.split()
        layer, h = int(head[1:head.index("H")]), int(head[head.index("H") + 1:])
        W = {"q": bridge.W_Q, "k": bridge.W_K, "v": bridge.W_V}[part][layer, h]
        b = {"q": bridge.b_Q, "k": bridge.b_K, "v": bridge.b_V}[part][layer, h]
        ln1 = bridge.blocks[layer].ln1.original_component

        def move_head(x, hook):
            x = x.clone()
            x[:, :, h] = apply_ln(ln1, seen["x"] + eps * delta) @ W + b
            return x
        fwd = [(hooks.resid_pre(layer), record), (getattr(hooks, part)(layer), move_head)]
    metric = metric_runs(bridge, task, task.corrupt, fwd, grad=True).mean()
    (d,) = torch.autograd.grad(metric, eps)
    return float(d) / (clean_metric.mean().item() - corrupt_metric.mean().item())


def test_edge_scores_are_the_derivative_of_moving_one_readers_input(model):
    bridge, task, result = model
    for writer, reader in [("embed", "L0H1 q"), ("embed", "L1H2 k"), ("L0H3", "L1H0 v"), ("L0H2", "L0 MLP"),
                           ("L0 MLP", "L1H1 q"), ("L1H0", "logits"), ("L0 MLP", "L1 MLP"), ("embed", "logits")]:
        got = result.scores[result.writers.index(writer), result.readers.index(reader)]
        want = edge_derivative(bridge, task, writer, reader)
        assert got == pytest.approx(want, rel=1e-8, abs=1e-12), (writer, reader)


def test_every_writers_edges_sum_to_its_atp_node_score(model):
    bridge, task, result = model
    atp = attribution_patching(bridge, task, star=False)
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    total = dict(zip(result.writers, np.nansum(result.scores, axis=1), strict=True))
    assert total["embed"] == pytest.approx(float(atp["resid"][0].sum()), rel=1e-8)
    for i in range(L):
        assert total[f"L{i} MLP"] == pytest.approx(float(atp["mlp"][i]), rel=1e-8, abs=1e-12)
        for h in range(H):
            assert total[f"L{i}H{h}"] == pytest.approx(float(atp["heads"][i, h]), rel=1e-8, abs=1e-12)


def test_eap_ig_of_the_embedding_is_complete(model):
    """The embedding feeds every reader, so its EAP-IG edges sum to its integrated gradient along the path from
    the corrupted to the clean embeddings: by the fundamental theorem of calculus, the whole metric change
    (1 after normalising), up to the Riemann sum's error, which shrinks with the steps; plain EAP has no
    such property."""
    bridge, task, eap = model
    errors = []
    for steps in (2, 8, 32):
        ig = edges.edge_attribution(bridge, task, ig_steps=steps)
        assert ig.method == f"EAP-IG ({steps} steps)"
        assert np.array_equal(np.isfinite(ig.scores), np.isfinite(eap.scores))
        errors.append(abs(np.nansum(ig.scores[0]) - 1.0))
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.05
    top = eap.top(5)
    assert len(top) == 5 and abs(top[0]["score"]) >= abs(top[-1]["score"])
    assert top[0]["score"] == np.nanmax(np.abs(eap.scores)) * np.sign(top[0]["score"])


def test_a_circuit_of_every_edge_is_the_clean_run_and_of_none_the_corrupted(model):
    bridge, task, result = model
    mask = edges.edge_mask(bridge.cfg.n_layers, bridge.cfg.n_heads)
    assert edges.circuit_recovery(bridge, task, mask)["recovered"] == pytest.approx(1.0, abs=1e-9)
    assert edges.circuit_recovery(bridge, task, ~mask)["recovered"] == pytest.approx(0.0, abs=1e-9)
    curve = edges.faithfulness(bridge, task, result, [0, 5, int(mask.sum()), 10**6])
    assert [c["edges"] for c in curve] == [0, 5, mask.sum(), mask.sum()]
    assert curve[0]["recovered"] == pytest.approx(0.0, abs=1e-9) and curve[2]["recovered"] == pytest.approx(1.0)


def test_one_edge_circuit_against_its_definition(model):
    """Keeping only embed -> logits: the final LN reads the corrupted final residual plus the clean minus the
    corrupted embedding, and every other reader gets corrupted inputs."""
    bridge, task, _ = model
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    keep = np.zeros_like(edges.edge_mask(L, H))
    keep[0, -1] = True
    got = edges.circuit_recovery(bridge, task, keep)["metric"]
    names = [hooks.EMBED, hooks.FINAL_LN_IN]
    _, clean = capture(bridge, task.clean, names, task)
    _, corrupt = capture(bridge, task.corrupt, names, task)
    final = corrupt[hooks.FINAL_LN_IN] + clean[hooks.EMBED] - corrupt[hooks.EMBED]
    from attribution.metric import from_resid

    want = from_resid(bridge, final[:, task.position], task.answer, task.counterfactual, torch.float64).mean()
    assert got == pytest.approx(float(want), rel=1e-9)


def test_eap_is_transformerlens_edge_attribution(model):
    """TransformerLens 4.x's edge-level attribution patching (per position, one prompt at a time, unnormalised)
    summed over positions gives the same edges and scores."""
    from transformer_lens.tools.analysis import attribution_patching as tl

    bridge = model[0]
    one = tasks.build(bridge.tokenizer, Settings(n_prompts=1, seq_len=4), bridge.cfg.n_ctx)

    def metric(logits):  # TransformerLens calls it once per prompt: one prompt here
        return logits[0, one.position, one.answer[0]] - logits[0, one.position, one.counterfactual[0]]

    ours = edges.edge_attribution(bridge, one)
    norm = (metric(bridge(one.clean)) - metric(bridge(one.corrupt))).item()
    res = tl.attribution_patch(bridge, one.clean, one.corrupt, metric, tl.EdgeAttributionConfig(granularity="edge"))

    def label(node):
        if node.kind == "embed" or node.kind == "logits":
            return node.kind
        if node.kind in ("attn_head_out", "q_input", "k_input", "v_input"):
            return f"L{node.layer}H{node.head}" + ("" if node.kind == "attn_head_out" else f" {node.kind[0]}")
        return f"L{node.layer} MLP"

    theirs = {}
    for (w, r), score in res.edge_scores.items():
        theirs[label(w), label(r)] = theirs.get((label(w), label(r)), 0.0) + score
    assert len(theirs) == np.isfinite(ours.scores).sum()
    for (w, r), score in theirs.items():
        assert ours.scores[ours.writers.index(w), ours.readers.index(r)] * norm == pytest.approx(score, abs=1e-12)


def test_edge_attribution_that_would_not_fit_is_one_sentence(model, monkeypatch):
    import models.loading
    from attribution.errors import AttributionInputError

    bridge, task, _ = model
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: edges.score_bytes(bridge, task))
    with pytest.raises(AttributionInputError, match="needs about .* GiB but .* GiB is free; use fewer"):
        edges.edge_attribution(bridge, task)
    from tests.test_report_numbers import IOI

    no_corrupt = tasks.build(bridge.tokenizer, Settings(task="custom", prompt=IOI.prompt, answer=IOI.answer),
                             bridge.cfg.n_ctx)
    with pytest.raises(AttributionInputError, match="needs a corrupted prompt"):
        edges.edge_attribution(bridge, no_corrupt)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_edge_scores_in_the_models_precision_match_float64(tiny_ln_dir, dtype, tol):
    """Scores are computed in the model's precision (at least float32) and summed over positions in float64:
    on a float32 or bfloat16 model they are the float64 model's to that precision (tol x the largest |score|)."""
    want = None
    for d in ("float64", dtype):
        m = load_bridge(str(tiny_ln_dir), d)
        task = tasks.build(m.bridge.tokenizer, SETTINGS, m.bridge.cfg.n_ctx)
        got = edges.edge_attribution(m.bridge, task).scores
        assert got.dtype == np.float64 and np.isfinite(got).sum() == edges.edge_mask(2, m.bridge.cfg.n_heads).sum()
        if want is None:
            want = got
    finite = np.isfinite(want)
    assert np.abs(got[finite] - want[finite]).max() <= tol * np.abs(want[finite]).max()
