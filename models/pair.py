"""The LN / LN-free pair an analysis compares: one sentence when the two models do not belong together."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from models.errors import ModelSpecError
from models.registry import Shape

if TYPE_CHECKING:
    from models.loading import ModelInfo

PAIR_SHAPE = ("n_layer", "n_embd", "n_head", "vocab")


def tokenizer_digest(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (every token and its id, added tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def check_pair(ln: ModelInfo, lnfree: ModelInfo) -> None:
    """Raise ModelSpecError unless `ln` has LayerNorm and `lnfree` is LN-free, with the same shape and tokenizer."""
    if ln.ln_free and not lnfree.ln_free:
        raise ModelSpecError(f"The pair is swapped: {ln.spec!r} (in the LN slot) is LN-free and {lnfree.spec!r} "
                             f"(in the LN-free slot) has LayerNorm; swap them.")
    if not lnfree.ln_free:
        raise ModelSpecError(f"The LN-free slot holds {lnfree.spec!r}, which is an LN model; give an LN-free "
                             f"checkpoint there (one written by lnfree.remove, layer_norm_epsilon 1e12).")
    if ln.ln_free:
        hint = f" ({ln.base!r}, by its record)" if ln.base else ""
        raise ModelSpecError(f"The LN slot holds {ln.spec!r}, which is an LN-free model; give the LN model it "
                             f"was made from there{hint}.")
    a, b = Shape.from_config(ln.config), Shape.from_config(lnfree.config)
    for key in PAIR_SHAPE:
        if getattr(a, key) != getattr(b, key):
            raise ModelSpecError(f"{ln.spec!r} and {lnfree.spec!r} differ in shape ({key} {getattr(a, key)} vs "
                                 f"{getattr(b, key)}); compare an LN-free model with the LN model it was made from.")
    if None in (ln.tokenizer_digest, lnfree.tokenizer_digest):
        return  # a ModelInfo built by hand, not by load_hf: nothing to compare
    if ln.tokenizer_size != lnfree.tokenizer_size or ln.tokenizer_digest != lnfree.tokenizer_digest:
        sizes = (f"{ln.tokenizer_size} vs {lnfree.tokenizer_size} tokens" if ln.tokenizer_size != lnfree.tokenizer_size
                 else f"both {ln.tokenizer_size} tokens, but not the same ones")
        raise ModelSpecError(f"{ln.spec!r} and {lnfree.spec!r} have different tokenizers ({sizes}); the same text "
                             f"would be different tokens: give both models the tokenizer of the LN model.")
