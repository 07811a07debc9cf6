"""AdamW parameter groups for GPT-2 training (LN removal and the demo's pretraining share them)."""

from __future__ import annotations


def adamw_groups(model, lr: float, weight_decay: float, embed_lr_scale: float = 1.0) -> list[dict]:
    """Matrices with weight decay, vectors (biases, LN gains) without, and the embeddings (wte, tied to
    lm_head, and wpe) with weight decay at lr x embed_lr_scale: Adam moves each weight by ~lr a step
    whatever its scale, so large embeddings can need a larger lr.  Each group records its `lr_mult`."""
    t = model.transformer
    embed = {id(t.wte.weight), id(t.wpe.weight)}
    params = list(model.parameters())
    groups = [([p for p in params if p.dim() >= 2 and id(p) not in embed], weight_decay, 1.0),
              ([p for p in params if p.dim() < 2], 0.0, 1.0),
              ([t.wte.weight, t.wpe.weight], weight_decay, embed_lr_scale)]
    return [{"params": ps, "weight_decay": wd, "lr": lr * mult, "lr_mult": mult} for ps, wd, mult in groups]
