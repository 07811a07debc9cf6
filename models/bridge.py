"""TransformerBridge construction for loaded GPT-2 models (kept apart: importing TL is slow)."""

from __future__ import annotations

import logging

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import NormalizationBridge

from models.ln_free import FixedLayerNorm


class FixedScaleNormBridge(NormalizationBridge):
    """A bridge LN whose scale is the wrapped FixedLayerNorm's constant sigma.

    TL's NormalizationBridge recomputes LN from its eps; for an LN-free model
    that would be a live division, so we compute the exact linear map instead,
    with hook_scale = sigma (constant), which keeps TL's residual-stack helpers
    (apply_ln_to_stack) exact.
    """

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        ln = self.original_component
        x = self.hook_in(hidden_states)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale(torch.full_like(x[..., :1], ln.sigma))
        x = self.hook_normalized(x / scale)
        return self.hook_out(x * ln.weight + ln.bias)


def bridge_from_hf(model, tokenizer, name: str = "model") -> TransformerBridge:
    """Wrap an already-loaded GPT2LMHeadModel in a TransformerBridge (no network).

    The bridge modifies `model` in place (its submodules become bridge components).
    """
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    param = next(model.parameters())
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=model, tokenizer=tokenizer, device=str(param.device), dtype=param.dtype
    )
    for module in bridge.modules():
        if isinstance(module, NormalizationBridge) and isinstance(module.original_component, FixedLayerNorm):
            module.__class__ = FixedScaleNormBridge
    bridge.eval()
    return bridge

