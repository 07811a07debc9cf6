"""Every dtype (float32, bfloat16, float16, float64) through loading, DLA / direct effect, patching,
AtP / AtP* and the findings, each against a float64 plain-torch reference at a tolerance fit for the dtype."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attribution import Settings, compare, dla, tasks
from attribution.findings import pair_findings
from models import load_bridge, load_hf
from models.inspect import describe
from tests.conftest import tiny_model, write_lnfree

# Realistic sigmas (GPT-2's LN scales are ~0.5-3): with this tiny model's small activations the heads'
# direct effects are small, so a float32 difference metric(x) - metric(x - c) would cancel.
SIGMAS = {"blocks.0.ln1": 0.5, "blocks.0.ln2": 1.3, "blocks.1.ln1": 2.1, "blocks.1.ln2": 3.0, "ln_final": 1.7}
# DLA and DE of a low-precision model differ from the float64 model's by the rounding of its weights
# and activations: bfloat16 keeps 8 bits, float16 11.
RTOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 6e-2, "float16": 5e-3}


@pytest.fixture(scope="module")
def lnfree_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("lnfree_realistic_sigmas")
    write_lnfree(tiny_model(tokenizer, seed=3), SIGMAS, path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ln_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ln_seed3")
    tiny_model(tokenizer, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def direct(path, dtype: str, task):
    bridge = load_bridge(str(path), dtype).bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(task.clean)
    return dla.direct_attribution(bridge, cache, task)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_lnfree_dla_equals_direct_effect_to_float64_precision(dtype, lnfree_dir, tokenizer):
    task = tasks.ioi(tokenizer, 3, 64, seed=2)
    d = direct(lnfree_dir, dtype, task)
    assert d.heads.dtype == torch.float64 and d.de_heads.abs().max() < 0.05  # small head effects
    assert dla.nmae(d.heads, d.de_heads) < 1e-9 and dla.nmae(d.mlp, d.de_mlp) < 1e-9
    # Against the float64 model: off only by the rounding of the model's own dtype.
    ref = direct(lnfree_dir, "float64", task)
    scale = ref.de_heads.abs().max()
    assert (d.de_heads - ref.de_heads).abs().max() <= RTOL[dtype] * scale
    assert (d.metric - ref.metric).abs().max() <= RTOL[dtype] * ref.metric.abs().max()


def test_float64_dla_against_plain_torch(lnfree_dir, tokenizer):
    """The float64 LN-free model's per-head DLA, written out: centre(c) / sigma . (gamma * dW_U)."""
    task = tasks.ioi(tokenizer, 2, 64, seed=2)
    d = direct(lnfree_dir, "float64", task)
    hf, _, _ = load_hf(str(lnfree_dir), "float64")
    z = {}
    hooks_ = [blk.attn.c_proj.register_forward_pre_hook(lambda m, a, i=i: z.__setitem__(i, a[0]))
              for i, blk in enumerate(hf.transformer.h)]
    with torch.no_grad():
        hf(task.clean)
    for h in hooks_:
        h.remove()
    ln = hf.transformer.ln_f
    dirn = hf.lm_head.weight[task.answer] - hf.lm_head.weight[task.counterfactual]
    dh = hf.config.n_embd // hf.config.n_head
    for i, blk in enumerate(hf.transformer.h):
        for h in range(hf.config.n_head):
            sl = slice(h * dh, (h + 1) * dh)
            c = z[i][:, task.position, sl] @ blk.attn.c_proj.weight[sl]
            expect = ((c - c.mean(-1, keepdim=True)) / SIGMAS["ln_final"] * ln.weight * dirn).sum(-1)
            torch.testing.assert_close(d.heads[:, i, h], expect, atol=1e-13, rtol=1e-10)


def test_float16_lnfree_checkpoint_loads_with_correct_sigmas(lnfree_dir, tokenizer):
    """gamma * 1e6 / sigma overflows float16: the checkpoint is de-scaled in float32 before the cast."""
    info = describe(str(lnfree_dir), "float16")
    assert info["sigmas"] == pytest.approx(SIGMAS, rel=1e-9)
    model, _, _ = load_hf(str(lnfree_dir), "float16")
    ref, _, _ = load_hf(str(lnfree_dir), "float64")
    ids = tasks.ioi(tokenizer, 2, 64).clean
    with torch.no_grad():
        logits, expect = model(ids).logits, ref(ids).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert (logits.double() - expect).abs().max() <= 1e-2 * expect.abs().max()
    assert all(ln.weight.dtype == torch.float16 and torch.isfinite(ln.weight).all()
               for ln in (model.transformer.ln_f, model.transformer.h[0].ln_1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_every_analysis_runs_and_agrees_with_float32(dtype, ln_dir, lnfree_dir):
    """The whole pair analysis (DLA, DE, patching, AtP / AtP*) in each dtype: finite, strict JSON, and
    within the dtype's rounding of the float32 results."""
    settings = Settings(task="induction", n_prompts=2, seq_len=5, per_position=False, full_sweeps=True)
    ref = compare(load_bridge(str(ln_dir)), load_bridge(str(lnfree_dir)), settings)
    pair = compare(load_bridge(str(ln_dir), dtype), load_bridge(str(lnfree_dir), dtype), settings)
    json.dumps(pair.to_json(), allow_nan=False)
    # Errors relative to each family's largest value: normalised patching effects (a resid_pre patch at the
    # last position restores everything: ~1) and metric units for DLA / DE.
    tol = {"float64": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}[dtype]
    for got, want in ((pair.ln, ref.ln), (pair.lnfree, ref.lnfree)):
        families = {abs(want.patch_resid).max(): ("patch_heads", "patch_resid", "atp_heads", "atpstar_heads",
                                                  "atp_resid", "atpstar_resid"),
                    abs(want.de_heads).max(): ("dla_heads", "de_heads")}
        for scale, keys in families.items():
            for key in keys:
                assert abs(getattr(got, key) - getattr(want, key)).max() <= tol * scale, (dtype, key)
        assert math.isclose(got.metric_clean, want.metric_clean, rel_tol=tol)
    assert pair.lnfree.dla_nmae < 1e-9


def test_findings_in_bfloat16(ln_dir, lnfree_dir):
    ref = pair_findings(load_bridge(str(ln_dir)), load_bridge(str(lnfree_dir)), n_seq=2, seq_len=16)
    got = pair_findings(load_bridge(str(ln_dir), "bfloat16"), load_bridge(str(lnfree_dir), "bfloat16"),
                        n_seq=2, seq_len=16)
    for key in ("ln", "lnfree"):
        assert got[key]["calibration"]["ce"] == pytest.approx(ref[key]["calibration"]["ce"], rel=2e-2)
        assert got[key]["sinks"]["rate"] == pytest.approx(ref[key]["sinks"]["rate"], abs=0.2)
    assert got["lnfree"]["dla_error"]["nmae"] < 1e-9

