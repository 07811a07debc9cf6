"""CLI: the paper's other findings (confidence neurons, first-token norms, sinks, calibration, DLA error).

    python -m attribution.findings --ln demo --lnfree demo-lnfree --n-seq 64 \\
        --out findings.json --figures findings_figures/ [--bos prepend] [--variants]

Runs attribution.findings.pair_findings on held-out text, each finding by the
paper's code's definition, and writes the numbers as JSON (and each figure as
self-contained HTML into --figures).  --bos says how each sequence begins
(`packed`, the paper's: packed chunks, no BOS; `prepend`: <|endoftext|> first, as
the app's prompts); --variants adds our variants of the findings, marked as
such.  A mistake in the arguments ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attribution.findings", description=__doc__.split("\n")[0])
    p.add_argument("--ln", required=True, help="the LN model: hub name, local directory or `demo`")
    p.add_argument("--lnfree", required=True, help="its LN-free twin, e.g. `demo-lnfree`")
    p.add_argument("--n-seq", type=int, default=64, help="held-out sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's n_ctx)")
    p.add_argument("--source", default="demo", help="held-out text: `demo` or a UTF-8 text file (default demo)")
    p.add_argument("--bos", default=None,
                   help="how each sequence begins: `packed` chunks with no BOS (the paper's code) or `prepend` "
                        "<|endoftext|> (as the app's prompts); default: prepend for the demo pair, which was "
                        "trained so, packed otherwise")
    p.add_argument("--variants", action="store_true",
                   help="also compute our variants of the findings (JSON keys in settings.variants)")
    p.add_argument("--k", type=int, default=3, help="confidence-neuron candidates to ablate (default 3, the paper's)")
    p.add_argument("--threshold", type=float, default=0.3, help="attention-sink threshold (default 0.3)")
    p.add_argument("--bins", type=int, default=10, help="calibration bins (default 10, the paper's)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", required=True, help="JSON file for the numbers")
    p.add_argument("--figures", default=None, help="directory for the HTML figures (optional)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    from attribution.export import check_out
    from attribution.findings import FindingsInputError
    from attribution.findings.base import check_bos

    if args.bos is None:
        from attribution.findings.base import default_bos

        args.bos = default_bos(args.ln, args.lnfree)
    check_bos(args.bos)
    if args.n_seq < 1:
        raise FindingsInputError("--n-seq must be at least 1.")
    if args.seq_len is not None and args.seq_len < 2:
        raise FindingsInputError("--seq-len must be at least 2.")
    if args.k < 1:
        raise FindingsInputError("--k must be at least 1.")
    if not 0 < args.threshold <= 1:
        raise FindingsInputError("--threshold must lie in (0, 1], e.g. 0.3.")
    if args.bins < 1:
        raise FindingsInputError("--bins must be at least 1.")
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise FindingsInputError(f"The directory of --out ({out.parent}) does not exist; create it first.")
    check_out(out, one_file=True)
    if args.figures:
        check_out(args.figures, one_file=False, flag="--figures")
    if args.source != "demo":  # by its type, unopened: a named pipe would block the read forever
        try:
            mode = os.stat(args.source).st_mode
        except OSError as err:
            raise FindingsInputError(f"--source {args.source}: {err.strerror}; give `demo` or a UTF-8 text file.") from None
        if not stat.S_ISREG(mode):
            raise FindingsInputError(f"--source {args.source} is not a regular file; give `demo` or a UTF-8 text file.")


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from attribution.findings import pair_findings
    from models import load_bridge

    ln = load_bridge(args.ln, args.dtype, args.device)
    lf = load_bridge(args.lnfree, args.dtype, args.device)
    bars = []  # created on the first progress call, so that an input error prints alone

    def progress(f: float, text: str) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc="findings", unit="‰", file=sys.stderr))
        bars[0].set_postfix_str(text, refresh=False)
        bars[0].update(max(0, int(f * 1000) - bars[0].n))

    result = pair_findings(ln, lf, args.n_seq, args.seq_len, args.source, progress, k=args.k,
                           threshold=args.threshold, n_bins=args.bins, bos=args.bos, variants=args.variants)
    for bar in bars:
        bar.close()
    return result


def summary(result: dict) -> str:
    from attribution.findings import summary_table

    def fmt(v, unit):
        if v is None:
            return "n/a"
        return f"{v:.2%}" if unit == "share" else f"{v:+.4f}" if unit.startswith("delta") else f"{v:.4g}"

    s = result["settings"]
    rows = [("", "LN", "LN-free", "paper (LN -> LN-free)")]
    for r in summary_table(result):
        rows.append((r["metric"], fmt(r["ln"], r["unit"]), fmt(r["lnfree"], r["unit"]), r["paper"]))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"BOS protocol: {s['bos']} ({s['bos_protocol']})",
             f"definitions: {s['definitions']}" + (" (and our variants, marked)" if s.get("variants") else ""),
             f"{s['n_seq']} sequences of {s['seq_len']} tokens from {s['source']}; ablated neurons "
             f"{s['ablated_neurons']} of layer {s['ablated_layer']}; sink threshold {s['threshold']:g}; "
             f"{s['n_bins']} calibration bins"]
    return "\n".join(lines + [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows])


def main(argv: list[str] | None = None) -> int:
    from attribution.errors import AttributionInputError
    from models import ModelSpecError

    args = parse_args(argv)
    try:
        check_args(args)
        result = run(args)
        Path(args.out).write_text(json.dumps(result, indent=1))
        if args.figures:
            from attribution.findings.plots import FINDINGS_FIGURES

            folder = Path(args.figures)
            folder.mkdir(parents=True, exist_ok=True)
            for name, make in FINDINGS_FIGURES.items():
                make(result).write_html(folder / f"{name}.html", include_plotlyjs=True)
    except (ModelSpecError, AttributionInputError) as err:  # a user's mistake (FindingsInputError included)
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"wrote {args.out}" + (f" and figures in {args.figures}" if args.figures else ""))
    return 0

