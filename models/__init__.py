"""Loading GPT-2 checkpoints (hub, local, demo) for training and for analysis."""

from models.loading import ModelInfo, ModelSpecError, load_bridge, load_hf, resolve
from models.registry import PAIRS, base_of, lnfree_twin

__all__ = ["ModelInfo", "ModelSpecError", "PAIRS", "base_of", "load_bridge", "load_hf",
           "lnfree_twin", "resolve"]
