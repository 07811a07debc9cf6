"""Figures and numbers to files, and the CLI:

    python -m attribution.export --ln SPEC --lnfree SPEC --task induction|ioi|custom
        [--prompt TEXT --answer TOK --counterfactual TOK --corrupt TEXT]
        [--figure NAME|all] --format html|png|svg|csv|json --out PATH

With --figure all (the default) and a per-figure format, --out is a directory
that receives one file per figure; with one figure it is the file itself.
A user's mistake ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from attribution.errors import AttributionInputError, ExportUnavailable
from attribution.report import PairResults, Settings

FORMATS = ("html", "png", "svg", "csv", "json")
CHROMIUM_HINT = ("PNG and SVG export needs a Chrome or Chromium browser for kaleido; install Debian's "
                 "chromium (`apt-get install chromium`) or set BROWSER_PATH to a Chrome binary.")


def image_export_problem() -> str | None:
    """Why PNG/SVG export cannot work here (one sentence), or None when kaleido and a browser exist."""
    import os
    import shutil

    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "PNG and SVG export needs kaleido; run `pip install kaleido`."
    browsers = ("chromium", "chromium-browser", "google-chrome", "chrome")
    if os.environ.get("BROWSER_PATH") or any(shutil.which(b) for b in browsers):
        return None
    return CHROMIUM_HINT


def figure_bytes(fig, fmt: str) -> bytes:
    """One plotly figure as self-contained HTML (plotly.js embedded, works offline), PNG or SVG."""
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode()
    if fmt not in ("png", "svg"):
        raise AttributionInputError(f"Unknown figure format {fmt!r}; use html, png or svg.")
    problem = image_export_problem()
    if problem:
        raise ExportUnavailable(problem)
    try:
        return fig.to_image(format=fmt, width=1200, height=550)
    except Exception as err:  # kaleido/choreographer raise several types when no browser is found
        if "chrom" in str(err).lower() or "browser" in str(err).lower():
            raise ExportUnavailable(CHROMIUM_HINT) from None
        raise


def write_figure(fig, path, fmt: str) -> Path:
    """Write one plotly figure as self-contained HTML, PNG or SVG (see figure_bytes)."""
    path = Path(path)
    data = figure_bytes(fig, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _models(pair: PairResults):
    return [("ln", pair.ln), ("lnfree", pair.lnfree)]


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _heads_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        L, H = m.dla_heads.shape
        for i in range(L):
            for h in range(H):
                rows.append({"model": name, "spec": m.spec, "layer": i, "head": h,
                             "dla": _num(m.dla_heads[i, h]), "de": _num(m.de_heads[i, h]),
                             "patch": _num(m.patch_heads[i, h]), "atp": _num(m.atp_heads[i, h]),
                             "atpstar": _num(m.atpstar_heads[i, h])})
    return rows


def _resid_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        star = m.atpstar_resid if m.atpstar_resid is not None else m.atp_resid * math.nan
        for i in range(m.patch_resid.shape[0]):
            for p in range(m.patch_resid.shape[1]):
                rows.append({"model": name, "spec": m.spec, "layer": i, "position": p, "token": m.str_tokens[p],
                             "patch": _num(m.patch_resid[i, p]), "atp": _num(m.atp_resid[i, p]),
                             "atpstar": _num(star[i, p])})
    return rows


def _layer_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        for i in range(len(m.dla_mlp)):
            rows.append({"model": name, "spec": m.spec, "layer": i, "attn_dla": _num(m.dla_heads[i].sum()),
                         "mlp_dla": _num(m.dla_mlp[i]), "mlp_de": _num(m.de_mlp[i]),
                         "mlp_patch": _num(m.patch_mlp[i]),
                         "mlp_atp": _num(m.atp_mlp[i]) if m.atp_mlp is not None else None})
    return rows


def _lens_rows(pair: PairResults) -> list[dict]:
    rows = []
    for name, m in _models(pair):
        L = len(m.logit_lens) - 1
        for i, v in enumerate(m.logit_lens):
            stream = f"resid_pre {i}" if i < L else f"resid_post {L - 1}"
            rows.append({"model": name, "spec": m.spec, "stream": stream, "metric": _num(v)})
    return rows


TABLES = {"dla_heads": _heads_rows, "dla_vs_de": _heads_rows, "patch_heads": _heads_rows, "atp_heads": _heads_rows,
          "atp_vs_patch": _heads_rows, "dla_layers": _layer_rows, "patch_resid": _resid_rows,
          "atp_resid": _resid_rows, "logit_lens": _lens_rows}


def figure_table(name: str, pair: PairResults) -> list[dict]:
    """The numbers behind figure `name`, one dict per row (the same columns in every row)."""
    if name not in TABLES:
        raise AttributionInputError(f"Unknown figure {name!r}; choose from {', '.join(TABLES)}.")
    return TABLES[name](pair)


def table_csv(rows: list[dict]) -> str:
    """Rows (dicts with the same keys) as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table_csv(rows))
    return path


def write_json(pair: PairResults, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pair.to_json(), indent=1, allow_nan=False))
    return path


def export(pair: PairResults, figure: str, fmt: str, out) -> list[Path]:
    """Write `figure` (a FIGURES name or "all") of `pair` in `fmt` under `out`; returns the files written."""
    from attribution.plots import FIGURES

    if fmt not in FORMATS:
        raise AttributionInputError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "json":
        return [write_json(pair, out)]
    if figure != "all" and figure not in FIGURES:
        raise AttributionInputError(f"Unknown figure {figure!r}; use all or one of {', '.join(FIGURES)}.")
    names = list(FIGURES) if figure == "all" else [figure]
    out = Path(out)
    paths = [out / f"{n}.{fmt}" for n in names] if figure == "all" else [out]
    for n, p in zip(names, paths, strict=True):
        if fmt == "csv":
            write_csv(figure_table(n, pair), p)
        else:
            write_figure(FIGURES[n](pair), p, fmt)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    from attribution.plots import FIGURES

    p = argparse.ArgumentParser(prog="python -m attribution.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ln", required=True, help="LN model spec (hub name, local directory, demo)")
    p.add_argument("--lnfree", required=True, help="LN-free model spec")
    p.add_argument("--task", choices=["induction", "ioi", "custom"], default="induction")
    p.add_argument("--prompt", default="")
    p.add_argument("--answer", default="")
    p.add_argument("--counterfactual", default="")
    p.add_argument("--corrupt", default="")
    p.add_argument("--n-prompts", type=int, default=Settings.n_prompts)
    p.add_argument("--seq-len", type=int, default=Settings.seq_len)
    p.add_argument("--position", type=int, default=-1)
    p.add_argument("--top-k", type=int, default=Settings.top_k)
    p.add_argument("--method", choices=["atp", "atp*"], default="atp*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-per-position", action="store_true", help="skip per-position head / MLP patching")
    p.add_argument("--figure", default="all", choices=["all", *FIGURES])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from attribution.report import compare
    from models import ModelSpecError, load_bridge

    settings = Settings(task=args.task, prompt=args.prompt, answer=args.answer, counterfactual=args.counterfactual,
                        corrupt=args.corrupt, n_prompts=args.n_prompts, seq_len=args.seq_len,
                        position=args.position, top_k=args.top_k, method=args.method, seed=args.seed,
                        per_position=not args.no_per_position)
    bar = None

    def progress(frac: float, text: str) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}")
        bar.set_description(text[-40:])
        bar.update(round(100 * frac) - bar.n)

    try:
        ln, ln_info = load_bridge(args.ln, args.dtype, args.device)
        lnfree, lnfree_info = load_bridge(args.lnfree, args.dtype, args.device)
        pair = compare(ln, ln_info, lnfree, lnfree_info, settings, progress)
        if bar is not None:
            bar.close()
        paths = export(pair, args.figure, args.format, args.out)
    except (AttributionInputError, ModelSpecError, ExportUnavailable) as err:
        if bar is not None:
            bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
