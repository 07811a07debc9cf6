"""Atomic training checkpoints: Accelerate's state (safetensors model) plus our trainer state as JSON.

A checkpoint is written into `.tmp-step-N` and renamed to `step-N` only when
complete, so a SIGKILL at any moment leaves either the previous checkpoint or
the new one.  The LR scheduler is stored in the JSON (Accelerate would pickle it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

KEEP = 2
STATE_FILE = "trainer_state.json"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def scheduler_state(scheduler) -> dict:
    state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return json.loads(json.dumps(state, default=float))


def load_scheduler_state(scheduler, state: dict) -> None:
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def save(accelerator, root: Path, step: int, trainer_state: dict) -> Path:
    """Write checkpoint `step` atomically (all processes call this); prune to the last KEEP."""
    tmp, final = root / f".tmp-step-{step:06d}", root / f"step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoints(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> dict:
    """Restore model, optimizer and RNG states from `path`; returns the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
