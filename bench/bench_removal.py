"""Removal fine-tuning vs plain fine-tuning: step time (one process, interleaved) and peak memory.

    python -m bench.bench_removal [--model demo] [--steps 12] [--micro-batch 8] [--n-ctx 256]
    python -m bench.bench_removal --random-init gpt2-xl --mixed-precision bf16   # on a GPU

Both variants run lnfree.run's own optimizer step (`Run.advance`) on the same
model, batch and recipe: "plain" is the --keep-ln control (nn.LayerNorm, no aux
loss); "removal" has FakeLayerNorms, the split ln_1 and the aux loss, timed once
while every LN is live (sigma statistics collected) and once after every LN is
removed.  Steps alternate between the variants so that load from other processes
hits both alike; the median step time is reported.  Peak memory: CUDA's
max_memory_allocated on a GPU, else the peak RSS of a child process per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from lnfree.config import RunConfig
from lnfree.data import TrainData
from lnfree.recipes import RECIPES, override


def build_run(args, keep_ln: bool, tmp: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lnfree.run import Run
    from models import load_hf
    from models.registry import GPT2_SHAPES

    recipe = override(RECIPES["demo"], micro_batch=args.micro_batch, grad_accum=1, n_ctx=args.n_ctx,
                      ln2_start=10**5, qk_start=10**5, v_start=10**5, lnf_step=10**5, steps=10**6)
    if args.random_init:
        s = GPT2_SHAPES[args.random_init]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                                           n_positions=s.n_ctx, vocab_size=s.vocab))
        model.config.eos_token_id = s.vocab - 1
        vocab = s.vocab
    else:
        model, _, _ = load_hf(args.model)
        vocab = model.config.vocab_size
    model.set_attn_implementation("sdpa")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tok = type("Tok", (), {"eos_token_id": model.config.eos_token_id})()
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(0, vocab, (64 * args.micro_batch, args.n_ctx), generator=g)
    recipe = replace(recipe, spike_factor=float("inf"))
    cfg = RunConfig(model=args.random_init or args.model, output_dir=tmp, recipe=recipe.as_dict(), max_steps=10**6,
                    keep_ln=keep_ln,
                    mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing)
    return Run(cfg, model=model, tokenizer=tok, data=(TrainData(chunks, 0), chunks[:1]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run, step: int) -> float:
    sync()
    t = time.perf_counter()
    _, _, bad = run.advance(step)
    sync()
    if bad:
        raise RuntimeError(bad)
    return time.perf_counter() - t


def measure_times(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        plain, rm = build_run(args, True, tmp + "/p"), build_run(args, False, tmp + "/r")
        for step in range(1, args.warmup + 1):
            timed(plain, step), timed(rm, step)
        t_plain, t_live, t_removed = [], [], []
        step = args.warmup
        for _ in range(args.steps):
            step += 1
            t_plain.append(timed(plain, step))
            t_live.append(timed(rm, step))
        for fake in rm.fake_modules().values():
            fake.remove()
        for _ in range(args.steps):
            step += 1
            t_plain.append(timed(plain, step))
            t_removed.append(timed(rm, step))
        med = statistics.median
        return {"plain_s": med(t_plain), "live_s": med(t_live), "removed_s": med(t_removed),
                "removal_s": med(t_live + t_removed), "tokens_per_step": args.micro_batch * args.n_ctx}


def child_peak(args, variant: str) -> float:
    """Peak memory (GiB) of `variant` run alone for a few steps in a fresh process."""
    cmd = [sys.executable, "-m", "bench.bench_removal", "--child", variant, "--model", args.model,
           "--micro-batch", str(args.micro_batch), "--n-ctx", str(args.n_ctx),
           "--mixed-precision", args.mixed_precision]
    if args.random_init:
        cmd += ["--random-init", args.random_init]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def run_child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(args, args.child == "plain", tmp)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for step in range(1, 4):
            timed(run, step)
            if step == 1 and args.child == "removal":
                for fake in run.fake_modules().values():
                    fake.remove()
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"peak_gib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--random-init", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                    help="a randomly initialised model of this shape instead of --model (no hub needed)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per phase")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--child", choices=["plain", "removal"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    t = measure_times(args)
    mem = {v: child_peak(args, v) for v in ("plain", "removal")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    what = f"random {args.random_init}" if args.random_init else args.model
    print(f"model {what}, micro-batch {args.micro_batch} x ctx {args.n_ctx}, {args.mixed_precision}, {device}; "
          f"median of {args.steps} interleaved steps per phase")
    print(f"{'variant':<26} {'step (s)':>9} {'ratio':>7} {'tok/s':>9} {'peak mem (GiB)':>15}")
    rows = [("plain fine-tuning (LN)", t["plain_s"], mem["plain"]),
            ("removal, LNs live", t["live_s"], None), ("removal, LNs removed", t["removed_s"], None),
            ("removal (both phases)", t["removal_s"], mem["removal"])]
    for name, sec, peak in rows:
        peak_s = f"{peak:.2f}" if peak is not None else ""
        print(f"{name:<26} {sec:>9.3f} {sec / t['plain_s']:>7.3f} {t['tokens_per_step'] / sec:>9,.0f} {peak_s:>15}")
    print(f"removal / plain step time: {t['removal_s'] / t['plain_s']:.3f} (goal <= 1.05); "
          f"peak memory ratio {mem['removal'] / mem['plain']:.3f}")


if __name__ == "__main__":
    main()
