"""Figures and numbers to files, and the CLI:

    python -m attribution.export --ln SPEC --lnfree SPEC --task induction|ioi|custom
        [--prompt TEXT --answer TOK --counterfactual TOK --corrupt TEXT]
        [--figure NAME|all] --format html|png|svg|csv|json|zip --out PATH
    python -m attribution.export --from-manifest EXPORTED_FILE --out PATH [--figure NAME|all] [--format FMT]

With --figure all (the default) and a per-figure format, --out is a directory
that receives one file per figure; with one figure it is the file itself.  json and zip
(the app's "Download all": every figure and table in one file) write the file --out.
Every file carries a manifest of how it was made (attribution.provenance), from which
--from-manifest makes it again.  A user's mistake ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

from attribution.errors import AttributionInputError, ExportUnavailable
from attribution.intervals import interval_rows
from attribution.results import PairResults, Settings
from attribution.tables import figure_table, summary_rows, table_csv

FORMATS = ("html", "png", "svg", "csv", "json", "zip")  # zip: the app's "Download all"
ZIP_HOLDS_ALL = "--format zip holds every figure; drop --figure or choose another format."
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
    for attempt in range(2):
        try:
            return fig.to_image(format=fmt, width=1200, height=550)
        except Exception as err:  # kaleido/choreographer raise several types when no browser is found
            if "chrom" in str(err).lower() or "browser" in str(err).lower():
                raise ExportUnavailable(CHROMIUM_HINT) from None
            # On a loaded machine kaleido's tab can be asked to render before its own script has loaded
            # ("kaleido_scopes is not defined"); a second try finds it loaded.
            if attempt or "kaleido_scopes" not in str(err):
                raise


def write_figure(fig, path, fmt: str, manifest: dict | None = None) -> Path:
    """Write one plotly figure as self-contained HTML, PNG or SVG (see figure_bytes), with `manifest`
    embedded when given (see figure_file)."""
    return write_bytes(figure_file(fig, fmt, manifest), path)


def write_bytes(data: bytes, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_text(text: str, path) -> Path:
    return write_bytes(text.encode(), path)


def results_json(pair: PairResults, manifest: dict | None = None, circuits: dict | None = None) -> str:
    """Every number of `pair` and its settings as strict JSON (no NaN: missing values are null), with its
    circuits (attribution.circuits) and the export's manifest (attribution.provenance) when given."""
    data = pair.to_json()
    if circuits is not None:
        from attribution.circuits import circuits_json

        data["circuits"] = circuits_json(circuits)
    if manifest is not None:
        data["manifest"] = manifest
    return json.dumps(data, indent=1, allow_nan=False)


def figure_file(fig, fmt: str, manifest: dict | None = None) -> bytes:
    """figure_bytes with the manifest embedded (see attribution.provenance)."""
    from attribution import provenance

    data = figure_bytes(fig, fmt)
    return data if manifest is None else provenance.embed(data, fmt, manifest)


def bundle(pair: PairResults, method: str = "atp*", manifest: dict | None = None, circuits: dict | None = None,
           circuit_edges: int = 20) -> bytes:
    """A zip of every figure (HTML, and PNG/SVG when a browser for kaleido is present) with its CSV, the
    summary table, the agreement numbers' bootstrap intervals, the JSON of all numbers and settings, the
    circuit figures and every edge score when `circuits` is given (their top `circuit_edges` edges drawn),
    and the manifest (manifest.json, and inside each figure and the JSON)."""
    from attribution.circuits import CIRCUIT_FIGURES, circuit_figure, circuit_tables
    from attribution.plots import FIGURES

    images = image_export_problem() is None
    # (name, its figure, its table), each made when its files are written
    figures = [(name, lambda make=make: make(pair, method), lambda name=name: figure_table(name, pair))
               for name, make in FIGURES.items()]
    if circuits is not None:
        tables = circuit_tables(circuits, circuit_edges)
        figures += [(name, lambda name=name: circuit_figure(name, circuits, circuit_edges),
                     lambda name=name: tables[name]) for name in CIRCUIT_FIGURES]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        if manifest is not None:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
        zf.writestr("results.json", results_json(pair, manifest, circuits))
        zf.writestr("summary.csv", table_csv(summary_rows(pair)))
        rows = interval_rows(pair.intervals)
        if rows:
            zf.writestr("agreement_intervals.csv", table_csv(rows))
        for name, make, table in figures:
            fig = make()
            zf.writestr(f"{name}.html", figure_file(fig, "html", manifest))
            zf.writestr(f"{name}.csv", table_csv(table()))
            if images:
                for fmt in ("png", "svg"):
                    zf.writestr(f"{name}.{fmt}", figure_file(fig, fmt, manifest))
    return buf.getvalue()


def export(pair: PairResults, figure: str, fmt: str, out, method: str = "atp*",
           manifest: dict | None = None, circuits: dict | None = None, circuit_edges: int = 20) -> list[Path]:
    """Write `figure` (a FIGURES or CIRCUIT_FIGURES name, or "all") of `pair` in `fmt` under `out`,
    attribution patching shown as `method` ("atp" or "atp*"), the circuit figures (their top
    `circuit_edges` edges) when `circuits` is given, each file carrying `manifest` when given (JSON, HTML,
    SVG and PNG inside the file; CSV beside it, FILE.manifest.json; a folder of figures also gets
    manifest.json); returns the files written."""
    from attribution.circuits import CIRCUIT_FIGURES, circuit_figure, circuit_tables
    from attribution.plots import FIGURES

    if fmt not in FORMATS:
        raise AttributionInputError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "json":
        return [write_text(results_json(pair, manifest, circuits), out)]
    if fmt == "zip":
        if figure != "all":
            raise AttributionInputError(ZIP_HOLDS_ALL)
        return [write_bytes(bundle(pair, method, manifest, circuits, circuit_edges), out)]
    extra = CIRCUIT_FIGURES if circuits is not None else {}
    if figure != "all" and figure not in FIGURES and figure not in extra:
        hint = " (the circuit figures need --circuits)" if figure in CIRCUIT_FIGURES else ""
        raise AttributionInputError(f"Unknown figure {figure!r}{hint}; use all or one of "
                                    f"{', '.join([*FIGURES, *extra])}.")
    names = [*FIGURES, *extra] if figure == "all" else [figure]
    out = Path(out)
    paths = [out / f"{n}.{fmt}" for n in names] if figure == "all" else [out]
    side = json.dumps(manifest, indent=1) if manifest is not None else None
    for n, p in zip(names, paths, strict=True):
        if fmt == "csv":
            table = circuit_tables(circuits, circuit_edges)[n] if n in extra else figure_table(n, pair)
            write_text(table_csv(table), p)
            if side:
                write_text(side, p.with_name(p.name + ".manifest.json"))
        elif n in extra:
            write_figure(circuit_figure(n, circuits, circuit_edges), p, fmt, manifest)
        else:
            write_figure(FIGURES[n](pair, method), p, fmt, manifest)
    if side and figure == "all":
        write_text(side, out / "manifest.json")
    return paths


def check_out(out, one_file: bool, flag: str = "--out") -> None:
    """One sentence when `out` cannot receive a file (`one_file`) or a folder of files: checked before any
    model is loaded, so a bad path costs nothing."""
    import os

    out = Path(out)
    if one_file and out.is_dir():
        raise AttributionInputError(f"{flag} {out} is a directory; give a file name.")
    if not one_file and out.exists() and not out.is_dir():
        raise AttributionInputError(f"{flag} {out} is a file; it must be a directory for several files.")
    place = out if not one_file else out.parent
    while not place.exists():  # the nearest existing folder is where the new ones will be made
        place = place.parent
    if not place.is_dir():
        raise AttributionInputError(f"{flag} {out} lies under {place}, which is a file; choose another path.")
    if not os.access(place, os.W_OK | os.X_OK):
        raise AttributionInputError(f"{flag} {out}: {place} is not writable; choose another path.")


def parse_args(argv=None) -> argparse.Namespace:
    from attribution.circuits import CIRCUIT_FIGURES
    from attribution.plots import FIGURES

    p = argparse.ArgumentParser(prog="python -m attribution.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ln", help="LN model spec (hub name, local directory, demo)")
    p.add_argument("--lnfree", help="LN-free model spec")
    p.add_argument("--from-manifest", metavar="FILE",
                   help="make an earlier export again: its models, settings, dtype and device from the manifest "
                        "in FILE (any exported file, or its .manifest.json); give --out, and --figure / --format "
                        "to change those")
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
    p.add_argument("--verify-top", type=int, default=Settings.verify_top,
                   help="activation patching checks the components with the largest |AtP*| (default 20)")
    p.add_argument("--full-sweeps", action="store_true",
                   help="patch every component instead (every head, layer x position and MLP; slow at GPT-2 scale)")
    p.add_argument("--circuits", action="store_true",
                   help="also edge attribution and circuit faithfulness on both models (attribution.circuits): "
                        "in the JSON, and the circuit_graphs and faithfulness figures")
    p.add_argument("--ig-steps", type=int, default=1, help="with --circuits: 1 = EAP (default), more = EAP-IG")
    p.add_argument("--circuit-edges", type=int, default=20, help="with --circuits: edges drawn per model")
    p.add_argument("--figure", choices=["all", *FIGURES, *CIRCUIT_FIGURES], help="default: all")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def from_manifest(args) -> tuple[argparse.Namespace, Settings, dict]:
    """The arguments and settings of the export a manifest records (--out, --figure and --format given on the
    command line win)."""
    from attribution import provenance

    m = provenance.read(args.from_manifest)
    try:
        settings = Settings(**m["settings"])
    except TypeError:
        raise AttributionInputError(f"The manifest in {args.from_manifest} has settings this version does not "
                                    f"know; use the workbench version it names.") from None
    args.ln, args.lnfree = m["models"]["ln"]["spec"], m["models"]["lnfree"]["spec"]
    args.dtype, args.device, args.method = m["dtype"], m["device"], m.get("method", "atp*")
    args.figure = args.figure or m.get("figure", "all")
    args.format = args.format or m.get("format")
    if "circuits" in m:
        args.circuits, args.ig_steps, args.circuit_edges = True, m["circuits"]["ig_steps"], m["circuits"]["edges"]
    return args, settings, m


def main(argv=None) -> int:
    args = parse_args(argv)
    from attribution import provenance
    from attribution.circuits import CIRCUIT_FIGURES
    from attribution.report import compare
    from models import ModelSpecError, load_bridge

    settings = Settings(task=args.task, prompt=args.prompt, answer=args.answer, counterfactual=args.counterfactual,
                        corrupt=args.corrupt, n_prompts=args.n_prompts, seq_len=args.seq_len,
                        position=args.position, top_k=args.top_k, seed=args.seed,
                        per_position=not args.no_per_position, verify_top=args.verify_top,
                        full_sweeps=args.full_sweeps)
    from attribution.tasks import check_settings

    bar, recorded = None, None
    try:
        if args.from_manifest:
            args, settings, recorded = from_manifest(args)
        args.figure = args.figure or "all"
        missing = [f for f, v in (("--ln", args.ln), ("--lnfree", args.lnfree), ("--format", args.format)) if not v]
        if missing:
            raise AttributionInputError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} needed "
                                        f"(or --from-manifest FILE).")
        check_settings(settings)
        if args.figure in CIRCUIT_FIGURES and not args.circuits:
            raise AttributionInputError(f"The {args.figure} figure needs --circuits.")
        if args.ig_steps < 1:
            raise AttributionInputError(f"--ig-steps must be at least 1, not {args.ig_steps}.")
        if args.format == "zip" and args.figure != "all":  # before the analysis, not after it
            raise AttributionInputError(ZIP_HOLDS_ALL)
        check_out(args.out, args.format in ("json", "zip") or args.figure != "all")
        problem = image_export_problem() if args.format in ("png", "svg") else None
        if problem:  # found before the analysis, not after it
            raise ExportUnavailable(problem)
    except (AttributionInputError, ExportUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def progress(frac: float, text: str) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}")
        bar.set_description(text[-40:])
        bar.update(round(100 * frac) - bar.n)

    try:
        ln = load_bridge(args.ln, args.dtype, args.device)
        lnfree = load_bridge(args.lnfree, args.dtype, args.device)
        pair = compare(ln, lnfree, settings, progress)
        if bar is not None:
            bar.close()
        found = None
        if args.circuits:
            from attribution.circuits import pair_circuits

            found = pair_circuits(ln, lnfree, settings, args.ig_steps)
        for line in provenance.check_weights(recorded, ln, lnfree) if recorded else []:
            print(line, file=sys.stderr)
        made = provenance.manifest(pair, ln, lnfree, method=args.method, dtype=args.dtype, device=args.device,
                                   figure=args.figure, fmt=args.format, out=args.out,
                                   circuits={"ig_steps": args.ig_steps, "edges": args.circuit_edges}
                                   if args.circuits else None)
        paths = export(pair, args.figure, args.format, args.out, args.method, made, found, args.circuit_edges)
    except (AttributionInputError, ModelSpecError, ExportUnavailable) as err:
        if bar is not None:
            bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, or the path changed during the analysis
        print(f"error: could not write {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
