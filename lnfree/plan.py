"""The plan `--dry-run` prints: removal stages, tokens, and memory per device (no weights needed).

Memory per device, in bytes (P parameters, s ctx, b micro-batch, h d_model, a heads, L layers, V vocab):
- model states: fp32 weights 4P + fp32 grads 4P + AdamW moments 8P, divided by the world size
  under FSDP (full shard); bf16 autocast adds a 2P cache of cast weights;
- activations per layer (Korthikanti et al. 2022, 16-bit): s*b*h*(34 + 4) bytes (+4 for the
  split ln_1's second path), doubled in fp32; with the eager attention kernel add the
  a*s^2*b score/softmax/dropout tensors (about 9 bytes each); gradient checkpointing keeps
  only each layer's input (2 or 4 bytes * s*b*h) plus one layer's activations;
- logits: b*s*V at about 14 bytes (bf16/fp32 logits, log-softmax and its gradient);
- 10% allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from lnfree.recipes import Recipe
from models.registry import Shape

GIB = 2**30


@dataclass
class MemoryEstimate:
    states: float
    activations: float
    logits: float
    total: float


def estimate_memory(shape: Shape, recipe: Recipe, mixed_precision: str = "no", world: int = 1,
                    fsdp: bool = False, grad_ckpt: bool = False) -> MemoryEstimate:
    p = shape.params
    act_bytes = 1 if mixed_precision == "bf16" else 2  # multiplier on the 16-bit byte counts
    states = 16 * p / (world if fsdp else 1) + (2 * p if mixed_precision == "bf16" else 0)
    s, b, h, L = min(recipe.n_ctx, shape.n_ctx), recipe.micro_batch, shape.n_embd, shape.n_layer
    layer = s * b * h * 38 * act_bytes  # SDPA: no [heads, s, s] attention matrices are kept
    acts = L * 2 * s * b * h * act_bytes + layer if grad_ckpt else L * layer
    logits = 14 * b * s * shape.vocab
    return MemoryEstimate(states, acts, logits, 1.1 * (states + acts + logits))


def stages(sched: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """(stage, number of LNs, first step, last step) in removal order."""
    groups = {"ln_2 (MLP)": ".ln2", "ln_1 q/k": ".ln1.qk", "ln_1 v": ".ln1.v", "ln_f": "ln_final"}
    out = []
    for label, suffix in groups.items():
        steps = [s for n, s in sched.items() if n.endswith(suffix)]
        out.append((label, len(steps), min(steps), max(steps)))
    return out


def format_plan(spec: str, shape: Shape, recipe: Recipe, total_steps: int, sched: dict[str, int],
                mem: MemoryEstimate, world: int, mixed_precision: str, fsdp: bool, grad_ckpt: bool,
                keep_ln: bool) -> str:
    tokens = total_steps * recipe.tokens_per_step
    lines = [
        f"model {spec}: {shape.n_layer} layers, d_model {shape.n_embd}, {shape.params / 1e6:,.1f}M parameters",
        f"recipe {recipe.name}: {total_steps} steps x {recipe.tokens_per_step:,} tokens/step "
        f"({recipe.micro_batch} seqs x {recipe.grad_accum} micro-batches x ctx {recipe.n_ctx}) "
        f"= {tokens / 1e6:,.1f}M tokens",
        f"LR {recipe.lr:g} -> {recipe.min_lr:g} (warmup {recipe.warmup}, cosine), AdamW wd {recipe.weight_decay}, "
        f"clip {recipe.grad_clip}, aux lambda {recipe.aux_lambda}, "
        f"sigma momentum per micro-batch {recipe.momentum:.4g} (ln_1 {recipe.momentum ** 3:.4g}: three updates "
        f"per forward, as in the paper's code)",
    ]
    if keep_ln:
        lines.append("vanilla control (--keep-ln): no LayerNorm is removed")
    else:
        lines.append(f"{'stage':<12} {'LNs':>4} {'removed after steps':>20}")
        lines += [f"{label:<12} {n:>4} {f'{first}..{last}' if last > first else str(first):>20}"
                  for label, n, first, last in stages(sched)]
    shard = f"FSDP over {world}" if fsdp else f"{world} process(es), DDP" if world > 1 else "1 process"
    lines.append(f"memory per device ({mixed_precision if mixed_precision != 'no' else 'fp32'}, {shard}"
                 f"{', gradient checkpointing' if grad_ckpt else ''}): ~{mem.total / GIB:.1f} GiB "
                 f"(states {mem.states / GIB:.1f}, activations {mem.activations / GIB:.1f}, "
                 f"logits {mem.logits / GIB:.1f})")
    return "\n".join(lines)
