"""`python -m lnfree.remove` / `lnfree.evaluate` as real subprocesses on a tiny model (2 layers, d_model 64)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from models import load_hf

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 30
# 30 steps of 8 sequences x 32 tokens; the gpt2 recipe compressed: every LN gone by step 10.
TRAIN = ["--recipe", "gpt2", "--max-steps", str(STEPS), "--micro-batch", "4", "--grad-accum", "2",
         "--n-ctx", "32", "--warmup", "3", "--seed", "1", "--threads", "1"]


def remove(*args, check=True, launcher=None):
    cmd = (launcher or [sys.executable, "-m"]) + ["lnfree.remove", *map(str, args)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def assert_user_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_ln_dir, text_data):
    """An uninterrupted run, checkpointing every 5 steps."""
    out = tmp_path_factory.mktemp("runs") / "full"
    remove("--model", tiny_ln_dir, "--output-dir", out, "--data", text_data, "--save-every", 5, *TRAIN,
           "--keep-checkpoints")
    return out


def lnfree_logits_by_hand(sd: dict, ids: torch.Tensor, n_head: int) -> torch.Tensor:
    """A trained FakeLN checkpoint's function in float64, written out: every LN (x - mean) / sigma * gamma + beta."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}

    def ln(prefix, x):
        assert not sd[f"{prefix}.live"].any()
        return (x - x.mean(-1, keepdim=True)) / sd[f"{prefix}.sigma"] * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]

    def gelu(x):  # GPT-2's tanh approximation
        return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))

    T, wte = ids.shape[1], sd["transformer.wte.weight"]
    h = wte[ids] + sd["transformer.wpe.weight"][:T]
    d = h.shape[-1]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(sum(k.endswith(".mlp.c_fc.weight") for k in sd)):
        p = f"transformer.h.{i}."
        qkv = ln(p + "attn.c_attn.ln", h) @ sd[p + "attn.c_attn.c_attn.weight"] + sd[p + "attn.c_attn.c_attn.bias"]
        q, k, v = (x.view(*x.shape[:2], n_head, d // n_head).transpose(1, 2) for x in qkv.split(d, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // n_head) ** 0.5 + mask, -1) @ v
        h = h + a.transpose(1, 2).reshape(h.shape) @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        m = gelu(ln(p + "ln_2", h) @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        h = h + m @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln("transformer.ln_f", h) @ wte.T  # the unembedding is tied


def test_end_to_end_run_removes_every_ln_and_lowers_the_loss(baseline, tiny_ln_dir):
    run = json.loads((baseline / "run.json").read_text())
    rows = [json.loads(ln) for ln in (baseline / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["lns_removed"] == 7  # 2 x (ln_2, ln_1 q/k, ln_1 v) + ln_f
    assert max(s for s in run["schedule"].values()) <= 0.7 * STEPS
    assert run["steps"] == STEPS and run["tokens_seen"] == STEPS * 8 * 32
    assert run["heldout_ce_final"] < run["heldout_ce_initial"] - 1.0
    assert sum(r["ce"] for r in rows[-5:]) / 5 < rows[0]["ce"] - 1.0
    # The export computes the trained model's function: against the last checkpoint's LNs written out by hand.
    from safetensors.torch import load_file

    sd = load_file(baseline / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors")
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = GPT2LMHeadModel.from_pretrained(baseline, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (plain(ids).logits.double() - lnfree_logits_by_hand(sd, ids, plain.config.n_head)).abs().max()
    assert diff < 1e-4 and run["export_max_logit_diff"] < 1e-4
    assert (baseline / "README.md").read_text().count(f"{run['heldout_ce_final']:.4f}") >= 1
    model, _, info = load_hf(str(baseline))
    assert info.ln_free and info.base == str(tiny_ln_dir)
    # What the exported model stores is what training froze, one sigma per LN (ln_1's two paths share it).
    assert set(run["sigmas"]) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"}
    assert info.sigmas == pytest.approx(run["sigmas"], rel=1e-6)
    in_checkpoint = {"ln_final": "transformer.ln_f"}
    for i in range(2):
        in_checkpoint |= {f"blocks.{i}.ln1": f"transformer.h.{i}.attn.c_attn.ln", f"blocks.{i}.ln2": f"transformer.h.{i}.ln_2"}
    assert {k: float(sd[f"{v}.sigma"]) for k, v in in_checkpoint.items()} == pytest.approx(run["sigmas"], rel=1e-6)
    assert plain.config.layer_norm_epsilon == 1e12


def test_vanilla_control_with_spans_and_frozen_embeddings(tmp_path, tiny_ln_dir, text_data):
    """--keep-ln keeps every LayerNorm; --embed-lr-scale 0 freezes wte/wpe alone; --span-frac is recorded."""
    out = tmp_path / "vanilla"
    remove("--model", tiny_ln_dir, "--output-dir", out, "--data", text_data, "--save-every", 0, *TRAIN,
           "--max-steps", 6, "--keep-ln", "--embed-lr-scale", 0, "--span-frac", 0.5)
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "vanilla" and not run["ln_free"] and run["schedule"] == {}
    assert not (out / "checkpoints").exists()  # pruned after a finished run
    assert run["recipe"]["span_frac"] == 0.5 and run["recipe"]["embed_lr_scale"] == 0
    assert "50% of the chunks repeated random-token spans" in (out / "README.md").read_text()
    model, _, info = load_hf(str(out))
    base, _, _ = load_hf(str(tiny_ln_dir))
    assert not info.ln_free and info.base == str(tiny_ln_dir)
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(model.get_parameter(name), base.get_parameter(name)), name
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.ln_2.weight"):
        assert not torch.equal(model.get_parameter(name), base.get_parameter(name)), name


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, baseline, tiny_ln_dir, text_data):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lnfree.remove", "--model", str(tiny_ln_dir), "--output-dir", str(out),
           "--data", str(text_data), "--save-every", "5", *TRAIN]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere in the following steps, possibly mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "run.json").exists()
    # Resume also reads a run_config.json written before the spike factor, span fraction and embedding
    # LR scale were recipe fields, and with the fields removed since (release_step, debug_nan_step).
    saved = json.loads((out / "run_config.json").read_text())
    saved["spike_factor"] = saved["recipe"].pop("spike_factor")
    del saved["recipe"]["span_frac"], saved["recipe"]["embed_lr_scale"]
    saved["recipe"]["release_step"], saved["debug_nan_step"] = None, None
    (out / "run_config.json").write_text(json.dumps(saved))
    remove("--output-dir", out, "--resume", "--threads", 1)
    a = json.loads((baseline / "run.json").read_text())
    b = json.loads((out / "run.json").read_text())
    assert b["steps"] == STEPS and b["tokens_seen"] == a["tokens_seen"]
    assert b["heldout_ce_initial"] == a["heldout_ce_initial"]
    assert abs(a["heldout_ce_final"] - b["heldout_ce_final"]) < 1e-3
    assert b["sigmas"] == pytest.approx(a["sigmas"], rel=1e-3)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no duplicated steps after the kill


def test_two_process_ddp_matches_one_process(tmp_path, tiny_ln_dir, text_data):
    args = ["--model", tiny_ln_dir, "--data", text_data, "--save-every", 0, *TRAIN, "--max-steps", 12]
    remove("--output-dir", tmp_path / "one", *args)
    # Without GPUs, lnfree.remove asks Accelerate for the CPU, so --multi_gpu starts 2 gloo processes.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    remove("--output-dir", tmp_path / "two", *args, launcher=launch)
    a = json.loads((tmp_path / "one" / "run.json").read_text())
    b = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert abs(a["heldout_ce_final"] - b["heldout_ce_final"]) < 2e-3
    # Each sigma folds the same micro-batches in the same global order, whatever the number of processes.
    assert b["sigmas"] == pytest.approx(a["sigmas"], rel=1e-5)
    ra = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ce"] for r in rb] == pytest.approx([r["ce"] for r in ra], abs=2e-3)


# `python -m lnfree.remove` with a fault injected by monkeypatching the run: step 12's loss is NaN, once.
NAN_AT_STEP_12 = [sys.executable, "-c", """
import sys
from lnfree import run
step_once = run.Run.train_step
def train_step(self, step):
    m = step_once(self, step)
    if step == 12 and not getattr(run, "nan_injected", False):
        run.nan_injected = True
        m["loss"] = float("nan")
    return m
run.Run.train_step = train_step
from lnfree.remove import main
sys.exit(main(sys.argv[2:]))
"""]


def test_divergence_stops_cleanly_or_rolls_back(tmp_path, tiny_ln_dir, text_data):
    args = ["--model", tiny_ln_dir, "--data", text_data, "--save-every", 3, *TRAIN, "--max-steps", 16]
    stop = remove("--output-dir", tmp_path / "stop", *args, check=False, launcher=NAN_AT_STEP_12)
    lines = stop.stderr.strip().splitlines()
    assert stop.returncode == 3 and "Traceback" not in stop.stderr
    assert "step 12: the loss became nan" in lines[-1] and "step-000009" in lines[-1]
    assert not (tmp_path / "stop" / "model.safetensors").exists()  # no broken final model
    # Checkpoints at 3, 6, 9: the last two are kept.
    kept = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000009"]
    remove("--output-dir", tmp_path / "rec", *args, "--auto-recover", launcher=NAN_AT_STEP_12)
    run = json.loads((tmp_path / "rec" / "run.json").read_text())
    assert run["recoveries"] == 1 and run["lr_scale"] == 0.5 and run["steps"] == 16
    events = [json.loads(x) for x in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    rollback = [e for e in events if e.get("event") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 9
    # After the rollback, steps 10.. run again at half the learning rate.
    first = [e for e in events if e.get("step") == 10 and "lr" in e]
    assert len(first) == 2 and first[1]["lr"] == pytest.approx(first[0]["lr"] / 2)


def test_evaluate_table_and_json(tmp_path, baseline, tiny_ln_dir, text_data):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "lnfree.evaluate", "--models", str(tiny_ln_dir), str(baseline),
                           "--data", str(text_data), "--tokens", "256", "--n-ctx", "32", "--json", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [m["spec"] for m in result["models"]] == [str(tiny_ln_dir), str(baseline)]
    assert "(+0.0000)" in proc.stdout
    assert "CE by position" in proc.stdout and "16-63" in proc.stdout
    assert result["bos"] is False and "packed chunks (no BOS)" in proc.stdout  # a text file: the paper's packing
    # Independent check: transformers' own loss on the same held-out text.
    from lnfree.data import documents
    from lnfree.quality import induction_losses  # its slicing is checked in test_models

    tok = AutoTokenizer.from_pretrained(tiny_ln_dir)
    stream = []
    for doc in documents(str(text_data), "heldout"):
        stream += [tok.eos_token_id] + tok(doc)["input_ids"]
    ids = torch.tensor(stream[: len(stream) // 32 * 32]).view(-1, 32)[:8]
    top1 = []
    for spec, row in zip((tiny_ln_dir, baseline), result["models"], strict=True):
        model = GPT2LMHeadModel.from_pretrained(spec).eval()
        with torch.no_grad():
            want = model(ids, labels=ids).loss.item()
            logits = model(ids).logits
        assert row["tokens"] == 8 * 31 and row["ce_mean"] == pytest.approx(want, abs=1e-4)
        # By position: the target at position p + 1, predicted from positions 0..p, in p's bucket.
        for label, (a, b) in {"0": (0, 1), "1-3": (1, 4), "4-15": (4, 16), "16-63": (16, 31)}.items():
            ce = torch.nn.functional.cross_entropy(logits[:, a:b].flatten(0, 1), ids[:, a + 1:b + 1].flatten())
            assert row["ce_by_position"][label] == pytest.approx(ce.item(), abs=1e-4), label
        assert list(row["ce_by_position"]) == ["0", "1-3", "4-15", "16-63"]  # n_ctx 32: no "64-"
        top1.append(logits[:, :-1].argmax(-1))
        ind = induction_losses(model, len(tok), bos_id=tok.bos_token_id, length=31)  # n_ctx 64
        assert (row["induction_first"], row["induction_second"]) == pytest.approx(
            (ind["first_copy"], ind["second_copy"]), abs=1e-4)
        assert row["induction_length"] == 31
    assert result["models"][1]["ln_free"] and not result["models"][0]["ln_free"]
    assert result["models"][0]["top1_agreement"] == 1.0
    assert result["models"][1]["top1_agreement"] == pytest.approx((top1[0] == top1[1]).float().mean().item())
    assert f"{baseline} {result['models'][1]['top1_agreement']:.1%}" in proc.stdout
    # The twin card's comparison table shows these numbers, and the length they were measured at.
    from lnfree.report import twin_card

    card = twin_card(json.loads((baseline / "run.json").read_text()), None, result, [])
    for row in result["models"]:
        assert f"| `{row['spec']}` | {'yes' if row['ln_free'] else 'no'} | {row['ce_mean']:.4f} " in card
        assert f"{row['induction_first']:.2f} -> {row['induction_second']:.2f} |" in card
    assert "(31 tokens each)" in card


def test_dry_run_plans_gpt2_xl_without_weights():
    proc = remove("--model", "gpt2-xl", "--output-dir", "/nonexistent/xl", "--dry-run", "--mixed-precision", "bf16")
    out = proc.stdout
    assert "48 layers" in out and "1,557.6M parameters" in out
    assert "ln_f            1                  722" in out
    assert "ln_1 v         48             434..716" in out
    gib = float(out.split("~")[1].split(" GiB")[0])
    assert 35 < gib < 80


def test_dry_run_knows_released_shapes_and_the_demo_by_path(tmp_path):
    """An LN-free hub release plans from its known shape (no download); models/demo by path is the demo."""
    proc = remove("--model", "schaeff/gpt2-small_LNFree300", "--output-dir", tmp_path / "a", "--dry-run")
    assert "12 layers" in proc.stdout and "note: " in proc.stderr and "the gpt2 recipe" in proc.stderr
    from lnfree.config import RunConfig
    from models.registry import MODELS_DIR

    assert RunConfig(model=str(MODELS_DIR / "demo"), output_dir=str(tmp_path / "b"), recipe={}, max_steps=1).source == "demo"
    assert RunConfig(model="gpt2", output_dir=str(tmp_path / "c"), recipe={}, max_steps=1).source == "openwebtext"
    # lnfree.evaluate's default data: the demo corpus when every model is a demo model, by name or path.
    from types import SimpleNamespace as NS

    from lnfree.evaluate import default_source

    assert default_source([NS(spec=str(MODELS_DIR / "demo"), base=None),
                           NS(spec="/tmp/twin", base="demo")]) == "demo"
    assert default_source([NS(spec=str(MODELS_DIR / "demo"), base=None), NS(spec="gpt2", base=None)]) == "openwebtext"


def test_evaluate_reads_the_demo_corpus_in_bos_chunks_unless_told():
    """The demo pair is trained on chunks that start with <|endoftext|>: evaluating on its corpus does the same
    by default; --no-bos gives the packed chunks (the paper's protocol, the default elsewhere)."""

    from lnfree.data import documents, tokenize_chunks
    from lnfree.evaluate import evaluate
    from lnfree.quality import token_losses
    from models import load_hf

    model, tok, _ = load_hf("demo")
    for bos, first in ((None, True), (False, False)):
        result = evaluate(["demo"], None, 2048, batch_size=8, bos=bos)
        assert result["bos"] is first and result["data"] == "demo"
        chunks = tokenize_chunks(documents("demo", "heldout"), tok, 256, 2048, bos=first)
        assert bool((chunks[:, 0] == tok.eos_token_id).all()) is first
        assert result["models"][0]["ce_mean"] == pytest.approx(token_losses(model, chunks).mean().item(), abs=1e-5)


def test_cli_errors_are_one_line(tmp_path, tiny_ln_dir, text_data, baseline):
    assert_user_error(remove("--model", "no-such-model", "--output-dir", tmp_path / "a", check=False),
                      "Unknown model")
    assert_user_error(remove("--model", tiny_ln_dir, "--output-dir", tmp_path / "b", "--data",
                             tmp_path / "missing.txt", check=False), "does not exist")
    assert_user_error(remove("--model", tiny_ln_dir, "--output-dir", tmp_path / "c", "--data", text_data,
                             "--dataset", "demo", check=False), "not allowed with")
    assert_user_error(remove("--model", tiny_ln_dir, "--output-dir", tmp_path / "d", "--lr", "1e-4",
                             "--min-lr", "1e-3", check=False), "--min-lr")
    assert_user_error(remove("--model", tiny_ln_dir, "--output-dir", baseline, check=False),
                      "already holds another run")
    assert_user_error(remove("--output-dir", baseline, "--resume", check=False), "already finished")
    assert_user_error(remove("--model", tiny_ln_dir, "--output-dir", tmp_path / "f", "--span-frac", "1",
                             check=False), "--span-frac")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    assert_user_error(remove("--model", tiny_ln_dir, "--output-dir", tmp_path / "e", "--data", bad,
                             *TRAIN, check=False), "no string field `text`")
    proc = subprocess.run([sys.executable, "-m", "lnfree.evaluate", "--models", "nope"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "Unknown model")



def test_large_and_xl_stop_at_the_papers_release_by_default(tmp_path):
    """The paper released gpt2-large / xl at steps 600 / 800 of 1200-step schedules: a default run stops
    there, keeping the 1200-step schedules; --stop-at 1200 runs all of it; a compressed run runs to its end."""
    for model, released in (("gpt2-large", 600), ("gpt2-xl", 800)):
        proc = remove("--model", model, "--output-dir", tmp_path / model, "--dry-run")
        assert f"stops at step {released} of 1200" in proc.stdout and "1200 steps x" in proc.stdout
        assert "--stop-at 1200 runs all of it" in proc.stderr
    proc = remove("--model", "gpt2-large", "--output-dir", tmp_path / "full", "--dry-run", "--stop-at", "1200")
    assert "stops at" not in proc.stdout
    proc = remove("--model", "gpt2-large", "--output-dir", tmp_path / "short", "--dry-run", "--max-steps", "100")
    assert "stops at" not in proc.stdout and "100 steps x" in proc.stdout
    assert_user_error(remove("--model", "gpt2-large", "--output-dir", tmp_path / "x", "--dry-run", "--stop-at", "0",
                             check=False), "--stop-at must lie in 1..1200")


def test_a_run_stopped_early_is_the_full_runs_first_steps(tiny_ln_dir, text_data, tmp_path):
    """--stop-at keeps the schedule of --max-steps (the LR and the removals): its steps are those of the
    full run, and it ends and exports at the stop."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    remove("--model", tiny_ln_dir, "--data", text_data, "--output-dir", full, *TRAIN, "--max-steps", "14")
    remove("--model", tiny_ln_dir, "--data", text_data, "--output-dir", stopped, *TRAIN, "--max-steps", "14",
           "--stop-at", "11")
    rows = {d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, stopped)}
    keys = ("step", "ce", "loss", "lr", "lns_removed")
    assert [[r[k] for k in keys] for r in rows[stopped]] == [[r[k] for k in keys] for r in rows[full][:11]]
    run = json.loads((stopped / "run.json").read_text())
    assert run["steps"] == 11 and run["stop_at"] == 11 and run["max_steps"] == 14
    assert (stopped / "model.safetensors").exists()


def test_training_ce_masks_eot_targets_and_the_control_has_the_aux_loss(tiny_ln_dir, text_data, tmp_path):
    """The first step's training CE (vanilla control: the model as loaded) equals the CE of that step's
    batches with every EOT target left out, computed here in float64, and not the CE with them.  The
    control is trained with the aux loss, as in the paper's code: its value is the definition written out."""
    import torch.nn.functional as F

    from lnfree.data import load_train_eval

    out = tmp_path / "run"
    remove("--model", tiny_ln_dir, "--data", text_data, "--output-dir", out, *TRAIN, "--max-steps", "1",
           "--keep-ln")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    logged = row["ce"]
    model, tokenizer, _ = load_hf(str(tiny_ln_dir), "float64")
    data, _ = load_train_eval(str(text_data), tokenizer, 32, None, 256, seed=1)
    eot = tokenizer.eos_token_id
    masked, unmasked, aux = [], [], []
    resid = []
    model.transformer.ln_f.register_forward_pre_hook(lambda m, a: resid.append(a[0]))  # returns None
    with torch.no_grad():
        for k in range(2):  # --micro-batch 4 x --grad-accum 2
            ids = data.batch(1, 4, 8, k)
            logits = model(ids).logits[:, :-1].flatten(0, 1)
            x = resid.pop()
            std = ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1).add(1e-5).sqrt()  # [B, T] at the ln_f input
            special = (ids == eot) | (torch.arange(ids.shape[1]) == 0)
            aux.append(((std - std[~special].mean()) ** 2).mean().item())
            targets = ids[:, 1:].flatten()
            assert (targets == eot).any()  # the batch has EOT targets to leave out
            masked.append(F.cross_entropy(logits, targets.masked_fill(targets == eot, -100)).item())
            unmasked.append(F.cross_entropy(logits, targets).item())
    assert logged == pytest.approx(sum(masked) / 2, rel=1e-5)
    assert abs(sum(unmasked) / 2 - logged) > 1e-3
    assert row["aux"] == pytest.approx(sum(aux) / 2, rel=1e-4) and row["aux"] > 0
    assert row["loss"] == pytest.approx(row["ce"] + 0.1 * row["aux"], rel=1e-6)  # the gpt2 recipe's lambda


def test_mixed_precision_defaults_to_bf16_on_a_gpu_that_has_it(monkeypatch, tmp_path):
    """The paper trains in bf16: the default on a bf16 GPU; fp32 on a CPU; the flag wins over both."""
    from lnfree import remove as rm

    def cfg(*extra):
        args = rm.build_parser().parse_args(["--model", "gpt2", "--output-dir", str(tmp_path), "--dry-run", *extra])
        return rm.config_from_args(args).mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg() == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cfg() == "bf16" and cfg("--mixed-precision", "no") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert cfg() == "no"
