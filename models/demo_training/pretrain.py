"""Train the embedded demo model (`demo`) from scratch on the embedded corpus.

    python -m models.demo_training.pretrain --out /tmp/demo-packed
    python -m models.demo_training.pretrain --init-from /tmp/demo-packed --out models/demo \
        --induction-steps 0 --steps 1200 --bos --lr 5e-4 --min-lr 1e-4 --warmup 20 --autocast bfloat16

Trains a byte-level BPE tokenizer (8192 tokens, `<|endoftext|>` as EOT) on the train
split, then a 4-layer GPT-2 (d_model 256, 4 heads, n_ctx 256) with AdamW and a fixed
seed: first span-only steps on repeated random tokens (which form the induction heads),
then text with a share of span rows.  Writes a Hugging Face directory and
`training.json` (held-out CE, induction losses; with --init-from, the training.json of
the model it continued from under "init").  The shipped model is the two runs above
(42 + 31 min on 2 CPU cores, bfloat16 autocast on the text steps): the defaults, on
packed chunks, where the induction heads form, then BOS_STAGE, which continues that
model on chunks that start with `<|endoftext|>` (from the start, BOS chunks stop the
heads forming).  NOTES.md beside this file has the runs behind them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from lnfree.optim import adamw_groups
from lnfree.quality import induction_losses, token_losses
from lnfree.spans import next_token_targets, repeated_spans
from models.corpus import load_passages, pack
from models.registry import DEMO_DIRS

EOT = "<|endoftext|>"
DEMO_DIR = DEMO_DIRS["demo"]
# The shipped demo's second run (with --init-from the first's output): text chunks that start with EOT, as
# the app's prompts do, a quarter of each batch still repeated spans so that the induction heads stay.
# Every step is a text step, so "bfloat16" does what the default "text" would; training.json records it.
BOS_STAGE = ["--induction-steps", "0", "--steps", "1200", "--bos", "--lr", "5e-4", "--min-lr", "1e-4", "--warmup", "20",
             "--autocast", "bfloat16"]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, model_max_length=256
    )


def demo_config(vocab_size: int, eot_id: int, n_ctx: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_ctx, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True,
    )


def sinusoidal_positions(n_ctx: int, d_model: int, std: float) -> torch.Tensor:
    """Transformer sinusoids, [n_ctx, d_model], scaled so each entry has standard deviation `std`."""
    angle = torch.arange(n_ctx)[:, None] / 10000 ** (torch.arange(0, d_model, 2) / d_model)
    pe = torch.zeros(n_ctx, d_model)
    pe[:, 0::2], pe[:, 1::2] = angle.sin(), angle.cos()
    return pe * std * math.sqrt(2)  # sin and cos have variance 1/2


@torch.no_grad()
def init_demo(model: GPT2LMHeadModel, embed_std: float | None = None, final_ln_gain: float | None = None,
              sinusoidal: bool = False) -> None:
    """Re-initialise a fresh demo model's token and position embeddings (normal, `embed_std`), its final
    LN's gain, and optionally its positions as sinusoids; None keeps transformers' initialisation."""
    t = model.transformer
    if embed_std is not None:
        t.wte.weight.normal_(std=embed_std)
        t.wpe.weight.normal_(std=embed_std)
    if final_ln_gain is not None:  # ~1/d_model keeps the initial logits of large tied embeddings near 1 nat
        t.ln_f.weight.fill_(final_ln_gain)
    if sinusoidal:
        t.wpe.weight.copy_(sinusoidal_positions(t.wpe.num_embeddings, model.config.n_embd,
                                                embed_std or model.config.initializer_range))


def init_record(spec: str, path: Path) -> dict:
    """What a run continued from: the spec, its weights' sha256, and that model's own training.json (so a
    model trained in stages records every stage)."""
    import hashlib

    record = {"spec": spec, "weights_sha256": hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()}
    if (path / "training.json").is_file():
        record["training"] = json.loads((path / "training.json").read_text())
    return record


def parser() -> argparse.ArgumentParser:
    """The script's flags; their defaults reproduce the shipped model (its training.json records them)."""
    # No abbreviated flags: main() looks for the initialisation flags by their full names.
    ap = argparse.ArgumentParser(prog="python -m models.demo_training.pretrain", description="Train the embedded demo model.",
                                 allow_abbrev=False)
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", default=None, metavar="SPEC",
                    help="continue from this model's weights (e.g. demo) instead of a fresh initialisation")
    # Induction heads (NOTES.md): the defaults are the recipe that gives them.
    ap.add_argument("--embed-std", type=float, default=1.0,
                    help="initial std of the token and position embeddings (transformers' is 0.02)")
    ap.add_argument("--embed-lr-scale", type=float, default=10.0,
                    help="the embeddings' learning rate is this multiple of the schedule's (not of --induction-lr): "
                         "Adam moves each weight by ~lr a step, so std-1 embeddings need a larger one to learn text")
    ap.add_argument("--final-ln-gain", type=float, default=0.004,
                    help="initial weight of the final LayerNorm (transformers' is 1); ~1/d_model keeps the "
                         "initial logits of large tied embeddings near 1 nat")
    ap.add_argument("--sinusoidal-positions", action="store_true",
                    help="start the learned position embeddings as scaled sinusoids")
    ap.add_argument("--induction-steps", type=int, default=1500,
                    help="first steps on repeated random spans only, before the text steps")
    ap.add_argument("--induction-ctx", type=int, default=64, help="sequence length of those steps")
    ap.add_argument("--induction-lengths", type=int, nargs=2, default=[5, 25], metavar=("MIN", "MAX"),
                    help="span lengths of those steps")
    ap.add_argument("--induction-offsets", action="store_true",
                    help="those steps' rows start at a random position in [0, n_ctx - induction_ctx] (position_ids), "
                         "so every position embedding, not only the first induction_ctx, learns the copy; slower "
                         "to form the heads (NOTES.md)")
    ap.add_argument("--induction-lr", type=float, default=3e-3,
                    help="constant learning rate of those steps (default: they follow the cosine schedule, "
                         "which then covers every step)")
    ap.add_argument("--ramp-steps", type=int, default=0,
                    help="after the induction steps, text's share of the batch grows linearly over this many")
    ap.add_argument("--repeat-frac", type=float, default=0.25,
                    help="share of each later batch that is repeated random spans (n_ctx long)")
    ap.add_argument("--repeat-lengths", type=int, nargs=2, default=[5, 100], metavar=("MIN", "MAX"),
                    help="span lengths of those rows")
    ap.add_argument("--repeats-only", action=argparse.BooleanOptionalAction, default=True,
                    help="on span rows, train only on the targets induction can predict (the first copy is noise)")
    ap.add_argument("--bos", action=argparse.BooleanOptionalAction, default=False,
                    help="every text chunk (training and held-out) starts with <|endoftext|>, so position 0 is a "
                         "constant token as when GPT-2 is prompted (span rows always do); with the other "
                         "defaults the induction heads do not form (NOTES.md)")
    ap.add_argument("--autocast", choices=["off", "bfloat16", "text"], default="text",
                    help="bfloat16: the forward pass in bfloat16 autocast (weights, optimiser and every evaluation stay "
                         "float32), 1.7x faster a step on a 2-core CPU with AVX512-BF16; text (the default): on the text "
                         "steps only, so the span-only steps, whose outcome decides whether the heads form, are the "
                         "float32 ones that formed them (in bfloat16 the same seed forms weaker heads: NOTES.md)")
    ap.add_argument("--heldout-chunks", type=int, default=None, metavar="N",
                    help="evaluate on the first N held-out chunks only (default: all; training.json records the count)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    if args.init_from and given & {"--embed-std", "--final-ln-gain", "--sinusoidal-positions"}:
        ap.error("--init-from keeps the model's weights; drop --embed-std, --final-ln-gain and --sinusoidal-positions")

    torch.manual_seed(args.seed)
    start = time.time()
    train_texts, held_texts = load_passages("train"), load_passages("heldout")
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    train = pack(tokenizer(train_texts)["input_ids"], eot, args.n_ctx, bos=args.bos)
    held = pack(tokenizer(held_texts)["input_ids"], eot, args.n_ctx, bos=args.bos)[: args.heldout_chunks]
    print(f"tokenizer: {len(tokenizer)} tokens; train {train.numel():,} tokens, held-out {held.numel():,}")

    init = None
    if args.init_from:
        from models import load_hf

        model, _, info = load_hf(args.init_from)
        init = init_record(args.init_from, Path(info.path))
        if model.config.vocab_size != len(tokenizer) or model.config.n_positions != args.n_ctx:
            ap.error(f"{args.init_from} does not have this tokenizer's {len(tokenizer)} tokens and "
                     f"--n-ctx {args.n_ctx}")
    else:  # a fresh model with its initialisation (--init-from keeps the loaded weights)
        model = GPT2LMHeadModel(demo_config(len(tokenizer), eot, args.n_ctx))
        init_demo(model, args.embed_std, args.final_ln_gain, args.sinusoidal_positions)
    opt = torch.optim.AdamW(adamw_groups(model, args.lr, 0.1, args.embed_lr_scale), lr=args.lr, betas=(0.9, 0.95))
    total = args.induction_steps + args.steps
    scheduled = args.steps if args.induction_lr else total  # steps the cosine schedule covers
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, args.warmup, scheduled, min_lr=args.min_lr)
    gen = torch.Generator().manual_seed(args.seed)
    def n_text_at(step: int) -> int:  # text rows in the batch: 0 during induction steps, then a ramp
        ramp = min(1.0, (step - args.induction_steps) / max(1, args.ramp_steps))
        return round(args.batch_size * (1 - args.repeat_frac) * ramp)

    order, cursor, seen, text_seen, induction_log = torch.randperm(len(train), generator=gen), 0, 0, 0, []
    model.train()
    for step in range(1, total + 1):
        in_induction = step <= args.induction_steps
        positions = None  # transformers' default: 0..n-1
        if in_induction:
            n_text = 0
            ids = repeated_spans(args.batch_size, args.induction_ctx, len(tokenizer), eot, gen,
                                 lengths=tuple(args.induction_lengths))
            if args.induction_offsets:
                first = torch.randint(0, args.n_ctx - args.induction_ctx + 1, (len(ids), 1), generator=gen)
                positions = first + torch.arange(args.induction_ctx)
        else:
            n_text = n_text_at(step)
            if cursor + n_text > len(order):
                order, cursor = torch.randperm(len(train), generator=gen), 0
            ids = torch.cat([train[order[cursor : cursor + n_text]],
                             repeated_spans(args.batch_size - n_text, args.n_ctx, len(tokenizer), eot, gen,
                                            lengths=tuple(args.repeat_lengths))])
            cursor += n_text
            text_seen += n_text * args.n_ctx
        if args.induction_lr:  # constant during the span steps; the schedule's own value after them
            for group, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
                group["lr"] = args.induction_lr if in_induction else lr
        targets = next_token_targets(ids, n_text, args.repeats_only)
        bf16 = args.autocast == "bfloat16" or (args.autocast == "text" and not in_induction)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, position_ids=positions).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not (args.induction_lr and in_induction):
            sched.step()
        seen += ids.numel()
        if step % 20 == 0 or step == 1:
            rate = seen / (time.time() - start)
            print(f"step {step}/{total} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{rate:,.0f} tok/s", flush=True)
        if step % 50 == 0:
            model.eval()
            ind = induction_losses(model, len(tokenizer), bos_id=eot, n_seq=16)
            short = induction_losses(model, len(tokenizer), bos_id=eot, n_seq=16, length=20)
            model.train()
            induction_log.append({"step": step, **ind, "length_20": short})
            print(f"step {step} induction: first copy {ind['first_copy']:.2f}, "
                  f"second copy {ind['second_copy']:.2f} (20-token spans: {short['first_copy']:.2f}, "
                  f"{short['second_copy']:.2f})", flush=True)

    model.eval()
    held_ce = token_losses(model, held).mean().item()
    induction = induction_losses(model, len(tokenizer), bos_id=eot)
    report = {
        "config": {k: getattr(model.config, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
        "train_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokens_seen": seen,
        "text_tokens_seen": text_seen,
        "train_tokens": train.numel(),
        "heldout_tokens": held.numel(),
        "heldout_ce": held_ce,
        "uniform_ce": math.log(len(tokenizer)),
        "induction": induction,
        "induction_during_training": induction_log,  # 16 sequences each, every 50 steps
        "wall_seconds": round(time.time() - start, 1),
    }
    if init is not None:
        report["init"] = init
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
