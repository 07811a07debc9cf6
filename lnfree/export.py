"""FakeLN model -> plain GPT2LMHeadModel in the paper's convention (layer_norm_epsilon = 1e12).

Every removed LN is stored as weight = gamma * 1e6 / sigma, bias = beta, so that
transformers' own LayerNorm computes (x - mean) / sigma * gamma + beta.  ln_1's
two paths may end with different gamma, beta and sigma: ln_1 is then stored as
pure centring (gamma = 1, beta = 0) with the q/k path's sigma, and each path's
gamma (times sigma_qk / sigma_path) and beta are folded into the matching
columns and bias of c_attn, which is exact.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from lnfree.fake_ln import find_fakes
from models.ln_free import EPS_SCALE, ln_modules, to_eps_convention

LNFREE_EPS = EPS_SCALE**2  # 1e12


@torch.no_grad()
def to_plain(fake_model: torch.nn.Module, base: str) -> GPT2LMHeadModel:
    """A plain GPT2LMHeadModel (eps = 1e12 convention) computing the same function as `fake_model`."""
    fake_model = getattr(fake_model, "module", fake_model)
    fakes = find_fakes(fake_model)
    live = [n for n, f in fakes.items() if f.is_live]
    if live:
        raise ValueError(f"{len(live)} LayerNorms are still live (first {live[0]}); finish the removal first.")
    config = copy.deepcopy(fake_model.config)
    config.layer_norm_epsilon = LNFREE_EPS
    out = GPT2LMHeadModel(config).to(dtype=torch.float32)
    # Everything but the LNs and c_attn copies over by name (the fake model's c_attn is wrapped).
    src = {k.replace("attn.c_attn.c_attn.", "attn.c_attn."): v for k, v in fake_model.state_dict().items()}
    dst = out.state_dict()
    for k in dst:
        if k in src and src[k].shape == dst[k].shape:
            dst[k].copy_(src[k].float())
    sigmas: dict[str, float] = {}
    for name, (parent, attr, _) in ln_modules(out).items():
        ln = getattr(parent, attr)
        ln.eps = LNFREE_EPS
        if attr == "ln_1":
            qk, v = fakes[f"{name}.qk"], fakes[f"{name}.v"]
            s_qk, s_v = float(qk.sigma), float(v.sigma)
            c_attn = parent.attn.c_attn
            d = c_attn.weight.shape[0]
            w, b = c_attn.weight.clone(), c_attn.bias.clone()  # Conv1D: [in, out]
            for f, cols, ratio in ((qk, slice(0, 2 * d), 1.0), (v, slice(2 * d, 3 * d), s_qk / s_v)):
                gamma, beta = f.weight.float(), f.bias.float()
                c_attn.bias[cols] = b[cols] + beta @ w[:, cols]
                c_attn.weight[:, cols] = w[:, cols] * (gamma * ratio)[:, None]
            ln.weight.copy_(to_eps_convention(torch.ones_like(ln.weight), s_qk))
            ln.bias.zero_()
            sigmas[name] = s_qk
        else:
            f = fakes["ln_final" if name == "ln_final" else name]
            ln.weight.copy_(to_eps_convention(f.weight.float(), float(f.sigma)))
            ln.bias.copy_(f.bias.float())
            sigmas[name] = float(f.sigma)
    out.config.lnfree_sigmas = sigmas
    out.config.lnfree_base = base
    return out.eval()


def plain_ln_copy(model: torch.nn.Module, base: str) -> GPT2LMHeadModel:
    """The vanilla control: the fine-tuned LN model as is, recording its base."""
    model = copy.deepcopy(getattr(model, "module", model)).float().eval()
    model.config.lnfree_base = base
    return model


def save(model: GPT2LMHeadModel, tokenizer, out_dir: Path) -> None:
    """Weights (safetensors), config and tokenizer: what from_pretrained needs."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
