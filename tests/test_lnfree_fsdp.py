"""`lnfree.remove --fsdp` over 2 CPU processes (gloo): the same run as one process, resumable, exportable.

Accelerate 1.x turns a FSDP plugin on only for accelerator devices; on CPU processes it silently runs DDP.
The launcher below builds lnfree's own plugin (`lnfree.run.fsdp_plugin`, FSDP2) and then sets Accelerate's
state to FSDP itself, so that everything after it (sharded prepare, training, the gathered sigma statistics,
sharded checkpoints, the gathered export) is the code a GPU run takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from lnfree import checkpoint as ckpt
from tests.test_lnfree_cli import ENV, TRAIN, remove

FSDP_ON_CPU = """
import sys
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from lnfree import run

def on_cpu(cfg):
    assert cfg.fsdp and not torch.cuda.is_available()
    plugin = run.fsdp_plugin()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, fsdp_plugin=plugin, log_with=cfg.log_with,
                      project_dir=cfg.output_dir, cpu=True)
    assert acc.distributed_type == DistributedType.MULTI_CPU and acc.num_processes == 2
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    assert acc.is_fsdp2
    return acc

run._accelerator = on_cpu
from lnfree.remove import main
sys.exit(main(sys.argv[1:]))
"""
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
STEPS = 12


@pytest.fixture(scope="module")
def fsdp_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "fsdp_on_cpu.py"
    path.write_text(FSDP_ON_CPU)
    return path


def args(tiny_ln_dir, text_data, out, *more):
    return ["--model", tiny_ln_dir, "--data", text_data, "--output-dir", out, *TRAIN, "--max-steps", STEPS,
            *more]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, all at once (as a machine's crash would)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def fsdp_cmd(script, *argv):
    return [*LAUNCH, str(script), *map(str, argv)]


def test_fsdp_over_two_processes_matches_one_process_and_resumes(tmp_path, tiny_ln_dir, text_data, fsdp_script):
    remove(*args(tiny_ln_dir, text_data, tmp_path / "one", "--save-every", 0))
    proc = subprocess.run(fsdp_cmd(fsdp_script, *args(tiny_ln_dir, text_data, tmp_path / "fsdp", "--save-every", 0,
                                                      "--fsdp")),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, [x for x in proc.stderr.splitlines() if x.startswith('error')]
    a = json.loads((tmp_path / "one" / "run.json").read_text())
    b = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert (a["processes"], b["processes"], b["fsdp"]) == (1, 2, True)
    assert abs(a["heldout_ce_final"] - b["heldout_ce_final"]) < 1e-4
    assert b["sigmas"] == pytest.approx(a["sigmas"], rel=1e-5)
    ra = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ce"] for r in rb] == pytest.approx([r["ce"] for r in ra], abs=1e-4)

    # The export, gathered from the shards, loads in plain transformers and is the one-process model's.
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = (GPT2LMHeadModel.from_pretrained(tmp_path / d).eval()(ids).logits for d in ("one", "fsdp"))
    assert torch.isfinite(lb).all() and (la - lb).abs().max() < 1e-3

    # Killed at its first sharded checkpoint (step 3), it resumes (under FSDP again) to the same run.
    out = tmp_path / "killed"
    killed = subprocess.Popen(fsdp_cmd(fsdp_script, *args(tiny_ln_dir, text_data, out, "--save-every", 3, "--fsdp")),
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list((out / "checkpoints").glob("step-*/trainer_state.json")) and time.time() < deadline:
        assert killed.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    kill_tree(killed.pid)  # the launcher and both workers (torch's elastic agent gives them sessions of their own)
    killed.wait()
    assert not (out / "run.json").exists()
    # A damaged sharded checkpoint is named as such (resume then falls back to an earlier one, or refuses).
    step3 = out / "checkpoints" / "step-000003"
    assert (step3 / ckpt.FSDP_MODEL / ".metadata").is_file() and ckpt.problem(step3) is None
    bad = Path(shutil.copytree(step3, tmp_path / "bad" / "step-000003"))
    shard = bad / ckpt.FSDP_MODEL / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert ckpt.problem(bad) == f"its shard {ckpt.FSDP_MODEL}/__1_0.distcp is missing or truncated"
    (bad / ckpt.FSDP_OPTIMIZER / ".metadata").unlink()
    (bad / ckpt.FSDP_MODEL / "__1_0.distcp").unlink()
    assert "missing" in ckpt.problem(bad)
    proc = subprocess.run(fsdp_cmd(fsdp_script, "--output-dir", out, "--resume", "--threads", 1),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, [x for x in proc.stderr.splitlines() if x.startswith('error')]
    c = json.loads((out / "run.json").read_text())
    assert c["steps"] == STEPS and c["tokens_seen"] == b["tokens_seen"]
    assert abs(c["heldout_ce_final"] - b["heldout_ce_final"]) < 1e-4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ce" in r] == list(range(1, STEPS + 1))
