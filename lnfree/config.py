"""Run configuration and the two error types the CLI turns into one-line messages.

A module of its own so that `python -m lnfree.remove` (imported as __main__) and
the trainer share the same classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lnfree.recipes import Recipe

EXIT_USER, EXIT_DIVERGED = 2, 3
RUN_CONFIG = "run_config.json"
MAX_RECOVERIES = 3


class UserError(ValueError):
    """A mistake the user can fix; printed as one line, exit code 2."""


class Diverged(RuntimeError):
    """Training became unstable; printed as one line, exit code 3."""


@dataclass(kw_only=True)
class RunConfig:
    model: str
    output_dir: str
    recipe: dict  # Recipe fields after overrides
    max_steps: int
    data: str | None = None
    dataset: str | None = None
    seed: int = 0
    save_every: int = 50
    keep_ln: bool = False
    mixed_precision: str = "no"
    fsdp: bool = False
    gradient_checkpointing: bool = False
    auto_recover: bool = False
    eval_tokens: int = 262_144
    log_with: str | None = None
    keep_checkpoints: bool = False

    @property
    def recipe_obj(self) -> Recipe:
        return Recipe(**self.recipe)

    @property
    def source(self) -> str:
        if self.data:
            return self.data
        if self.dataset:
            return self.dataset
        from models.registry import is_demo

        return "demo" if is_demo(self.model) else "openwebtext"


def save_run_config(cfg: RunConfig) -> None:
    """The configuration `--resume` reads back (removed once the run has finished)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(asdict(cfg), indent=1) + "\n")
