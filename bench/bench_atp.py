"""AtP / AtP* vs full activation patching over all heads x positions (induction task).

    python -m bench.bench_atp [--ln demo --lnfree demo-lnfree] [--gpt2-random] [--n-prompts 8 --seq-len 20]

Prints, per model: time of the activation-patching sweep over every (layer, head, position), time of
AtP and of AtP* (each over the whole batch), their ratio, and agreement with patching (Spearman,
Pearson, top-k recall, MAE) on head outputs per position and over all positions.  Patches before the
first position where clean and corrupted prompts differ are exact zeros and are not run.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from attribution import atp, hooks, patching, tasks
from attribution.results import agreement


def bench(name: str, bridge, n_prompts: int, seq_len: int, seed: int = 0) -> None:
    task = tasks.induction(bridge.tokenizer, n_prompts, seq_len, bridge.cfg.n_ctx, seed)
    t0 = time.perf_counter()
    p = patching.activation_patching(bridge, task, ("heads_pos",))["heads_pos"]
    t_patch = time.perf_counter() - t0
    t0 = time.perf_counter()
    a = atp.attribution_patching(bridge, task, star=False)
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = atp.attribution_patching(bridge, task, star=True)
    t_star = time.perf_counter() - t0
    n_runs = p.numel() - p[..., : patching.first_difference(task)].numel()
    # One full forward pass with one patch (as an unbatched sweep from the tokens would run it), to
    # extrapolate that sweep's cost.
    base = patching.baseline(bridge, task, [hooks.z(0)])

    def one(x, hook):
        x = x.clone()
        x[:, task.position, 0] = base.clean[hooks.z(0)][:, task.position, 0]
        return x

    patching.metric_runs(bridge, task, task.corrupt, [(hooks.z(0), one)])
    t0 = time.perf_counter()
    patching.metric_runs(bridge, task, task.corrupt, [(hooks.z(0), one)])
    t_one = time.perf_counter() - t0
    print(f"\n## {name}: {bridge.cfg.n_layers} layers x {bridge.cfg.n_heads} heads, batch {n_prompts} x "
          f"{task.clean.shape[1]} tokens; {n_runs} patched runs (of {p.numel()} head x position patches)")
    print(f"activation patching {t_patch:8.2f} s | AtP {t_atp:6.2f} s ({t_patch / t_atp:6.1f}x faster) | "
          f"AtP* {t_star:6.2f} s ({t_patch / t_star:6.1f}x faster)")
    print(f"unbatched sweep (extrapolated: {n_runs} x {t_one:.3f} s) {n_runs * t_one:8.2f} s | "
          f"AtP {n_runs * t_one / t_atp:6.1f}x faster | AtP* {n_runs * t_one / t_star:6.1f}x faster")
    for label, key in (("heads x positions", "heads_pos"), ("heads, all positions (sum)", "heads")):
        truth = p if key == "heads_pos" else p.sum(-1)
        for method, est in (("AtP ", a[key]), ("AtP*", s["star_" + key])):
            g = agreement(est.numpy(), truth.numpy(), 10)
            print(f"  {label:28s} {method}: spearman {g['spearman']:.3f}  pearson {g['pearson']:.3f}  "
                  f"top-10 recall {g['topk_recall']:.2f}  MAE {g['mae']:.4f}")


def random_gpt2_small(tokenizer_spec: str):
    """gpt2-small-shaped model (GPT2Config() defaults) with random weights: no hub access."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from models.bridge import bridge_from_hf
    from models.loading import resolve

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    tok = AutoTokenizer.from_pretrained(resolve(tokenizer_spec))  # any tokenizer: ids < 50257 are valid
    return bridge_from_hf(model, tok, "gpt2-random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ln", default="demo")
    ap.add_argument("--lnfree", default="demo-lnfree")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=20)
    ap.add_argument("--gpt2-random", action="store_true", help="also a random gpt2-small-shaped model")
    ap.add_argument("--gpt2-n-prompts", type=int, default=1)
    ap.add_argument("--gpt2-seq-len", type=int, default=10)
    args = ap.parse_args()
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    from models import ModelSpecError, load_bridge

    torch.set_grad_enabled(True)
    print(f"torch threads: {torch.get_num_threads()}")
    for spec in (args.ln, args.lnfree):
        try:
            model = load_bridge(spec)
        except ModelSpecError as err:
            print(f"\n## {spec}: skipped ({err})")
            continue
        bench(f"{spec} ({'LN-free' if model.ln_free else 'LN'})", model.bridge, args.n_prompts, args.seq_len)
    if args.gpt2_random:
        bench("random gpt2-small shape", random_gpt2_small(args.ln), args.gpt2_n_prompts, args.gpt2_seq_len)


if __name__ == "__main__":
    main()
