"""FakeLN model -> plain GPT2LMHeadModel in the paper's convention (layer_norm_epsilon = 1e12).

Every removed LN is stored as weight = gamma * 1e6 / sigma, bias = beta, so that
transformers' own LayerNorm computes (x - mean) / sigma * gamma + beta.  A block's
ln_1 has one gamma, beta and sigma for its two paths (as in the paper), so it is
stored like the others and c_attn is copied as is.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from lnfree.fake_ln import fake_norms, find_fakes
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
    # Everything but the LNs copies over by name (the fake model's c_attn is wrapped).
    src = {k.replace("attn.c_attn.c_attn.", "attn.c_attn."): v for k, v in fake_model.state_dict().items()}
    dst = out.state_dict()
    for k in dst:
        if k in src and src[k].shape == dst[k].shape:
            dst[k].copy_(src[k].float())
    sigmas: dict[str, float] = {}
    targets = ln_modules(out)
    for name, fake in fake_norms(fake_model).items():
        parent, attr, _ = targets[name]
        ln = getattr(parent, attr)
        ln.eps = LNFREE_EPS
        ln.weight.copy_(to_eps_convention(fake.weight.float(), float(fake.sigma)))
        ln.bias.copy_(fake.bias.float())
        sigmas[name] = float(fake.sigma)
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
