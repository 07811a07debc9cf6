"""AtP*'s QK fix: the exact pattern change of a resid_pre patch, and the q/k-mediated term of the linear
estimate it replaces, against the Hugging Face model (a patched run, and a jvp in float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from attribution import atp, hooks, patching
from tests.test_attribution_core import Setup


def test_qk_fix_pattern_matches_patched_run(real_scale_lnfree_dir, tokenizer):
    s = Setup(real_scale_lnfree_dir, tokenizer, "induction")
    t = s.task
    _, clean = s.capture(t.clean)
    _, cor = patching.capture(s.bridge, t.corrupt, [f"blocks.{i}.attn.hook_{x}" for i in range(s.L) for x in "qk"])
    _, cln = patching.capture(s.bridge, t.clean, [f"blocks.{i}.attn.hook_{x}" for i in range(s.L) for x in "qk"])
    layer = 1
    q, k = f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"
    positions = range(t.clean.shape[1] - 4, t.clean.shape[1])
    dA = atp.pattern_deltas(cor[q], cor[k], cln[q], cln[k], positions)
    with torch.no_grad():
        base = s.hf(t.corrupt, output_attentions=True).attentions[layer]
    for j, p in enumerate(positions):
        def pre(m, args, p=p):
            x = args[0].clone()
            x[:, p] = clean[("resid", layer)][:, p]
            return (x,) + tuple(args[1:])
        h = s.hf.transformer.h[layer].register_forward_pre_hook(pre)
        with torch.no_grad():
            patched = s.hf(t.corrupt, output_attentions=True).attentions[layer]
        h.remove()
        torch.testing.assert_close(dA[:, :, j], patched - base, atol=1e-5, rtol=1e-4)
    assert dA.abs().max() > 1e-3



def qk_mediated_reference(s: Setup, layer: int) -> torch.Tensor:
    """Per position p [T], summed over the batch: d/d(eps) at eps = 0 of the corrupted run's metric when
    only layer `layer`'s queries and keys read its input x + eps * (clean - corrupted residual at p), and
    its values and the residual stream keep x.  The HF model in float64, differentiated by torch.func.jvp:
    the q/k-mediated part of the first-order estimate of patching resid_pre at (layer, p)."""
    hf = copy.deepcopy(s.hf).double()
    block, d = hf.transformer.h[layer], hf.config.n_embd
    t = s.task
    inputs = {}
    grab = block.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        hf(t.clean)
        x_clean = inputs["x"]
        hf(t.corrupt)
        x = inputs["x"]
    grab.remove()
    out = []
    for p in range(t.clean.shape[1]):
        delta = torch.zeros_like(x)
        delta[:, p] = x_clean[:, p] - x[:, p]

        def metric_of(eps, delta=delta):
            def qk_from_shifted_input(module, args, output):
                h = block.ln_1(x + eps * delta)
                qkv = h @ module.weight + module.bias
                return torch.cat([qkv[..., : 2 * d], output[..., 2 * d:]], -1)

            hook = block.attn.c_attn.register_forward_hook(qk_from_shifted_input)
            try:
                return s.metric(hf(t.corrupt).logits).sum()
            finally:
                hook.remove()

        _, tangent = torch.func.jvp(metric_of, (torch.zeros((), dtype=torch.float64),),
                                    (torch.ones((), dtype=torch.float64),))
        out.append(tangent)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_qk_fix_removes_the_qk_term_the_estimate_contains(kind, tiny_ln_dir, real_scale_lnfree_dir, tokenizer):
    """AtP*'s QK fix subtracts g_q . J_q dresid + g_k . J_k dresid (J through the live ln1): against a jvp
    of the HF model in float64 at every position.  The change of q / k itself (what the fix used to
    subtract) equals it only LN-free."""
    s = Setup(tiny_ln_dir if kind == "ln" else real_scale_lnfree_dir, tokenizer, "induction")
    t, layer = s.task, 1
    names = [hooks.resid_pre(layer), hooks.q(layer), hooks.k(layer)]
    _, clean = patching.capture(s.bridge, t.clean, names)
    run = atp.corrupted_run(s.bridge, t, star=False, names=names)
    acts = run.acts
    g_q, g_k = torch.autograd.grad(run.metric * t.clean.shape[0], [acts[hooks.q(layer)], acts[hooks.k(layer)]])
    x = acts[hooks.resid_pre(layer)].detach()
    dq, dk = atp.qk_tangents(s.bridge, layer, x, clean[hooks.resid_pre(layer)] - x)
    ours = (g_q.double() * dq + g_k.double() * dk).sum((0, 2, 3))
    ref = qk_mediated_reference(s, layer)
    assert ref.abs().max() > 1e-4  # a real q/k path, not a vanishing one
    torch.testing.assert_close(ours, ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-4)
    change = (g_q.double() * (clean[hooks.q(layer)] - acts[hooks.q(layer)].detach()).double()
              + g_k.double() * (clean[hooks.k(layer)] - acts[hooks.k(layer)].detach()).double()).sum((0, 2, 3))
    gap = ((change - ref).abs().max() / ref.abs().max()).item()
    assert gap < 1e-4 if kind == "lnfree" else gap > 0.05


def test_qk_tangents_of_two_threads_take_turns(tiny_ln_dir, tokenizer, monkeypatch):
    """torch's forward-AD level is one per process: two sessions' jvps at once (analyses of two different
    models, each holding its own model's lock) ended each other's level.  They must never overlap, and
    each still gets the tangents it gets alone."""
    import threading
    import time

    s = Setup(tiny_ln_dir, tokenizer, "induction")
    x = torch.randn(2, 5, s.bridge.cfg.d_model)
    dx = torch.randn_like(x)
    alone = atp.qk_tangents(s.bridge, 0, x, dx)
    jvp, active, most = torch.func.jvp, [0], [0]

    def slow_jvp(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.2)  # long enough for the other thread to arrive meanwhile
        try:
            return jvp(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(torch.func, "jvp", slow_jvp)
    out = {}
    threads = [threading.Thread(target=lambda n=n: out.__setitem__(n, atp.qk_tangents(s.bridge, 0, x, dx)))
               for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1
    for n in range(2):
        for got, want in zip(out[n], alone, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
