"""`lnfree.remove --log-with tensorboard | wandb` for real: what each tracker writes holds every logged number
of metrics.jsonl (the tracker extra, `.[track]`, is installed by `make test`)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from tests.test_lnfree_cli import ENV, TRAIN, remove

EXTRA = "the tracker extra (pip install -e '.[track]') is not installed"


def test_tensorboard_event_files_hold_the_run_metrics(tiny_ln_dir, text_data, tmp_path):
    pytest.importorskip("tensorboard", reason=EXTRA)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    remove("--model", tiny_ln_dir, "--data", text_data, "--output-dir", out, *TRAIN, "--max-steps", "6",
           "--log-with", "tensorboard")
    logs = out / "lnfree"  # Accelerate's project_dir / the tracker's project name (hparams in a sub-folder)
    assert list(logs.glob("events.out.tfevents.*")), f"no event file in {logs}"
    acc = EventAccumulator(str(logs))
    acc.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("ce", "loss", "grad_norm", "lr"):
        logged = {e.step: e.value for e in acc.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6), key


def wandb_records(path):
    """The records of a W&B run file (.wandb): a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB-log records (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each a
    protobuf `Record`. Written out here because wandb no longer ships a reader in Python."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = path.read_bytes(), 32768
    assert raw[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, part, records = 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        part += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            records.append(rec)
            part = b""
    return records


def test_wandb_without_a_key_logs_offline_and_says_how_to_sync(tiny_ln_dir, text_data, tmp_path):
    pytest.importorskip("wandb", reason=EXTRA)
    out = tmp_path / "run"
    (tmp_path / "netrc").write_text("")
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "netrc"), HOME=str(tmp_path), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "lnfree.remove", "--model", str(tiny_ln_dir), "--data",
                           str(text_data), "--output-dir", str(out), *map(str, TRAIN), "--max-steps", "6",
                           "--log-with", "wandb"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert f"note: upload the W&B run with `wandb sync {runs[0]}`" in proc.stderr
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[rec.history.step.num] = items
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for rec in records if rec.WhichOneof("record_type") == "config"
              for i in rec.config.update}
    assert config["lr"] == pytest.approx(6e-4) and config["micro_batch"] == 4  # the recipe
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        for key in ("ce", "loss", "grad_norm", "lr"):
            assert history[r["step"]][key] == pytest.approx(r[key], rel=1e-6), key
    assert not (tmp_path / "wandb").exists() and os.path.isdir(out / "wandb")  # beside the run, not in the cwd
