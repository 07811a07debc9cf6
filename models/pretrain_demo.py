"""Train the embedded demo model (`demo`) from scratch on the embedded corpus.

    python -m models.pretrain_demo [--out models/demo]

Trains a byte-level BPE tokenizer (8192 tokens, `<|endoftext|>` as EOT) on the
train split, then a 4-layer GPT-2 (d_model 256, 4 heads, n_ctx 256) with AdamW,
with a fixed seed.  Writes a Hugging Face directory (safetensors + tokenizer.json)
and `training.json` with held-out cross-entropy and induction losses (and a
16-sequence probe every 50 steps).  The defaults reproduce the shipped model (73 min
on 2 CPU cores), a recipe that gives this architecture induction heads:

1. 1,500 steps of repeated random spans only (EOT + a span of 5-25 tokens over the
   whole vocabulary, repeated to fill 64 tokens), constant lr 3e-3, trained only on the
   targets induction can predict (`--repeats-only`).  The embeddings (token and
   position) start at std 1 and the final LN's gain at 0.004 instead of transformers'
   0.02 and 1.
2. 1,000 text steps (cosine 1e-3 -> 1e-4), with 8 of the 32 rows repeated spans of
   5-100 tokens, the embeddings at 10x the scheduled lr (Adam moves each weight by ~lr
   a step, so std-1 embeddings take ~50x longer than std-0.02 ones to take on the
   text's structure).
Result: held-out CE 4.738; second copy 2.95 vs first 11.51 (64 x 50 tokens; 0.47 vs
11.47 on 20-token spans): real induction heads.  Without step 2's embedding lr (and with
800 text steps) held-out CE was 5.61 (second copy 6.37 vs 11.86).  The model shipped
before (text only, 800 steps, transformers' initialisation) reached 4.253 but had no
induction (12.35 -> 12.27).

Its LN-free twin (`lnfree.remove`'s `demo` recipe) needed three changes from the
paper's schedule, found on this model:
- Removing blocks.1's ln_1 v path blows the residual up ~1000x for a step (in the model
  before fine-tuning, with the LNs before it removed, the mean std at the ln_f input goes
  from 25 to ~18,000; early positions, whose attention averages few tokens, have 2-4x
  the typical std).  With the paper's gaps (v paths 3 steps apart, ln_f at step 48) the
  run diverges; 20 steps between v paths and a lax spike check let clipping and the aux
  loss repair each blow-up within ~5 steps.
- Trained on text alone, the twin loses the induction heads (9.62 -> 8.09, against
  10.93 -> 3.53 for the vanilla control): a quarter of the removal chunks are repeated
  random spans (`--span-frac 0.25`), which keeps them (9.53 -> 2.93).
- The embeddings train at 10x the lr, as here.
Even so LN-free minus vanilla is +0.153 held-out CE (goal +0.05): most of it at the
first positions of each 256-token chunk (README).  Variants that did not narrow it, all
300 steps on an earlier form of the span data (a .jsonl of the corpus plus documents of
decoded repeated spans, embeddings at 1x; LN-free minus vanilla +0.130 there): the aux
loss averaged over every LN's input instead of ln_f's only (+0.128), aux lambda 1.0
(+0.133), position 0 and EOT left out of the aux loss (+0.130), no aux loss (+0.144).

Continuing from that earlier text-only model instead (`--init-from`; 800 span-only steps
of 5-25-token spans at lr 1e-3, then 150 text steps at 3e-4 -> 1e-4; 17 min): induction
only begins (9.80 -> 8.95 at 50 tokens, 10.19 -> 7.79 at 20) and the span-only steps cost
the text: held-out CE 5.38, which 150 text steps do not win back.

Why induction takes all that (16 x 50-token probes unless said; uniform is 9.01):
- With transformers' initialisation there were none: from text only (the model shipped before),
  from spans continuing from the text-trained weights, from spans mixed into the text
  from step 0, or from span-only curricula with sinusoidal position embeddings, in up
  to 1,450 steps.  Spans of one fixed length (50) did drop the second copy to 3.5, but
  that vanished within 50 steps of other lengths: a positional shortcut ("copy the
  token 49 back") that a fixed-length probe cannot tell from induction.  Train on
  varied lengths and probe at more than one.
- `python -m models.induction_toy` (its docstring has the runs) found three obstacles:
  LayerNorm with GPT-2's 0.02 embedding initialisation (fixed by the initialisation
  above), the 8,192-token output vocabulary (the toy needs ~2,400 span steps at 8,192
  tokens against ~100 at 64), and, in this deeper architecture with MLPs, training on
  the first copy of each span: it is random, and its gradient is noise on embeddings
  that each appear ~0.25 times per batch.  With the first copy in the loss this
  architecture stayed at 9.0 on both copies for 2,675 span steps; with `--repeats-only`
  it forms the heads in stage 1 above.
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

from models.corpus import load_passages, next_token_targets, pack, repeated_spans
from models.param_groups import adamw_groups
from models.quality import induction_losses, token_losses

EOT = "<|endoftext|>"
DEMO_DIR = Path(__file__).parent / "demo"


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


def parser() -> argparse.ArgumentParser:
    """The script's flags; their defaults reproduce the shipped model (its training.json records them)."""
    # No abbreviated flags: main() looks for the initialisation flags by their full names.
    ap = argparse.ArgumentParser(prog="python -m models.pretrain_demo", description="Train the embedded demo model.",
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
    # Induction heads (see the docstring): the defaults are the recipe that gives them.
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
    train = pack(tokenizer(train_texts)["input_ids"], eot, args.n_ctx)
    held = pack(tokenizer(held_texts)["input_ids"], eot, args.n_ctx)
    print(f"tokenizer: {len(tokenizer)} tokens; train {train.numel():,} tokens, held-out {held.numel():,}")

    if args.init_from:
        from models import load_hf

        model = load_hf(args.init_from)[0]
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
        if in_induction:
            n_text = 0
            ids = repeated_spans(args.batch_size, args.induction_ctx, len(tokenizer), eot, gen,
                                 lengths=tuple(args.induction_lengths))
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
        logits = model(ids).logits
        targets = next_token_targets(ids, n_text, args.repeats_only)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
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
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
