"""The paper's removal recipes (arXiv 2507.02559) as dataclasses, and removal schedules.

Step numbers count optimizer steps from 1.  An LN scheduled at step s is removed
once s steps are done, so step s + 1 is the first without it: the paper's code
removes it in `on_step_begin` when `global_step == s`.  Within each stage layers go 0, 1, 2, ...
`gap` steps apart: every ln_2, then every ln_1 q/k path, then every ln_1 v path,
then ln_f.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields, replace

from lnfree.fake_ln import fake_ln_names
from models.registry import hub_name

TARGET_FRACTION = 0.7  # a compressed schedule removes its last LN by this fraction of the run


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    steps: int  # optimizer steps of the full recipe
    lr: float
    min_lr: float
    warmup: int
    aux_lambda: float
    ln2_start: int
    ln2_gap: int
    qk_start: int
    qk_gap: int
    v_start: int
    v_gap: int
    lnf_step: int
    micro_batch: int  # sequences per device per forward pass
    grad_accum: int  # micro-batches per optimizer step, summed over all processes
    n_ctx: int = 1024
    momentum: float = 0.9  # sigma EMA momentum per forward call of one micro-batch (the paper's convention)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    embed_lr_scale: float = 1.0  # learning rate of wte/wpe as a multiple of `lr` (1: the paper)
    span_frac: float = 0.0  # share of training chunks that are repeated random-token spans (0: the paper)
    spike_factor: float = 50.0  # divergence check: stop when the grad norm exceeds this x its running level
    bos: int = 0  # 1: every text chunk starts with EOT, a constant first token (0: the paper's packed chunks)

    @property
    def seqs_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.seqs_per_step * self.n_ctx

    def as_dict(self) -> dict:
        return asdict(self)


def _paper(name: str, *, steps: int, lr: float, min_lr: float, warmup: int, aux: float, starts: tuple,
           gaps: tuple, micro: int, seqs: int, decay_seqs: int = 32) -> Recipe:
    """A recipe of the paper's table; starts = (ln2, qk, v, ln_f), gaps = (ln2, qk, v).

    seqs: sequences per optimizer step as the paper's config.py has them (its micro-batch times
    2^19 // (micro-batch x 1024)); our micro-batch divides it.  decay_seqs: sigma's moving average decays
    by 0.9 per this many sequences (the paper: 0.9 per forward call of its micro-batch for small /
    medium, 0.9 ** (micro-batch / 32) for large / xl, i.e. per 32 sequences).
    """
    if seqs % micro:
        raise ValueError(f"micro-batch {micro} does not divide {seqs} sequences per step")
    return Recipe(name=name, steps=steps, lr=lr, min_lr=min_lr, warmup=warmup, aux_lambda=aux,
                  ln2_start=starts[0], ln2_gap=gaps[0], qk_start=starts[1], qk_gap=gaps[1], v_start=starts[2],
                  v_gap=gaps[2], lnf_step=starts[3], micro_batch=micro, grad_accum=seqs // micro, n_ctx=1024,
                  momentum=0.9 ** (micro / decay_seqs))


# The paper released gpt2-large and gpt2-xl at steps 600 and 800 of their 1200-step schedules: a run of
# those recipes stops there by default (lnfree.remove --stop-at), keeping the schedules of 1200 steps.
RELEASED_AT = {"gpt2-large": 600, "gpt2-xl": 800}
RECIPES: dict[str, Recipe] = {
    "gpt2": _paper("gpt2", steps=300, lr=6e-4, min_lr=3e-4, warmup=25, aux=0.1, starts=(20, 44, 68, 104),
                   gaps=(2, 2, 3), micro=32, seqs=512),
    "gpt2-medium": _paper("gpt2-medium", steps=500, lr=6e-4, min_lr=3e-4, warmup=10, aux=0.1,
                          starts=(20, 68, 116, 188), gaps=(2, 2, 3), micro=22, seqs=506, decay_seqs=22),
    "gpt2-large": _paper("gpt2-large", steps=1200, lr=3e-4, min_lr=4e-5, warmup=15, aux=0.03,
                         starts=(30, 174, 318, 534), gaps=(4, 4, 6), micro=8, seqs=504),
    "gpt2-xl": _paper("gpt2-xl", steps=1200, lr=1e-4, min_lr=2e-5, warmup=20, aux=0.01,
                      starts=(50, 242, 434, 722), gaps=(4, 4, 6), micro=4, seqs=504),
    # 4 layers, ctx 256, 2 CPU cores (16 min alone): every LN gone by step 170 of 900, 2.8M tokens.  The steps
    # after ln_f recover: on an earlier demo the twin ended +0.07 CE above the vanilla control at 300 steps,
    # +0.036 at 600; on the shipped demo (a better-trained base) +0.058 at 600, +0.039 at 900.  Gentler than
    # the paper's gaps: removing blocks.1's ln_1 v path blows the residual up for a few steps (a ~1e5-1e7x
    # gradient-norm spike that clipping and the aux loss repair), hence the lax spike check.  A quarter of the
    # chunks are repeated random spans so that the induction heads stay in use, and the embeddings train at
    # 10x the lr, as in the demo's pretraining (models/demo_training). Every chunk starts with <|endoftext|>,
    # as the demo's last pretraining run and the app's prompts. 12 x 256 tokens a step (the paper's 512 x 1024
    # would take hours on a CPU), hence 10 warmup steps of 900; lr, min lr, aux lambda and momentum are
    # gpt2's.
    "demo": Recipe(name="demo", steps=900, lr=6e-4, min_lr=3e-4, warmup=10, aux_lambda=0.1, ln2_start=20, ln2_gap=6,
                   qk_start=48, qk_gap=6, v_start=80, v_gap=20, lnf_step=170, micro_batch=12, grad_accum=1,
                   n_ctx=256, momentum=0.9, embed_lr_scale=10.0, span_frac=0.25, spike_factor=1e9, bos=1),
}
MODEL_RECIPE = {"gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
                "gpt2-xl": "gpt2-xl", "demo": "demo"}
_HINTS = typing.get_type_hints(Recipe)
RECIPE_FIELDS: dict[str, type] = {f.name: _HINTS[f.name] for f in fields(Recipe) if f.name != "name"}
BY_DEPTH = {12: "gpt2", 24: "gpt2-medium", 36: "gpt2-large", 48: "gpt2-xl", 4: "demo"}


def recipe_for_model(spec: str, n_layer: int | None = None) -> tuple[str, str | None]:
    """The default recipe of a model spec: its own, else by depth (12/24/36/48 layers), else gpt2; and,
    for a model of known depth without a recipe of its own, a note saying which was chosen and why."""
    if hub_name(spec) in MODEL_RECIPE:
        return MODEL_RECIPE[hub_name(spec)], None
    name = BY_DEPTH.get(n_layer or 0, "gpt2")
    if n_layer is None:  # an unknown spec: loading it will say so
        return name, None
    why = f"chosen by its depth of {n_layer} layers" if n_layer in BY_DEPTH else \
        f"no recipe is made for {n_layer} layers"
    return name, f"{spec!r} has no recipe of its own; using the {name} recipe ({why}); choose one with --recipe."


def override(recipe: Recipe, **values) -> Recipe:
    """The recipe with the given (non-None) fields replaced."""
    return replace(recipe, **{k: v for k, v in values.items() if v is not None})


def schedule(recipe: Recipe, n_layer: int, max_steps: int | None = None) -> dict[str, int]:
    """Removal step of every FakeLayerNorm (see fake_ln.fake_ln_names), for a run of max_steps.

    A run shorter than the recipe compresses the schedule proportionally (and further if
    needed) so that the last LN goes by TARGET_FRACTION of the run.
    """
    steps = {}
    for i in range(n_layer):
        steps[f"blocks.{i}.ln2"] = recipe.ln2_start + i * recipe.ln2_gap
        steps[f"blocks.{i}.ln1.qk"] = recipe.qk_start + i * recipe.qk_gap
        steps[f"blocks.{i}.ln1.v"] = recipe.v_start + i * recipe.v_gap
    steps["ln_final"] = recipe.lnf_step
    n = max_steps or recipe.steps
    if n < recipe.steps:
        last = max(steps.values())
        scale = min(n / recipe.steps, TARGET_FRACTION * n / last)
        steps = {k: max(2, math.floor(v * scale)) for k, v in steps.items()}  # sigma needs a step of statistics
    return {k: steps[k] for k in fake_ln_names(n_layer)}


def check_schedule(steps: dict[str, int], total: int) -> str | None:
    """A user-facing problem with a schedule, or None."""
    late = [k for k, s in steps.items() if s >= total]  # removed after step s: s < total leaves a step without it
    if late:
        return (f"{len(late)} LayerNorms (first {late[0]}) would be removed at or after the last step {total}; "
                f"lower the removal steps, or raise --max-steps or --stop-at.")
    return None
