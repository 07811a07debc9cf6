"""The research scripts that made the demo pair (models/demo_training): pretraining and the induction toy.

Marked slow (`pytest -m "not slow"` skips them locally); CI runs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from models import load_hf
from tests.test_models import ROOT

pytestmark = pytest.mark.slow


def test_the_shipped_demo_is_the_defaults_then_the_bos_stage():
    """`models/demo` is two runs of `python -m models.demo_training.pretrain` (its docstring): the defaults
    (packed chunks: the induction heads form), then BOS_STAGE continued from that model.  Its training.json
    records both (the first under "init")."""
    from models.demo_training.pretrain import BOS_STAGE, parser

    report = json.loads((ROOT / "models" / "demo" / "training.json").read_text())

    def args(argv):
        return json.loads(json.dumps(vars(parser().parse_args(argv)), default=str))

    def same(recorded, argv):
        want = args(argv)
        assert {k: v for k, v in recorded.items() if k != "out"} == {k: want[k] for k in recorded if k != "out"}

    same(report["init"]["training"]["train_args"], [])
    same(report["train_args"], [*BOS_STAGE, "--init-from", report["train_args"]["init_from"]])
    assert report["train_args"]["bos"] and report["train_args"]["induction_steps"] == 0
    assert len(report["init"]["weights_sha256"]) == 64
    stage = args(BOS_STAGE)
    assert report["tokens_seen"] == stage["steps"] * stage["batch_size"] * stage["n_ctx"]


def test_pretrain_demo_runs_its_induction_recipe(tmp_path):
    """The pretraining script as a process, on the real corpus with a tiny budget: span-only steps at a
    constant learning rate, then text with span rows; the initialisation flags take effect."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "models.demo_training.pretrain", "--out", str(out), "--batch-size", "2", "--n-ctx", "128",
           "--steps", "20", "--warmup", "5", "--induction-steps", "30", "--induction-ctx", "32",
           "--induction-lengths", "3", "8", "--induction-lr", "3e-3", "--repeats-only", "--repeat-frac", "0.5",
           "--repeat-lengths", "3", "20", "--embed-std", "1", "--final-ln-gain", "0.004", "--heldout-chunks", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lrs = {int(line.split()[1].split("/")[0]): float(line.split(" lr ")[1].split()[0])
           for line in proc.stdout.splitlines() if line.startswith("step ") and " lr " in line}
    assert lrs[20] == 3e-3 and lrs[40] < 1e-3  # constant during the span steps, then the text schedule
    report = json.loads((out / "training.json").read_text())
    assert report["train_args"]["induction_steps"] == 30 and report["tokens_seen"] == 30 * 2 * 32 + 20 * 2 * 128
    assert report["text_tokens_seen"] == 20 * 1 * 128 and report["heldout_tokens"] == 16 * 128
    (probe,) = report["induction_during_training"]
    assert probe["step"] == 50 and set(probe["length_20"]) == {"first_copy", "second_copy"}
    model, _, info = load_hf(str(out))
    assert not info.ln_free and model.config.n_positions == 128
    assert model.transformer.wte.weight.std() > 0.5 and model.transformer.ln_f.weight.mean() < 0.5

    def pretrain(path, *flags):  # a short continuation of `out`; its transformer
        proc = subprocess.run([sys.executable, "-m", "models.demo_training.pretrain", "--out", str(path), "--init-from", str(out),
                               "--n-ctx", "128", "--heldout-chunks", "1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return load_hf(str(path))[0].transformer

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    # --init-from continues from a model's weights (the initialisation defaults do not apply): with no
    # steps, the written model is that model.
    again = tmp_path / "again"
    assert same(model.transformer, pretrain(again, "--steps", "0", "--induction-steps", "0"))
    init = json.loads((again / "training.json").read_text())["init"]  # what it continued from, recorded
    assert init["spec"] == str(out) and init["training"] == report
    assert init["weights_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    # --embed-lr-scale reaches the embeddings' learning rate: at 0 they (and only they) stay put.  The same
    # 3 steps with and without bfloat16 autocast: the flag is recorded and changes the arithmetic.
    # --autocast text: bfloat16 on the text steps (as "bfloat16"), float32 on the span-only ones (as "off").
    def frozen_run(path, autocast, span_steps=0, text_steps=3):
        moved = pretrain(path, "--batch-size", "2", "--steps", str(text_steps), "--warmup", "1", "--autocast", autocast,
                         "--induction-steps", str(span_steps), "--induction-ctx", "32", "--embed-lr-scale", "0")
        assert json.loads((path / "training.json").read_text())["train_args"]["autocast"] == autocast
        return moved

    moved = frozen_run(tmp_path / "frozen", "bfloat16")
    in_float32 = frozen_run(tmp_path / "frozen32", "off")
    assert not torch.equal(moved.h[0].attn.c_attn.weight, in_float32.h[0].attn.c_attn.weight)
    assert torch.equal(moved.wte.weight, model.transformer.wte.weight)
    assert torch.equal(moved.wpe.weight, model.transformer.wpe.weight)
    assert not torch.equal(moved.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    assert same(frozen_run(tmp_path / "text", "text"), moved)
    assert same(*(frozen_run(tmp_path / f"spans-{mode}", mode, span_steps=3, text_steps=0) for mode in ("text", "off")))
    # --induction-offsets: span-only steps at ctx 32 train the position embeddings beyond 32 too.  Without
    # it those rows get no gradient, so AdamW only decays them (by 1 - lr * 0.1 a step).
    offset = tmp_path / "offsets"
    after = pretrain(offset, "--batch-size", "4", "--steps", "0", "--induction-steps", "2", "--induction-ctx", "32",
                     "--induction-offsets").wpe.weight[32:]
    assert json.loads((offset / "training.json").read_text())["train_args"]["induction_offsets"] is True
    before = model.transformer.wpe.weight[32:]
    assert (after - before * (1 - 3e-3 * 0.1) ** 2).abs().max() > 1e-3
    refused = subprocess.run([sys.executable, "-m", "models.demo_training.pretrain", "--out", str(tmp_path / "no"),
                              "--init-from", str(out), "--embed-std", "1"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--init-from keeps" in refused.stderr and not (tmp_path / "no").exists()
    abbreviated = subprocess.run([sys.executable, "-m", "models.demo_training.pretrain", "--out", str(tmp_path / "no"),
                                  "--init-from", str(out), "--final-ln", "1"], cwd=ROOT, capture_output=True, text=True)
    assert abbreviated.returncode == 2 and "--final-ln" in abbreviated.stderr and not (tmp_path / "no").exists()
    wrong = subprocess.run([sys.executable, "-m", "models.demo_training.pretrain", "--out", str(tmp_path / "no"),
                            "--init-from", str(out), "--steps", "0"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "--n-ctx 256" in wrong.stderr and not (tmp_path / "no").exists()


def test_induction_toy_starts_from_a_trained_checkpoint(tiny_ln_dir):
    from models.demo_training import induction_toy

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
    """The toy's probe is lnfree.quality.induction_losses (checked against a copier above); here the toy
    and the demo architecture train and log it."""
    from models.demo_training import induction_toy

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
