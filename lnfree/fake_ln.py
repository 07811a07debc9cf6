"""FakeLayerNorm: a live LayerNorm that tracks its average std, then freezes to a scalar sigma.

As in the paper's code (train.py, whose README command sets no EXP_* flag but the
moving average synced while an LN is real):
- sigma starts from a measured std of the original model (`measure_initial_sigmas`:
  the std over all elements of one training sequence's positions 1.., as its
  generate_std_dict.py measures it);
- while live, the LN computes nn.LayerNorm exactly, and every forward call folds the
  call's average std into sigma with the recipe's momentum.  The trainer does the
  folding at the end of each optimizer step, micro-batch by micro-batch in their
  global order, which gives the same sigma as folding during the calls and keeps a
  step's result independent of how its batch is split across processes;
- after removal it computes (x - mean(x)) / sigma * gamma + beta: a linear map.

Each block's ln_1 keeps one gamma, beta and sigma, as in the paper, but is applied
on two paths, the queries/keys and the values (`SplitLNAttnInput` replaces
`attn.c_attn`), removed at different steps.  Its sigma moves while either path is
live, so a removed q/k path follows it until the v path goes too.  The paper's
ln_1 is called three times per forward (q/k, v, and v again at EOT positions),
each call updating the average: its momentum per forward is the recipe's cubed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ln_free import ln_modules

AUX_STD_EPS = 1e-5  # keeps the aux loss's sqrt differentiable at zero variance
LN1_CALLS = 3  # moving-average updates of ln_1 per forward pass in the paper's code


class FakeLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm, paths: int = 1, calls: int = 1):
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().clone())
        self.bias = nn.Parameter(ln.bias.detach().clone())
        self.eps = float(ln.eps)
        self.normalized_shape = tuple(ln.normalized_shape)
        self.calls = calls  # moving-average updates per forward pass
        # Buffers so that checkpoints (and DDP's buffer broadcast) carry the removal state.
        self.register_buffer("sigma", torch.zeros((), dtype=torch.float32))
        self.register_buffer("live", torch.ones(paths, dtype=torch.bool))
        self.micro = 0  # the micro-batch of the step being computed (set by the trainer)
        self._stats: dict[int, torch.Tensor] = {}  # micro-batch -> detached [sum of stds, count]
        self._measuring = False

    @property
    def any_live(self) -> bool:
        return bool(self.live.any())

    def observe(self, x: torch.Tensor) -> None:
        """Record this forward call's std statistics (or, when measuring, the initial sigma)."""
        if self._measuring:
            # generate_std_dict.py: torch.std (unbiased) over every element of positions 1..T-1.
            self.sigma.copy_(x[:, 1:].float().std())
            self._measuring = False
        elif self.training and self.any_live:
            with torch.no_grad():
                std = torch.sqrt(x.float().var(-1, unbiased=False) + self.eps)
                s = torch.stack([std.sum(), torch.tensor(float(std.numel()), device=std.device)])
                # A recomputation under gradient checkpointing adds the same values again: same mean.
                self._stats[self.micro] = self._stats[self.micro] + s if self.micro in self._stats else s

    def normalise(self, x: torch.Tensor, path: int = 0) -> torch.Tensor:
        if self.live[path]:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # One fused multiply-add after centring: (x - mean) * (gamma / sigma) + beta.
        scale = (self.weight / self.sigma).to(x.dtype)
        return torch.addcmul(self.bias.to(x.dtype), x - x.mean(-1, keepdim=True), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return self.normalise(x)

    def pending_stats(self, n_micro: int) -> torch.Tensor:
        """[n_micro, 2]: each local micro-batch's [sum of stds, count] since the last commit."""
        out = torch.zeros(n_micro, 2, device=self.sigma.device)
        for k, s in self._stats.items():
            out[k] = s.float().to(out.device)
        return out

    def clear_stats(self) -> None:
        self._stats = {}

    @torch.no_grad()
    def commit_ema(self, stats: torch.Tensor, momentum: float) -> None:
        """Fold each micro-batch's average std into sigma, in order, as the paper's forward calls do.

        stats: [micro-batches, 2] of [sum, count]; momentum: the recipe's, per forward call.
        """
        self.clear_stats()
        if not self.any_live:
            return
        m = momentum**self.calls
        for total, count in stats.tolist():
            if count <= 0:
                continue
            mean_std = total / count
            if self.sigma <= 0:  # never measured (a FakeLayerNorm used on its own)
                self.sigma.fill_(mean_std)
            else:
                self.sigma.mul_(m).add_((1 - m) * mean_std)

    @torch.no_grad()
    def remove(self, path: int = 0) -> None:
        """Freeze this path: from now on it is a linear map."""
        if self.sigma <= 0:
            raise RuntimeError("cannot remove a FakeLayerNorm whose sigma was never measured")
        self.live[path] = False

    def extra_repr(self) -> str:
        state = "/".join("live" if v else "removed" for v in self.live.tolist())
        return f"{self.normalized_shape}, {state}, sigma={float(self.sigma):.6g}"


@dataclass(frozen=True, eq=True)
class LNPath:
    """One removable unit of the schedule: an LN, or one path of a block's ln_1."""

    ln: FakeLayerNorm
    path: int = 0

    @property
    def is_live(self) -> bool:
        return bool(self.ln.live[self.path])

    @property
    def sigma(self) -> torch.Tensor:
        return self.ln.sigma

    def remove(self) -> None:
        self.ln.remove(self.path)


class SplitLNAttnInput(nn.Module):
    """Replaces GPT2Attention.c_attn: ln_1 applied separately on the q/k path (0) and the v path (1)."""

    def __init__(self, ln_1: nn.LayerNorm, c_attn: nn.Module):
        super().__init__()
        self.ln = FakeLayerNorm(ln_1, paths=2, calls=LN1_CALLS)
        self.c_attn = c_attn
        self.d = c_attn.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, d = self.c_attn.weight, self.c_attn.bias, self.d
        self.ln.observe(x)
        # Conv1D stores [in, out]; columns [:2d] are q,k and [2d:] are v.
        qk = torch.addmm(b[: 2 * d], self.ln.normalise(x, 0).reshape(-1, d), w[:, : 2 * d])
        v = torch.addmm(b[2 * d :], self.ln.normalise(x, 1).reshape(-1, d), w[:, 2 * d :])
        return torch.cat([qk, v], dim=-1).view(*x.shape[:-1], 3 * d)


def fake_ln_names(n_layer: int) -> list[str]:
    """Names of every removable LN path of a converted model, in removal order."""
    return ([f"blocks.{i}.ln2" for i in range(n_layer)] + [f"blocks.{i}.ln1.qk" for i in range(n_layer)]
            + [f"blocks.{i}.ln1.v" for i in range(n_layer)] + ["ln_final"])


def convert_to_fake(model: nn.Module) -> dict[str, LNPath]:
    """Swap every LayerNorm of a GPT2LMHeadModel for FakeLayerNorms, in place; returns the paths by name."""
    for parent, attr, _ in ln_modules(model).values():
        ln = getattr(parent, attr)
        if attr == "ln_1":
            parent.attn.c_attn = SplitLNAttnInput(ln, parent.attn.c_attn)
            setattr(parent, attr, nn.Identity())
        else:
            setattr(parent, attr, FakeLayerNorm(ln))
    return find_fakes(model)


def find_fakes(model: nn.Module) -> dict[str, LNPath]:
    """The removable LN paths of an already converted (possibly wrapped) model, by name."""
    core = getattr(model, "module", model)
    out = {}
    for i, block in enumerate(core.transformer.h):
        out[f"blocks.{i}.ln2"] = LNPath(block.ln_2)
        out[f"blocks.{i}.ln1.qk"] = LNPath(block.attn.c_attn.ln, 0)
        out[f"blocks.{i}.ln1.v"] = LNPath(block.attn.c_attn.ln, 1)
    out["ln_final"] = LNPath(core.transformer.ln_f)
    return {n: out[n] for n in fake_ln_names(len(core.transformer.h))}


def fake_norms(model: nn.Module) -> dict[str, FakeLayerNorm]:
    """Each FakeLayerNorm once (a block's ln_1 serves two paths), by LN name: blocks.i.ln1, ..., ln_final."""
    out = {}
    for name, p in find_fakes(model).items():
        out.setdefault(name.removesuffix(".qk").removesuffix(".v"), p.ln)
    return out


@torch.no_grad()
def measure_initial_sigmas(model: nn.Module, ids: torch.Tensor) -> None:
    """Every FakeLayerNorm's sigma from one forward pass of the (original) model on `ids` [1, T]."""
    norms = list(fake_norms(model).values())
    for ln in norms:
        ln._measuring = True
    was = model.training
    model.eval()
    try:
        model(ids)
    finally:
        model.train(was)
        for ln in norms:
            ln._measuring = False


class ResidualStd:
    """Records the per-position std of the ln_f input on each forward pass (for the aux loss).

    A forward pre-hook, as in the paper's CustomTrainer, so the vanilla control (LNs kept) gets it too.
    """

    def __init__(self, model: nn.Module):
        core = getattr(model, "module", model)
        self.last: torch.Tensor | None = None
        self.handle = core.transformer.ln_f.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if not module.training:  # evaluation passes (the held-out CE) need no aux loss: no float copy kept
            return
        x = args[0].float()
        self.last = torch.sqrt(x.var(-1, unbiased=False) + AUX_STD_EPS)

    def remove(self) -> None:
        self.handle.remove()
        self.last = None


def aux_loss(resid_std: torch.Tensor, input_ids: torch.Tensor, eot_id: int | None) -> torch.Tensor:
    """Mean over positions of (std - detached mean std over positions other than 0 and EOT)^2.

    resid_std: [B, T] std of the ln_f input per position; the lambda is applied by the caller.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[:, 0] = False
    if eot_id is not None:
        keep &= input_ids != eot_id
    target = resid_std[keep].mean().detach() if keep.any() else resid_std.mean().detach()
    return ((resid_std - target) ** 2).mean()
