"""Cross-entropy of several models on identical tokens, in the paper's Table-1 layout.

Each model is also given repeated random tokens (64 sequences, 50 tokens twice, or
fewer where the context is shorter): its loss on the second copy far below the
first means it has induction heads, a circuit LN removal should keep.  CE is also
given by position in the chunk (0, 1-3, 4-15, 16-63, 64-...): a short context puts
more weight on the first positions, whose residual stream LN removal fits worst.
How often each model's most likely next token agrees with the first model's measures
how closely a twin follows its base.

    python -m lnfree.evaluate --models demo demo-lnfree [--data PATH | --dataset NAME|DIR] [--tokens N] [--json OUT]

Default data: the demo held-out split when every model is a demo model (or was
fine-tuned from one), else OpenWebText's validation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lnfree.config import EXIT_USER, UserError
from lnfree.data import DATASETS, DataError, check_source, dataset_arg, documents, tokenize_chunks
from lnfree.files import check_output_file, write_atomic, writing
from lnfree.quality import induction_losses, token_losses
from lnfree.remove import OneLineParser
from models import ModelSpecError, load_hf
from models.registry import demo_name, shape_of


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m lnfree.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, metavar="SPEC")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help=".txt file, folder of .txt, or .jsonl with a `text` field")
    src.add_argument("--dataset", type=dataset_arg, metavar="NAME|DIR",
                     help=f"{', '.join(DATASETS)}, or a local folder of a dataset in the hub's format (parquet "
                          f"files), streamed as the hub's")
    p.add_argument("--tokens", type=int, default=262_144, help="tokens to evaluate on (default 262144)")
    p.add_argument("--n-ctx", type=int, help="context length (default: the smallest model context, max 1024)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every chunk with <|endoftext|> (as lnfree.remove --bos 1); default: on the demo "
                        "corpus, on which the demo models were trained so, else off (packed, as the paper)")
    p.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    p.add_argument("--threads", type=int)
    return p


POSITION_BUCKETS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, None))  # target positions, [start, end)


def by_position(losses: torch.Tensor) -> dict[str, float]:
    """Mean loss [N, T] over the targets whose input token sits at each bucket's positions."""
    out = {}
    for a, b in POSITION_BUCKETS:
        if a < losses.shape[1]:
            label = f"{a}" if b == a + 1 else f"{a}-{b - 1}" if b else f"{a}-"
            out[label] = losses[:, a:b].mean().item()
    return out


def default_source(infos) -> str:
    demo = all(demo_name(i.spec) or demo_name(i.base) for i in infos)
    return "demo" if demo else "openwebtext"


def evaluate(specs: list[str], source: str | None, tokens: int, n_ctx: int | None = None,
             batch_size: int = 8, bos: bool | None = None) -> dict:
    loaded = [load_hf(s) for s in specs]
    tok = loaded[0][1]
    for (_, t, info) in loaded[1:]:
        if t.get_vocab() != tok.get_vocab():
            raise ModelSpecError(f"{info.spec!r} uses a different tokenizer from {specs[0]!r}; compare models "
                                 f"that share one tokenizer.")
    source = source or default_source([i for _, _, i in loaded])
    bos = source == "demo" if bos is None else bos
    shortest = min(m.config.n_positions for m, _, _ in loaded)
    if n_ctx and n_ctx > shortest:
        raise UserError(f"--n-ctx {n_ctx} exceeds the context of the models ({shortest} tokens); lower --n-ctx.")
    ctx = n_ctx or min(shortest, 1024)
    chunks = tokenize_chunks(documents(source, "heldout"), tok, ctx, tokens, desc=f"tokenising {source}", bos=bos)
    if len(chunks) == 0:
        raise DataError("The evaluation text is shorter than one context window; give more text.")
    rows, first_top1 = [], None
    for (model, _, info) in loaded:
        per_position, top1 = token_losses(model, chunks, batch_size, top1=True)
        first_top1 = top1 if first_top1 is None else first_top1
        losses = per_position.flatten()
        length = min(50, (model.config.n_positions - 1) // 2)
        induction = induction_losses(model, len(tok), bos_id=tok.bos_token_id, length=length)
        rows.append({"spec": info.spec, "ln_free": info.ln_free, "ce_mean": losses.mean().item(),
                     "ce_median": losses.median().item(), "tokens": int(losses.numel()),
                     "induction_first": induction["first_copy"], "induction_second": induction["second_copy"],
                     "induction_length": length, "ce_by_position": by_position(per_position),
                     "top1_agreement": (top1 == first_top1).float().mean().item()})
    return {"data": source, "n_ctx": ctx, "bos": bos, "models": rows}


def format_table(result: dict) -> str:
    rows = result["models"]
    best_mean = min(r["ce_mean"] for r in rows)
    best_med = min(r["ce_median"] for r in rows)
    w = max(12, *(len(r["spec"]) for r in rows))
    lines = [f"{'model':<{w}}  {'LN-free':<7}  {'CE mean':<18}  {'CE median':<18}  induction 1st -> 2nd copy",
             f"{'-' * w}  {'-' * 7}  {'-' * 18}  {'-' * 18}  {'-' * 25}"]
    for r in rows:
        mean = f"{r['ce_mean']:.4f} (+{r['ce_mean'] - best_mean:.4f})"
        med = f"{r['ce_median']:.4f} (+{r['ce_median'] - best_med:.4f})"
        ind = f"{r['induction_first']:.2f} -> {r['induction_second']:.2f}"
        lines.append(f"{r['spec']:<{w}}  {'yes' if r['ln_free'] else 'no':<7}  {mean:<18}  {med:<18}  {ind}")
    lines.append(f"{rows[0]['tokens']:,} tokens of {result['data']} per model, context {result['n_ctx']}, "
                 f"{'each chunk starting with <|endoftext|>' if result['bos'] else 'packed chunks (no BOS)'}; "
                 f"(+gap) to the best model; induction: mean loss on the first and second copy of "
                 f"repeated random tokens")
    buckets = list(rows[0]["ce_by_position"])
    lines += ["", f"{'CE by position':<{w}}  " + "  ".join(f"{b:>7}" for b in buckets)]
    lines += [f"{r['spec']:<{w}}  " + "  ".join(f"{r['ce_by_position'][b]:7.3f}" for b in buckets) for r in rows]
    lines += ["", f"top-1 next token agrees with {rows[0]['spec']}'s: "
              + ", ".join(f"{r['spec']} {r['top1_agreement']:.1%}" for r in rows[1:])] if len(rows) > 1 else []
    return "\n".join(lines)


def check_args(args) -> None:
    """Every flag in range and every path usable, before a model loads."""
    for name, value, least in (("--tokens", args.tokens, 1), ("--n-ctx", args.n_ctx, 2),
                               ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise UserError(f"{name} must be at least {least}, not {value}.")
    if args.data:
        check_source(args.data)
    if args.json_out:
        check_output_file(Path(args.json_out), "--json")
    if args.n_ctx:
        for spec in args.models:
            shape = shape_of(spec)
            if shape and args.n_ctx > shape.n_ctx:
                raise UserError(f"--n-ctx {args.n_ctx} exceeds the context of {spec!r} ({shape.n_ctx} tokens); "
                                f"lower --n-ctx.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        result = evaluate(args.models, args.data or args.dataset, args.tokens, args.n_ctx, args.batch_size,
                          args.bos)
        print(format_table(result))
        if args.json_out:
            out = Path(args.json_out)
            with writing(out.parent):
                out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, json.dumps(result, indent=1) + "\n")
    except (UserError, ModelSpecError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER
    return 0


if __name__ == "__main__":
    sys.exit(main())
