"""Careless users, damaged run directories, full disks and signals against `lnfree.remove` / `lnfree.evaluate`.

Each bad input ends in one sentence (exit 2) that says what to do, with no traceback and no file of the
user's changed; a damaged run falls back to the newest checkpoint that loads; a full disk or a signal
loses nothing: the resumed run ends at exactly the uninterrupted run's CE.  Most cases call main() in
this process (the checks come before any model loads); the runs train the tiny model (2 layers,
d_model 64) for 30 steps as tests/test_lnfree_cli.py does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import lnfree.data
import models
from lnfree import checkpoint as ckpt
from lnfree import evaluate, remove, trainer
from lnfree import run as run_module
from lnfree.config import RunConfig
from tests.test_lnfree_cli import ENV, TRAIN

STEPS = 30
KILL_AT = 18  # the killed run's checkpoints: step-000010 and step-000015; metrics up to step 17


# ---------------------------------------------------------------------------------------------- helpers


def digest(*paths) -> dict[str, str]:
    """sha256 of every file under `paths` (and the names of folders, so that a new file shows)."""
    out = {}
    for root in map(Path, paths):
        if not root.exists():
            continue
        for p in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model or the data was loaded before the bad input was refused")


def cli(entry, args, capsys) -> tuple[int, str]:
    """Run a CLI's main() here: (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = entry([str(a) for a in args])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def assert_sentence(code: int, err: str, phrase: str, expect: int = 2) -> str:
    """Exit code `expect`, no traceback, and the last stderr line an error holding `phrase`."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert code == expect, err
    assert last.startswith("error: ") and phrase in last, last
    return last


def final_ce(out: Path) -> float:
    return json.loads((out / "run.json").read_text())["heldout_ce_final"]


def metric_steps(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "event" not in r]


@pytest.fixture(autouse=True)
def keep_threads():
    """main() sets --threads 1 for this whole process; give the other tests their threads back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_args(tiny_ln_dir, text_data):
    return ["--model", tiny_ln_dir, "--data", text_data, "--save-every", 5, *TRAIN]


def run_here(args) -> tuple[int, str]:
    """main() in this process, outside of a test's capsys (for module fixtures)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = remove.main([str(a) for a in args])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, run_args):
    """The uninterrupted run's final held-out CE."""
    out = tmp_path_factory.mktemp("runs") / "full"
    code, err = run_here([*run_args, "--output-dir", out])
    assert code == 0, err
    return final_ce(out)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, run_args):
    """A run stopped at once at step 18 (as by SIGKILL): checkpoints 10 and 15, metrics to step 17."""
    out = tmp_path_factory.mktemp("runs") / "killed"
    advance = run_module.Run.advance

    def dies(self, step):
        if step == KILL_AT:
            raise KeyboardInterrupt
        return advance(self, step)

    run_module.Run.advance = dies
    try:
        code, err = run_here([*run_args, "--output-dir", out])
    finally:
        run_module.Run.advance = advance
    assert code == 130 and "continue with" in err and "(from step-000015)" in err, err
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")] == ["step-000010", "step-000015"]
    return out


@pytest.fixture
def copy_of(killed, tmp_path):
    def make(name="run"):
        return Path(shutil.copytree(killed, tmp_path / name))
    return make


def resume_matches(out: Path, baseline: float, capsys, *extra) -> str:
    code, err = cli(remove.main, ["--output-dir", out, "--resume", "--threads", 1, *extra], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert final_ce(out) == pytest.approx(baseline, abs=1e-5)
    assert metric_steps(out) == list(range(1, STEPS + 1))
    return err


# ---------------------------------------------------------------------------------------------- flags


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.txt")
    return tmp / "pipe.txt"


def _file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("mine\n")
    return tmp / "a-file"


def _fifo_in_folder(tmp: Path) -> Path:
    (tmp / "texts").mkdir()
    (tmp / "texts" / "a.txt").write_text("fine text " * 50)
    os.mkfifo(tmp / "texts" / "b.txt")
    return tmp / "texts"


# (extra flags, phrase of the sentence); {tmp} is the test's folder, {out} a fresh output dir there.
REMOVE_CASES = {
    "grad-clip negative (gradient ascent)": (["--grad-clip", "-1"], "--grad-clip must be a positive number"),
    "grad-clip 0 (no learning)": (["--grad-clip", "0"], "--grad-clip must be a positive number"),
    "grad-clip nan": (["--grad-clip", "nan"], "--grad-clip"),
    "aux-lambda nan (aux loss off)": (["--aux-lambda", "nan"], "--aux-lambda must be 0"),
    "aux-lambda negative": (["--aux-lambda", "-0.1"], "--aux-lambda"),
    "warmup negative": (["--warmup", "-5"], "--warmup must be 0 or more"),
    "weight-decay negative": (["--weight-decay", "-1"], "--weight-decay must be 0 or a positive"),
    "weight-decay inf": (["--weight-decay", "inf"], "--weight-decay"),
    "lr 0": (["--lr", "0"], "--lr must be a positive number"),
    "lr inf": (["--lr", "inf"], "--lr must be a positive number"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "min-lr above lr": (["--min-lr", "1"], "--min-lr must lie between 0 and --lr"),
    "min-lr negative": (["--min-lr", "-1e-4"], "--min-lr"),
    "eval-tokens 0": (["--eval-tokens", "0"], "--eval-tokens must be at least 1"),
    "threads negative": (["--threads", "-1"], "--threads must be at least 1"),
    "num-processes 0": (["--num-processes", "0"], "--num-processes must be at least 1"),
    "n-ctx 1 (nothing to predict)": (["--n-ctx", "1"], "--n-ctx must be at least 2"),
    "n-ctx above the model's context": (["--n-ctx", "65"], "exceeds the model's context 64"),
    "micro-batch 0": (["--micro-batch", "0"], "--micro-batch must be at least 1"),
    "grad-accum negative": (["--grad-accum", "-2"], "--grad-accum must be at least 1"),
    "max-steps 0": (["--max-steps", "0"], "--max-steps must be at least 1"),
    "steps 0": (["--steps", "0"], "--steps must be at least 1"),
    "save-every negative": (["--save-every", "-1"], "--save-every must be 0"),
    "seed negative": (["--seed", "-1"], "--seed must lie in"),
    "seed too large": (["--seed", str(2**70)], "--seed must lie in"),
    "momentum 1": (["--momentum", "1"], "--momentum must be in [0, 1)"),
    "span-frac 1": (["--span-frac", "1"], "--span-frac must be in [0, 1)"),
    "embed-lr-scale negative": (["--embed-lr-scale", "-1"], "--embed-lr-scale"),
    "spike-factor below 1": (["--spike-factor", "0.5"], "--spike-factor must be at least 1"),
    "removal at step 1 (no statistics)": (["--ln2-start", "1"], "--ln2-start must be at least 2"),
    "removal at step 0": (["--lnf-step", "0"], "--lnf-step must be at least 2"),
    "negative removal gap": (["--qk-gap", "-1"], "--qk-gap must be 0 or more"),
    "removal after the last step": (["--max-steps", "400", "--steps", "300", "--lnf-step", "500"],
                                    "would be removed at or after the last step"),
    "not a number": (["--lr", "fast"], "invalid float value"),
    "int flag given a float": (["--warmup", "2.5"], "invalid int value"),
    "output dir is a file": (["--output-dir", "{tmp}/a-file"], "is a file; give a directory"),
    "output dir under a file": (["--output-dir", "{tmp}/a-file/run"], "lies under"),
    "output dir not writable": (["--output-dir", "/proc/lnfree-run"], "cannot write in /proc"),
    "output dir holds another run": (["--output-dir", "{tmp}/texts"], "already holds another run"),
    "data missing": (["--data", "{tmp}/missing.txt"], "does not exist"),
    "data is a named pipe": (["--data", "{tmp}/pipe.txt"], "is a named pipe, not a file or a folder"),
    "data is a device": (["--data", "/dev/zero"], "is a character device"),
    "data folder holds a named pipe": (["--data", "{tmp}/texts"], "b.txt' is a named pipe"),
    "data and dataset": (["--dataset", "demo"], "not allowed with"),
    "no model": (["--model", ""], "--model is required"),
    "tensorboard not installed": (["--log-with", "tensorboard"], "needs the tensorboard package"),
    "wandb online without a key": (["--log-with", "wandb"], "WANDB_MODE=online needs a W&B API key"),
    "resume without a run": (["--resume", "--output-dir", "{tmp}/texts"], "holds no run to resume"),
}


@pytest.mark.parametrize("case", REMOVE_CASES)
def test_remove_refuses_bad_flags_and_paths_before_loading(case, tmp_path, run_args, tiny_ln_dir, text_data,
                                                           capsys, monkeypatch):
    flags, phrase = REMOVE_CASES[case]
    if case == "tensorboard not installed":  # `make test` installs it (tests/test_trackers.py): hide it
        import accelerate.utils

        monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    if case == "wandb online without a key":  # without WANDB_MODE it logs offline (tests/test_trackers.py)
        monkeypatch.setenv("WANDB_MODE", "online")
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    _file(tmp_path)
    _fifo(tmp_path)
    _fifo_in_folder(tmp_path)
    out = tmp_path / "out"
    args = [*run_args, "--output-dir", out, *(f.format(tmp=tmp_path) for f in flags)]
    mine = [tiny_ln_dir, text_data, tmp_path / "a-file", tmp_path / "texts"]
    before = digest(*mine)
    monkeypatch.setattr(models, "load_hf", _must_not_load)  # refused before a model or the data loads
    monkeypatch.setattr(lnfree.data, "load_train_eval", _must_not_load)
    code, err = cli(remove.main, args, capsys)
    assert_sentence(code, err, phrase)
    assert len(err.strip().splitlines()) == 1, err
    assert digest(*mine) == before
    assert not out.exists()  # nothing written, not even the folder


EVALUATE_CASES = {
    "batch-size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "tokens 0": (["--tokens", "0"], "--tokens must be at least 1"),
    "n-ctx 1": (["--n-ctx", "1"], "--n-ctx must be at least 2"),
    "n-ctx above the model's context": (["--n-ctx", "100"], "exceeds the context of"),
    "threads 0": (["--threads", "0"], "--threads must be at least 1"),
    "json is a directory": (["--json", "{tmp}"], "is a directory; give a file name"),
    "json under a file": (["--json", "{tmp}/a-file/out.json"], "is a file"),
    "data is a named pipe": (["--data", "{tmp}/pipe.txt"], "is a named pipe"),
    "data missing": (["--data", "{tmp}/none.jsonl"], "does not exist"),
}


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_refuses_bad_flags_and_paths_before_loading(case, tmp_path, tiny_ln_dir, text_data, capsys):
    flags, phrase = EVALUATE_CASES[case]
    _file(tmp_path)
    _fifo(tmp_path)
    args = ["--models", tiny_ln_dir, "--data", text_data, *(f.format(tmp=tmp_path) for f in flags)]
    before = digest(tiny_ln_dir, text_data, tmp_path)
    code, err = cli(evaluate.main, args, capsys)
    assert_sentence(code, err, phrase)
    assert digest(tiny_ln_dir, text_data, tmp_path) == before


def test_a_named_pipe_as_data_never_blocks_the_real_cli(tmp_path, tiny_ln_dir):
    pipe = _fifo(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lnfree.remove", "--model", str(tiny_ln_dir), "--output-dir",
                           str(tmp_path / "out"), "--data", str(pipe), *TRAIN], env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert_sentence(proc.returncode, proc.stderr, "is a named pipe")


def test_unknown_model_gets_its_own_context_and_a_batch_that_fits(tmp_path, tiny_ln_dir, capsys):
    code, err = cli(remove.main, ["--model", tiny_ln_dir, "--output-dir", tmp_path / "o", "--dry-run"], capsys)
    assert code == 0, err
    assert "--n-ctx 64, 512 x 16 sequences per step (524,288 tokens; the gpt2 recipe has 524,288)" in err
    code, err = cli(remove.main, ["--model", tiny_ln_dir, "--output-dir", tmp_path / "o", "--dry-run",
                                  "--micro-batch", 8], capsys)
    assert code == 0 and "8 x 1024 sequences per step" in err, err


# ---------------------------------------------------------------------------------------------- resume


def test_resume_refuses_what_it_cannot_do(copy_of, capsys):
    out = copy_of()
    before = digest(out)
    for flags, phrase in ((["--seed", 3], "--seed 3 differs from the run's 1"),
                          (["--n-ctx", 16], "--n-ctx 16 differs from the run's 32"),
                          (["--keep-ln"], "--keep-ln was not set when the run started"),
                          (["--data", out / "run_config.json"], "--data"),
                          (["--max-steps", 12], "Checkpoint step-000015 is past the run's 12 steps"),
                          (["--lr", -1], "--lr must be a positive number"),
                          (["--threads", 0], "--threads must be at least 1")):
        code, err = cli(remove.main, ["--output-dir", out, "--resume", *flags], capsys)
        assert_sentence(code, err, phrase)
        assert len(err.strip().splitlines()) == 1, err
    assert digest(out) == before


def _edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


RUN_CONFIG_DAMAGE = {
    "empty": (lambda p: p.write_text(""), "it is empty"),
    "garbage": (lambda p: p.write_bytes(b"\x00\xffnot json"), "Cannot resume from"),
    "not an object": (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    "unknown key": (lambda p: _edit_json(p, colour="blue"), "unknown key 'colour'"),
    "missing key": (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                       if k != "max_steps"})), "lacks 'max_steps'"),
    "wrong type": (lambda p: _edit_json(p, max_steps="30"), "its 'max_steps' is '30'"),
    "value out of range": (lambda p: _edit_json(p, save_every=-3), "--save-every must be 0"),
    "bad recipe value": (lambda p: _edit_json(p, recipe={**json.loads(p.read_text())["recipe"], "lr": -1}),
                         "--lr must be a positive number"),
    "a folder": (lambda p: (p.unlink(), p.mkdir()), "Cannot resume from"),
}


@pytest.mark.parametrize("damage", RUN_CONFIG_DAMAGE)
def test_a_damaged_run_config_is_one_sentence(damage, copy_of, capsys):
    out = copy_of()
    hurt, phrase = RUN_CONFIG_DAMAGE[damage]
    hurt(out / "run_config.json")
    before = digest(out)
    code, err = cli(remove.main, ["--output-dir", out, "--resume"], capsys)
    assert_sentence(code, err, phrase)
    assert digest(out) == before  # the run is left as it was, for the user to repair


def _truncate(path: Path):
    os.truncate(path, path.stat().st_size // 2)


STEP15 = "checkpoints/step-000015"
CHECKPOINT_DAMAGE = {  # what happens to the newest checkpoint, and the note that says so
    "trainer_state empty": (lambda d: (d / STEP15 / ckpt.STATE_FILE).write_text(""),
                            "its trainer_state.json is empty or not JSON"),
    "trainer_state says step 400 of 30": (lambda d: _edit_json(d / STEP15 / ckpt.STATE_FILE, step=400),
                                          "its trainer_state.json says step 400, not 15"),
    "trainer_state without its fields": (lambda d: (d / STEP15 / ckpt.STATE_FILE).write_text('{"step": 15}'),
                                         "its trainer_state.json lacks the trainer's state"),
    "model.safetensors missing": (lambda d: (d / STEP15 / "model.safetensors").unlink(),
                                  "its model.safetensors is missing"),
    "model.safetensors truncated": (lambda d: _truncate(d / STEP15 / "model.safetensors"),
                                    "its model.safetensors is truncated"),
    "optimizer.bin truncated": (lambda d: _truncate(d / STEP15 / "optimizer.bin"),
                                "its optimizer.bin is truncated"),
    "optimizer.bin garbage": (lambda d: (d / STEP15 / "optimizer.bin").write_bytes(b"PK\x05\x06" + bytes(18)),
                              "it does not load ("),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_resume_falls_back_past_a_damaged_checkpoint(damage, copy_of, baseline, capsys):
    out = copy_of()
    hurt, phrase = CHECKPOINT_DAMAGE[damage]
    hurt(out)
    err = resume_matches(out, baseline, capsys)
    assert f"note: skipped step-000015: {phrase}" in err and "; moved it to " in err, err
    assert "resumed from step-000010" in err


def test_resume_tolerates_a_partial_metrics_line_and_a_stray_folder(copy_of, baseline, capsys):
    out = copy_of()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 18, "ce": 3.')  # a write cut short
    (out / "checkpoints" / "step-abc").mkdir()
    (out / "checkpoints" / "notes.txt").write_text("mine")
    err = resume_matches(out, baseline, capsys, "--keep-checkpoints")
    assert "dropped 1 unreadable line(s)" in err and "ignored" in err and "step-abc" in err, err
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"


def test_resume_applies_the_safe_flags_and_says_so(copy_of, capsys):
    out = copy_of()
    code, err = cli(remove.main, ["--output-dir", out, "--resume", "--lr", 3e-4, "--max-steps", 34,
                                  "--save-every", 4, "--auto-recover", "--threads", 1], capsys)
    assert code == 0, err
    assert ("note: resuming with --lr 0.0003 (was 0.0006), --min-lr 0.00015 (was 0.0003), --max-steps 34 "
            "(was 30), --save-every 4 (was 5), --auto-recover") in err
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["lr"] == 3e-4 and run["recipe"]["min_lr"] == pytest.approx(1.5e-4)
    assert run["steps"] == run["max_steps"] == 34
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[15]["lr"] == pytest.approx(rows[14]["lr"] / 2, rel=0.2)  # step 16 at about half the LR


def test_divergence_names_a_command_that_works(tmp_path, run_args, capsys, monkeypatch):
    out = tmp_path / "diverged"
    step_once = run_module.Run.train_step

    def nan_at_12(self, step):
        m = step_once(self, step)
        return {**m, "loss": float("nan")} if step == 12 else m

    monkeypatch.setattr(run_module.Run, "train_step", nan_at_12)
    code, err = cli(remove.main, [*run_args, "--output-dir", out], capsys)
    last = assert_sentence(code, err, "step 12: the loss became nan", expect=3)
    # The test hook lives in this process only: run_config.json holds the run's fields and nothing else.
    assert set(json.loads((out / "run_config.json").read_text())) == {f.name for f in fields(RunConfig)}
    monkeypatch.undo()
    command = shlex.split(last.split("`")[1])
    assert command[:3] == ["python", "-m", "lnfree.remove"] and "--lr" in command
    code, err = cli(remove.main, command[3:], capsys)
    assert code == 0, err
    assert "resumed from step-000010" in err and "--lr 0.0003 (was 0.0006)" in err
    assert json.loads((out / "run.json").read_text())["recipe"]["lr"] == 3e-4


# ---------------------------------------------------------------------------------------------- signals


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(tmp_path, run_args, baseline, capsys):
    out = tmp_path / "term"
    log = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "lnfree.remove", *map(str, run_args), "--output-dir", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000005" / ckpt.STATE_FILE).exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "--resume" in last, last
    step = int(last.split()[3].rstrip(";"))
    assert (out / "checkpoints" / f"step-{step:06d}" / ckpt.STATE_FILE).exists()
    assert metric_steps(out) == list(range(1, step + 1))
    err = resume_matches(out, baseline, capsys)
    assert f"resumed from step-{step:06d}" in err


def test_sigint_after_the_run_finished_does_not_ask_for_a_resume(tmp_path, run_args, capsys, monkeypatch):
    out = tmp_path / "done"
    remove_tree = trainer.remove_tree

    def interrupted_cleanup(path):  # the user presses Ctrl-C as the run deletes its checkpoints
        os.kill(os.getpid(), signal.SIGINT)
        remove_tree(path)

    monkeypatch.setattr(trainer, "remove_tree", interrupted_cleanup)
    code, err = cli(remove.main, [*run_args, "--output-dir", out, "--max-steps", 12], capsys)
    assert code == 0 and "--resume" not in err and "the run had finished" in err, err
    assert (out / "run.json").exists() and not (out / "checkpoints").exists()


def test_sigint_during_training_checkpoints_that_step(tmp_path, run_args, capsys, monkeypatch):
    out = tmp_path / "int"
    advance = run_module.Run.advance

    def ctrl_c_at_7(self, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return advance(self, step)

    monkeypatch.setattr(run_module.Run, "advance", ctrl_c_at_7)
    code, err = cli(remove.main, [*run_args, "--output-dir", out], capsys)
    assert code == 130 and "interrupted at step 7; checkpoint step-000007 is written" in err, err
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")] == ["step-000005", "step-000007"]


# ---------------------------------------------------------------------------------------------- disks


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped elsewhere) and a function that fills it up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def fill():
        with open(mnt / "filler", "ab") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as err:
                assert err.errno == errno.ENOSPC

    yield mnt, fill
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("where", ["metrics", "checkpoint", "export"])
def test_a_full_disk_is_one_sentence_and_loses_nothing(where, small_disk, run_args, baseline, capsys,
                                                       monkeypatch):
    mnt, fill = small_disk
    out = mnt / "run"
    if where == "metrics":  # the disk fills just before step 18's line
        append_line = trainer.append_line

        def append_on_a_full_disk(path, line):
            if line.startswith('{"step": 18,'):
                fill()
            append_line(path, line)

        monkeypatch.setattr(trainer, "append_line", append_on_a_full_disk)
    elif where == "checkpoint":  # ... just before checkpoint 10
        save = ckpt.save

        def save_on_a_full_disk(acc, root, step, state):
            if step == 10:
                fill()
            return save(acc, root, step, state)

        monkeypatch.setattr(ckpt, "save", save_on_a_full_disk)
    else:  # ... just before the export, with --save-every 0: the weights are only in memory
        export = trainer._export

        def export_on_a_full_disk(*args):
            fill()
            export(*args)

        monkeypatch.setattr(trainer, "_export", export_on_a_full_disk)
        run_args = [*run_args, "--save-every", 0]
    code, err = cli(remove.main, [*run_args, "--output-dir", out], capsys)
    last = assert_sentence(code, err, "could not write")
    assert "(No space left on device" in last or "MiB free on that disk" in last, last
    start = {"metrics": "step-000015", "checkpoint": "step-000005", "export": "step-000030"}[where]
    assert f"then continue with `python -m lnfree.remove --output-dir {out} --resume` (from {start})" in last
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / ".export-tmp").exists()
    monkeypatch.undo()
    (mnt / "filler").unlink()  # the user frees space
    err = resume_matches(out, baseline, capsys)
    assert f"resumed from {start}" in err


# ---------------------------------------------------------------------------------------------- trackers


def test_a_tracker_that_cannot_start_leaves_no_run_behind(tmp_path, run_args, capsys, monkeypatch):
    from accelerate import Accelerator

    def refuse(self, *a, **k):
        raise RuntimeError("no network")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(Accelerator, "init_trackers", refuse)
    out = tmp_path / "tracked"
    code, err = cli(remove.main, [*run_args, "--output-dir", out, "--log-with", "wandb"], capsys)
    assert_sentence(code, err, "--log-with wandb could not start (RuntimeError)")
    assert not (out / "run_config.json").exists()


# ---------------------------------------------------------------------------------------------- writes


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from lnfree import files

    target = tmp_path / "run.json"
    target.write_text("old\n")
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(files.WriteError, match=r"could not write .*run.json \(No space left on device\)"):
        files.write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_deletion_cut_short_leaves_nothing_under_the_old_name(tmp_path, monkeypatch):
    from lnfree import files

    doomed = tmp_path / "checkpoints"
    (doomed / "step-000010").mkdir(parents=True)
    (doomed / "step-000010" / "model.safetensors").write_bytes(b"x")

    def killed(path, ignore_errors=False):  # a kill once the deletion has started
        if Path(path).exists():
            raise KeyboardInterrupt

    monkeypatch.setattr(files.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        files.remove_tree(doomed)
    assert not doomed.exists() and (tmp_path / ".deleting-checkpoints").exists()
    monkeypatch.undo()
    files.remove_tree(doomed)  # nothing to do; a later deletion of the same name clears the leftover
