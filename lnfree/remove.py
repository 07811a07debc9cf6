"""Fine-tune LayerNorm out of a GPT-2: `python -m lnfree.remove --model gpt2 --output-dir runs/small`.

Replaces every LN by a FakeLayerNorm (ln_1 split into q/k and v paths), fine-tunes
with the recipe's schedule (lnfree.recipes) removing LNs one by one, and writes an
LN-free checkpoint in the paper's eps = 1e12 convention next to run.json,
metrics.jsonl and a model card.  `accelerate launch -m lnfree.remove ...` spreads
the run over several processes (DDP, or FSDP with --fsdp).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lnfree.config import EXIT_DIVERGED, EXIT_USER, RUN_CONFIG, Diverged, RunConfig, UserError
from lnfree.data import DATASETS
from lnfree.recipes import RECIPE_FIELDS, RECIPES, override, recipe_for_model, schedule
from models.registry import shape_of


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message, as one line
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER)


RECIPE_HELP = {
    "embed_lr_scale": "learning rate of the token and position embeddings as a multiple of --lr",
    "span_frac": "share of training chunks that are repeated random-token spans (keeps induction heads in use)",
    "spike_factor": "stop (or, with --auto-recover, roll back) when the grad norm exceeds this x its running level",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m lnfree.remove", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="hub name (gpt2, gpt2-xl, ...), local HF dir, or demo")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: the model's own")
    p.add_argument("--max-steps", type=int, help="shorter than the recipe: the schedule is compressed")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help=".txt file, folder of .txt, or .jsonl with a `text` field")
    src.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.add_argument("--keep-ln", action="store_true", help="vanilla fine-tuning control (LNs stay)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and memory estimate, then exit")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (for gpt2-xl on several GPUs)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--auto-recover", action="store_true", help="on divergence roll back and halve the LR")
    p.add_argument("--eval-tokens", type=int, default=262_144, help="held-out tokens for CE")
    p.add_argument("--log-with", choices=["wandb", "tensorboard"], help="Accelerate tracker (off by default)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints after a finished run")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--num-processes", type=int, default=1,
                   help="for --dry-run only: the number of devices to plan for")
    rec = p.add_argument_group("recipe overrides (default: the recipe's value)")
    for name, kind in RECIPE_FIELDS.items():
        rec.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=f"r_{name}", metavar=name.upper(),
                         help=RECIPE_HELP.get(name))
    return p


def config_from_args(args) -> RunConfig:
    out = Path(args.output_dir)
    saved = out / RUN_CONFIG
    if args.resume and (out / "run.json").exists():
        raise UserError(f"The run in {out} is already finished; see {out / 'run.json'}.")
    if args.resume and saved.exists():
        cfg = RunConfig(**older_run_config(json.loads(saved.read_text())))
        cfg.output_dir = str(out)
        return cfg
    if not args.model:
        raise UserError("--model is required (a hub name, a local model directory, or demo).")
    if not args.dry_run and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds another run; pass --resume to continue it or choose another "
                        f"--output-dir.")
    shape = shape_of(args.model)
    name, note = (args.recipe, None) if args.recipe else recipe_for_model(args.model, shape.n_layer if shape else None)
    values = {k: getattr(args, f"r_{k}") for k in RECIPE_FIELDS}
    try:
        recipe = override(RECIPES[name], **values)
    except TypeError as err:
        raise UserError(f"Bad recipe override: {err}.") from None
    max_steps = args.max_steps if args.max_steps is not None else recipe.steps
    cfg = RunConfig(model=args.model, output_dir=str(out), recipe=recipe.as_dict(), max_steps=max_steps,
                    data=args.data, dataset=args.dataset, seed=args.seed, save_every=args.save_every,
                    keep_ln=args.keep_ln, mixed_precision=args.mixed_precision, fsdp=args.fsdp,
                    gradient_checkpointing=args.gradient_checkpointing, auto_recover=args.auto_recover,
                    eval_tokens=args.eval_tokens, log_with=args.log_with, keep_checkpoints=args.keep_checkpoints)
    validate(cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return cfg


def older_run_config(saved: dict) -> dict:
    """A run_config.json written by an earlier version, in today's form, so that a killed run resumes."""
    if "spike_factor" in saved:  # before the spike factor became a recipe field
        saved["recipe"]["spike_factor"] = saved.pop("spike_factor")
    saved.pop("debug_nan_step", None)  # a test hook, no longer a field
    saved["recipe"].pop("release_step", None)  # unused, removed
    return saved


def validate(cfg: RunConfig) -> None:
    r = cfg.recipe_obj
    if cfg.max_steps < 1:
        raise UserError("--max-steps must be at least 1.")
    if cfg.save_every < 0:
        raise UserError("--save-every must be 0 (never) or positive.")
    for name in ("micro_batch", "grad_accum", "n_ctx"):
        if getattr(r, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
    if not (0 <= r.min_lr <= r.lr):
        raise UserError("--min-lr must lie between 0 and --lr.")
    if not (0 <= r.momentum < 1):
        raise UserError("--momentum must lie in [0, 1).")
    if not (0 <= r.span_frac < 1):
        raise UserError("--span-frac must lie in [0, 1).")
    if cfg.data and not Path(cfg.data).exists():
        raise UserError(f"Data path {cfg.data!r} does not exist.")


# ---------------------------------------------------------------------------------------------- dry run


def dry_run(cfg: RunConfig, world: int) -> str:
    from lnfree.plan import estimate_memory, format_plan
    from models.registry import HUB_MODELS, Shape

    r = cfg.recipe_obj
    if cfg.model in HUB_MODELS:  # known shape: no download for a plan
        shape = HUB_MODELS[cfg.model]
    else:
        from models import resolve
        from models.loading import read_config

        shape = Shape.from_config(read_config(resolve(cfg.model), cfg.model))
    sched = schedule(r, shape.n_layer, cfg.max_steps)
    mem = estimate_memory(shape, r, cfg.mixed_precision, world, cfg.fsdp, cfg.gradient_checkpointing)
    return format_plan(cfg.model, shape, r, cfg.max_steps, sched, mem, world, cfg.mixed_precision, cfg.fsdp,
                       cfg.gradient_checkpointing, cfg.keep_ln)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lnfree.data import DataError
    from models import ModelSpecError

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
    except (UserError, ModelSpecError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
