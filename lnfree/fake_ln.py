"""FakeLayerNorm: a live LayerNorm that tracks its average std, then freezes to a scalar sigma.

While live it computes nn.LayerNorm exactly and accumulates the batch's average
std (over every position); the trainer folds that into an EMA once per optimizer
step (`commit_ema`), so sigma does not depend on how a global batch is split
into micro-batches or processes.  After removal it computes
(x - mean(x)) / sigma * gamma + beta with sigma frozen: a linear map.

Each block's ln_1 is split into a query/key path and a value path: the block's
ln_1 becomes nn.Identity and `SplitLNAttnInput` replaces `attn.c_attn`, applying
one FakeLayerNorm before the q/k columns and another before the v columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.ln_free import ln_modules

AUX_STD_EPS = 1e-5  # keeps the aux loss's sqrt differentiable at zero variance


class FakeLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().clone())
        self.bias = nn.Parameter(ln.bias.detach().clone())
        self.eps = float(ln.eps)
        self.normalized_shape = tuple(ln.normalized_shape)
        # Buffers so that checkpoints (and DDP's buffer broadcast) carry the removal state.
        self.register_buffer("sigma", torch.zeros((), dtype=torch.float32))
        self.register_buffer("live", torch.ones((), dtype=torch.bool))
        self._std_sum = 0.0  # detached batch statistics since the last commit_ema
        self._std_count = 0
        self.last_input_std: torch.Tensor | None = None  # per-position std, kept only if asked
        self.keep_input_std = False

    @property
    def is_live(self) -> bool:
        return bool(self.live)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_input_std:
            var = x.float().var(-1, unbiased=False)
            self.last_input_std = torch.sqrt(var + AUX_STD_EPS)
        if self.is_live:
            if self.training:
                with torch.no_grad():
                    std = torch.sqrt(x.float().var(-1, unbiased=False) + self.eps)
                    self._std_sum = self._std_sum + std.sum()
                    self._std_count += std.numel()
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # One fused multiply-add after centring: (x - mean) * (gamma / sigma) + beta.
        scale = (self.weight / self.sigma).to(x.dtype)
        return torch.addcmul(self.bias.to(x.dtype), x - x.mean(-1, keepdim=True), scale)

    def pending_stats(self) -> torch.Tensor:
        """[sum of stds, count] accumulated since the last commit (for an all-reduce)."""
        s = self._std_sum if torch.is_tensor(self._std_sum) else torch.tensor(float(self._std_sum))
        return torch.stack([s.float().reshape(()).to(self.sigma.device),
                            torch.tensor(float(self._std_count), device=self.sigma.device)])

    @torch.no_grad()
    def commit_ema(self, stats: torch.Tensor, momentum: float) -> None:
        """Fold the step's average std into sigma (the first step initialises it)."""
        self._std_sum, self._std_count = 0.0, 0
        if not self.is_live or stats[1] <= 0:
            return
        mean_std = (stats[0] / stats[1]).to(self.sigma.dtype)
        if self.sigma <= 0:
            self.sigma.copy_(mean_std)
        else:
            self.sigma.mul_(momentum).add_((1 - momentum) * mean_std)

    @torch.no_grad()
    def remove(self) -> None:
        """Freeze sigma: from now on this LN is a linear map."""
        if self.sigma <= 0:
            raise RuntimeError("cannot remove a FakeLayerNorm before it has seen a training step")
        self.live.fill_(False)

    def extra_repr(self) -> str:
        state = "live" if self.is_live else "removed"
        return f"{self.normalized_shape}, {state}, sigma={float(self.sigma):.6g}"


class SplitLNAttnInput(nn.Module):
    """Replaces GPT2Attention.c_attn: ln_1 applied separately on the q/k and the v path."""

    def __init__(self, ln_1: nn.LayerNorm, c_attn: nn.Module):
        super().__init__()
        self.ln_qk = FakeLayerNorm(ln_1)
        self.ln_v = FakeLayerNorm(ln_1)
        self.c_attn = c_attn
        self.d = c_attn.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, d = self.c_attn.weight, self.c_attn.bias, self.d
        # Conv1D stores [in, out]; columns [:2d] are q,k and [2d:] are v.
        qk = torch.addmm(b[: 2 * d], self.ln_qk(x).reshape(-1, d), w[:, : 2 * d])
        v = torch.addmm(b[2 * d :], self.ln_v(x).reshape(-1, d), w[:, 2 * d :])
        return torch.cat([qk, v], dim=-1).view(*x.shape[:-1], 3 * d)


def fake_ln_names(n_layer: int) -> list[str]:
    """Names of every FakeLayerNorm of a converted model, in removal order."""
    return ([f"blocks.{i}.ln2" for i in range(n_layer)] + [f"blocks.{i}.ln1.qk" for i in range(n_layer)]
            + [f"blocks.{i}.ln1.v" for i in range(n_layer)] + ["ln_final"])


def convert_to_fake(model: nn.Module) -> dict[str, FakeLayerNorm]:
    """Swap every LayerNorm of a GPT2LMHeadModel for FakeLayerNorms, in place; returns them by name."""
    fakes: dict[str, FakeLayerNorm] = {}
    for name, (parent, attr, _) in ln_modules(model).items():
        ln = getattr(parent, attr)
        if attr == "ln_1":
            split = SplitLNAttnInput(ln, parent.attn.c_attn)
            parent.attn.c_attn = split
            setattr(parent, attr, nn.Identity())
            fakes[f"{name}.qk"], fakes[f"{name}.v"] = split.ln_qk, split.ln_v
        else:
            fake = FakeLayerNorm(ln)
            setattr(parent, attr, fake)
            fakes[name] = fake
    return {n: fakes[n] for n in fake_ln_names(len(model.transformer.h))}


def find_fakes(model: nn.Module) -> dict[str, FakeLayerNorm]:
    """The FakeLayerNorms of an already converted (possibly wrapped) model, by name."""
    core = getattr(model, "module", model)
    out = {}
    for i, block in enumerate(core.transformer.h):
        out[f"blocks.{i}.ln2"] = block.ln_2
        out[f"blocks.{i}.ln1.qk"] = block.attn.c_attn.ln_qk
        out[f"blocks.{i}.ln1.v"] = block.attn.c_attn.ln_v
    out["ln_final"] = core.transformer.ln_f
    return {n: out[n] for n in fake_ln_names(len(core.transformer.h))}


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
