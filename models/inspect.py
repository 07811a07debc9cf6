"""Print one JSON object describing a model spec.

    python -m models.inspect SPEC [--dtype float32] [--device cpu]

Keys: spec, ln_free, n_layers, d_model, n_heads, d_vocab, n_ctx, params, sigmas
(null for LN models; {LN name: sigma} for LN-free ones), sigma_source (null for LN models; "stored":
the checkpoint's lnfree_sigmas, or "implied": chosen so that mean |gamma| = 1), base, twin, path.
A bad spec: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from models.loading import ModelSpecError, load_hf


def describe(spec: str, dtype: str = "float32", device: str = "cpu") -> dict:
    model, _, info = load_hf(spec, dtype, device)
    cfg = model.config
    return {
        "spec": spec,
        "ln_free": info.ln_free,
        "n_layers": cfg.n_layer,
        "d_model": cfg.n_embd,
        "n_heads": cfg.n_head,
        "d_vocab": cfg.vocab_size,
        "n_ctx": cfg.n_positions,
        "params": sum(p.numel() for p in model.parameters()),
        "sigmas": info.sigmas,
        "sigma_source": info.sigma_source,
        "base": info.base,
        "twin": info.twin,
        "path": info.path,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        # allow_nan=False: a bare NaN is not JSON (loading refuses non-finite values, so it never happens)
        print(json.dumps(describe(args.spec, args.dtype, args.device), indent=2, allow_nan=False))
    except ModelSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
