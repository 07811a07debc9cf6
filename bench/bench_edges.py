"""Edge attribution's and the bootstrap intervals' cost, in forward-pass equivalents of the same batch.

    python -m bench.bench_edges [--shapes demo small]

For each model (the demo pair, and the gpt2-small-shaped stand-in with random weights of bench.bench_engine
and its LN-free twin): 8 x 20-token induction prompts (41 tokens with BOS), one forward pass of the batch
as the unit, then EAP, EAP-IG with 5 steps and the faithfulness curve (one pass per circuit size), each
as its wall time / the unit (after one untimed EAP), measured in one run; and for the pair, the bootstrap intervals of a default
analysis (1,000 resamples).  EAP's floor is 2 forward passes (clean, corrupted) plus a forward and
backward pass (about 3 forward passes): 5 in all.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_engine import build_pair, forward_seconds


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(ln_spec: str, lnfree_spec: str) -> dict:
    from attribution import Settings, circuits, compare, edges, intervals, tasks
    from models import load_bridge

    settings = Settings(task="induction", n_prompts=8, seq_len=20, per_position=False)
    models = [load_bridge(spec) for spec in (ln_spec, lnfree_spec)]
    out = {}
    for name, model in zip(("LN", "LN-free"), models, strict=True):
        bridge = model.bridge
        task = tasks.build(bridge.tokenizer, settings, bridge.cfg.n_ctx)
        unit = forward_seconds(bridge, task.clean)
        edges.edge_attribution(bridge, task)  # warm-up (first-call allocations), as forward_seconds has
        eap, t_eap = timed(lambda b=bridge, t=task: edges.edge_attribution(b, t))
        _, t_ig = timed(lambda b=bridge, t=task: edges.edge_attribution(b, t, ig_steps=5))
        n_edges = int(np.isfinite(eap.scores).sum())
        sizes = [n for n in circuits.SIZES if n < n_edges] + [n_edges]
        _, t_faith = timed(lambda b=bridge, t=task, e=eap, s=sizes: edges.faithfulness(b, t, e, s))
        out[name] = {"forward_s": round(unit, 3), "edges": n_edges, "EAP": round(t_eap / unit, 1),
                     "EAP-IG (5 steps)": round(t_ig / unit, 1),
                     f"faithfulness curve ({len(sizes)} sizes)": round(t_faith / unit, 1)}
    pair = compare(*models, settings)
    pair_unit = sum(forward_seconds(m.bridge, tasks.build(m.bridge.tokenizer, settings, m.bridge.cfg.n_ctx).clean)
                    for m in models)
    _, t_iv = timed(lambda: intervals.pair_intervals(pair))
    out["bootstrap intervals (pair, 1000 resamples)"] = round(t_iv / pair_unit, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["demo", "small"], choices=["demo", "small"])
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    for shape in args.shapes:
        if shape == "demo":
            print(json.dumps({"shape": "demo", **measure("demo", "demo-lnfree")}), flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ln_dir, lf_dir = build_pair(shape, Path(tmp))
            print(json.dumps({"shape": shape, **measure(str(ln_dir), str(lf_dir))}), flush=True)


if __name__ == "__main__":
    main()
