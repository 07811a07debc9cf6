"""Atomic training checkpoints: Accelerate's state (safetensors model) plus our trainer state as JSON.

A checkpoint is written into `.tmp-step-N` and renamed to `step-N` only when
complete, so a SIGKILL at any moment leaves either the previous checkpoint or
the new one.  The LR scheduler is stored in the JSON (Accelerate would pickle it).
A checkpoint damaged afterwards (a truncated copy, a deleted file) is recognised
by `problem`, so that a resume can fall back to the one before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from lnfree.files import remove_tree, writing

KEEP = 2
STATE_FILE = "trainer_state.json"
FSDP_MODEL, FSDP_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"  # Accelerate's sharded state folders
STATE_KEYS = ("step", "tokens", "lr_scale", "recoveries", "gnorm_level", "scheduler", "train_ces")
NAME = re.compile(r"step-(\d+)")


def step_of(path: Path) -> int:
    return int(NAME.fullmatch(path.name).group(1))


def checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under root (named step-N, with a trainer state), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if NAME.fullmatch(p.name) and (p / STATE_FILE).exists()]
    return sorted(done, key=step_of)


def strays(root: Path) -> list[Path]:
    """Entries under root that are not checkpoints (nor our temporary or set-aside ones)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not NAME.fullmatch(p.name) and not p.name.startswith((".", "skipped-")))


def _safetensors_complete(path: Path) -> bool:
    """The file is as long as its header says (a truncated copy is not)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, MemoryError):
            return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return os.path.getsize(path) == 8 + n + max(ends, default=0)


def _sharded_problem(folder: Path) -> str | None:
    """Why a torch.distributed.checkpoint folder is incomplete: its .metadata (written last, by the first
    process) is missing or unreadable, or a shard it lists is missing or shorter than the metadata says."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception:  # a missing, empty or truncated pickle: whatever it raises, the folder is unusable
        return f"its {folder.name}/.metadata is missing or truncated"
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        f = folder / name
        if not f.is_file() or f.stat().st_size < end:
            return f"its shard {folder.name}/{name} is missing or truncated"
    return None


def problem(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be resumed from, in words; None when it looks complete."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {STATE_FILE} is empty or not JSON"
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        return f"its {STATE_FILE} lacks the trainer's state"
    if state["step"] != step_of(path):
        return f"its {STATE_FILE} says step {state['step']!r}, not {step_of(path)}"
    if (path / FSDP_MODEL).exists():  # a sharded (FSDP) checkpoint: torch.distributed.checkpoint folders
        return next(filter(None, (_sharded_problem(path / d) for d in (FSDP_MODEL, FSDP_OPTIMIZER))), None)
    model, opt = path / "model.safetensors", path / "optimizer.bin"
    for f in (model, opt):
        if not f.is_file():
            return f"its {f.name} is missing"
    if not _safetensors_complete(model):
        return "its model.safetensors is truncated"
    if not zipfile.is_zipfile(opt):  # torch.save writes a zip whose directory comes last
        return "its optimizer.bin is truncated"
    return None


def scheduler_state(scheduler) -> dict:
    state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return json.loads(json.dumps(state, default=float))


def load_scheduler_state(scheduler, state: dict) -> None:
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def save(accelerator, root: Path, step: int, trainer_state: dict) -> Path:
    """Write checkpoint `step` atomically (all processes call this); prune to the last KEEP.

    A failed write (full disk) removes its temporary directory, to give the space back, and raises
    WriteError: the previous checkpoints are untouched.
    """
    tmp, final = root / f".tmp-step-{step:06d}", root / f"step-{step:06d}"
    try:
        with writing(final, f"checkpoint {final}"):
            if accelerator.is_main_process:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp), safe_serialization=True)
            # save_state returns on each process once its own files are written (its RNG state, under FSDP
            # its shards): the rename waits for every process's.
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with open(tmp / STATE_FILE, "w") as f:
                    json.dump(trainer_state, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                remove_tree(final)
                os.rename(tmp, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in checkpoints(root)[:-KEEP]:
            remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> dict:
    """Restore model, optimizer and RNG states from `path`; returns the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
