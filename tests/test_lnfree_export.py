"""Export of a FakeLN model to the eps = 1e12 convention: exact, and paired with its base by models/."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from lnfree import export
from lnfree.fake_ln import convert_to_fake, fake_norms
from models import load_hf
from tests.conftest import tiny_model


def _removed_fake_model(tokenizer, seed=1):
    model = tiny_model(tokenizer, seed=seed)
    paths = convert_to_fake(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fake in fake_norms(model).values():  # own gamma, beta and sigma for every LN
            fake.weight.copy_(torch.rand(fake.weight.shape, generator=g) + 0.5)
            fake.bias.copy_(torch.randn(fake.bias.shape, generator=g) * 0.2)
            fake.sigma.fill_(0.3 + torch.rand((), generator=g).item())
    for path in paths.values():
        path.remove()
    return model.eval(), fake_norms(model)


def _reference_logits(model, fakes, ids):
    """The FakeLN model's function written out by hand: LN(x) = (x - mean) / sigma * gamma + beta."""
    def ln(f, x):
        return (x - x.mean(-1, keepdim=True)) / f.sigma * f.weight + f.bias

    t = model.transformer
    h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i, block in enumerate(t.h):
        attn, d, nh = block.attn, h.shape[-1], block.attn.num_heads
        w, b = attn.c_attn.c_attn.weight, attn.c_attn.c_attn.bias
        qk = ln(fakes[f"blocks.{i}.ln1"], h) @ w[:, : 2 * d] + b[: 2 * d]  # one ln_1 for both paths
        v = ln(fakes[f"blocks.{i}.ln1"], h) @ w[:, 2 * d :] + b[2 * d :]
        q, k = qk.split(d, -1)
        q, k, v = (x.view(*x.shape[:2], nh, d // nh).transpose(1, 2) for x in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // nh) ** 0.5 + mask, -1) @ v
        h = h + attn.c_proj(a.transpose(1, 2).reshape(h.shape))
        h = h + block.mlp(ln(fakes[f"blocks.{i}.ln2"], h))
    return model.lm_head(ln(fakes["ln_final"], h))


def test_export_round_trip_exact_and_loaded_as_ln_free(tokenizer, tmp_path):
    model, fakes = _removed_fake_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (3, 24))
    with torch.no_grad():
        ref = _reference_logits(model, fakes, ids)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)
        plain = export.to_plain(model, base="demo")
        export.save(plain, tokenizer, tmp_path)
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert loaded.config.layer_norm_epsilon == 1e12
        assert (loaded(ids).logits - ref).abs().max().item() < 1e-4
    m, _, info = load_hf(str(tmp_path))
    assert info.ln_free and info.base == "demo"
    want = {name: float(f.sigma) for name, f in fakes.items()}
    assert info.sigmas == pytest.approx(want, rel=1e-6)
    with torch.no_grad():
        assert (m(ids).logits - ref).abs().max().item() < 1e-4  # models/' exact linear LNs agree too
    # The stored ln_2 weight follows the convention: gamma * 1e6 / sigma.
    f = fakes["blocks.1.ln2"]
    torch.testing.assert_close(loaded.transformer.h[1].ln_2.weight, f.weight * 1e6 / f.sigma, rtol=1e-6, atol=0)


def test_export_refuses_live_layernorms(tokenizer):
    model = tiny_model(tokenizer)
    convert_to_fake(model)
    with pytest.raises(ValueError, match="still live"):
        export.to_plain(model, base="demo")
