"""Loading GPT-2 checkpoints (hub, local, demo) for training and for analysis.

The names below are imported on first use (PEP 562): the app's server imports `models.preload` as it starts,
and that must not wait for torch.
"""

import importlib

_HOME = {"LoadedModel": "loading", "ModelInfo": "loading", "ModelSpecError": "loading", "load_bridge": "loading",
         "load_hf": "loading", "resolve": "loading", "check_pair": "pair", "PAIRS": "registry",
         "base_of": "registry", "lnfree_twin": "registry"}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"models.{_HOME[name]}"), name)
