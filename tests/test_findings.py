"""attribution.findings: each analysis against an independent plain-torch computation on tiny models.

References use the Hugging Face model (loaded separately from the bridge) with
torch forward hooks, output_hidden_states / output_attentions, or the
definition written out on hand-made numbers.
"""

from __future__ import annotations

import copy
import json
import math

import plotly.graph_objects as go
import pytest
import torch

from attribution import findings as fnd
from attribution import findings_base as fbase
from attribution.dla import nmae as dla_nmae
from attribution.findings_plots import FINDINGS_FIGURES
from models import load_bridge, load_hf
from tests.conftest import tiny_model, write_lnfree

PLANTED = 7  # the planted confidence neuron of the last layer


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokens(tokenizer):
    return fnd.heldout_tokens(tokenizer, n_ctx=24, n_seq=6)


@pytest.fixture(scope="module")
def ln_pair(tiny_ln_dir):
    bridge, _ = load_bridge(str(tiny_ln_dir))
    return bridge, load_hf(str(tiny_ln_dir))[0]


@pytest.fixture(scope="module")
def lnfree_pair(tiny_lnfree_dir):
    bridge, _ = load_bridge(str(tiny_lnfree_dir))
    return bridge, load_hf(str(tiny_lnfree_dir))[0]


def planted_model(tokenizer):
    """The tiny model with a last-layer neuron that writes only into the unembedding's null space.

    With ln_f's gain set to 1, a centred direction v orthogonal to every
    unembedding vector changes no logit directly; with LN it still changes the
    final LN's scale, so it acts on every logit's size (an entropy neuron).
    """
    model = tiny_model(tokenizer, seed=3)
    d = model.config.n_embd
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(1.0)
        v = torch.randn(d, generator=torch.Generator().manual_seed(1))
        v = v - v.mean()
        v = v / v.norm()
        wte = model.transformer.wte.weight                     # tied with lm_head
        wte -= (wte @ v)[:, None] * v[None]
        mlp = model.transformer.h[-1].mlp
        mlp.c_proj.weight[PLANTED] = 4.0 * v                   # Conv1D: rows are neurons
        mlp.c_fc.weight[:, PLANTED] *= 6.0                     # a widely varying activation
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer, tiny_sigmas):
    ln_dir, lf_dir = tmp_path_factory.mktemp("planted_ln"), tmp_path_factory.mktemp("planted_lnfree")
    model = planted_model(tokenizer)
    model.save_pretrained(ln_dir)
    write_lnfree(model, tiny_sigmas, lf_dir)
    for p in (ln_dir, lf_dir):
        tokenizer.save_pretrained(p)
    return {name: (load_bridge(str(p))[0], load_hf(str(p))[0]) for name, p in (("ln", ln_dir), ("lnfree", lf_dir))}


# ----------------------------------------------------------------------------- plain-torch references

def ref_stats(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """CE, entropy, top-1 confidence and correctness from the definition (float64 softmax)."""
    p = torch.softmax(logits[:, :-1].double(), -1)
    target = ids[:, 1:]
    conf, pred = p.max(-1)
    return {"ce": -p.gather(-1, target[..., None])[..., 0].log(), "entropy": -(p * p.log()).sum(-1),
            "confidence": conf, "correct": (pred == target).double()}


def ref_ece(conf: list[float], correct: list[float], n_bins: int) -> tuple[float, list[int]]:
    """ECE by explicit loops: bin b = [b/n, (b+1)/n), confidence 1.0 in the last bin."""
    counts, total = [], 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(conf) if lo <= c < hi or (b == n_bins - 1 and c == 1.0)]
        counts.append(len(members))
        if members:
            mean_conf = sum(conf[i] for i in members) / len(members)
            acc = sum(correct[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(mean_conf - acc)
    return total, counts


def hf_mlp_ablation(model, ids: torch.Tensor, neurons: list[int],
                    layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the clean run and of the run with `neurons` of `layer` set to their mean (torch hooks)."""
    act = model.transformer.h[layer].mlp.act
    seen = []
    h = act.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        clean = model(ids).logits
    h.remove()
    mean = seen[0][..., neurons].mean((0, 1))

    def replace(m, i, o):
        o = o.clone()
        o[..., neurons] = mean
        return o

    h = act.register_forward_hook(replace)
    with torch.no_grad():
        ablated = model(ids).logits
    h.remove()
    return clean, ablated


def final_residual(model, ids: torch.Tensor, extra_hooks=()) -> tuple[torch.Tensor, list]:
    """The input of ln_f (the final residual stream) via a forward pre-hook."""
    seen = []
    h = model.transformer.ln_f.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    h.remove()
    return seen[0], out


def hf_head_effects(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head frozen-scale DLA and true direct effect by surgery on the final residual: [B, T-1, L, H].

    Runs a float64 copy of the model, so the reference differences carry no float32 rounding.
    """
    model = copy.deepcopy(model).double()
    cfg = model.config
    H, dh = cfg.n_head, cfg.n_embd // cfg.n_head
    merged = []
    hooks = [blk.attn.c_proj.register_forward_pre_hook(lambda m, args: merged.append(args[0].detach()))
             for blk in model.transformer.h]
    x, _ = final_residual(model, ids)
    for h in hooks:
        h.remove()
    ln, W_U = model.transformer.ln_f, model.lm_head.weight.T            # W_U [d, V]
    target = ids[:, 1:]
    x = x[:, :-1]
    with torch.no_grad():
        scale = ln.sigma if hasattr(ln, "sigma") else (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()

        def logit(resid):  # logit of the actual next token, final LN live: [B, T-1]
            return model.lm_head(ln(resid)).gather(-1, target[..., None])[..., 0]

        dla, de = [], []
        for layer, z in enumerate(merged):
            W = model.transformer.h[layer].attn.c_proj.weight                # [H*dh, d]
            for head in range(H):
                c = z[:, :-1, head * dh:(head + 1) * dh] @ W[head * dh:(head + 1) * dh]
                de.append(logit(x) - logit(x - c))
                u = W_U.T[target]                                             # [B, T-1, d]
                dla.append((((c - c.mean(-1, keepdim=True)) / scale * ln.weight) * u).sum(-1))
    L = cfg.n_layer
    stack = lambda xs: torch.stack(xs, -1).reshape(*xs[0].shape, L, H).double()  # noqa: E731
    return stack(dla), stack(de)


# ----------------------------------------------------------------------------- calibration

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


# ----------------------------------------------------------------------------- first token

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


# ----------------------------------------------------------------------------- DLA error

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


# ----------------------------------------------------------------------------- confidence neurons

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


# ----------------------------------------------------------------------------- plumbing and errors

def test_progress_and_cancel(ln_pair, tokens, monkeypatch):
    monkeypatch.setattr(fbase, "MAX_BATCH", 1)
    seen = []
    fnd.calibration(ln_pair[0], tokens, progress=lambda f, text: seen.append((f, text)))
    fractions = [f for f, _ in seen]
    assert len(seen) == 6 and fractions == sorted(fractions) and fractions[-1] == 1.0
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(fnd.AnalysisCancelled):
        fnd.dataset_dla_error(ln_pair[0], tokens, should_stop=stop_after_two)
    assert len(calls) == 3


def test_batch_size_follows_free_memory(ln_pair, monkeypatch):
    import models.loading

    bridge = ln_pair[0]
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: 1 << 40)
    assert fnd.batch_size(bridge, 64) == fbase.MAX_BATCH
    per_seq = 4 * 64 * (4 * 300 + 3 * 256 + (12 + 4) * 64 + 2 * 4 * 64)
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: int(per_seq * 3 / fbase.MEMORY_SHARE))
    assert fnd.batch_size(bridge, 64) == 3
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: 10)
    assert fnd.batch_size(bridge, 64) == 1


def test_bad_inputs(ln_pair, tokens, tokenizer):
    bridge = ln_pair[0]
    with pytest.raises(fnd.FindingsInputError, match="context"):
        fnd.calibration(bridge, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(fnd.FindingsInputError, match="tokenizer"):
        fnd.first_token_norms(bridge, torch.full((1, 5), 300))
    with pytest.raises(fnd.FindingsInputError, match="2-D"):
        fnd.calibration(bridge, torch.zeros(5, dtype=torch.long))
    with pytest.raises(fnd.FindingsInputError, match="at least one neuron"):
        fnd.ablate_neurons(bridge, tokens, [])
    with pytest.raises(fnd.FindingsInputError, match="Neurons"):
        fnd.ablate_neurons(bridge, tokens, [256])
    with pytest.raises(fnd.FindingsInputError, match="threshold"):
        fnd.attention_sink_rate(bridge, tokens, threshold=0)
    with pytest.raises(fnd.FindingsInputError, match="lower n_seq"):
        fnd.heldout_tokens(tokenizer, 64, 10**6)
    with pytest.raises(ValueError):  # FindingsInputError is a ValueError for the app and the CLI
        fnd.heldout_tokens(tokenizer, 64, 2, source="/nonexistent.txt")


def test_heldout_tokens_are_packed_demo_text(tokenizer):
    from models.corpus import load_passages, pack

    chunks = fnd.heldout_tokens(tokenizer, 32, 3)
    texts = load_passages("heldout")
    ref = pack([tokenizer.encode(t, add_special_tokens=False) for t in texts], tokenizer.eos_token_id, 32)
    n = len(ref)
    assert chunks.shape == (3, 32) and n > 100
    for got, i in zip(chunks, [0, round((n - 1) / 2), n - 1], strict=True):  # first, middle, last
        assert torch.equal(got, ref[i])


def test_heldout_tokens_from_a_text_file(tokenizer, tmp_path):
    from models.corpus import pack

    paragraphs = ["In the beginning was the Word.", "To be, or not to be, that is the question."] * 6
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    chunks = fnd.heldout_tokens(tokenizer, 16, 2, source=str(path))
    ref = pack([tokenizer.encode(p, add_special_tokens=False) for p in paragraphs], tokenizer.eos_token_id, 16)
    assert len(ref) > 2 and torch.equal(chunks, ref[[0, len(ref) - 1]])


# ----------------------------------------------------------------------------- comparison, figures, CLI

def test_compare_findings_and_figures(ln_pair, lnfree_pair, tokens):
    result = fnd.compare_findings(ln_pair[0], lnfree_pair[0], tokens[:3, :16], tokens[:3, :16], k=2)
    json.dumps(result, allow_nan=False)
    neurons = result["settings"]["ablated_neurons"]
    assert len(neurons) == 2
    assert result["ln"]["ablation"]["neurons"] == result["lnfree"]["ablation"]["neurons"] == neurons
    assert result["lnfree"]["dla_error"]["nmae"] < 1e-5 < result["ln"]["dla_error"]["nmae"]
    table = {r["metric"]: r for r in fnd.summary_table(result)}
    assert table["DLA error (NMAE over heads)"]["ln"] == result["ln"]["dla_error"]["nmae"]
    assert table["attention-sink rate"]["lnfree"] == result["lnfree"]["sinks"]["rate"]
    for name, make in FINDINGS_FIGURES.items():
        fig = make(result)
        assert isinstance(fig, go.Figure), name
        assert {t.xaxis for t in fig.data} == {"x", "x2"}, name      # LN | LN-free panels
    heat = FINDINGS_FIGURES["dla_error"](result)
    assert {t.coloraxis for t in heat.data} == {"coloraxis"}     # one shared colour scale
    top = max(max(r) for m in ("ln", "lnfree") for r in result[m]["dla_error"]["per_head"])
    assert heat.layout.coloraxis.cmax == pytest.approx(top)
    norms = FINDINGS_FIGURES["norms"](result)
    assert norms.layout.yaxis2.matches == "y"                    # shared y scale
    assert list(norms.data[0].y) == result["ln"]["norms"]["pos0"]


def test_cli_writes_json_and_figures(tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys):
    from attribution import findings_cli

    out, figs = tmp_path / "r.json", tmp_path / "figs"
    rc = findings_cli.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir), "--n-seq", "2",
                            "--seq-len", "16", "--k", "2", "--out", str(out), "--figures", str(figs)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["n_seq"] == 2 and result["settings"]["seq_len"] == 16
    assert result["settings"]["source"] == "demo"
    assert result["models"] == {"ln": str(tiny_ln_dir), "lnfree": str(tiny_lnfree_dir), "lnfree_is_ln_free": True,
                                "ln_is_ln_free": False}
    assert result["lnfree"]["dla_error"]["nmae"] < 1e-5
    assert "DLA error (NMAE over heads)" in capsys.readouterr().out
    for name in FINDINGS_FIGURES:
        html = (figs / f"{name}.html").read_text()
        assert "Plotly.newPlot" in html and len(html) > 1_000_000   # plotly.js embedded: works offline


@pytest.mark.parametrize("argv, message", [
    (["--n-seq", "0"], "--n-seq"),
    (["--threshold", "2"], "--threshold"),
    (["--seq-len", "1000"], "context"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, tiny_ln_dir, tiny_lnfree_dir, tmp_path, capsys):
    from attribution import findings_cli

    rc = findings_cli.main(["--ln", str(tiny_ln_dir), "--lnfree", str(tiny_lnfree_dir),
                            "--out", str(tmp_path / "r.json")] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_cli_unknown_model_exits_2(tmp_path, capsys):
    from attribution import findings_cli

    rc = findings_cli.main(["--ln", str(tmp_path / "missing"), "--lnfree", "demo-lnfree",
                            "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
