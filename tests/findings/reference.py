"""Independent references for the findings: the Hugging Face model with torch hooks, or the definition
written out, and a model with a planted confidence neuron.

The paper_* functions are the definitions of the paper's code (github.com/submarat/removing-layer-norm)
written out here in plain torch / numpy from the Hugging Face model, float64: its models are
TransformerLens models with fold_ln, center_writing_weights and center_unembed, which
`paper_unembedding` reproduces by hand.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from tests.conftest import tiny_model

PLANTED = 7  # the planted confidence neuron of the last layer


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
    """Logits of the clean run and of the run with `neurons` of `layer` set to their mean over the
    predicting positions 0..T-2 (the paper's mean), by torch hooks on the real forward pass."""
    clean, ablated, _ = _mean_ablated(model, ids, neurons, layer)
    return clean, ablated


def _mean_ablated(model, ids: torch.Tensor, neurons: list[int], layer: int = -1):
    """(clean logits, logits with `neurons` of `layer` at their mean over positions 0..T-2, the clean
    activations [B, T, d_mlp])."""
    act = model.transformer.h[layer].mlp.act
    seen = []
    h = act.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        clean = model(ids).logits
    h.remove()
    mean = seen[0][:, :-1, neurons].mean((0, 1))

    def replace(m, i, o):
        o = o.clone()
        o[..., neurons] = mean
        return o

    h = act.register_forward_hook(replace)
    with torch.no_grad():
        ablated = model(ids).logits
    h.remove()
    return clean, ablated, seen[0]


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


def _double(model):
    return copy.deepcopy(model).double().eval()


def is_lnfree(model) -> bool:
    return hasattr(model.transformer.ln_f, "sigma") or model.config.layer_norm_epsilon >= 1e6


def paper_gain(model) -> torch.Tensor:
    """ln_f's gain as the paper's loaders see it: the weight, or for an LN-free checkpoint (weight = gamma *
    1e6 / sigma, eps 1e12) the weight / 1e6 = gamma / sigma (NoLNModelLoader); load_hf's exact LN-free
    modules hold gamma and sigma separately."""
    ln = model.transformer.ln_f
    w = ln.weight.detach().double()
    if hasattr(ln, "sigma"):
        return w / ln.sigma
    return w / 1e6 if is_lnfree(model) else w


def paper_unembedding(model) -> torch.Tensor:
    """W_U [d, V] as TransformerLens holds it after fold_ln + center_unembed: gain folded in, centred
    over d_model (fold_ln's centring of reading weights), then over the vocabulary."""
    W = model.lm_head.weight.detach().double().T * paper_gain(model)[:, None]
    W = W - W.mean(0, keepdim=True)
    return W - W.mean(1, keepdim=True)


def paper_sink_rate(attentions, eps: float = 0.3) -> tuple[float, torch.Tensor]:
    """utils.calculate_sink_rate: per layer, count (query, head) with attention on key 0 > eps, divide by
    T, sum over layers, mean over the batch, divide by L * H.  Also the per-head share [L, H]."""
    L, (B, H, T, _) = len(attentions), attentions[0].shape
    total = torch.zeros(B, dtype=torch.float64)
    per_head = torch.zeros(L, H, dtype=torch.float64)
    for layer, att in enumerate(attentions):
        hit = att.double()[:, :, :, 0] > eps                       # [B, H, T]
        total += hit.sum((1, 2)).double() / T
        per_head[layer] = hit.double().mean((0, 2))
    return float(total.mean() / (L * H)), per_head


def paper_norm_streams(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream at the paper's points, centred (center_writing_weights), float64 [B, T, d] each:
    embed, pos_embed, resid_mid / resid_post of each block, ln_final.hook_normalized."""
    m = _double(model)
    attn_out, final = [], []
    hooks = [blk.attn.register_forward_hook(lambda mod, i, o: attn_out.append(o[0].detach())) for blk in m.transformer.h]
    hooks.append(m.transformer.ln_f.register_forward_pre_hook(lambda mod, args: final.append(args[0].detach())))
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
        T = ids.shape[1]
        streams = [m.transformer.wte(ids), m.transformer.wpe(torch.arange(T))[None].expand(ids.shape[0], -1, -1)]
    for h in hooks:
        h.remove()
    L = m.config.n_layer
    for i in range(L):
        streams.append(hs[i] + attn_out[i])                          # resid_mid
        streams.append(hs[i + 1] if i < L - 1 else final[0])         # resid_post (hs[L] is after ln_f)
    x = final[0]
    xc = x - x.mean(-1, keepdim=True)
    streams.append(xc if is_lnfree(model) else xc / (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    return [s - s.mean(-1, keepdim=True) for s in streams]


def paper_neuron_scores(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """svd_comparison.py: ||W_out[n]|| / var_v(cos(W_U[:, v], W_out[n])) over the last layer, with
    W_out centred over d_model and W_U as paper_unembedding.  (score, norm, logit var), float64 [d_mlp]."""
    W_out = model.transformer.h[-1].mlp.c_proj.weight.detach().double()      # Conv1D: [d_mlp, d]
    W_out = W_out - W_out.mean(1, keepdim=True)
    W_U = paper_unembedding(model)
    cos = (W_out / W_out.norm(dim=1, keepdim=True)) @ (W_U / W_U.norm(dim=0, keepdim=True))
    var = cos.var(dim=1)                                                        # unbiased, as torch.var
    norm = W_out.norm(dim=1)
    return norm / var, norm, var


def paper_ablation(model, ids: torch.Tensor, neuron: int) -> dict:
    """ablate_all_models.py on the float64 model: the last-layer neuron's mean activation over positions
    0..T-2, the real forward pass with it replaced, per-token |change| in CE and entropy and their
    median / quartiles (numpy's), and the mean activation."""
    m = _double(model)
    clean, ablated, acts = _mean_ablated(m, ids, [neuron])
    mean = acts[:, :-1, neuron].mean()
    before, after = ref_stats(clean, ids), ref_stats(ablated, ids)
    out = {"mean_activation": float(mean), "mean_all_positions": float(acts[..., neuron].mean()),
           "signed_delta_ce": float((after["ce"] - before["ce"]).mean())}
    for key, field in (("ce", "ce"), ("entropy", "entropy")):
        d = (after[field] - before[field]).abs().flatten().numpy()
        q1, med, q3 = np.percentile(d, [25, 50, 75])
        out.update({f"median_abs_delta_{key}": med, f"q1_abs_delta_{key}": q1, f"q3_abs_delta_{key}": q3})
    return out


def paper_head_dla(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """run_analysis.py's DLA and direct effect per head [B, L*H] (float64): at the last position, the
    target the input token there, through paper_unembedding; LN models through an LN without gain
    (eps 1e-5, as its apply_layer_norm), LN-free ones with no normalisation at all."""
    m = _double(model)
    merged, final = [], []
    hooks = [blk.attn.c_proj.register_forward_pre_hook(lambda mod, args: merged.append(args[0].detach()))
             for blk in m.transformer.h]
    hooks.append(m.transformer.ln_f.register_forward_pre_hook(lambda mod, args: final.append(args[0].detach())))
    with torch.no_grad():
        m(ids)
        for h in hooks:
            h.remove()
        return _paper_head_dla(m, model, ids, merged, final[0])


def _paper_head_dla(m, model, ids, merged, final):
    cfg = m.config
    H, dh = cfg.n_head, cfg.n_embd // cfg.n_head
    x = final[:, -1]                                                        # [B, d]
    W = paper_unembedding(model)[:, ids[:, -1]].T                           # [B, d]
    lnfree = is_lnfree(model)

    def normalise(v):
        if lnfree:
            return v
        v = v - v.mean(-1, keepdim=True)
        return v / (v.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()

    scale = 1.0 if lnfree else (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    logit = (normalise(x) * W).sum(-1)
    dla, de = [], []
    for layer, z in enumerate(merged):
        Wo = m.transformer.h[layer].attn.c_proj.weight
        for head in range(H):
            c = z[:, -1, head * dh:(head + 1) * dh] @ Wo[head * dh:(head + 1) * dh]    # [B, d]
            cc = c if lnfree else c - c.mean(-1, keepdim=True)
            dla.append((cc / scale * W).sum(-1))
            de.append(logit - (normalise(x - c) * W).sum(-1))
    return torch.stack(dla, 1), torch.stack(de, 1)


def paper_nmae(dla: torch.Tensor, de: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-head and global NMAE (run_analysis.py, as shares): mean |DLA - DE| / mean |DE|."""
    diff = (dla - de).abs()
    return diff.mean(0) / de.abs().mean(0), float(diff.mean() / de.abs().mean())
