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


def _std(x):
    return torch.sqrt(x.var(-1, unbiased=False) + 1e-5).mean().item()


def _paper_ema(sigma, xs, momentum, calls=1):
    """The paper's FakeLayerNorm.recompute_average_std, called `calls` times per forward, one forward per x."""
    for x in xs:
        for _ in range(calls):
            sigma = momentum * sigma + (1 - momentum) * _std(x)
    return sigma


def _step(ln, xs, momentum):
    """One optimizer step of micro-batches xs through `ln` (the trainer's order), then the fold."""
    for k, x in enumerate(xs):
        ln.micro = k
        ln.observe(x)  # what each forward call records
    ln.commit_ema(ln.pending_stats(len(xs)), momentum)


def test_sigma_folds_each_forward_call_as_the_papers_then_freezes():
    fake = FakeLayerNorm(_ln(8)).train()
    x1 = [torch.randn(2, 3, 8) * 2, torch.randn(2, 3, 8) * 5]
    x2 = [torch.randn(2, 3, 8) * 3, torch.randn(2, 3, 8) * 0.5, torch.randn(2, 3, 8) * 9]
    fake.sigma.fill_(1.7)  # as measured on the original model
    _step(fake, x1, 0.8)
    _step(fake, x2, 0.8)
    assert float(fake.sigma) == pytest.approx(_paper_ema(1.7, x1 + x2, 0.8), rel=1e-6)
    # Not the step's plain average (the fold weights later micro-batches more, as sequential calls do).
    assert float(fake.sigma) != pytest.approx(0.8 * _paper_ema(1.7, x1, 0.8) + 0.2 * _std(torch.cat(x2)), rel=1e-3)
    fake.remove()
    sigma = float(fake.sigma)
    _step(fake, x2, 0.8)
    assert float(fake.sigma) == sigma  # frozen after removal
    x = torch.randn(2, 3, 8)
    want = (x - x.mean(-1, keepdim=True)) / sigma * fake.weight + fake.bias
    torch.testing.assert_close(fake(x), want)


def test_ln1_moves_three_calls_per_forward_until_its_v_path_goes(tokenizer):
    """One gamma, beta and sigma for both paths; sigma follows the paper's 3 updates per forward while the v
    path is live, also after the q/k path is removed (the q/k path then uses it); frozen once v goes."""
    model = tiny_model(tokenizer)
    paths = convert_to_fake(model)
    ln = paths["blocks.0.ln1.qk"].ln
    assert ln is paths["blocks.0.ln1.v"].ln and ln.calls == 3
    model.train()
    xs = [torch.randn(2, 5, 64) * 3, torch.randn(2, 5, 64)]
    ln.sigma.fill_(2.0)
    _step(ln, xs, 0.9)
    want = _paper_ema(2.0, xs, 0.9, calls=3)
    assert float(ln.sigma) == pytest.approx(want, rel=1e-6)
    paths["blocks.0.ln1.qk"].remove()
    _step(ln, xs[::-1], 0.9)
    want = _paper_ema(want, xs[::-1], 0.9, calls=3)
    assert float(ln.sigma) == pytest.approx(want, rel=1e-6)  # still moving: the v path is live
    x = torch.randn(1, 4, 64)
    torch.testing.assert_close(ln.normalise(x, 0), (x - x.mean(-1, keepdim=True)) / want * ln.weight + ln.bias)
    torch.testing.assert_close(ln.normalise(x, 1), torch.nn.functional.layer_norm(x, (64,), ln.weight, ln.bias))
    paths["blocks.0.ln1.v"].remove()
    frozen = float(ln.sigma)
    _step(ln, xs, 0.9)
    assert float(ln.sigma) == frozen


def test_initial_sigma_is_the_original_models_measured_std(tokenizer):
    """generate_std_dict.py's value: torch.std over every element of positions 1.. of each LN's input."""
    from lnfree.fake_ln import fake_norms, measure_initial_sigmas

    model = tiny_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 20))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].detach().clone()))
             for name, m in [*((f"blocks.{i}.ln1", b.ln_1) for i, b in enumerate(model.transformer.h)),
                             *((f"blocks.{i}.ln2", b.ln_2) for i, b in enumerate(model.transformer.h)),
                             ("ln_final", model.transformer.ln_f)]]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    fake_model = copy.deepcopy(model)
    convert_to_fake(fake_model)
    fake_model.train()
    measure_initial_sigmas(fake_model, ids)
    assert fake_model.training
    norms = fake_norms(fake_model)
    assert set(norms) == set(seen)
    for name, x in seen.items():
        want = x[:, 1:].double().flatten().std(unbiased=True).item()
        assert float(norms[name].sigma) == pytest.approx(want, rel=1e-5), name
        assert not norms[name]._stats  # measuring records no training statistics


def test_a_recomputed_forward_counts_once():
    """Gradient checkpointing runs each block's forward again in the backward pass: sigma is unchanged."""
    ln = FakeLayerNorm(_ln(8)).train()
    ln.sigma.fill_(1.0)
    x = torch.randn(2, 3, 8) * 4
    ln.micro = 0
    ln(x)
    ln(x)  # the recomputation
    ln.commit_ema(ln.pending_stats(1), 0.5)
    assert float(ln.sigma) == pytest.approx(0.5 + 0.5 * _std(x), rel=1e-6)


def test_eval_mode_does_not_update_sigma():
    fake = FakeLayerNorm(_ln(8)).eval()
    fake(torch.randn(2, 3, 8))
    assert not fake.pending_stats(1).any()


def test_converted_model_equals_original_while_live(tokenizer):
    model = tiny_model(tokenizer)
    fake_model = copy.deepcopy(model)
    fakes = convert_to_fake(fake_model)
    assert list(fakes) == fake_ln_names(2) and find_fakes(fake_model) == fakes
    ids = torch.randint(0, len(tokenizer), (2, 20))
    torch.testing.assert_close(fake_model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # One ln_1 for both paths: its gamma has one copy, in the state dict as in the parameters.
    keys = [k for k in fake_model.state_dict() if k.startswith("transformer.h.0.") and "ln" in k]
    assert sorted(keys) == sorted(["transformer.h.0.attn.c_attn.ln.weight", "transformer.h.0.attn.c_attn.ln.bias",
                                   "transformer.h.0.attn.c_attn.ln.sigma", "transformer.h.0.attn.c_attn.ln.live",
                                   "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
                                   "transformer.h.0.ln_2.sigma", "transformer.h.0.ln_2.live"])


def test_residual_std_is_the_ln_f_inputs_std_in_training_only(tokenizer):
    """The aux loss's input: the per-position std of ln_f's input (paper: sqrt(var + 1e-5)), with gradient,
    on training passes; evaluation passes keep nothing."""
    from lnfree.fake_ln import ResidualStd

    model = tiny_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 9))
    seen = []
    model.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    rec = ResidualStd(model)
    model.eval()
    model(ids)
    assert rec.last is None
    model.train()
    model(ids)
    x = seen[-1]
    want = ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1).add(1e-5).sqrt()
    torch.testing.assert_close(rec.last.double(), want, rtol=1e-5, atol=1e-6)
    assert rec.last.requires_grad
    rec.remove()
    model(ids)
    assert rec.last is None


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


def test_a_runs_sigmas_follow_the_papers_schedule(tokenizer, tmp_path):
    """A removal run, step by step: sigma starts at the original model's measured std, folds each micro-batch
    of each step (ln_1 three times), stops once every path of its LN is gone; an LN scheduled at s is live in
    step s and removed from step s + 1 on.  The expected values are computed here from hooks on LN inputs."""
    from lnfree.config import RunConfig
    from lnfree.data import TrainData
    from lnfree.recipes import RECIPES, override
    from lnfree.run import Run

    model = tiny_model(tokenizer)
    recipe = override(RECIPES["gpt2"], steps=10, warmup=1, micro_batch=2, grad_accum=2, n_ctx=16, ln2_start=2,
                      ln2_gap=1, qk_start=4, qk_gap=1, v_start=6, v_gap=1, lnf_step=8, spike_factor=float("inf"))
    chunks = torch.randint(0, len(tokenizer), (64, 16), generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(model="tiny", output_dir=str(tmp_path), recipe=recipe.as_dict(), max_steps=10)
    first = TrainData(chunks, 0).batch(1, 2, 4, 0)[:1]
    original = copy.deepcopy(model)
    tok = type("Tok", (), {"eos_token_id": tokenizer.eos_token_id})()
    run = Run(cfg, model=model, tokenizer=tok, data=(TrainData(chunks, 0), chunks[:1]))
    core, norms, paths = run.core, run.norms(), run.fake_modules()
    inputs = {f"blocks.{i}.ln1": b.attn.c_attn for i, b in enumerate(core.transformer.h)}
    inputs |= {f"blocks.{i}.ln2": b.ln_2 for i, b in enumerate(core.transformer.h)} | {"ln_final": core.transformer.ln_f}

    def input_stds(m, mods, ids):  # the LN inputs' (std over positions 1.. , mean per-position std)
        seen = {}
        def keep(name):
            def hook(_, args):
                seen[name] = args[0].detach().double()  # returns None: the input is left as is
            return hook

        hooks = [mod.register_forward_pre_hook(keep(n)) for n, mod in mods.items()]
        was = m.training
        with torch.no_grad():
            m.eval()
            m(ids)
        m.train(was)
        for h in hooks:
            h.remove()
        return {n: (x[:, 1:].flatten().std().item(), torch.sqrt(x.var(-1, unbiased=False) + 1e-5).mean().item())
                for n, x in seen.items()}

    orig = {f"blocks.{i}.ln1": b.ln_1 for i, b in enumerate(original.transformer.h)}
    orig |= {f"blocks.{i}.ln2": b.ln_2 for i, b in enumerate(original.transformer.h)} | {"ln_final": original.transformer.ln_f}
    for name, (measured, _) in input_stds(original, orig, first).items():
        assert float(norms[name].sigma) == pytest.approx(measured, rel=1e-5), name
    sigma = {n: float(ln.sigma) for n, ln in norms.items()}
    ln1_after = {}
    for step in range(1, 11):
        gone = run.apply_schedule(step)
        assert sorted(gone) == sorted(n for n, s in run.sched.items() if s == step - 1)
        assert all(p.is_live for n, p in paths.items() if run.sched[n] >= step)
        micro = [input_stds(core, inputs, run.data.batch(step, 2, 4, k)) for k in range(2)]
        live = {n: ln.live.any().item() for n, ln in norms.items()}
        _, _, bad = run.advance(step)
        assert bad is None
        for n, ln in norms.items():
            if live[n]:
                m = 0.9 ** (3 if n.endswith("ln1") else 1)  # the paper's ln_1: three updates per forward
                for stats in micro:
                    sigma[n] = m * sigma[n] + (1 - m) * stats[n][1]
            assert float(ln.sigma) == pytest.approx(sigma[n], rel=1e-5), (step, n)
        ln1_after[step] = float(norms["blocks.0.ln1"].sigma)
    assert not any(p.is_live for p in paths.values())
    # blocks.0's q/k path goes after step 4 and its v path after step 6: sigma moves until then, not after.
    assert ln1_after[5] != ln1_after[4] and ln1_after[6] != ln1_after[5]
    assert ln1_after[6] == ln1_after[7] == ln1_after[10]
