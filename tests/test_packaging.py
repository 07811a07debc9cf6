"""Packaging: the wheel builds with no setuptools warning and carries the demo pair and its corpus."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS_WARNINGS = re.compile(r"BuildBackendWarning|SetuptoolsDeprecationWarning|SetuptoolsWarning|"
                                 r"is absent from the `packages`")


def test_wheel_builds_without_setuptools_warnings(tmp_path):
    src = tmp_path / "src"  # a copy: an in-place build would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert not SETUPTOOLS_WARNINGS.search(log), [ln for ln in log.splitlines() if SETUPTOOLS_WARNINGS.search(ln)]
    (wheel,) = tmp_path.glob("lnfree_workbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("models/data/corpus.jsonl.xz", "models/demo/model.safetensors", "models/demo-lnfree/model.safetensors",
              "models/demo-lnfree/tokenizer.json", "models/demo_training/NOTES.md", "attribution/findings/cli.py"):
        assert f in names
    meta = next(n for n in names if n.endswith("METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(meta).decode()
