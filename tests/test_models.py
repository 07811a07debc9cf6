"""models/: loading LN and LN-free checkpoints, the bridge, errors, inspect CLI, the demo model."""

from __future__ import annotations

import json
import math
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
    bridge, _ = load_bridge(str(tiny_ln_dir))
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
    bridge, binfo = load_bridge(str(tiny_lnfree_dir))
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
    bridge, _ = load_bridge(str(tiny_lnfree_dir))
    _, cache = bridge.run_with_cache(ids_for(tokenizer))
    scale = cache["ln_final.hook_scale"]
    assert torch.allclose(scale, torch.full_like(scale, tiny_sigmas["ln_final"]))


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


# --- the embedded demo model -------------------------------------------------------------

DEMO = ROOT / "models" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo model not built")


@needs_demo
def test_demo_model_size_and_quality():
    from models.corpus import load_passages, pack
    from models.quality import induction_losses, token_losses

    model, tok, info = load_hf("demo")
    report = json.loads((DEMO / "training.json").read_text())
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (4, 256, 4, 256, 8192)
    assert not info.ln_free and info.twin == "demo-lnfree"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    held = pack(tok(load_passages("heldout"))["input_ids"], eot, cfg.n_positions)
    ce = token_losses(model, held, batch_size=64).mean().item()
    assert ce < math.log(cfg.vocab_size) - 3.0  # far better than uniform (9.01 nats)
    assert ce == pytest.approx(report["heldout_ce"], abs=1e-3)  # the README's number
    # The reported induction numbers are what the model does, and it has induction heads (README).
    ind = induction_losses(model, cfg.vocab_size, bos_id=eot)
    assert ind == pytest.approx(report["induction"], abs=1e-3)
    assert ind["second_copy"] < ind["first_copy"] - 5  # far below: induction
    # `python -m models.pretrain_demo` with no flags is what trained it (its defaults are the recipe).
    from models.pretrain_demo import parser

    defaults = json.loads(json.dumps(vars(parser().parse_args([])), default=str))
    assert {k: v for k, v in report["train_args"].items() if k != "out"} == {
        k: defaults[k] for k in report["train_args"] if k != "out"}


def test_demo_lnfree_is_ln_free_and_keeps_induction():
    """The shipped twin: its recorded held-out CE (the README's) and the base's induction heads."""
    from models.corpus import load_passages, pack
    from models.quality import induction_losses, token_losses

    model, tok, info = load_hf("demo-lnfree")
    run = json.loads((ROOT / "models" / "demo-lnfree" / "run.json").read_text())
    assert info.ln_free and info.base == "demo" and set(info.sigmas) == {
        *(f"blocks.{i}.ln{k}" for i in range(4) for k in (1, 2)), "ln_final"}
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    held = pack(tok(load_passages("heldout"))["input_ids"], eot, model.config.n_positions)
    assert token_losses(model, held, batch_size=64).mean().item() == pytest.approx(run["heldout_ce_final"], abs=1e-3)
    ind = induction_losses(model, model.config.vocab_size, bos_id=eot)
    assert ind["second_copy"] < ind["first_copy"] - 5


def test_pretrain_demo_runs_its_induction_recipe(tmp_path):
    """The pretraining script as a process, on the real corpus with a tiny budget: span-only steps at a
    constant learning rate, then text with span rows; the initialisation flags take effect."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "models.pretrain_demo", "--out", str(out), "--batch-size", "2", "--n-ctx", "128",
           "--steps", "20", "--warmup", "5", "--induction-steps", "30", "--induction-ctx", "32",
           "--induction-lengths", "3", "8", "--induction-lr", "3e-3", "--repeats-only", "--repeat-frac", "0.5",
           "--repeat-lengths", "3", "20", "--embed-std", "1", "--final-ln-gain", "0.004"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lrs = {int(line.split()[1].split("/")[0]): float(line.split(" lr ")[1].split()[0])
           for line in proc.stdout.splitlines() if line.startswith("step ") and " lr " in line}
    assert lrs[20] == 3e-3 and lrs[40] < 1e-3  # constant during the span steps, then the text schedule
    report = json.loads((out / "training.json").read_text())
    assert report["train_args"]["induction_steps"] == 30 and report["tokens_seen"] == 30 * 2 * 32 + 20 * 2 * 128
    assert report["text_tokens_seen"] == 20 * 1 * 128
    (probe,) = report["induction_during_training"]
    assert probe["step"] == 50 and set(probe["length_20"]) == {"first_copy", "second_copy"}
    model, _, info = load_hf(str(out))
    assert not info.ln_free and model.config.n_positions == 128
    assert model.transformer.wte.weight.std() > 0.5 and model.transformer.ln_f.weight.mean() < 0.5
    # --init-from continues from a model's weights (the initialisation defaults do not apply): with no
    # steps, the written model is that model.
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "models.pretrain_demo", "--out", str(again), "--init-from", str(out),
                           "--n-ctx", "128", "--steps", "0", "--induction-steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    copy = load_hf(str(again))[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values(), strict=True))
    # --embed-lr-scale reaches the embeddings' learning rate: at 0 they (and only they) stay put.
    frozen = tmp_path / "frozen"
    proc = subprocess.run([sys.executable, "-m", "models.pretrain_demo", "--out", str(frozen), "--init-from", str(out),
                           "--n-ctx", "128", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                           "--induction-steps", "0", "--embed-lr-scale", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = load_hf(str(frozen))[0].transformer
    assert torch.equal(moved.wte.weight, model.transformer.wte.weight)
    assert torch.equal(moved.wpe.weight, model.transformer.wpe.weight)
    assert not torch.equal(moved.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    refused = subprocess.run([sys.executable, "-m", "models.pretrain_demo", "--out", str(tmp_path / "no"),
                              "--init-from", str(out), "--embed-std", "1"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--init-from keeps" in refused.stderr and not (tmp_path / "no").exists()
    abbreviated = subprocess.run([sys.executable, "-m", "models.pretrain_demo", "--out", str(tmp_path / "no"),
                                  "--init-from", str(out), "--final-ln", "1"], cwd=ROOT, capture_output=True, text=True)
    assert abbreviated.returncode == 2 and "--final-ln" in abbreviated.stderr and not (tmp_path / "no").exists()
    wrong = subprocess.run([sys.executable, "-m", "models.pretrain_demo", "--out", str(tmp_path / "no"),
                            "--init-from", str(out), "--steps", "0"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "--n-ctx 256" in wrong.stderr and not (tmp_path / "no").exists()


def test_repeated_spans():
    from models.corpus import repeated_spans

    gen = torch.Generator().manual_seed(0)
    rows = repeated_spans(20, 64, 100, eot_id=5, gen=gen, lengths=(3, 20))
    assert rows.shape == (20, 64) and (rows[:, 0] == 5).all() and not (rows[:, 1:] == 5).any()
    for row in rows.tolist():
        body = row[1:]
        period = next(p for p in range(3, 21) if body[p:] == body[:-p])
        assert len(set(body[:period])) > 1  # a span of random tokens, repeated with that period
    assert repeated_spans(0, 64, 100, 5, gen).shape == (0, 64)


def test_induction_targets_are_the_tokens_a_copier_can_predict():
    """Against the definition: target j (token j+1) is predictable by induction iff the token before it
    occurred earlier in the row and what followed that earlier occurrence is the target."""
    from models.corpus import induction_targets, repeated_spans

    rows = repeated_spans(16, 40, 50_000, eot_id=0, gen=torch.Generator().manual_seed(1), lengths=(3, 12))
    mask = induction_targets(rows)
    assert mask.shape == (16, 39) and mask.any(dim=1).all()
    for row, m in zip(rows.tolist(), mask.tolist(), strict=True):
        for j in range(len(row) - 1):
            earlier = [i for i in range(1, j) if row[i] == row[j]]
            assert m[j] == (bool(earlier) and row[earlier[-1] + 1] == row[j + 1]), (row, j)
    # A span that repeats within itself is predictable from its own repeat: [7, 8, 7, 8] has period 2.
    assert induction_targets(torch.tensor([[0, 7, 8, 7, 8, 7, 8]])).tolist() == [[False, False, False, True, True, True]]


def test_next_token_targets_mask_only_the_span_rows():
    """What pretrain_demo and the toy train on: text rows keep every target; with repeats_only, span rows
    keep exactly the targets induction_targets marks and ignore (-100) the rest."""
    from models.corpus import induction_targets, next_token_targets, repeated_spans

    gen = torch.Generator().manual_seed(2)
    text = torch.randint(1, 500, (3, 30), generator=gen)
    spans = repeated_spans(2, 30, 500, eot_id=0, gen=gen, lengths=(4, 9))
    ids = torch.cat([text, spans])
    assert torch.equal(next_token_targets(ids, 3), ids[:, 1:])
    targets = next_token_targets(ids, 3, repeats_only=True)
    assert torch.equal(targets[:3], text[:, 1:])
    keep = induction_targets(spans)
    assert torch.equal(targets[3:][keep], spans[:, 1:][keep]) and (targets[3:][~keep] == -100).all()
    assert torch.equal(next_token_targets(text, 3, repeats_only=True), text[:, 1:])


class Copier(torch.nn.Module):
    """A perfect induction "model": where the current token occurred before, predict the token that
    followed it (logit 30); elsewhere, uniform logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.anchor = vocab, torch.nn.Parameter(torch.zeros(1))  # token_losses reads the device

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            for t, tok in enumerate(row):
                earlier = [j for j in range(t) if row[j] == tok]
                if earlier:
                    logits[b, t, row[earlier[-1] + 1]] = 30.0
        return type("Out", (), {"logits": logits})


def test_induction_losses_match_their_definition():
    from models.quality import induction_batch, induction_losses

    vocab, length = 5000, 10
    ind = induction_losses(Copier(vocab), vocab, bos_id=7, n_seq=4, length=length)
    seq = induction_batch(vocab, 4, length, 0, bos_id=7)
    assert (seq[:, 0] == 7).all() and (seq[:, 1:] != 7).all() and seq.shape == (4, 1 + 2 * length)
    assert torch.equal(seq[:, 1 : 1 + length], seq[:, 1 + length :])
    assert all(len(set(r.tolist())) == length for r in seq[:, 1 : 1 + length])  # this seed: no repeats
    # So the first copy is unpredictable to the copier (uniform: log vocab per token) and every
    # token of the second copy after its first is predicted with logit 30 over vocab-1 zeros.
    assert ind["first_copy"] == pytest.approx(math.log(vocab), abs=1e-5)
    assert ind["second_copy"] == pytest.approx(math.log(1 + (vocab - 1) * math.exp(-30)), abs=1e-6)


@needs_demo
def test_inspect_cli_demo():
    out = json.loads(run_inspect("demo").stdout)
    assert out["spec"] == "demo" and out["n_layers"] == 4 and out["ln_free"] is False


def test_induction_toy_starts_from_a_trained_checkpoint(tiny_ln_dir):
    from models import induction_toy

    vocab = GPT2LMHeadModel.from_pretrained(tiny_ln_dir).config.vocab_size
    log = induction_toy.main(["--init-from", str(tiny_ln_dir), "--vocab", str(vocab), "--steps", "2",
                              "--batch-size", "2", "--repeats-only", "--threads", "1"])
    assert [r["step"] for r in log] == [2] and math.isfinite(log[0]["second_30"])
    with pytest.raises(SystemExit) as exit_info:  # a span vocabulary the checkpoint does not have
        induction_toy.main(["--init-from", str(tiny_ln_dir), "--vocab", str(vocab + 1), "--steps", "1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # two ways to choose the model
        induction_toy.main(["--init-from", str(tiny_ln_dir), "--gpt2", "--vocab", str(vocab), "--steps", "1"])
    assert exit_info.value.code == 2


def test_induction_toy_runs_and_probes_through_induction_losses():
    """The toy's probe is models.quality.induction_losses (checked against a copier above); here the toy
    and the demo architecture train and log it."""
    from models import induction_toy

    log = induction_toy.main(["--vocab", "16", "--steps", "2", "--batch-size", "2", "--layer-norm", "--tied",
                              "--mlp", "--embed-std", "1", "--final-ln-gain", "0.004", "--threads", "1"])
    gpt = induction_toy.main(["--gpt2", "--vocab", "16", "--steps", "2", "--batch-size", "2", "--embed-std", "1",
                              "--final-ln-gain", "0.004", "--proj-std", "0.02", "--repeats-only",
                              "--embed-lr-scale", "0.1", "--threads", "1"])
    for run in (log, gpt):
        assert [r["step"] for r in run] == [2]
        assert all(math.isfinite(run[0][k]) for k in ("loss", "first_13", "second_13", "first_30", "second_30"))
    toy = induction_toy.Toy(16, 64, layer_norm=True, tied=True)
    assert toy.unembed.weight is toy.embed.weight
    assert toy(torch.zeros(2, 5, dtype=torch.long)).logits.shape == (2, 5, 16)
    gpt2 = induction_toy.demo_gpt2(512, 64, embed_std=1.0, final_ln_gain=0.004, proj_std=0.05)
    assert gpt2.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert (gpt2.transformer.ln_f.weight == 0.004).all() and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert gpt2.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert gpt2.transformer.h[3].mlp.c_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
