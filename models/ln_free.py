"""LN-free checkpoints: detection of the paper's eps = 1e12 convention, exact linear LNs.

A checkpoint with layer_norm_epsilon >= 1e6 stores each "removed" LayerNorm as
    weight = gamma * 1e6 / sigma,  eps = 1e12,
so that (x - mean) / sqrt(var + 1e12) * weight ~= (x - mean) / sigma * gamma.
We replace every such LN by FixedLayerNorm, which computes exactly
    (x - mean(x)) / sigma * gamma + beta
with a constant sigma: a linear map, so the residual stream decomposes exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import ModelSpecError

LN_FREE_MIN_EPS = 1e6
EPS_SCALE = 1e6  # sqrt(1e12): the factor the convention multiplies into each weight


class FixedLayerNorm(nn.Module):
    """(x - mean(x)) / sigma * weight + bias with a frozen scalar sigma (no live division).

    sigma is a Python float (double precision), not a tensor: casting the model to bfloat16 or
    float16 rounds the weights, never sigma, so float64 readouts use the checkpoint's exact value.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.sigma = float(sigma)
        self.normalized_shape = tuple(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        return x / self.sigma * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, sigma={self.sigma:.6g}"


def ln_names(n_layer: int) -> list[str]:
    """The TransformerLens names of every LN of an `n_layer`-layer GPT-2, in order."""
    return [f"blocks.{i}.ln{j}" for i in range(n_layer) for j in (1, 2)] + ["ln_final"]


def ln_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """TransformerLens name -> (parent module, attribute, HF name) of every LN of a GPT-2."""
    out = {}
    for i, block in enumerate(model.transformer.h):
        out[f"blocks.{i}.ln1"] = (block, "ln_1", f"transformer.h.{i}.ln_1")
        out[f"blocks.{i}.ln2"] = (block, "ln_2", f"transformer.h.{i}.ln_2")
    out["ln_final"] = (model.transformer, "ln_f", "transformer.ln_f")
    return out


def is_ln_free_config(config: dict) -> bool:
    """Whether a config.json (as a dict) is an LN-free checkpoint in the eps = 1e12 convention."""
    return float(config.get("layer_norm_epsilon", 1e-5)) >= LN_FREE_MIN_EPS


def sigma_source(config: dict) -> str:
    """Where an LN-free checkpoint's sigmas come from: "stored" (its lnfree_sigmas, one per LN: models.validate
    checks that they are complete) or "implied" (chosen so that mean |gamma| = 1)."""
    return "stored" if config.get("lnfree_sigmas") else "implied"


def make_exact(model: nn.Module, where: str = "the checkpoint") -> dict[str, float]:
    """Turn every eps-convention LN of `model` into a FixedLayerNorm, in place.

    sigma per LN comes from the checkpoint's `lnfree_sigmas` (written by our
    exports) when present; otherwise only gamma / sigma is determined by the
    weights, and we pick sigma so that mean |gamma| = 1 (exact for LNs whose
    gamma was 1, and a harmless convention otherwise: the function is the same).
    Returns the sigma of every LN, by TransformerLens name.  Call it on a float32 (or float64) model:
    the stored weights (gamma * 1e6 / sigma) overflow float16, so they are de-scaled before any cast.
    An all-zero weight leaves no sigma to imply: ModelSpecError naming `where` (the weights file).
    """
    eps = float(model.config.layer_norm_epsilon)
    scale = eps**0.5
    recorded = getattr(model.config, "lnfree_sigmas", None) or {}
    sigmas = {}
    for name, (parent, attr, hf_name) in ln_modules(model).items():
        ln = getattr(parent, attr)
        w = ln.weight.detach().double()
        if name not in recorded and w.abs().mean().item() == 0:
            raise ModelSpecError(f"{where}: {hf_name}.weight (LN {name}) is all zero, so its sigma cannot be "
                                 f"implied; restore the weights, or record lnfree_sigmas in config.json.")
        sigma = float(recorded[name]) if name in recorded else scale / w.abs().mean().item()
        gamma = (w * sigma / scale).to(ln.weight.dtype)
        setattr(parent, attr, FixedLayerNorm(gamma, ln.bias.detach(), sigma).to(ln.weight.device))
        sigmas[name] = sigma
    return sigmas


def to_eps_convention(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """The stored LN weight of the paper's convention: gamma * 1e6 / sigma."""
    return weight * (EPS_SCALE / sigma)
