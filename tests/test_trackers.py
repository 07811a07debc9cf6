"""`lnfree.remove --log-with tensorboard` for real: the event files it writes hold every logged number of
metrics.jsonl (the tracker extra, `.[track]`, is installed by `make test`)."""

from __future__ import annotations

import json

import pytest

from tests.test_lnfree_cli import TRAIN, remove

pytest.importorskip("tensorboard", reason="the tracker extra (pip install -e '.[track]') is not installed")


def test_tensorboard_event_files_hold_the_run_metrics(tiny_ln_dir, text_data, tmp_path):
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
