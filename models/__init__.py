"""Loading GPT-2 checkpoints (hub, local, demo) for training and for analysis."""

from models.loading import LoadedModel, ModelInfo, ModelSpecError, load_bridge, load_hf, resolve
from models.pair import check_pair
from models.registry import PAIRS, base_of, lnfree_twin

__all__ = ["LoadedModel", "ModelInfo", "ModelSpecError", "PAIRS", "base_of", "check_pair", "load_bridge",
           "load_hf", "lnfree_twin", "resolve"]
