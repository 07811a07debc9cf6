"""The analysis engine at GPT-2 scale, on GPT-2-shaped stand-ins with random weights (no hub access).

    python -m bench.bench_engine [--shapes small medium] [--dtypes float32 bfloat16] [--sweeps small] [--xl-memory]

Builds each shape's checkpoint (vocab 50257, n_ctx 1024) and its LN-free twin in the paper's eps = 1e12
format (sigmas drawn from 0.5-3) in a temporary directory, then reports, measured in one run:
- per shape and dtype, the default analysis (DLA + DE + AtP* + top-20 verification) of 8 x 40-token
  induction prompts in forward-pass equivalents (its wall time / one forward pass of the same batch);
- for the shapes in --sweeps, the full head sweep and the resid_pre sweep (2 x 40-token prompts) against
  transformer_lens.patching's get_act_patch_attn_head_out_all_pos / get_act_patch_resid_pre: the largest
  difference and the speed-up;
- with --xl-memory, the peak RSS of a fresh process that loads the gpt2-xl pair and analyses it in
  bfloat16 on a 32-token custom prompt.
The prompts use the demo's tokenizer (its ids are valid GPT-2 ids).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "xl": (48, 1600, 25)}
PROMPT_32 = ("And the earth was without form, and void; and darkness was upon the face of the deep. "
             "And the Spirit of God moved upon the face of the")  # 31 tokens and BOS


def build_pair(shape: str, root: Path) -> tuple[Path, Path]:
    """A random GPT-2 of `shape` and its LN-free twin (eps = 1e12, weight = gamma * 1e6 / sigma), bfloat16 on
    disk for xl (to halve the files), with the demo's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from models.ln_free import ln_modules, to_eps_convention
    from models.loading import resolve

    n_layer, d, heads = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, vocab_size=50257, n_positions=1024))
    tok = AutoTokenizer.from_pretrained(resolve("demo"))
    dtype = torch.bfloat16 if shape == "xl" else torch.float32
    ln_dir, lf_dir = root / f"{shape}", root / f"{shape}-lnfree"
    model.to(dtype).save_pretrained(ln_dir)
    gen = torch.Generator().manual_seed(1)
    sigmas = {name: 0.5 + 2.5 * float(torch.rand((), generator=gen)) for name in ln_modules(model)}
    model.float()
    model.config.layer_norm_epsilon = 1e12
    model.config.lnfree_sigmas = sigmas
    with torch.no_grad():
        for name, (parent, attr, _) in ln_modules(model).items():
            getattr(parent, attr).weight.copy_(to_eps_convention(getattr(parent, attr).weight, sigmas[name]))
    model.to(dtype).save_pretrained(lf_dir)
    for path in (ln_dir, lf_dir):
        tok.save_pretrained(path)
    return ln_dir, lf_dir


def forward_seconds(bridge, tokens: torch.Tensor, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            bridge(tokens)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def default_analysis(path: Path, dtype: str) -> dict:
    from attribution import Settings, analyse, tasks
    from models import load_bridge

    model = load_bridge(str(path), dtype)
    settings = Settings(task="induction", n_prompts=8, seq_len=20, per_position=False)
    task = tasks.build(model.tokenizer, settings, model.bridge.cfg.n_ctx)
    unit = forward_seconds(model.bridge, task.clean)
    start = time.perf_counter()
    res = analyse(model, settings)
    wall = time.perf_counter() - start
    return {"forward_s": round(unit, 3), "analysis_fwd_equiv": round(wall / unit, 1), "stages": res.cost,
            "passes": res.passes, "lnfree_nmae": res.dla_nmae if res.ln_free else None,
            "spearman_atpstar_verified": res.agreement["atpstar"]["spearman"]}


def sweeps_against_transformer_lens(path: Path) -> dict:
    from transformer_lens import patching as tl

    from attribution import patching, tasks
    from models import load_bridge

    bridge = load_bridge(str(path)).bridge
    task = tasks.induction(bridge.tokenizer, 2, 20, bridge.cfg.n_ctx)
    base = patching.baseline(bridge, task, [])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(task.clean)

    def metric(logits):
        return (task.metric(logits).double().mean() - base.corrupt_metric) / base.norm

    out = {}
    for kind, theirs in (("heads", tl.get_act_patch_attn_head_out_all_pos), ("resid", tl.get_act_patch_resid_pre)):
        start = time.perf_counter()
        ours = patching.activation_patching(bridge, task, (kind,))[kind]
        mine = time.perf_counter() - start
        start = time.perf_counter()
        ref = theirs(bridge, task.corrupt, cache, metric)
        tl_s = time.perf_counter() - start
        out[kind] = {"patches": ours.numel(), "ours_s": round(mine, 1), "transformer_lens_s": round(tl_s, 1),
                     "speedup": round(tl_s / mine, 1), "max_abs_diff": float((ours - ref.double()).abs().max())}
    return out


def xl_memory(ln_dir: Path, lf_dir: Path) -> dict:
    """In this process (started fresh): load both models in bfloat16, analyse a 32-token prompt."""
    from attribution import Settings, compare
    from models import load_bridge

    ln, lf = load_bridge(str(ln_dir), "bfloat16"), load_bridge(str(lf_dir), "bfloat16")
    settings = Settings(task="custom", prompt=PROMPT_32, answer=" waters", counterfactual=" earth",
                        corrupt=PROMPT_32.replace("darkness", "light"), per_position=False)
    start = time.perf_counter()
    pair = compare(ln, lf, settings)
    return {"tokens": len(pair.ln.str_tokens), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "lnfree_nmae": pair.lnfree.dla_nmae}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["small", "medium"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--sweeps", nargs="*", default=["small"], choices=list(SHAPES))
    ap.add_argument("--xl-memory", action="store_true")
    ap.add_argument("--measure-xl", nargs=2, metavar=("LN_DIR", "LNFREE_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_xl:
        print(json.dumps(xl_memory(*map(Path, args.measure_xl))))
        return
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in dict.fromkeys(args.shapes + args.sweeps + (["xl"] if args.xl_memory else [])):
            ln_dir, lf_dir = build_pair(shape, Path(tmp))
            if shape in args.shapes:
                for dtype in args.dtypes:
                    for name, path in (("LN", ln_dir), ("LN-free", lf_dir)):
                        print(json.dumps({"shape": shape, "dtype": dtype, "model": name,
                                          **default_analysis(path, dtype)}), flush=True)
            if shape in args.sweeps:
                for name, path in (("LN", ln_dir), ("LN-free", lf_dir)):
                    print(json.dumps({"shape": shape, "model": name, "sweeps": sweeps_against_transformer_lens(path)}),
                          flush=True)
            if shape == "xl" and args.xl_memory:
                proc = subprocess.run([sys.executable, "-m", "bench.bench_engine", "--measure-xl", str(ln_dir),
                                       str(lf_dir)], capture_output=True, text=True)
                print(json.dumps({"shape": "xl", "bfloat16 pair, 32-token custom prompt":
                                  json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                                  else proc.stderr[-2000:]}), flush=True)
            for path in (ln_dir, lf_dir):
                subprocess.run(["rm", "-rf", str(path)], check=False)


if __name__ == "__main__":
    main()
