"""models/: loading LN and LN-free checkpoints, the bridge, errors, the inspect CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from models import ModelSpecError, load_bridge, load_hf, loading, registry
from models.ln_free import FixedLayerNorm, ln_modules
from tests.conftest import tiny_model, write_lnfree

ROOT = Path(__file__).resolve().parents[1]


def ids_for(tokenizer, n=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer), (n, length), generator=g)


def fake_ln_reference(model, sigmas):
    """Plain-torch reference: the same model with each LN as (x - mean) / sigma * gamma + beta."""
    import copy

    ref = copy.deepcopy(model)

    class Fake(torch.nn.Module):
        def __init__(self, ln, sigma):
            super().__init__()
            self.w, self.b, self.sigma = ln.weight, ln.bias, sigma

        def forward(self, x):
            return (x - x.mean(-1, keepdim=True)) / self.sigma * self.w + self.b

    for name, (parent, attr, _) in ln_modules(ref).items():
        setattr(parent, attr, Fake(getattr(parent, attr), sigmas[name]))
    return ref


def test_ln_checkpoint_matches_transformers(tiny_ln_dir, tokenizer):
    ids = ids_for(tokenizer)
    ref = GPT2LMHeadModel.from_pretrained(tiny_ln_dir, attn_implementation="eager").eval()
    model, tok, info = load_hf(str(tiny_ln_dir))
    bridge = load_bridge(str(tiny_ln_dir)).bridge
    with torch.no_grad():
        expected = ref(ids).logits
        assert (model(ids).logits - expected).abs().max() < 1e-4
        assert (bridge(ids) - expected).abs().max() < 1e-4
    assert not info.ln_free and info.sigmas is None
    assert len(tok) == len(tokenizer)
    assert all(isinstance(getattr(p, a), torch.nn.LayerNorm) for p, a, _ in ln_modules(model).values())


def test_lnfree_checkpoint_loads_exact(tiny_lnfree_dir, tokenizer, tiny_sigmas):
    ids = ids_for(tokenizer)
    expected = fake_ln_reference(tiny_model(tokenizer), tiny_sigmas)(ids).logits.detach()
    plain = GPT2LMHeadModel.from_pretrained(tiny_lnfree_dir, attn_implementation="eager").eval()
    model, _, info = load_hf(str(tiny_lnfree_dir))
    loaded = load_bridge(str(tiny_lnfree_dir))
    bridge, binfo = loaded.bridge, loaded.info
    assert info.ln_free and binfo.ln_free
    assert info.sigmas == pytest.approx(tiny_sigmas, rel=1e-6)
    assert all(isinstance(getattr(p, a), FixedLayerNorm) for p, a, _ in ln_modules(model).values())
    with torch.no_grad():
        assert (plain(ids).logits - expected).abs().max() < 1e-4  # the convention itself
        assert (model(ids).logits - expected).abs().max() < 1e-4
        assert (bridge(ids) - expected).abs().max() < 1e-4


def test_lnfree_sigmas_implied_when_not_recorded(tmp_path, tokenizer):
    """Third-party checkpoints carry no sigmas; with gamma = 1 they are recovered exactly."""
    model = tiny_model(tokenizer)
    with torch.no_grad():
        for parent, attr, _ in ln_modules(model).values():
            getattr(parent, attr).weight.fill_(1.0)
    sigmas = {name: 2.0 + i for i, name in enumerate(ln_modules(model))}
    write_lnfree(model, sigmas, tmp_path, record_sigmas=False)
    tokenizer.save_pretrained(tmp_path)
    _, _, info = load_hf(str(tmp_path))
    assert info.sigmas == pytest.approx(sigmas, rel=1e-5)


def test_lnfree_residual_decomposition_needs_no_scale(tiny_lnfree_dir, tokenizer, tiny_sigmas):
    """Embeddings + every attn/MLP output, each centred, /sigma_f * gamma + beta, times W_U = logits.

    Computed in plain torch from the transformers model with forward hooks.
    """
    ids = ids_for(tokenizer)
    model = GPT2LMHeadModel.from_pretrained(tiny_lnfree_dir, attn_implementation="eager").eval()
    parts = []
    hooks = [blk.attn.register_forward_hook(lambda m, i, o: parts.append(o[0])) for blk in model.transformer.h]
    hooks += [blk.mlp.register_forward_hook(lambda m, i, o: parts.append(o)) for blk in model.transformer.h]
    with torch.no_grad():
        logits = model(ids).logits
        pos = torch.arange(ids.shape[1])
        parts.append(model.transformer.wte(ids) + model.transformer.wpe(pos))
    for h in hooks:
        h.remove()
    ln_f = model.transformer.ln_f
    gamma = ln_f.weight / 1e6 * tiny_sigmas["ln_final"]
    w_u = model.lm_head.weight.T
    total = sum(((p - p.mean(-1, keepdim=True)) / tiny_sigmas["ln_final"] * gamma) @ w_u for p in parts)
    total = total + ln_f.bias @ w_u
    assert (total - logits).abs().max() < 1e-4


def test_bridge_lnfree_scale_is_constant_sigma(tiny_lnfree_dir, tokenizer, tiny_sigmas):
    bridge = load_bridge(str(tiny_lnfree_dir)).bridge
    _, cache = bridge.run_with_cache(ids_for(tokenizer))
    scale = cache["ln_final.hook_scale"]
    assert torch.allclose(scale, torch.full_like(scale, tiny_sigmas["ln_final"]))


def test_bridge_tokenizer_is_loaded_once_with_bos(monkeypatch):
    """The bridge's tokenizer prepends BOS (TransformerLens's convention) and is the one load_hf read: given a
    tokenizer without it, TransformerLens reads the tokenizer files a second time (0.05-0.2 s per model)."""
    from transformers import AutoTokenizer

    calls = []
    read = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(k) or read(*a, **k))
    model = load_bridge("demo")
    assert calls == [{"add_bos_token": True}]
    text = "And David said unto Saul"
    want = read(loading.resolve("demo"), add_bos_token=True)(text).input_ids
    assert want[0] == model.bridge.tokenizer.bos_token_id and want[1:] == read(loading.resolve("demo"))(text).input_ids
    assert model.bridge.to_tokens(text)[0].tolist() == want
    assert load_hf("demo")[1](text).input_ids == want[1:]  # training and evaluation tokenize without BOS


def test_dtype_option(tiny_ln_dir):
    model, _, _ = load_hf(str(tiny_ln_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelSpecError, match="Unknown dtype"):
        load_hf(str(tiny_ln_dir), dtype="float8")


def test_pairing_from_recorded_base(tmp_path, tokenizer, tiny_sigmas):
    model = tiny_model(tokenizer)
    model.config.lnfree_base = "demo"
    write_lnfree(model, tiny_sigmas, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, _, info = load_hf(str(tmp_path))
    assert info.base == "demo" and info.twin == "demo"
    assert registry.lnfree_twin("gpt2") == "schaeff/gpt2-small_LNFree300"
    assert registry.base_of("schaeff/gpt2-xl_LNFree800") == "gpt2-xl"
    assert registry.base_of("apollo-research/gpt2_noLN") == "gpt2"


def test_shape_params_match_real_model():
    shape = registry.Shape(n_layer=3, n_embd=48, n_head=4, n_ctx=32, vocab=101)
    cfg = GPT2Config(n_layer=3, n_embd=48, n_head=4, n_positions=32, vocab_size=101)
    assert shape.params == sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())
    assert registry.GPT2_SHAPES["gpt2"].params == 124_439_808


def test_shape_of_hub_local_and_demo(tiny_ln_dir):
    assert registry.shape_of("schaeff/gpt2-medium_LNFree500") == registry.GPT2_SHAPES["gpt2-medium"]
    cfg = GPT2LMHeadModel.from_pretrained(tiny_ln_dir).config
    assert registry.shape_of(str(tiny_ln_dir)) == registry.Shape(cfg.n_layer, cfg.n_embd, cfg.n_head,
                                                                 cfg.n_positions, cfg.vocab_size)
    assert registry.shape_of("demo").n_layer == 4
    assert registry.shape_of("no-such-model") is None
    assert registry.is_demo("demo") and registry.is_demo(str(registry.MODELS_DIR / "demo") + "/")
    assert not registry.is_demo("demo-lnfree") and not registry.is_demo(str(tiny_ln_dir))
    assert registry.demo_name(str(registry.MODELS_DIR / "demo-lnfree")) == "demo-lnfree"
    assert registry.demo_name(str(tiny_ln_dir)) is None and registry.demo_name(None) is None


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no-such-model", "Unknown model"),
        ("./missing_dir", "does not exist"),
        ("", "empty"),
        ("gpt2", "not in the local Hugging Face cache"),
        ("schaeff/gpt2-small_LNFree300", "huggingface-cli download"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        load_hf(spec)


def test_pickled_and_foreign_checkpoints_refused(tmp_path, tiny_ln_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_ln_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelSpecError, match="pickled"):
        load_hf(str(pickled))
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"x": torch.zeros(1)}, foreign / "model.safetensors")
    with pytest.raises(ModelSpecError, match="GPT-2"):
        load_hf(str(foreign))


def test_memory_check_fails_clearly(monkeypatch):
    monkeypatch.setattr(loading, "available_bytes", lambda device: 2 * 2**30)
    xl = registry.GPT2_SHAPES["gpt2-xl"]
    cfg = {"n_layer": xl.n_layer, "n_embd": xl.n_embd, "n_head": xl.n_head, "vocab_size": xl.vocab}
    with pytest.raises(ModelSpecError, match="needs about 8.7 GiB"):
        loading.check_memory(cfg, torch.float32, "cpu", "gpt2-xl")
    small = registry.GPT2_SHAPES["gpt2"]
    loading.check_memory({"n_layer": small.n_layer, "n_embd": small.n_embd, "n_head": small.n_head,
                          "vocab_size": small.vocab}, torch.float32, "cpu", "gpt2")


def run_inspect(spec):
    return subprocess.run([sys.executable, "-m", "models.inspect", spec], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_inspect_cli(tiny_ln_dir, tiny_lnfree_dir, tiny_sigmas):
    out = json.loads(run_inspect(str(tiny_ln_dir)).stdout)
    assert out["ln_free"] is False and out["sigmas"] is None
    assert (out["n_layers"], out["d_model"], out["n_heads"], out["n_ctx"]) == (2, 64, 4, 64)
    real = GPT2LMHeadModel.from_pretrained(tiny_ln_dir)
    assert out["params"] == sum(p.numel() for p in real.parameters())
    assert out["d_vocab"] == real.config.vocab_size
    out = json.loads(run_inspect(str(tiny_lnfree_dir)).stdout)
    assert out["ln_free"] is True
    assert out["sigmas"] == pytest.approx(tiny_sigmas, rel=1e-6)


def test_inspect_cli_bad_spec():
    res = run_inspect("definitely-not-a-model")
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
