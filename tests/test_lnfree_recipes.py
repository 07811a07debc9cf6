"""Recipes and removal schedules against the paper's table of values (arXiv 2507.02559)."""

from __future__ import annotations

import itertools

import pytest

from lnfree.fake_ln import fake_ln_names
from lnfree.plan import estimate_memory
from lnfree.recipes import RECIPES, TARGET_FRACTION, override, schedule
from models.registry import GPT2_SHAPES

# recipe: n_layer, (ln2 start, qk start, v start, ln_f), gaps (ln2, qk, v), steps, lr, min lr, warmup, aux
TABLE = {
    "gpt2": (12, (20, 44, 68, 104), (2, 2, 3), 300, 6e-4, 3e-4, 25, 0.1),
    "gpt2-medium": (24, (20, 68, 116, 188), (2, 2, 3), 500, 6e-4, 3e-4, 10, 0.1),
    "gpt2-large": (36, (30, 174, 318, 534), (4, 4, 6), 1200, 3e-4, 4e-5, 15, 0.03),
    "gpt2-xl": (48, (50, 242, 434, 722), (4, 4, 6), 1200, 1e-4, 2e-5, 20, 0.01),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_paper_recipe_values_and_schedule(name):
    n_layer, starts, gaps, steps, lr, min_lr, warmup, aux = TABLE[name]
    r = RECIPES[name]
    assert (r.steps, r.lr, r.min_lr, r.warmup, r.aux_lambda) == (steps, lr, min_lr, warmup, aux)
    assert r.weight_decay == 0.01 and r.grad_clip == 1.0 and r.n_ctx == 1024
    assert 500_000 <= r.tokens_per_step <= 530_000  # ~516k tokens per optimizer step
    sched = schedule(r, n_layer)
    assert list(sched) == fake_ln_names(n_layer)
    for stage, start, gap in zip(("ln2", "ln1.qk", "ln1.v"), starts, gaps, strict=False):
        assert [sched[f"blocks.{i}.{stage}"] for i in range(n_layer)] == [start + i * gap for i in range(n_layer)]
    assert sched["ln_final"] == starts[3]
    # Stages do not overlap: every ln_2 before any ln_1 q/k, before any v, before ln_f.
    order = list(sched.values())
    assert order == sorted(order)


# The paper's config.py: (micro-batch, its sigma momentum per forward call) per size; gradient accumulation
# is 2^19 // (micro-batch x 1024).
PAPER_CONFIG = {"gpt2": (32, 0.9), "gpt2-medium": (22, 0.9), "gpt2-large": (28, 0.9 ** (28 / 32)),
                "gpt2-xl": (18, 0.9 ** (18 / 32))}


@pytest.mark.parametrize("name", list(PAPER_CONFIG))
def test_sequences_per_step_and_sigma_decay_are_the_papers(name):
    """512 / 506 / 504 / 504 sequences per optimizer step, and sigma's moving average decaying per optimizer
    step as the paper's per-forward-call updates compound over its micro-batches (our micro-batch may be
    smaller, for memory; the decay per sequence is the same)."""
    micro, momentum = PAPER_CONFIG[name]
    accum = 2**19 // (micro * 1024)
    r = RECIPES[name]
    assert r.seqs_per_step == micro * accum
    assert r.momentum ** r.grad_accum == pytest.approx(momentum ** accum, rel=1e-12)
    assert r.momentum == pytest.approx(momentum ** (r.micro_batch / micro), rel=1e-12)


def test_demo_recipe_removes_everything_with_time_to_recover():
    r = RECIPES["demo"]
    sched = schedule(r, 4)
    assert min(sched.values()) == 20 and max(sched.values()) <= 0.6 * r.steps
    assert list(sched.values()) == sorted(sched.values())
    v_paths = [sched[f"blocks.{i}.ln1.v"] for i in range(4)]
    assert min(b - a for a, b in itertools.pairwise(v_paths)) >= 20  # each v path's blow-up repaired first


@pytest.mark.parametrize("name,max_steps", [("gpt2", 100), ("gpt2-xl", 800), ("gpt2-xl", 60), ("demo", 30)])
def test_compressed_schedule(name, max_steps):
    r = RECIPES[name]
    n_layer = TABLE[name][0] if name in TABLE else 4
    full, short = schedule(r, n_layer), schedule(r, n_layer, max_steps)
    assert max(short.values()) <= TARGET_FRACTION * max_steps + 1
    assert min(short.values()) >= 2
    assert list(short.values()) == sorted(short.values())  # order preserved
    scale = min(max_steps / r.steps, TARGET_FRACTION * max_steps / max(full.values()))
    for k in full:  # proportional (floored), apart from the clamp at step 2
        assert short[k] == max(2, int(full[k] * scale))


def test_override_and_unchanged_schedule_for_longer_runs():
    r = override(RECIPES["gpt2"], lr=1e-3, aux_lambda=None)
    assert r.lr == 1e-3 and r.aux_lambda == 0.1
    assert schedule(RECIPES["gpt2"], 12, 400) == schedule(RECIPES["gpt2"], 12)


def test_xl_memory_estimate_is_realistic():
    shape, r = GPT2_SHAPES["gpt2-xl"], RECIPES["gpt2-xl"]
    assert 1.5e9 < shape.params < 1.6e9
    mem = estimate_memory(shape, r, "bf16")
    # 16 bytes/param of fp32 weights, grads and AdamW moments + a bf16 weight cache: ~28 GiB.
    assert mem.states == pytest.approx(18 * shape.params)
    # Activations: 48 layers x 1024 x 4 x 1600 x 38 bytes ~ 11.2 GiB with bf16.
    assert mem.activations == pytest.approx(48 * 1024 * 4 * 1600 * 38)
    assert 35 * 2**30 < mem.total < 80 * 2**30  # fits one 80 GB GPU, as the paper's runs did
    sharded = estimate_memory(shape, r, "bf16", world=8, fsdp=True, grad_ckpt=True)
    assert sharded.states == pytest.approx(16 * shape.params / 8 + 2 * shape.params)
    assert sharded.total < mem.total / 2


def test_recipe_by_depth_says_so():
    from lnfree.recipes import recipe_for_model

    assert recipe_for_model("gpt2-xl", 48) == ("gpt2-xl", None)
    name, note = recipe_for_model("/my/ckpt", 24)
    assert name == "gpt2-medium" and "depth of 24 layers" in note and "--recipe" in note
    name, note = recipe_for_model("/my/ckpt", 7)
    assert name == "gpt2" and "no recipe is made for 7 layers" in note
    assert recipe_for_model("no-such-model", None) == ("gpt2", None)  # loading it will explain


def test_recipe_and_run_config_are_keyword_only():
    from lnfree.config import RunConfig
    from lnfree.recipes import RECIPE_FIELDS, Recipe

    with pytest.raises(TypeError):
        Recipe("x", 300)
    with pytest.raises(TypeError):
        RunConfig("gpt2", "out", {}, 1)
    assert RECIPE_FIELDS["steps"] is int and RECIPE_FIELDS["lr"] is float and RECIPE_FIELDS["span_frac"] is float
