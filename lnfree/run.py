"""One removal run's state (Accelerate): model, optimizer, schedule, the sigma EMA, and one optimizer step."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from lnfree import checkpoint as ckpt
from lnfree.config import RunConfig, UserError
from lnfree.fake_ln import (
    ResidualStd,
    aux_loss,
    convert_to_fake,
    fake_norms,
    find_fakes,
    measure_initial_sigmas,
)
from lnfree.optim import adamw_groups
from lnfree.recipes import check_schedule, schedule

SPIKE_WARMUP = 10  # steps before the grad-norm spike check starts


def fsdp_plugin():
    """FSDP2 (torch's fully_shard), one unit per GPT2Block: every block's weights, grads and Adam states are
    sharded over the processes and gathered block by block for its forward and backward."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=["GPT2Block"], reshard_after_forward=True)


def _accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    if cfg.fsdp and not torch.cuda.is_available():
        # Accelerate enables FSDP on accelerators only: on CPU processes it would run DDP without a word.
        raise UserError("--fsdp needs GPUs; run without it on the CPU.")
    # cpu=True without GPUs: `accelerate launch --multi_gpu --num_processes N` then runs N gloo processes.
    return Accelerator(mixed_precision=cfg.mixed_precision, fsdp_plugin=fsdp_plugin() if cfg.fsdp else None,
                       log_with=cfg.log_with, project_dir=cfg.output_dir, cpu=not torch.cuda.is_available())


def load_base(cfg: RunConfig):
    from models import load_hf

    model, tokenizer, info = load_hf(cfg.model)
    if info.ln_free:
        raise UserError(f"{cfg.model!r} is already LN-free; give the LN model it came from.")
    if cfg.recipe["n_ctx"] > model.config.n_positions:
        raise UserError(f"--n-ctx {cfg.recipe['n_ctx']} exceeds the model's context "
                        f"{model.config.n_positions}; lower --n-ctx.")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{cfg.model!r} has a tokenizer without an EOT token.")
    # models/ loads with eager attention (for analysis hooks); training uses the fused kernel,
    # which keeps no [heads, T, T] attention tensors (see lnfree.plan).
    model.set_attn_implementation("sdpa")
    return model, tokenizer


class Run:
    """State of one training run (rebuilt from a checkpoint on resume or rollback)."""

    def __init__(self, cfg: RunConfig, model=None, tokenizer=None, data=None, eval_initial: bool = False):
        """model/tokenizer/data (TrainData, held-out chunks) may be given directly (benchmarks)."""
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        from lnfree.data import load_train_eval

        self.cfg, self.r = cfg, cfg.recipe_obj
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.acc = _accelerator(cfg)
        self.world = self.acc.num_processes
        if self.r.grad_accum % self.world:
            raise UserError(f"--grad-accum {self.r.grad_accum} must be a multiple of the number of processes "
                            f"({self.world}) so that the global batch stays the same.")
        self.accum_local = self.r.grad_accum // self.world
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = (model, tokenizer) if model is not None else load_base(cfg)
        self.eot = self.tokenizer.eos_token_id
        self.n_layer = model.config.n_layer
        self.sched = schedule(self.r, self.n_layer, cfg.max_steps)
        problem = check_schedule(self.sched, cfg.last_step)  # every LN gone by the step the run ends
        if problem and not cfg.keep_ln:
            raise UserError(problem)
        if not cfg.keep_ln:
            convert_to_fake(model)
        # The aux loss in the vanilla control too, as in the paper's code (one recipe, LN kept or not).
        self.use_aux = self.r.aux_lambda > 0
        self.resid_std = ResidualStd(model) if self.use_aux else None
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        train_tokens = cfg.last_step * self.r.tokens_per_step
        if data is not None:
            self.data, self.held = data
        else:
            with self.acc.main_process_first():
                self.data, self.held = load_train_eval(cfg.source, self.tokenizer, self.r.n_ctx, train_tokens,
                                                       cfg.eval_tokens, cfg.seed, self.r.span_frac,
                                                       bool(self.r.bos))
        opt = torch.optim.AdamW(adamw_groups(model, self.r.lr, self.r.weight_decay, self.r.embed_lr_scale),
                                lr=self.r.lr)
        self.initial_ce = None
        if eval_initial and self.acc.is_main_process:  # before sharding: one process, whole model
            self.initial_ce = heldout_ce(model.to(self.acc.device), self.held)
        self.model, self.opt = self.acc.prepare(model, opt)
        if not cfg.keep_ln:  # sigma starts from the original model's std on the first training sequence
            first = self.data.batch(1, self.r.micro_batch, self.r.seqs_per_step, 0)[:1]
            measure_initial_sigmas(self.model, first.to(self.acc.device))
        self.sched_lr = get_cosine_with_min_lr_schedule_with_warmup(
            self.opt, min(self.r.warmup, cfg.max_steps), cfg.max_steps, min_lr=self.r.min_lr)
        self.step, self.tokens, self.lr_scale, self.recoveries = 0, 0, 1.0, 0
        self.saved_step: int | None = None  # the step of the last checkpoint written or restored
        self.gnorm_level: float | None = None
        self.train_ces: list[float] = []
        self.t0, self.wall_before = time.time(), 0.0  # wall time of earlier (killed) segments of the run

    # --------------------------------------------------------------------------- state
    @property
    def core(self):
        return self.acc.unwrap_model(self.model)

    def fake_modules(self):
        """The removable LN paths by name (see fake_ln.fake_ln_names)."""
        return {} if self.cfg.keep_ln else find_fakes(self.core)

    def norms(self):
        """Each FakeLayerNorm once (ln_1 serves two paths)."""
        return {} if self.cfg.keep_ln else fake_norms(self.core)

    def removed(self) -> int:
        return sum(not f.is_live for f in self.fake_modules().values())

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "lr_scale": self.lr_scale,
                "recoveries": self.recoveries, "gnorm_level": self.gnorm_level,
                "scheduler": ckpt.scheduler_state(self.sched_lr), "train_ces": self.train_ces[-20:],
                "initial_ce": self.initial_ce, "wall_seconds": self.wall_before + time.time() - self.t0,
                "removed": [n for n, f in self.fake_modules().items() if not f.is_live]}

    def save(self) -> None:
        ckpt.save(self.acc, self.ckpt_root, self.step, self.trainer_state())
        self.saved_step = self.step

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a signal may reach only some of them)."""
        if self.world == 1:
            return flag
        return bool(self.acc.gather(torch.tensor([flag], device=self.acc.device)).any())

    def restore(self, path: Path, resume: bool = False) -> None:
        state = ckpt.load(self.acc, path)
        if resume:  # a rollback keeps counting the time it threw away
            self.wall_before = state.get("wall_seconds", 0.0)
        self.step, self.tokens = state["step"], state["tokens"]
        self.recoveries, self.gnorm_level = state["recoveries"], state["gnorm_level"]
        self.train_ces = state["train_ces"]
        self.initial_ce = state.get("initial_ce")
        ckpt.load_scheduler_state(self.sched_lr, state["scheduler"])
        self.set_lr_scale(state["lr_scale"])
        self.saved_step = self.step

    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale = scale
        self.sched_lr.base_lrs = [self.r.lr * scale * g["lr_mult"] for g in self.opt.param_groups]
        for g, base, fn in zip(self.opt.param_groups, self.sched_lr.base_lrs, self.sched_lr.lr_lambdas,
                               strict=True):
            g["lr"] = base * fn(self.sched_lr.last_epoch)

    # --------------------------------------------------------------------------- one step
    def advance(self, step: int) -> tuple[dict, list[str], str | None]:
        """One optimizer step: removals due, forward/backward over the micro-batches, checks, update.

        Returns (metrics, LNs removed now, problem); on a problem nothing is updated.
        """
        gone = [] if self.cfg.keep_ln else self.apply_schedule(step)
        m = self.train_step(step)
        bad = self.problem(m)
        if bad:
            self.discard_step()
            return m, gone, bad
        self.opt.step()
        self.sched_lr.step()
        self.opt.zero_grad(set_to_none=True)
        self.commit_sigmas()
        self.step, self.tokens = step, self.tokens + self.r.tokens_per_step
        g = m["grad_norm"]
        self.gnorm_level = g if self.gnorm_level is None else 0.9 * self.gnorm_level + 0.1 * g
        self.train_ces.append(m["ce"])
        return m, gone, None

    def apply_schedule(self, step: int) -> list[str]:
        gone = []
        for name, fake in self.fake_modules().items():
            # An LN scheduled at s goes once s steps are done (the paper's on_step_begin at global_step s).
            if fake.is_live and self.sched[name] < step:
                fake.remove()
                gone.append(name)
        return gone

    def train_step(self, step: int) -> dict:
        micro, seqs = self.r.micro_batch, self.r.seqs_per_step
        # Sums stay on the device: a .cpu() per micro-batch would stall the GPU queue each time.
        ce_sum, aux_sum, loss_sum = (torch.zeros((), device=self.acc.device) for _ in range(3))
        norms = list(self.norms().values())
        for k in range(self.accum_local):
            for ln in norms:
                ln.micro = k
            ids = self.data.batch(step, micro, seqs, self.acc.process_index * self.accum_local + k)
            ids = ids.to(self.acc.device)
            last = k == self.accum_local - 1
            with nullcontext() if last else self.acc.no_sync(self.model), self.acc.autocast():
                logits = self.model(ids).logits
                # EOT targets are not trained, as in the paper's code (its pad token is EOT, and the
                # causal-LM collator masks padding): predicting where a document ends is not learnt.
                targets = ids[:, 1:].masked_fill(ids[:, 1:] == self.eot, -100)
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
                loss = ce
                if self.use_aux:
                    aux = aux_loss(self.resid_std.last, ids, self.eot)
                    self.resid_std.last = None
                    loss = ce + self.r.aux_lambda * aux
                    aux_sum += aux.detach().float()
                self.acc.backward(loss / self.accum_local)
            ce_sum += ce.detach().float()
            loss_sum += loss.detach().float()
        stats = torch.stack([ce_sum, aux_sum, loss_sum]) / self.accum_local
        if self.world > 1:
            stats = self.acc.reduce(stats, "mean")
        stats = stats.cpu()
        gnorm = self.acc.clip_grad_norm_(self.model.parameters(), self.r.grad_clip)
        ce, aux, loss = stats.tolist()
        return {"ce": ce, "aux": aux, "loss": loss, "grad_norm": float(gnorm)}

    def commit_sigmas(self) -> None:
        """Fold the step's micro-batches into each sigma in their global order (process-major)."""
        norms = list(self.norms().values())
        if not norms:
            return
        stats = torch.stack([ln.pending_stats(self.accum_local) for ln in norms])  # [norms, micro, 2]
        if self.world > 1:
            gathered = self.acc.gather(stats.to(self.acc.device))  # [world * norms, micro, 2], rank order
            stats = gathered.view(self.world, len(norms), self.accum_local, 2).transpose(0, 1)
            stats = stats.reshape(len(norms), self.world * self.accum_local, 2)
        for ln, s in zip(norms, stats.cpu(), strict=True):
            ln.commit_ema(s, self.r.momentum)

    def discard_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for ln in self.norms().values():
            ln.clear_stats()

    def problem(self, m: dict) -> str | None:
        if not math.isfinite(m["loss"]):
            return f"the loss became {m['loss']}"
        if not math.isfinite(m["grad_norm"]):
            return f"the gradient norm became {m['grad_norm']}"
        level = self.gnorm_level
        if level is not None and self.step >= SPIKE_WARMUP and m["grad_norm"] > self.r.spike_factor * level:
            return f"the gradient norm {m['grad_norm']:.3g} is {m['grad_norm'] / level:.0f}x its running level"
        return None


@torch.no_grad()
def heldout_ce(model, chunks: torch.Tensor) -> float:
    from lnfree.quality import token_losses

    was = model.training
    model.eval()
    try:
        return token_losses(model, chunks, batch_size=8).mean().item()
    finally:
        model.train(was)
