"""FakeLayerNorm, the split ln_1, the sigma EMA and the auxiliary loss, against plain-torch computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lnfree.fake_ln import FakeLayerNorm, aux_loss, convert_to_fake, fake_ln_names, find_fakes
from tests.conftest import tiny_model


def _ln(d=16, seed=0):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.3)
    return ln


def test_live_fake_ln_equals_layernorm_forward_and_backward():
    ln = _ln()
    fake = FakeLayerNorm(ln).train()
    x = (torch.randn(3, 5, 16) * 4 + 1).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(fake(x), ln(x2), atol=1e-6, rtol=1e-6)
    fake(x).pow(2).sum().backward()
    ln(x2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fake.weight.grad, ln.weight.grad, atol=1e-5, rtol=1e-5)


def test_sigma_ema_tracks_average_std_then_freezes():
    fake = FakeLayerNorm(_ln(8)).train()
    x1, x2 = torch.randn(2, 3, 8) * 2, torch.randn(4, 3, 8) * 5
    std = lambda x: torch.sqrt(x.var(-1, unbiased=False) + 1e-5)  # noqa: E731
    fake(x1)
    fake.commit_ema(fake.pending_stats(), momentum=0.8)
    assert float(fake.sigma) == pytest.approx(std(x1).mean().item(), rel=1e-5)  # first step initialises
    fake(x2[:2])  # two micro-batches of one step: the step's average over all 12 positions
    fake(x2[2:])
    fake.commit_ema(fake.pending_stats(), momentum=0.8)
    want = 0.8 * std(x1).mean().item() + 0.2 * std(x2).mean().item()
    assert float(fake.sigma) == pytest.approx(want, rel=1e-5)
    fake.remove()
    sigma = float(fake.sigma)
    fake(x2)
    fake.commit_ema(fake.pending_stats(), momentum=0.8)
    assert float(fake.sigma) == sigma  # frozen after removal
    x = torch.randn(2, 3, 8)
    want = (x - x.mean(-1, keepdim=True)) / sigma * fake.weight + fake.bias
    torch.testing.assert_close(fake(x), want)


def test_eval_mode_does_not_update_sigma():
    fake = FakeLayerNorm(_ln(8)).eval()
    fake(torch.randn(2, 3, 8))
    assert fake.pending_stats()[1].item() == 0


def test_converted_model_equals_original_while_live(tokenizer):
    model = tiny_model(tokenizer)
    fake_model = copy.deepcopy(model)
    fakes = convert_to_fake(fake_model)
    assert list(fakes) == fake_ln_names(2) and find_fakes(fake_model) == fakes
    ids = torch.randint(0, len(tokenizer), (2, 20))
    torch.testing.assert_close(fake_model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # Separate q/k and v paths: changing the v path's gamma changes only the values' input.
    with torch.no_grad():
        fakes["blocks.0.ln1.v"].weight.mul_(2)
    assert not torch.allclose(fake_model(ids).logits, model(ids).logits, atol=1e-3)


def test_aux_loss_on_hand_made_input():
    std = torch.tensor([[9.0, 1.0, 2.0, 3.0], [8.0, 4.0, 7.0, 2.0]])
    ids = torch.tensor([[5, 6, 0, 7], [5, 0, 6, 7]])  # EOT = 0 at (0, 2) and (1, 1)
    target = (1.0 + 3.0 + 7.0 + 2.0) / 4  # positions other than 0 and EOT
    want = sum((s - target) ** 2 for s in std.flatten().tolist()) / 8
    assert aux_loss(std, ids, eot_id=0).item() == pytest.approx(want)
    std.requires_grad_(True)
    aux_loss(std, ids, eot_id=0).backward()
    # The target is detached: d/ds (s - t)^2 / 8 = (s - t) / 4.
    torch.testing.assert_close(std.grad, (std.detach() - target) / 4)
    assert math.isfinite(aux_loss(std.detach(), ids, eot_id=None).item())
