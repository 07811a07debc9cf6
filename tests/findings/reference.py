"""Independent references for the findings: the Hugging Face model with torch hooks, or the definition
written out, and a model with a planted confidence neuron."""

from __future__ import annotations

import copy

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
