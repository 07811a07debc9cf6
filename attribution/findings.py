"""The paper's other findings (arXiv 2507.02559, section 5) as dataset-level analyses.

Each function takes a TransformerBridge and held-out token chunks [N, T] and
returns plain floats / lists (JSON-friendly):

- confidence (entropy) neurons: last-layer MLP neurons with a large output norm
  and a small effective projection onto the unembedding, and the effect of
  mean-ablating them on cross-entropy and output entropy;
- first-token residual norms per layer, and the attention-sink rate;
- calibration: mean output entropy, expected calibration error, reliability bins;
- the DLA error over a dataset: per-head NMAE between frozen-scale DLA of the
  actual next token's logit and the true direct effect.

Work over many sequences runs in batches sized from free memory, reports
progress through `progress(fraction, text)` and stops with AnalysisCancelled
when `should_stop()` returns True.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from attribution.dla import final_ln
from attribution.findings_base import (  # noqa: F401  (re-exported: the app and the CLI import them from here)
    AnalysisCancelled,
    FindingsInputError,
    Progress,
    ShouldStop,
    batch_size,
    batches,
    cfg_of,
    check_tokens,
    heldout_tokens,
    next_token_stats,
    sub_progress,
)
from attribution.patching import capture
from attribution.report import jsonable

# ----------------------------------------------------------------------------- confidence neurons

def unembed_projection(bridge, directions: torch.Tensor) -> torch.Tensor:
    """Relative logit spread of residual directions [n, d_model] through the final LN and W_U -> [n].

    A direction w changes the logits by A(w) = centre_vocab(W_U^T (g * centre_d(w))) / sigma
    (LN's centring, gain g, the unembedding; a shift shared by every logit does not
    change the softmax, so it is removed).  The value is ||A(w)|| / ||w|| divided by
    its root-mean-square over random directions, sqrt(||A||_F^2 / d): 1 for a typical
    direction, ~0 for a direction in the effective null space of the unembedding.
    """
    g = final_ln(bridge).weight.detach().float()
    W_U = bridge.W_U.detach().float()
    A = g[:, None] * W_U                                   # [d, V]
    A = A - A.mean(0, keepdim=True)                        # centre_d(w) . A == w . (A - column means)
    A = A - A.mean(1, keepdim=True)                        # drop the shared logit shift
    typical = A.pow(2).sum().div(A.shape[0]).sqrt()
    w = directions.float()
    return (w @ A).norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30) / typical


@torch.no_grad()
def confidence_neurons(bridge, k: int = 5, layer: int | None = None) -> list[dict]:
    """Candidate confidence (entropy) neurons of the last MLP layer, best first.

    The paper's criterion: a large output-weight norm and a small effective
    projection onto the unembedding (the neuron writes into W_U's null space, so it
    acts on the logits only through the final LN's scale).  For every neuron n:
      w_out_norm              ||W_out[n]||
      norm_ratio              w_out_norm / median norm of the layer
      effective_unembed_proj  unembed_projection(W_out[n]) (1 = typical direction, 0 = null space)
      score                   norm_ratio / effective_unembed_proj
    Candidates are the k neurons with the highest score among those with
    norm_ratio >= 1 (a tiny neuron in the null space does nothing either way).
    """
    L, _, _, d_mlp, _, _ = cfg_of(bridge)
    layer = L - 1 if layer is None else layer
    if not 0 <= layer < L:
        raise FindingsInputError(f"Layer {layer} does not exist; the model has layers 0..{L - 1}.")
    if k < 1:
        raise FindingsInputError("Ask for at least one confidence-neuron candidate (k >= 1).")
    W_out = bridge.W_out[layer].detach().float()          # [d_mlp, d]
    norms = W_out.norm(dim=-1)
    ratio = norms / norms.median()
    proj = unembed_projection(bridge, W_out)
    score = ratio / proj.clamp_min(1e-12)
    score = torch.where(ratio >= 1, score, torch.zeros_like(score))
    idx = score.topk(min(k, d_mlp)).indices
    return [{"neuron": int(i), "layer": layer, "w_out_norm": float(norms[i]), "norm_ratio": float(ratio[i]),
             "effective_unembed_proj": float(proj[i]), "score": float(score[i])} for i in idx]


@torch.no_grad()
def ablate_neurons(bridge, tokens: torch.Tensor, neurons: list[int], progress: Progress = None,
                   should_stop: ShouldStop = None, layer: int | None = None,
                   individually: bool = False) -> dict:
    """Mean-ablate MLP neurons (last layer by default) and measure CE and output entropy.

    The mean of each neuron's activation (mlp.hook_post) is taken over every
    position of every given sequence; the ablated run replaces the neuron's
    activation by that mean at every position.  CE and entropy (nats) are means
    over the next-token predictions at positions 0..T-2.  With individually=True,
    "per_neuron" also holds the effect of ablating each neuron alone.
    """
    L, _, _, d_mlp, _, _ = cfg_of(bridge)
    layer = L - 1 if layer is None else layer
    if not neurons:
        raise FindingsInputError("Give at least one neuron to ablate.")
    if not 0 <= layer < L or any(not 0 <= int(n) < d_mlp for n in neurons):
        raise FindingsInputError(f"Neurons must lie in layer 0..{L - 1}, index 0..{d_mlp - 1}.")
    tokens = check_tokens(bridge, tokens)
    neurons = [int(n) for n in neurons]
    hook_name = f"blocks.{layer}.mlp.hook_post"
    groups = [neurons] + ([[n] for n in neurons] if individually and len(neurons) > 1 else [])
    last = layer == L - 1
    # The last layer's neurons reach the logits only through W_out -> final LN -> W_U, so one captured
    # pass gives every group's ablated logits; other layers need one hooked forward pass per group.
    n_pass = 2 if last else 1 + len(groups)
    size = batch_size(bridge, tokens.shape[1], floats_per_token=2 * bridge.cfg.d_vocab if last else 0)

    # Pass 1: the clean run; neuron means and baseline CE / entropy.
    act_sum = torch.zeros(len(neurons), dtype=torch.float64, device=tokens.device)
    ce = ent = 0.0
    n_pos = tokens.shape[0] * (tokens.shape[1] - 1)
    for batch in batches(tokens, size, sub_progress(progress, 0, 1 / n_pass), should_stop, "ablation: clean run"):
        logits, acts = capture(bridge, batch, [hook_name])
        act_sum += acts[hook_name][..., neurons].double().sum((0, 1))
        s = next_token_stats(logits, batch)
        ce += float(s["ce"].double().sum())
        ent += float(s["entropy"].double().sum())
    means = (act_sum / (tokens.shape[0] * tokens.shape[1])).to(bridge.W_U.dtype)
    before = {"ce": ce / n_pos, "entropy": ent / n_pos}
    sums = [[0.0, 0.0] for _ in groups]

    def add(i: int, logits: torch.Tensor, batch: torch.Tensor) -> None:
        st = next_token_stats(logits, batch)
        sums[i][0] += float(st["ce"].double().sum())
        sums[i][1] += float(st["entropy"].double().sum())

    if last:
        ln, W_out, W_U = final_ln(bridge), bridge.W_out[layer], bridge.W_U
        b_U = getattr(bridge, "b_U", None)
        resid = f"blocks.{layer}.hook_resid_post"
        for batch in batches(tokens, size, sub_progress(progress, 1 / n_pass, 1), should_stop, "ablation: ablated"):
            _, acts = capture(bridge, batch, [hook_name, resid])
            shift = means - acts[hook_name][..., neurons]                  # [B, T, k]
            for i, group in enumerate(groups):
                cols = [neurons.index(n) for n in group]
                x = acts[resid] + shift[..., cols] @ W_out[group]          # the ablated final residual
                logits = ln(x) @ W_U
                add(i, logits if b_U is None else logits + b_U, batch)
    else:
        for i, group in enumerate(groups):
            cols = [neurons.index(n) for n in group]

            def ablate(x, hook, group=group, cols=cols):
                x = x.clone()
                x[..., group] = means[cols]
                return x

            for batch in batches(tokens, size, sub_progress(progress, (1 + i) / n_pass, (2 + i) / n_pass),
                                  should_stop, f"ablation: neurons {group}"):
                add(i, bridge.run_with_hooks(batch, fwd_hooks=[(hook_name, ablate)]), batch)

    def means_of(i: int) -> dict[str, float]:  # pass i's mean CE and entropy
        return {"ce": sums[i][0] / n_pos, "entropy": sums[i][1] / n_pos}

    after = means_of(0)
    out = {"layer": layer, "neurons": neurons, "mean_activation": [float(m) for m in means],
           "ce_before": before["ce"], "ce_after": after["ce"],
           "entropy_before": before["entropy"], "entropy_after": after["entropy"],
           "delta_ce": after["ce"] - before["ce"], "delta_entropy": after["entropy"] - before["entropy"]}
    if len(groups) > 1:
        out["per_neuron"] = []
        for i, group in enumerate(groups[1:], start=1):
            r = means_of(i)
            out["per_neuron"].append({"neuron": group[0], "delta_ce": r["ce"] - before["ce"],
                                      "delta_entropy": r["entropy"] - before["entropy"]})
    elif individually:
        out["per_neuron"] = [{"neuron": neurons[0], "delta_ce": out["delta_ce"],
                              "delta_entropy": out["delta_entropy"]}]
    return out


# ----------------------------------------------------------------------------- first token

@torch.no_grad()
def first_token_norms(bridge, tokens: torch.Tensor, progress: Progress = None,
                      should_stop: ShouldStop = None) -> dict:
    """Mean L2 norm of the residual stream at position 0 vs positions 1..T-1, per layer.

    layers[i] for i < L is resid_pre of block i (layer 0 = embeddings); layers[L]
    is resid_post of the last block (the final residual, before ln_final).
    pos0: mean over sequences of ||x[:, 0]||; rest: mean over sequences and
    positions 1..T-1 of ||x[:, p]||.
    """
    L = bridge.cfg.n_layers
    tokens = check_tokens(bridge, tokens)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    pos0 = torch.zeros(L + 1, dtype=torch.float64)
    rest = torch.zeros(L + 1, dtype=torch.float64)
    for batch in batches(tokens, batch_size(bridge, tokens.shape[1]), progress, should_stop, "residual norms"):
        _, acts = capture(bridge, batch, names)
        for i, n in enumerate(names):
            norm = acts[n].double().norm(dim=-1)   # [B, T]
            pos0[i] += norm[:, 0].sum().cpu()
            rest[i] += norm[:, 1:].sum().cpu()
    N, T = tokens.shape
    return {"layers": list(range(L + 1)),
            "labels": [f"resid_pre {i}" for i in range(L)] + [f"resid_post {L - 1}"],
            "pos0": (pos0 / N).tolist(), "rest": (rest / (N * (T - 1))).tolist()}


@torch.no_grad()
def attention_sink_rate(bridge, tokens: torch.Tensor, threshold: float = 0.3, progress: Progress = None,
                        should_stop: ShouldStop = None) -> dict:
    """Attention sinks on the first token (the sink metric of Gu et al. 2024, as the paper uses it).

    For sequence s, layer l, head h let a[s,l,h] be the head's attention on
    position 0, averaged over query positions 1..T-1 (query 0 can only attend to
    itself, so it is left out).  A head is a sink on s when a[s,l,h] >= threshold.
      rate            share of (sequence, head) pairs that are sinks (the paper's 55.3% -> 45.3%)
      per_head        [L][H] share of sequences on which the head is a sink (rate = its mean)
      mean_attention  [L][H] a[s,l,h] averaged over sequences
      query_rate      [L][H] share of (sequence, query position >= 1) pairs with attention on
                      position 0 >= threshold; query_rate_overall is its mean
    """
    if not 0 < threshold <= 1:
        raise FindingsInputError("The sink threshold must lie in (0, 1], e.g. 0.3.")
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    tokens = check_tokens(bridge, tokens)
    sink = torch.zeros(L, H, dtype=torch.float64)
    mean_att = torch.zeros(L, H, dtype=torch.float64)
    q_rate = torch.zeros(L, H, dtype=torch.float64)

    def make_hook(layer: int):
        def hook(pattern, hook):  # [B, H, q, k]
            first = pattern[:, :, 1:, 0].double()          # [B, H, T-1]
            a = first.mean(-1)
            sink[layer] += (a >= threshold).double().sum(0).cpu()
            mean_att[layer] += a.sum(0).cpu()
            q_rate[layer] += (first >= threshold).double().mean(-1).sum(0).cpu()
            return pattern
        return hook

    hooks = [(f"blocks.{i}.attn.hook_pattern", make_hook(i)) for i in range(L)]
    for batch in batches(tokens, batch_size(bridge, tokens.shape[1]), progress, should_stop, "attention sinks"):
        bridge.run_with_hooks(batch, fwd_hooks=hooks)
    N = tokens.shape[0]
    per_head = sink / N
    return {"threshold": threshold, "rate": float(per_head.mean()), "per_head": per_head.tolist(),
            "mean_attention": (mean_att / N).tolist(), "query_rate": (q_rate / N).tolist(),
            "query_rate_overall": float((q_rate / N).mean())}


# ----------------------------------------------------------------------------- calibration

def calibration_from_logits(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict:
    """Entropy, ECE and reliability bins of next-token predictions: logits [..., V], targets [...]."""
    acc = _CalibrationAccumulator(n_bins, logits.device)
    logp = F.log_softmax(logits.float(), dim=-1)
    conf, pred = logp.max(-1)
    acc.add(-logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1), conf.exp(),
            (pred == targets).float())
    return acc.result()


class _CalibrationAccumulator:
    """Sums per confidence bin; bin b holds confidences in [b/n, (b+1)/n) (the last bin includes 1)."""

    def __init__(self, n_bins: int, device):
        if n_bins < 1:
            raise FindingsInputError("Use at least one calibration bin.")
        self.n_bins = n_bins
        self.conf = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.correct = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.count = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.ce = self.entropy = 0.0
        self.n = 0

    def add(self, ce, entropy, conf, correct) -> None:
        conf, correct = conf.flatten().double(), correct.flatten().double()
        b = (conf * self.n_bins).long().clamp(0, self.n_bins - 1)
        self.conf.index_add_(0, b, conf)
        self.correct.index_add_(0, b, correct)
        self.count.index_add_(0, b, torch.ones_like(conf))
        self.ce += float(ce.double().sum())
        self.entropy += float(entropy.double().sum())
        self.n += conf.numel()

    def result(self) -> dict:
        n = max(self.n, 1)
        bins = []
        for b in range(self.n_bins):
            c = float(self.count[b])
            bins.append({"lo": b / self.n_bins, "hi": (b + 1) / self.n_bins, "count": int(c),
                         "confidence": float(self.conf[b] / c) if c else None,
                         "accuracy": float(self.correct[b] / c) if c else None})
        ece = float((self.conf - self.correct).abs().sum() / n)  # sum_b n_b/N |conf_b - acc_b|
        return {"entropy": self.entropy / n, "ece": ece, "ce": self.ce / n,
                "accuracy": float(self.correct.sum() / n), "confidence": float(self.conf.sum() / n),
                "n_predictions": self.n, "n_bins": self.n_bins, "bins": bins}


@torch.no_grad()
def calibration(bridge, tokens: torch.Tensor, n_bins: int = 15, progress: Progress = None,
                should_stop: ShouldStop = None) -> dict:
    """Mean output entropy (nats) and the expected calibration error of top-1 next-token predictions.

    Over every prediction at positions 0..T-2 of every sequence: confidence is the
    top-1 probability, correct means the top-1 token is the actual next token.
    With equal-width bins over [0, 1], ECE = sum_b (n_b / N) |mean confidence_b -
    accuracy_b|.  Also returns CE, overall accuracy and mean confidence.
    """
    tokens = check_tokens(bridge, tokens)
    acc = _CalibrationAccumulator(n_bins, tokens.device)
    for batch in batches(tokens, batch_size(bridge, tokens.shape[1]), progress, should_stop, "calibration"):
        s = next_token_stats(bridge(batch), batch)
        acc.add(s["ce"], s["entropy"], s["confidence"], s["correct"])
    return acc.result()


# ----------------------------------------------------------------------------- DLA error over a dataset

@torch.no_grad()
def head_direct_effects(bridge, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head DLA and true direct effect on the actual next token's logit: ([B, T-1, L, H],) * 2, float64.

    For head (l, h) with output c = z[l, h] @ W_O[l, h] at position p (no b_O), the
    final residual x and the actual next token t = tokens[p + 1]:
      DLA = centre(c) / scale(x) . (g * W_U[:, t])       (scale frozen at the real run's value)
      DE  = logit_t(x) - logit_t(x - c)                  (the model's final LN recomputed live)
    For an LN-free model the scale is the constant sigma, so DLA == DE.  The
    arithmetic is done in float64 so that the LN-free difference is pure rounding.
    """
    L = bridge.cfg.n_layers
    tokens = check_tokens(bridge, tokens)
    names = [f"blocks.{i}.attn.hook_z" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post",
                                                              "ln_final.hook_scale"]
    _, acts = capture(bridge, tokens, names)
    ln = copy.deepcopy(final_ln(bridge)).double()
    u = bridge.W_U.detach().double().T[tokens[:, 1:]]                    # [B, T-1, d]
    x = acts[f"blocks.{L - 1}.hook_resid_post"][:, :-1].double()         # [B, T-1, d]
    scale = acts["ln_final.hook_scale"][:, :-1].double()                  # [B, T-1, 1]
    gu = ln.weight * u / scale                                            # [B, T-1, d]
    logit_x = (ln(x) * u).sum(-1)                                         # [B, T-1]
    W_O = bridge.W_O.detach().double()
    dla, de = [], []
    for i in range(L):
        c = torch.einsum("bphe,hed->bphd", acts[f"blocks.{i}.attn.hook_z"][:, :-1].double(), W_O[i])
        dla.append(((c - c.mean(-1, keepdim=True)) * gu[:, :, None]).sum(-1))
        de.append(logit_x[..., None] - (ln(x[:, :, None] - c) * u[:, :, None]).sum(-1))
    return torch.stack(dla, 2), torch.stack(de, 2)


@torch.no_grad()
def dataset_dla_error(bridge, tokens: torch.Tensor, progress: Progress = None,
                      should_stop: ShouldStop = None) -> dict:
    """NMAE between frozen-scale DLA and the true direct effect of every head over a dataset.

    Over all sequences and positions 0..T-2 (target: the actual next token), per head
      per_head[l][h] = sum |DLA - DE| / sum |DE|
    and overall ("nmae") the same ratio summed over all heads too (as attribution.dla.nmae).
    Also returns the mean |DE| and mean DLA / DE per head.  See head_direct_effects.
    """
    L, H, d, _, _, _ = cfg_of(bridge)
    tokens = check_tokens(bridge, tokens)
    err = torch.zeros(L, H, dtype=torch.float64)
    mag = torch.zeros(L, H, dtype=torch.float64)
    dla_sum = torch.zeros(L, H, dtype=torch.float64)
    de_sum = torch.zeros(L, H, dtype=torch.float64)
    size = batch_size(bridge, tokens.shape[1], floats_per_token=8 * H * d + 2 * L * H * 16)
    for batch in batches(tokens, size, progress, should_stop, "DLA error"):
        dla, de = head_direct_effects(bridge, batch)
        err += (dla - de).abs().sum((0, 1)).cpu()
        mag += de.abs().sum((0, 1)).cpu()
        dla_sum += dla.sum((0, 1)).cpu()
        de_sum += de.sum((0, 1)).cpu()
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    per_head = torch.where(mag > 0, err / mag.clamp_min(1e-300), torch.full_like(err, math.nan))
    total = float(mag.sum())
    return {"nmae": float(err.sum() / total) if total > 0 else math.nan, "per_head": per_head.tolist(),
            "mean_abs_de": (mag / n).tolist(), "mean_dla": (dla_sum / n).tolist(),
            "mean_de": (de_sum / n).tolist(), "n_predictions": n}


# ----------------------------------------------------------------------------- the comparison

STAGES = {"neurons": 2.0, "norms": 1.0, "sinks": 1.0, "calibration": 1.0, "dla_error": 2.0}


def findings(bridge, tokens: torch.Tensor, neurons: list[int], k: int = 5, threshold: float = 0.3,
             n_bins: int = 15, progress: Progress = None, should_stop: ShouldStop = None) -> dict:
    """Every analysis for one model; `neurons` (last layer) are the ones mean-ablated."""
    total, done = sum(STAGES.values()), 0.0
    out = {"n_seq": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}

    def part(name: str) -> Progress:
        nonlocal done
        lo, done = done, done + STAGES[name]
        return sub_progress(progress, lo / total, done / total)

    out["neurons"] = confidence_neurons(bridge, k)
    out["ablation"] = ablate_neurons(bridge, tokens, neurons, part("neurons"), should_stop, individually=True)
    out["norms"] = first_token_norms(bridge, tokens, part("norms"), should_stop)
    out["sinks"] = attention_sink_rate(bridge, tokens, threshold, part("sinks"), should_stop)
    out["calibration"] = calibration(bridge, tokens, n_bins, part("calibration"), should_stop)
    out["dla_error"] = dataset_dla_error(bridge, tokens, part("dla_error"), should_stop)
    return out


def compare_findings(ln_bridge, lnfree_bridge, tokens_ln: torch.Tensor, tokens_lnfree: torch.Tensor,
                     progress: Progress = None, should_stop: ShouldStop = None, k: int = 5,
                     threshold: float = 0.3, n_bins: int = 15) -> dict:
    """All findings for an LN model and its LN-free twin: {"ln": {...}, "lnfree": {...}, "settings": {...}}.

    The confidence-neuron candidates are found in the LN model (where they act
    through the final LN's scale) and the same neuron indices are mean-ablated in
    both models (the twin is fine-tuned from the LN model, so neurons correspond);
    each model's own candidates are listed under "neurons".
    """
    if ln_bridge.cfg.d_mlp != lnfree_bridge.cfg.d_mlp or ln_bridge.cfg.n_layers != lnfree_bridge.cfg.n_layers:
        raise FindingsInputError("The two models have different shapes; compare a model with its LN-free twin.")
    neurons = [c["neuron"] for c in confidence_neurons(ln_bridge, k)]
    return jsonable({
        "settings": {"k": k, "threshold": threshold, "n_bins": n_bins, "ablated_neurons": neurons,
                     "ablated_layer": ln_bridge.cfg.n_layers - 1, "neurons_from": "ln"},
        "ln": findings(ln_bridge, tokens_ln, neurons, k, threshold, n_bins, sub_progress(progress, 0, 0.5, "LN: "),
                       should_stop),
        "lnfree": findings(lnfree_bridge, tokens_lnfree, neurons, k, threshold, n_bins,
                           sub_progress(progress, 0.5, 1, "LN-free: "), should_stop),
    })


def pair_findings(ln_bridge, ln_info, lnfree_bridge, lnfree_info, n_seq: int, seq_len: int | None = None,
                  source: str = "demo", progress: Progress = None, should_stop: ShouldStop = None,
                  k: int = 5, threshold: float = 0.3, n_bins: int = 15) -> dict:
    """compare_findings on `n_seq` held-out sequences of `seq_len` tokens (default: each model's n_ctx),
    with the models and every setting recorded in the result (what the app and the CLI both export)."""
    tokens = []
    for bridge in (ln_bridge, lnfree_bridge):
        n_ctx = bridge.cfg.n_ctx
        if seq_len is not None and seq_len > n_ctx:
            raise FindingsInputError(f"A sequence length of {seq_len} exceeds the model's context of {n_ctx}; "
                                     f"lower it.")
        tokens.append(heldout_tokens(bridge.tokenizer, seq_len or n_ctx, n_seq, source))
    start = time.time()
    result = compare_findings(ln_bridge, lnfree_bridge, tokens[0], tokens[1], progress, should_stop, k=k,
                              threshold=threshold, n_bins=n_bins)
    result["models"] = {"ln": ln_info.spec, "lnfree": lnfree_info.spec, "lnfree_is_ln_free": lnfree_info.ln_free,
                        "ln_is_ln_free": ln_info.ln_free}
    result["settings"].update({"n_seq": n_seq, "seq_len": int(tokens[0].shape[1]), "source": source,
                               "seconds": round(time.time() - start, 1)})
    return result


# (metric, unit, how to read it from one model's findings, the paper's LN -> LN-free value)
SUMMARY = [
    ("confidence-neuron ablation: delta CE", "nats", lambda r: r["ablation"]["delta_ce"],
     "changes with LN, ~0 LN-free"),
    ("confidence-neuron ablation: delta entropy", "nats", lambda r: r["ablation"]["delta_entropy"],
     "changes with LN, ~0 LN-free"),
    ("residual norm at position 0, first layer", "L2", lambda r: r["norms"]["pos0"][0], ""),
    ("residual norm at position 0, final", "L2", lambda r: r["norms"]["pos0"][-1],
     "GPT-2 medium: ~500 -> ~3,600 by layer 3 with LN; ~300-500 LN-free"),
    ("residual norm at other positions, final", "L2", lambda r: r["norms"]["rest"][-1], ""),
    ("attention-sink rate", "share", lambda r: r["sinks"]["rate"], "55.3% -> 45.3%"),
    ("mean output entropy", "nats", lambda r: r["calibration"]["entropy"], "GPT-2 small: 3.053 -> 2.794"),
    ("expected calibration error", "", lambda r: r["calibration"]["ece"], "GPT-2 small: 0.0193 -> 0.0354"),
    ("cross-entropy", "nats", lambda r: r["calibration"]["ce"], ""),
    ("DLA error (NMAE over heads)", "share", lambda r: r["dla_error"]["nmae"], "GPT-2 small: 49% -> 0%"),
]


def summary_table(result: dict) -> list[dict]:
    """One row per headline number of a compare_findings result: metric, unit, ln, lnfree, paper."""
    return [{"metric": name, "unit": unit, "ln": get(result["ln"]), "lnfree": get(result["lnfree"]),
             "paper": paper} for name, unit, get, paper in SUMMARY]
