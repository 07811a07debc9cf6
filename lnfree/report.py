"""run.json, the model card README.md and the final summary table of a removal run."""

from __future__ import annotations

import platform
import statistics

import torch
import transformers

PAPER_CE = {  # OpenWebText validation CE: original / vanilla fine-tune / LN-free
    "gpt2": (3.1006, 3.0126, 3.0797), "gpt2-medium": (2.8145, 2.7390, 2.7642),
    "gpt2-large": (2.6623, 2.6240, 2.6384), "gpt2-xl": (2.5567, 2.4799, 2.5052),
}


def base_fingerprint(spec: str) -> str | None:
    """sha256 of the base model's weights, so that a twin can be checked against its base later."""
    import hashlib

    from models import resolve

    try:
        files = sorted(resolve(spec).glob("*.safetensors"))
    except ValueError:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                h.update(block)
    return h.hexdigest() if files else None


def build_run_json(cfg, run, initial_ce, final_ce, export_diff, sigmas, info, wall) -> dict:
    last = run.train_ces[-10:]
    return {
        "base": cfg.model,
        "base_sha256": base_fingerprint(cfg.model),
        "kind": "vanilla" if cfg.keep_ln else "ln-free",
        "ln_free": bool(info.ln_free),
        "recipe": cfg.recipe,
        "max_steps": cfg.max_steps,
        "stop_at": cfg.stop_at,
        "schedule": {} if cfg.keep_ln else run.sched,
        "data": cfg.source,
        "seed": cfg.seed,
        "steps": run.step,
        "tokens_seen": run.tokens,
        "train_ce_final": statistics.fmean(last) if last else None,
        "heldout_ce_initial": initial_ce,
        "heldout_ce_final": final_ce,
        "heldout_tokens": int(run.held[:, 1:].numel()),
        "sigmas": sigmas,
        "exported_sigmas": info.sigmas,
        "export_max_logit_diff": export_diff,
        "recoveries": run.recoveries,
        "lr_scale": run.lr_scale,
        "processes": run.world,
        "mixed_precision": cfg.mixed_precision,
        "fsdp": cfg.fsdp,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "wall_seconds": round(wall, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def summary_table(s: dict) -> str:
    rows = [("base", s["base"]), ("kind", s["kind"]), ("steps", s["steps"]),
            ("tokens seen", f"{s['tokens_seen']:,}"),
            ("held-out CE before", _f(s["heldout_ce_initial"])), ("held-out CE after", _f(s["heldout_ce_final"])),
            ("train CE (last 10 steps)", _f(s["train_ce_final"])),
            ("export max |logit diff|", f"{s['export_max_logit_diff']:.2e}"),
            ("wall time", f"{s['wall_seconds']:.0f} s")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def model_card(s: dict) -> str:
    r = s["recipe"]
    kind = "LayerNorm-free" if s["kind"] == "ln-free" else "vanilla fine-tuned (LayerNorm kept)"
    paper = "\n".join(f"| {m} | {o:.4f} | {v:.4f} | {f:.4f} |" for m, (o, v, f) in PAPER_CE.items())
    frac = r.get("span_frac", 0)  # recipes written before span_frac have no such key
    spans = f" ({frac:.0%} of the chunks repeated random-token spans)" if frac else ""
    spans += ", every chunk starting with <|endoftext|>" if r.get("bos") else ""
    scale = r.get("embed_lr_scale", 1)
    embed = f", embeddings at {scale:g}x the LR" if scale != 1 else ""
    return f"""# {kind} twin of `{s['base']}`

Written by `python -m lnfree.remove` (arXiv 2507.02559's method). A plain
`transformers.GPT2LMHeadModel` checkpoint{' in the paper convention: `layer_norm_epsilon = 1e12`, every LN weight = gamma * 1e6 / sigma (`lnfree_sigmas` in config.json)' if s['kind'] == 'ln-free' else ''}; `lnfree_base` names the base model.

| | held-out CE (nats/token) |
|---|---|
| `{s['base']}` before fine-tuning | {_f(s['heldout_ce_initial'])} |
| this model | {_f(s['heldout_ce_final'])} |

Held-out data: `{s['data']}` ({s['heldout_tokens']:,} predicted tokens). Training: {s['steps']} steps,
{s['tokens_seen']:,} tokens{spans}, recipe `{r['name']}` (LR {r['lr']:g} -> {r['min_lr']:g}, warmup {r['warmup']},
aux lambda {r['aux_lambda']:g}{embed}, {r['micro_batch']} x {r['grad_accum']} sequences of {r['n_ctx']} tokens per step),
seed {s['seed']}, {s['wall_seconds']:.0f} s wall time on {s['processes']} process(es).
Export check: max |logit difference| to the trained model {s['export_max_logit_diff']:.2e}.

The paper's GPT-2 numbers (OpenWebText validation CE) for comparison:

| model | original | vanilla fine-tune | LN-free |
|---|---|---|---|
{paper}

See `run.json` for every value used and `metrics.jsonl` for the per-step log.
"""


def twin_card(run: dict, control: dict | None, evaluation: dict | None, commands: list[str],
              notes: list[str] | None = None) -> str:
    """The model card of an LN-free twin with the three-way comparison (original / vanilla / LN-free)."""
    card = model_card(run)
    if evaluation:
        rows = evaluation["models"]
        best = min(r["ce_mean"] for r in rows)
        table = "\n".join(f"| `{r['spec']}` | {'yes' if r['ln_free'] else 'no'} | {r['ce_mean']:.4f} "
                          f"(+{r['ce_mean'] - best:.4f}) | {r['ce_median']:.4f} | "
                          f"{r['induction_first']:.2f} -> {r['induction_second']:.2f} |" for r in rows)
        lengths = " / ".join(sorted({str(r["induction_length"]) for r in rows}, key=int))
        card += f"""
## Three-way comparison (`python -m lnfree.evaluate`, {rows[0]['tokens']:,} tokens of {evaluation['data']})

| model | LN-free | CE mean (gap to best) | CE median | induction: 1st -> 2nd copy |
|---|---|---|---|---|
{table}

Induction: mean loss on the first and the second copy of 64 repeated random-token
sequences ({lengths} tokens each); a second copy far below the first means induction heads.
"""
    if control:
        gap = run["heldout_ce_final"] - control["heldout_ce_final"]
        card += f"""
Vanilla control (same data, schedule and seed, LayerNorm kept; not shipped): held-out CE
{control['heldout_ce_final']:.4f}; LN-free minus vanilla: {gap:+.4f} (goal: at most +0.05; the paper: +0.025
to +0.067 on OpenWebText). Wall time: LN-free {run['wall_seconds']:.0f} s, vanilla {control['wall_seconds']:.0f} s.
"""
    for note in notes or []:
        card += f"\n{note}\n"
    if commands:
        card += "\n## Commands\n\n```\n" + "\n".join(commands) + "\n```\n"
    return card


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description="Rewrite a run's README.md with the vanilla control and an evaluation.")
    ap.add_argument("run_dir")
    ap.add_argument("--control", help="the --keep-ln run's output dir")
    ap.add_argument("--eval", help="JSON written by `lnfree.evaluate --json`")
    ap.add_argument("--command", action="append", default=[], help="a command to list (repeatable)")
    ap.add_argument("--note", action="append", default=[], help="a paragraph to add (repeatable)")
    args = ap.parse_args(argv)
    read = lambda p: json.loads(Path(p).read_text()) if p else None  # noqa: E731
    run_dir = Path(args.run_dir)
    control = read(Path(args.control) / "run.json") if args.control else None
    from lnfree.files import write_atomic

    write_atomic(run_dir / "README.md", twin_card(read(run_dir / "run.json"), control, read(args.eval),
                                                  args.command, args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
