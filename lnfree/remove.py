"""Fine-tune LayerNorm out of a GPT-2: `python -m lnfree.remove --model gpt2 --output-dir runs/small`.

Replaces every LN by a FakeLayerNorm (ln_1 split into q/k and v paths), fine-tunes
with the recipe's schedule (lnfree.recipes) removing LNs one by one, and writes an
LN-free checkpoint in the paper's eps = 1e12 convention next to run.json,
metrics.jsonl and a model card.  `accelerate launch -m lnfree.remove ...` spreads
the run over several processes (DDP, or FSDP with --fsdp).

Every flag and path is checked before a model loads; SIGINT and SIGTERM stop at
the end of a step with a checkpoint; `--resume` continues, and may change the
settings in SAFE_ON_RESUME.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from lnfree import checkpoint as ckpt
from lnfree import signals, trackers
from lnfree.config import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_USER,
    RUN_CONFIG,
    Diverged,
    Interrupted,
    RunConfig,
    UserError,
    WriteError,
    check_config,
    flag,
    read_run_config,
)
from lnfree.data import DATASETS, check_source, dataset_arg
from lnfree.files import check_writable_dir
from lnfree.recipes import (
    MODEL_RECIPE,
    RECIPE_FIELDS,
    RECIPES,
    RELEASED_AT,
    Recipe,
    check_schedule,
    override,
    recipe_for_model,
    schedule,
)
from models.registry import Shape, hub_name, shape_of

# Defaults of a new run; None in the parser, so that --resume can tell what was given.
DEFAULTS = {"seed": 0, "save_every": 50, "eval_tokens": 262_144}
# What --resume may change (and --threads): none of it alters the data or the model being trained.
SAFE_ON_RESUME = ("lr", "min_lr", "max_steps", "save_every", "log_with", "auto_recover", "keep_checkpoints")
RUN_FLAGS = ("model", "data", "dataset", "seed", "max_steps", "stop_at", "save_every", "mixed_precision", "eval_tokens",
             "log_with", "keep_ln", "fsdp", "gradient_checkpointing", "auto_recover", "keep_checkpoints")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message, as one line
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER)


RECIPE_HELP = {
    "embed_lr_scale": "learning rate of the token and position embeddings as a multiple of --lr",
    "span_frac": "share of training chunks that are repeated random-token spans (keeps induction heads in use)",
    "spike_factor": "stop (or, with --auto-recover, roll back) when the grad norm exceeds this x its running level",
    "bos": "1: every training and held-out chunk starts with <|endoftext|> (0: packed, as the paper)",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m lnfree.remove", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="hub name (gpt2, gpt2-xl, ...; NAME@REVISION for a branch, tag or commit), "
                                   "local HF dir, or demo")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: the model's own")
    p.add_argument("--max-steps", type=int, help="shorter than the recipe: the schedule is compressed")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="end and export at this step of the schedule (default: the paper's release, 600 of 1200 "
                        "for gpt2-large and 800 for gpt2-xl, else the last step)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help=".txt file, folder of .txt, or .jsonl with a `text` field")
    src.add_argument("--dataset", type=dataset_arg, metavar="NAME|DIR",
                     help=f"{', '.join(DATASETS)}, or a local folder of a dataset in the hub's format (parquet "
                          f"files), streamed as the hub's")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: only at the end; default 50)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --output-dir (may change: {', '.join(map(flag, SAFE_ON_RESUME))}, "
                        f"--threads)")
    p.add_argument("--keep-ln", action="store_true", help="vanilla fine-tuning control (LNs stay)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and memory estimate, then exit")
    p.add_argument("--mixed-precision", choices=["no", "bf16"],
                   help="default bf16 on a GPU that has it (as the paper trains), else no (fp32)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (for gpt2-xl on several GPUs)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--auto-recover", action="store_true", help="on divergence roll back and halve the LR")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for CE (default 262144)")
    p.add_argument("--log-with", choices=["wandb", "tensorboard"], help="Accelerate tracker (off by default)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints after a finished run")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--num-processes", type=int, default=1,
                   help="for --dry-run only: the number of devices to plan for")
    rec = p.add_argument_group("recipe overrides (default: the recipe's value)")
    for name, kind in RECIPE_FIELDS.items():
        rec.add_argument(flag(name), type=kind, dest=f"r_{name}", metavar=name.upper(),
                         help=RECIPE_HELP.get(name))
    return p


# ---------------------------------------------------------------------------------------------- config


def config_from_args(args) -> RunConfig:
    """The run's configuration, every flag and path checked before anything heavy loads."""
    for name in ("threads", "num_processes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"{flag(name)} must be at least 1, not {value}.")
    out = Path(args.output_dir)
    cfg = resumed_config(args, out) if args.resume else new_config(args, out)
    trackers.check(cfg.log_with)
    return cfg


def given(args) -> dict:
    """The run settings on the command line, by RunConfig field (recipe fields and `recipe`: its name)."""
    values = {k: getattr(args, k) for k in RUN_FLAGS}
    values = {k: v for k, v in values.items() if v is not None and v is not False}
    if args.recipe:
        values["recipe"] = args.recipe
    values.update({k: getattr(args, f"r_{k}") for k in RECIPE_FIELDS if getattr(args, f"r_{k}") is not None})
    return values


def _same(key: str, new, old) -> bool:
    if key == "model" and new != old:  # one local directory written two ways
        return Path(new).expanduser().resolve() == Path(str(old)).expanduser().resolve()
    return new == old


def resumed_config(args, out: Path) -> RunConfig:
    if (out / "run.json").exists():
        raise UserError(f"The run in {out} is already finished; see {out / 'run.json'}.")
    if not (out / RUN_CONFIG).exists():
        raise UserError(f"{out} holds no run to resume (no {RUN_CONFIG}); start one without --resume.")
    cfg = read_run_config(out)
    saved = {**vars(cfg), **cfg.recipe, "recipe": cfg.recipe["name"]}
    changes = {k: v for k, v in given(args).items() if not _same(k, v, saved[k])}
    fixed = [k for k in changes if k not in SAFE_ON_RESUME]
    if fixed:
        k = fixed[0]
        differs = (f"{flag(k)} was not set when the run started" if changes[k] is True else
                   f"{flag(k)} {changes[k]} differs from the run's {saved[k]}")
        raise UserError(f"{differs}; --resume can change only {', '.join(map(flag, SAFE_ON_RESUME))} and "
                        f"--threads: drop {flag(k)}, or start a new run in another --output-dir.")
    if "lr" in changes and "min_lr" not in changes:  # the whole schedule moves with the LR
        changes["min_lr"] = cfg.recipe["min_lr"] * changes["lr"] / cfg.recipe["lr"]
    for k, v in changes.items():
        if k in cfg.recipe:
            cfg.recipe[k] = v
        else:
            setattr(cfg, k, v)
    check_config(cfg)
    newest = ckpt.checkpoints(out / "checkpoints")[-1:]
    if newest and ckpt.step_of(newest[0]) > cfg.max_steps:
        raise UserError(f"Checkpoint {newest[0].name} is past the run's {cfg.max_steps} steps; resume with "
                        f"--max-steps {ckpt.step_of(newest[0])} or more.")
    if not args.dry_run:
        check_writable_dir(out, "--output-dir")
    if changes:
        told = [_change(k, changes[k], saved[k]) for k in SAFE_ON_RESUME if k in changes]
        print(f"note: resuming with {', '.join(told)}", file=sys.stderr)
    return cfg


def _change(key: str, new, old) -> str:
    if new is True:
        return flag(key)
    show = (lambda v: f"{v:g}") if isinstance(new, float) else str
    return f"{flag(key)} {show(new)} (was {show(old)})"


def known_shape(spec: str) -> Shape | None:
    """shape_of, without opening a config.json that is not a regular file (a named pipe would block)."""
    config = Path(spec).expanduser() / "config.json"
    if os.path.lexists(config) and not config.is_file():
        return None
    return shape_of(spec)


def new_config(args, out: Path) -> RunConfig:
    if not args.model:
        raise UserError("--model is required (a hub name, a local model directory, or demo).")
    if not args.dry_run:
        check_writable_dir(out, "--output-dir")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} already holds another run; pass --resume to continue it or choose another "
                            f"--output-dir.")
    shape = known_shape(args.model)
    name, note = (args.recipe, None) if args.recipe else recipe_for_model(args.model, shape.n_layer if shape else None)
    values = {k: getattr(args, f"r_{k}") for k in RECIPE_FIELDS}
    recipe = override(RECIPES[name], **values)
    recipe, fitted = fit_to_model(recipe, args, shape)
    max_steps = args.max_steps if args.max_steps is not None else recipe.steps
    released = RELEASED_AT.get(name) if args.max_steps is None and args.stop_at is None else None
    stop_at = args.stop_at if args.stop_at is not None else released
    stop_at = None if stop_at == max_steps else stop_at  # the whole schedule: no early stop to record
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
    settings["mixed_precision"] = args.mixed_precision or default_precision()
    cfg = RunConfig(model=args.model, output_dir=str(out), recipe=recipe.as_dict(), max_steps=max_steps,
                    data=args.data, dataset=args.dataset, save_every=settings["save_every"], seed=settings["seed"],
                    keep_ln=args.keep_ln, mixed_precision=settings["mixed_precision"], fsdp=args.fsdp,
                    gradient_checkpointing=args.gradient_checkpointing, auto_recover=args.auto_recover,
                    eval_tokens=settings["eval_tokens"], log_with=args.log_with,
                    keep_checkpoints=args.keep_checkpoints, stop_at=stop_at)
    check_config(cfg)
    if released:
        print(f"note: stopping at step {released} of the {max_steps}-step schedule, as the paper's released "
              f"{name} checkpoint; --stop-at {max_steps} runs all of it", file=sys.stderr)
    check_against_model(cfg, shape)
    if cfg.data:
        check_source(cfg.data)
    for line in (note, fitted):
        if line:
            print(f"note: {line}", file=sys.stderr)
    return cfg


def check_against_model(cfg: RunConfig, shape: Shape | None) -> None:
    """The context and the removal schedule against the model's shape, when config.json tells it."""
    if shape is None:
        return
    r = cfg.recipe_obj
    if r.n_ctx > shape.n_ctx:
        raise UserError(f"--n-ctx {r.n_ctx} exceeds the model's context {shape.n_ctx}; lower --n-ctx.")
    problem = None if cfg.keep_ln else check_schedule(schedule(r, shape.n_layer, cfg.max_steps), cfg.last_step)
    if problem:
        raise UserError(problem)


def fit_to_model(recipe: Recipe, args, shape: Shape | None) -> tuple[Recipe, str | None]:
    """For a model the recipes do not know: --n-ctx defaults to the model's context, and the batch shape
    keeps the recipe's tokens per micro-batch and per step, micro-batches halved until one fits in memory.
    Returns the recipe and a note saying what was chosen (None when nothing changed)."""
    if (hub_name(args.model) in MODEL_RECIPE or shape is None or args.r_n_ctx is not None
            or shape.n_ctx == recipe.n_ctx):
        return recipe, None
    n_ctx, tokens = shape.n_ctx, RECIPES[recipe.name].tokens_per_step  # the named recipe's, before overrides
    micro = args.r_micro_batch or max(1, recipe.micro_batch * recipe.n_ctx // n_ctx)
    if args.r_micro_batch is None:
        micro = _fitting_micro_batch(shape, replace(recipe, n_ctx=n_ctx), micro, args)
    accum = args.r_grad_accum or max(1, tokens // (micro * n_ctx))
    fitted = replace(recipe, n_ctx=n_ctx, micro_batch=micro, grad_accum=accum)
    return fitted, (f"{args.model!r} has a context of {n_ctx} tokens: --n-ctx {n_ctx}, {micro} x {accum} sequences "
                    f"per step ({fitted.tokens_per_step:,} tokens; the {recipe.name} recipe has {tokens:,}); set "
                    f"--n-ctx, --micro-batch and --grad-accum to choose.")


def default_precision() -> str:
    """bf16 autocast where the GPU has bf16 (the paper trains in bf16), fp32 on a CPU."""
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _fitting_micro_batch(shape: Shape, recipe: Recipe, micro: int, args) -> int:
    import torch

    from lnfree.plan import estimate_memory
    from models.loading import available_bytes

    have = available_bytes("cuda" if torch.cuda.is_available() else "cpu")
    while micro > 1 and estimate_memory(shape, replace(recipe, micro_batch=micro),
                                        args.mixed_precision or default_precision(),
                                        1, args.fsdp, args.gradient_checkpointing).total > have:
        micro //= 2
    return micro


# ---------------------------------------------------------------------------------------------- dry run


def dry_run(cfg: RunConfig, world: int) -> str:
    from lnfree.plan import estimate_memory, format_plan
    from models import resolve

    r = cfg.recipe_obj
    shape = known_shape(cfg.model)
    if shape is None:
        resolve(cfg.model)  # an unknown spec says so
        raise UserError(f"The config.json of {cfg.model!r} cannot be read as a GPT-2 configuration.")
    sched = schedule(r, shape.n_layer, cfg.max_steps)
    mem = estimate_memory(shape, r, cfg.mixed_precision, world, cfg.fsdp, cfg.gradient_checkpointing)
    plan = format_plan(cfg.model, shape, r, cfg.max_steps, sched, mem, world, cfg.mixed_precision, cfg.fsdp,
                       cfg.gradient_checkpointing, cfg.keep_ln)
    if cfg.stop_at:
        plan += f"\nstops at step {cfg.stop_at} of {cfg.max_steps} ({cfg.stop_at * r.tokens_per_step / 1e6:,.1f}M tokens)"
    return plan


# ---------------------------------------------------------------------------------------------- main


def resume_command(out: Path) -> str:
    return f"`python -m lnfree.remove --output-dir {shlex.quote(str(out))} --resume`"


def where_to_continue(out: Path) -> str:
    """What to run after the run stopped early: resume from the newest checkpoint, or start again."""
    if not (out / RUN_CONFIG).exists():
        return "nothing was trained yet: run the command again"
    found = ckpt.checkpoints(out / "checkpoints")
    start = f"from {found[-1].name}" if found else "from the start"
    return f"continue with {resume_command(out)} ({start})"


def interrupted(out: Path) -> tuple[str, int]:
    """The message and exit code for a KeyboardInterrupt that stopped the run at once."""
    if (out / "run.json").exists():
        return f"interrupted after the run had finished; the model and run.json in {out} are complete", 0
    return f"interrupted; {where_to_continue(out)}", EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lnfree.data import DataError
    from models import ModelSpecError

    out = Path(args.output_dir)
    with signals.installed():
        try:
            cfg = config_from_args(args)
            if args.dry_run:
                print(dry_run(cfg, max(1, args.num_processes)))
                return 0
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            from lnfree.trainer import train

            train(cfg, resume=args.resume)
            return 0
        except WriteError as err:
            print(f"error: {err}; free disk space or fix the permissions, then {where_to_continue(out)}.",
                  file=sys.stderr)
            return EXIT_USER
        except (UserError, ModelSpecError, DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER
        except Diverged as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        except Interrupted as err:
            print(err, file=sys.stderr)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            message, code = interrupted(out)
            print(message, file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
