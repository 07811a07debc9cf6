"""Run configuration, its checks, and the error types the CLI turns into one-line messages.

A module of its own so that `python -m lnfree.remove` (imported as __main__) and
the trainer share the same classes.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from lnfree.recipes import RECIPE_FIELDS, Recipe

EXIT_USER, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
RUN_CONFIG = "run_config.json"
MAX_RECOVERIES = 3
MAX_SEED = 2**32  # TrainData multiplies the seed; torch generators take 64 bits


class UserError(ValueError):
    """A mistake the user can fix; printed as one line, exit code 2."""


class WriteError(UserError):
    """A run's file could not be written (disk full, no permission); the message names it and why."""


class Diverged(RuntimeError):
    """Training became unstable; printed as one line, exit code 3."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after a checkpoint; exit code 130."""


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
    stop_at: int | None = None  # end (and export) at this step of the max_steps schedule; None: at max_steps

    @property
    def last_step(self) -> int:
        """The step the run ends at: stop_at, else max_steps (the LR and removal schedules span max_steps)."""
        return self.stop_at or self.max_steps

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
    from lnfree.files import write_atomic, writing

    out = Path(cfg.output_dir)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_CONFIG, json.dumps(asdict(cfg), indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- checks

_RULES = {  # recipe field -> (test, what the value must be); NaN fails every test
    "steps": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: 0 < v < math.inf, "a positive number"),
    "warmup": (lambda v: v >= 0, "0 or more steps"),
    "aux_lambda": (lambda v: 0 <= v < math.inf, "0 (no aux loss) or a positive number"),
    "micro_batch": (lambda v: v >= 1, "at least 1"),
    "grad_accum": (lambda v: v >= 1, "at least 1"),
    "n_ctx": (lambda v: v >= 2, "at least 2 (a token and the next one to predict)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or a positive number"),
    "grad_clip": (lambda v: v > 0, "a positive number (inf: no clipping)"),
    "embed_lr_scale": (lambda v: 0 <= v < math.inf, "0 (frozen embeddings) or a positive number"),
    "span_frac": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "spike_factor": (lambda v: v >= 1, "at least 1 (inf: no spike check)"),
    "bos": (lambda v: v in (0, 1), "0 (packed chunks, as the paper) or 1 (every chunk starts with EOT)"),
    # A removed LN freezes the sigma it has measured, so it needs one step of statistics first.
    **{k: (lambda v: v >= 2, "at least 2 (an LN needs one step of statistics before it goes)")
       for k in ("ln2_start", "qk_start", "v_start", "lnf_step")},
    **{k: (lambda v: v >= 0, "0 or more steps") for k in ("ln2_gap", "qk_gap", "v_gap")},
}
assert set(_RULES) | {"min_lr"} == set(RECIPE_FIELDS), "every recipe field has a range check"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_recipe(r: Recipe) -> None:
    for name, (ok, what) in _RULES.items():
        value = getattr(r, name)
        if not ok(value):
            raise UserError(f"{flag(name)} must be {what}, not {value}.")
    if not (0 <= r.min_lr <= r.lr):
        raise UserError(f"--min-lr must lie between 0 and --lr ({r.lr:g}), not {r.min_lr}.")


def check_config(cfg: RunConfig) -> None:
    """Every value of a run in range (new runs, resumed ones and a hand-edited run_config.json)."""
    check_recipe(cfg.recipe_obj)
    if cfg.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, not {cfg.max_steps}.")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.max_steps:
        raise UserError(f"--stop-at must lie in 1..{cfg.max_steps} (the schedule's steps), not {cfg.stop_at}.")
    if cfg.save_every < 0:
        raise UserError(f"--save-every must be 0 (never) or positive, not {cfg.save_every}.")
    if cfg.eval_tokens < 1:
        raise UserError(f"--eval-tokens must be at least 1, not {cfg.eval_tokens}.")
    if not 0 <= cfg.seed < MAX_SEED:
        raise UserError(f"--seed must lie in [0, {MAX_SEED}), not {cfg.seed}.")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise UserError(f"--mixed-precision must be no or bf16, not {cfg.mixed_precision!r}.")
    if cfg.log_with not in (None, "wandb", "tensorboard"):
        raise UserError(f"--log-with must be wandb or tensorboard, not {cfg.log_with!r}.")


# ---------------------------------------------------------------------------------------------- reading


def older_run_config(saved: dict) -> dict:
    """A run_config.json written by an earlier version, in today's form, so that a killed run resumes."""
    if "spike_factor" in saved:  # before the spike factor became a recipe field
        saved["recipe"]["spike_factor"] = saved.pop("spike_factor")
    saved.pop("debug_nan_step", None)  # a test hook, no longer a field
    saved["recipe"].pop("release_step", None)  # unused, removed
    return saved


def _type_ok(value, kind) -> bool:
    """isinstance for the annotations RunConfig and Recipe use (bool is not an int here)."""
    kinds = typing.get_args(kind) or (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _check_keys(values: dict, cls, kinds: dict, where: str) -> None:
    """The keys of a saved dataclass: none unknown, none required missing, each of the right type."""
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ValueError(f"it has an unknown key {unknown[0]!r}{where}")
    required = {f.name for f in fields(cls) if f.default is MISSING}
    missing = sorted(required & set(kinds) - set(values))
    if missing:
        raise ValueError(f"it lacks {missing[0]!r}{where}")
    for key, value in values.items():
        if not _type_ok(value, kinds[key]):
            raise ValueError(f"its {key!r}{where} is {value!r}")


def read_run_config(out: Path) -> RunConfig:
    """The saved configuration of the run in `out`, checked: garbage, an unknown key, a wrong type or a
    value out of range is one sentence (a run cannot resume from a configuration it cannot trust)."""
    path = Path(out) / RUN_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError("it is empty")
        saved = json.loads(text)
        if not isinstance(saved, dict) or not isinstance(saved.get("recipe"), dict):
            raise ValueError("it is not a JSON object with a recipe")
        saved = older_run_config(saved)
        _check_keys(saved, RunConfig, typing.get_type_hints(RunConfig), "")
        _check_keys(saved["recipe"], Recipe, {"name": str, **RECIPE_FIELDS}, " in its recipe")
        cfg = RunConfig(**saved)
        check_config(cfg)
    except json.JSONDecodeError:
        raise UserError(f"Cannot resume from {path}: it is not valid JSON; restore the file, or start the "
                        f"run again in another --output-dir.") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) else str(err).rstrip(".")
        raise UserError(f"Cannot resume from {path}: {why}; restore the file, or start the run again in "
                        f"another --output-dir.") from None
    cfg.output_dir = str(out)
    return cfg
