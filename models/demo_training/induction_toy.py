"""Which settings let induction heads form quickly?  A small attention-only transformer on repeated spans.

    python -m models.demo_training.induction_toy --vocab 64 --layer-norm --tied --embed-std 1 --final-ln-gain 0.004

A 2-layer attention-only transformer (d_model 256, 4 heads, learned positions),
optionally with GPT-2's LayerNorms and a tied unembedding (or, with --gpt2, the demo's
own architecture), trained with Adam on EOT + a random span of 5-25 tokens repeated to
fill 64 tokens.  Every 25 steps it prints the loss on the first and on the second copy
of two probe spans, 13 and 30 tokens long.  NOTES.md beside this file has the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lnfree.quality import induction_losses
from lnfree.spans import next_token_targets, repeated_spans

EOT = 0


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, layer_norm: bool, mlp: bool):
        super().__init__()
        self.n_heads = n_heads
        self.ln = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.LayerNorm(d) if layer_norm else nn.Identity(), nn.Linear(d, 4 * d),
                                 nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(z.transpose(1, 2).reshape(B, T, d))
        return x if self.mlp is None else x + self.mlp(x)


class Toy(nn.Module):
    """Attention layers (and optionally MLPs) over learned token and position embeddings."""

    def __init__(self, vocab: int, n_ctx: int, d: int = 256, n_heads: int = 4, n_layers: int = 2,
                 layer_norm: bool = False, tied: bool = False, embed_std: float = 0.02,
                 final_ln_gain: float = 1.0, mlp: bool = False):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, layer_norm, mlp) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.unembed = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)  # GPT-2's initialisation
        nn.init.normal_(self.embed.weight, std=embed_std)
        nn.init.normal_(self.pos.weight, std=embed_std)
        if tied:
            self.unembed.weight = self.embed.weight
        if layer_norm:
            nn.init.constant_(self.ln_f.weight, final_ln_gain)

    def forward(self, ids: torch.Tensor) -> CausalLMOutput:  # like transformers, so lnfree.quality measures it
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return CausalLMOutput(logits=self.unembed(self.ln_f(x)))


def demo_gpt2(vocab: int, n_ctx: int, embed_std: float, final_ln_gain: float, proj_std: float | None = None):
    """The demo's own architecture (pretrain.demo_config: 4 layers with MLPs, LayerNorm,
    tied unembedding) with the toy's embedding and final-LN initialisation."""
    from transformers import GPT2LMHeadModel

    from models.demo_training.pretrain import demo_config, init_demo

    model = GPT2LMHeadModel(demo_config(vocab, EOT, n_ctx))
    init_demo(model, embed_std, final_ln_gain)
    if proj_std is not None:  # transformers: 0.02 / sqrt(2 n_layer)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.normal_(std=proj_std)
    return model


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m models.demo_training.induction_toy", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--gpt2", action="store_true",
                    help="the demo's GPT-2 (4 layers, MLPs, LN, tied) instead of the toy; keeps --embed-std and "
                         "--final-ln-gain, ignores the other shape flags")
    ap.add_argument("--proj-std", type=float, default=None,
                    help="with --gpt2: initial std of every c_proj weight (transformers: 0.02 / sqrt(2 n_layer))")
    ap.add_argument("--init-from", default=None, metavar="SPEC",
                    help="start from a trained GPT-2 (e.g. demo) instead of a fresh model; --vocab must be its own")
    ap.add_argument("--span-vocab", type=int, default=None, help="draw spans from the first N tokens only")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layer-norm", action="store_true", help="GPT-2's pre-LNs and final LN")
    ap.add_argument("--mlp", action="store_true", help="GPT-2's MLP after each attention layer")
    ap.add_argument("--tied", action="store_true", help="unembedding = embedding (as in GPT-2)")
    ap.add_argument("--embed-std", type=float, default=0.02, help="initial std of token and position embeddings")
    ap.add_argument("--final-ln-gain", type=float, default=1.0, help="initial weight of the final LN")
    ap.add_argument("--freeze-embed", action="store_true", help="keep token and position embeddings at init")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--embed-lr-scale", type=float, default=1.0, help="learning rate of the token and position "
                    "embeddings (and so of a tied unembedding), as a multiple of --lr")
    ap.add_argument("--beta2", type=float, default=0.999, help="Adam's beta2 (the demo uses 0.95)")
    ap.add_argument("--repeats-only", action="store_true",
                    help="train only on the targets induction can predict (the first copy is random noise)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.init_from and args.gpt2:
        ap.error("--init-from and --gpt2 each choose the model; pass one")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.init_from:
        from models import load_hf

        model = load_hf(args.init_from)[0].train()
        if model.config.vocab_size != args.vocab or model.config.bos_token_id != EOT:
            ap.error(f"{args.init_from} has {model.config.vocab_size} tokens and EOT {model.config.bos_token_id}; "
                     f"pass --vocab {model.config.vocab_size} (the toy's EOT is {EOT})")
    elif args.gpt2:
        model = demo_gpt2(args.vocab, args.n_ctx, args.embed_std, args.final_ln_gain, args.proj_std)
    else:
        model = Toy(args.vocab, args.n_ctx, n_layers=args.layers, layer_norm=args.layer_norm, tied=args.tied,
                    embed_std=args.embed_std, final_ln_gain=args.final_ln_gain, mlp=args.mlp)
    embeds = [p for name, p in model.named_parameters() if name.split(".")[-2] in ("embed", "pos", "wte", "wpe")]
    if args.freeze_embed:
        for p in embeds:
            p.requires_grad_(False)
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not e for e in embeds)]
    groups = [{"params": rest}] + ([] if args.freeze_embed else [{"params": embeds, "lr": args.lr * args.embed_lr_scale}])
    opt = torch.optim.Adam(groups, lr=args.lr, betas=(0.9, args.beta2))
    span_vocab = args.span_vocab or args.vocab
    gen, start, log = torch.Generator().manual_seed(args.seed), time.time(), []
    print(f"uniform loss over the span tokens: {math.log(span_vocab - 1):.2f}", flush=True)
    for step in range(1, args.steps + 1):
        ids = repeated_spans(args.batch_size, args.n_ctx, span_vocab, EOT, gen, lengths=(5, 25))
        targets = next_token_targets(ids, repeats_only=args.repeats_only)
        loss = F.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps:
            row = {"step": step, "loss": round(loss.item(), 3), "seconds": round(time.time() - start, 1)}
            for length in (13, 30):
                ind = induction_losses(model, span_vocab, bos_id=EOT, n_seq=16, length=length, seed=1)
                row[f"first_{length}"], row[f"second_{length}"] = round(ind["first_copy"], 3), round(
                    ind["second_copy"], 3)
            log.append(row)
            print(json.dumps(row), flush=True)
    return log


if __name__ == "__main__":
    main()
