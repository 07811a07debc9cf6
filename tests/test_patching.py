"""Activation patching as it is run: against TransformerLens's own patching functions, starting from the
cached residual, AtP-guided verification, one clean and one corrupted pass per prompt set, the memory
check and cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

from attribution import AttributionInputError, Settings, analyse, atp, hooks, patching, tasks
from attribution.errors import AnalysisCancelled
from models import load_bridge


@pytest.fixture(scope="module", params=["ln", "lnfree"])
def model(request, tiny_ln_dir, tiny_lnfree_dir):
    return load_bridge(str(tiny_ln_dir if request.param == "ln" else tiny_lnfree_dir))


@pytest.fixture(scope="module")
def task(tokenizer):
    return tasks.induction(tokenizer, 3, 5, 64, seed=4)


def test_results_equal_transformer_lens_patching(model, task):
    """Our batched runs from the cached residual against TransformerLens's patching functions (one full
    forward pass per patch) with the same normalised metric."""
    bridge = model.bridge
    ours = patching.activation_patching(bridge, task, ("resid", "heads", "heads_pos"))
    base = patching.baseline(bridge, task, [])
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(task.clean)

    def metric(logits):
        return (task.metric(logits).double().mean() - base.corrupt_metric) / base.norm

    resid = tl_patching.get_act_patch_resid_pre(bridge, task.corrupt, clean_cache, metric)
    heads = tl_patching.get_act_patch_attn_head_out_all_pos(bridge, task.corrupt, clean_cache, metric)
    by_pos = tl_patching.get_act_patch_attn_head_out_by_pos(bridge, task.corrupt, clean_cache, metric)
    torch.testing.assert_close(ours["resid"], resid.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["heads"], heads.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["heads_pos"], by_pos.double().permute(0, 2, 1), atol=1e-5, rtol=0)
    assert ours["resid"].abs().max() > 0.5  # the last position's residual restores the clean metric


def test_patched_runs_start_at_the_patched_layer(model, task):
    """A run whose patches are all in layer 1 never computes layer 0 (or the embeddings)."""
    bridge = model.bridge
    base = patching.baseline(bridge, task, [hooks.z(1), hooks.resid_pre(1)])
    calls = []
    handle = bridge.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = patching.run_patches(bridge, task, base, [(hooks.z(1), (patching.ALL, 0)),
                                                        (hooks.resid_pre(1), (task.position,))])
    finally:
        handle.remove()
    assert calls == [] and out.dtype == torch.float64
    # The same patches in full forward passes from the tokens (embeddings and layer 0 recomputed).
    moved = []
    for value, (name, index) in zip(out, [(hooks.z(1), (patching.ALL, 0)), (hooks.resid_pre(1), (task.position,))],
                                    strict=True):
        def patch(x, hook, name=name, index=index):
            x = x.clone()
            x[(patching.ALL,) + index] = base.clean[name][(patching.ALL,) + index]
            return x

        full = patching.metric_runs(bridge, task, task.corrupt, [(name, patch)]).mean().item()
        assert value.item() == pytest.approx(full, abs=1e-6)
        moved.append(abs(full - base.corrupt_metric))
    assert max(moved) > 0.05 * abs(base.norm)  # patches that change something


def test_default_analysis_patches_the_top_components_by_atpstar(model):
    """By default patching checks the 5 (verify_top) components with the largest |AtP*| over heads,
    resid_pre and MLPs together, with the values a full sweep gives there; the rest is not patched."""
    settings = Settings(task="induction", n_prompts=3, seq_len=5, verify_top=5, per_position=False)
    res = analyse(model, settings)
    full = analyse(model, Settings(task="induction", n_prompts=3, seq_len=5, per_position=False, full_sweeps=True))
    assert res.patching == "top-5 by |AtP*|" and full.patching == "full sweeps"
    kinds = ("heads", "resid", "mlp")
    star = np.concatenate([getattr(res, f"atpstar_{kind}").ravel() for kind in kinds])
    got = np.concatenate([getattr(res, f"patch_{kind}").ravel() for kind in kinds])
    want = np.concatenate([getattr(full, f"patch_{kind}").ravel() for kind in kinds])
    chosen = np.argsort(-np.abs(star), kind="stable")[:5]
    assert set(np.flatnonzero(np.isfinite(got)).tolist()) == set(chosen.tolist())
    np.testing.assert_allclose(got[chosen], want[chosen], atol=1e-9)
    assert res.passes["patched_runs"] == 5 < full.passes["patched_runs"]
    assert res.agreement["over"] == "patched components" and full.agreement["over"] == "heads"
    expect = np.corrcoef(star[chosen], got[chosen])[0, 1]
    assert res.agreement["atpstar"]["pearson"] == pytest.approx(expect, abs=1e-9)


def test_one_clean_and_one_corrupted_pass_per_prompt_set(model, monkeypatch):
    """The metric, DLA, DE, AtP and AtP* come from one clean and one corrupted forward pass (and the
    backward passes of AtP*'s GradDrop); patched runs start past the embeddings."""
    bridge = model.bridge
    forwards, backwards = [], []
    handle = bridge.embed.register_forward_hook(lambda *a: forwards.append(1))
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    try:
        res = analyse(model, Settings(task="induction", n_prompts=2, seq_len=4))
    finally:
        handle.remove()
    L = bridge.cfg.n_layers
    assert len(forwards) == res.passes["full_forward"] == 2
    assert len(backwards) == res.passes["backward"] == 1 + L
    assert res.cost["clean forward"] == 1.0 and res.cost["total"] >= 1.0
    assert set(res.cost) >= {"clean forward", "dla", "corrupted forward", "atp", "activation patching"}


def test_too_little_memory_is_one_sentence(model, monkeypatch):
    import models.loading

    monkeypatch.setattr(models.loading, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(AttributionInputError, match=r"needs about .* GiB but .* is free; use fewer"):
        analyse(model, Settings(task="induction", n_prompts=4, seq_len=10))


def test_patching_can_be_cancelled(model, task):
    bridge = model.bridge
    base = patching.baseline(bridge, task, [hooks.z(0)])
    with pytest.raises(AnalysisCancelled):
        patching.run_patches(bridge, task, base, [(hooks.z(0), (patching.ALL, 0))], should_stop=lambda: True)


def test_atp_from_a_shared_pass_equals_its_own(model, task):
    """Estimates made from the analysis's clean cache and corrupted pass equal those AtP makes alone."""
    bridge = model.bridge
    alone = atp.attribution_patching(bridge, task)
    run = atp.corrupted_run(bridge, task)
    L = bridge.cfg.n_layers
    with torch.no_grad():
        _, cache = bridge.run_with_cache(task.clean)
    clean_metric = patching.baseline(bridge, task, []).clean_metric
    base = patching.Baseline({n: cache[n] for n in atp.grad_names(L, True)},
                             [run.acts[hooks.resid_pre(i)].detach() for i in range(L)], clean_metric, run.metric.item())
    shared = atp.attribution_patching(bridge, task, base=base, run=run)
    for k, v in alone.items():
        torch.testing.assert_close(shared[k], v, atol=1e-9, rtol=1e-7)


def test_threads_sharing_a_model_never_run_inside_each_others_passes(tiny_ln_dir):
    """Two browser sessions analysing the same cached model: every pass runs while its thread holds the
    model's lock (the stages of the two analyses take turns), so no pass sees another's hooks, and each
    analysis gets what it gets alone."""
    import threading
    import time

    model = load_bridge(str(tiny_ln_dir))
    first = Settings(task="induction", n_prompts=2, seq_len=4, per_position=False)
    second = Settings(task="ioi", n_prompts=2, per_position=False)
    alone = [analyse(model, s) for s in (first, second)]
    calls, inside = [], threading.Event()

    def record(module, args, out):
        calls.append((threading.current_thread().name, model.lock._is_owned()))
        if threading.current_thread().name == "a" and not inside.is_set():
            inside.set()
            time.sleep(0.5)  # the other thread starts meanwhile

    handle = model.bridge.embed.register_forward_hook(record)
    results = {}
    threads = [threading.Thread(target=lambda s=s, n=n: results.__setitem__(n, analyse(model, s)), name=n)
               for n, s in (("a", first), ("b", second))]
    try:
        threads[0].start()
        assert inside.wait(30)
        threads[1].start()
        for t in threads:
            t.join(120)
    finally:
        handle.remove()
    assert {name for name, _ in calls} == {"a", "b"} and all(owned for _, owned in calls)
    for name, want in zip("ab", alone, strict=True):
        got = results[name]
        np.testing.assert_allclose(got.dla_heads, want.dla_heads, atol=1e-12)
        np.testing.assert_allclose(got.patch_heads, want.patch_heads, atol=1e-9)
        np.testing.assert_allclose(got.atpstar_resid, want.atpstar_resid, atol=1e-9)
