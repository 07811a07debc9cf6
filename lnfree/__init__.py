"""Removing LayerNorm from GPT-2 by fine-tuning (arXiv 2507.02559): `python -m lnfree.remove`, `lnfree.evaluate`."""
