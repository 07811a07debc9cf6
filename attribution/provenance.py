"""How an export was made: a manifest (workbench version and commit, each model's spec, revision and weight
hashes, dtype, device, task, prompts, settings, seed, and the command that reproduces it), embedded in every
file the export writes, and read back by `python -m attribution.export --from-manifest FILE`.

Where it lives in each format: JSON, a "manifest" key; HTML, a <script type="application/json"> element;
SVG, a <metadata> element; PNG, a tEXt chunk; a zip, manifest.json; CSV (which has no room for it), a
FILE.manifest.json beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import shlex
import struct
import subprocess
import zlib
from pathlib import Path

from attribution.errors import AttributionInputError
from attribution.results import PairResults, Settings

KEY = "lnfree-manifest"  # the PNG tEXt keyword and the HTML / SVG element id
REPO = Path(__file__).resolve().parents[1]


def _commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": head, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lnfree-workbench")
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weight_hashes(path: str) -> dict[str, str]:
    """sha256 of each weight file of a model directory, by file name."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")):
        st = f.stat()
        out[f.name] = _sha256(str(f), st.st_size, st.st_mtime_ns)
    return out


def model_entry(model) -> dict:
    """What identifies a loaded model: its spec, the directory it came from, the hub revision (a snapshot's
    commit) where it came from the hub cache, and its weights' hashes."""
    from models.registry import split_revision

    info = model.info
    path = Path(info.path)
    _, asked = split_revision(info.spec)
    snapshot = path.name if path.parent.name == "snapshots" else None
    return {"spec": info.spec, "revision": asked or snapshot, "snapshot": snapshot, "path": str(path),
            "ln_free": bool(info.ln_free), "weights_sha256": weight_hashes(str(path))}


def command(m: dict) -> str:
    """The attribution.export command line that makes the manifest's export again."""
    s = m["settings"]
    args = ["python", "-m", "attribution.export", "--ln", m["models"]["ln"]["spec"],
            "--lnfree", m["models"]["lnfree"]["spec"], "--task", s["task"]]
    for key in ("prompt", "answer", "counterfactual", "corrupt"):
        if s[key]:
            args += [f"--{key}", s[key]]
    defaults = dataclasses.asdict(Settings())
    for key in ("n_prompts", "seq_len", "position", "top_k", "seed", "verify_top"):
        if s[key] != defaults[key]:
            args += ["--" + key.replace("_", "-"), str(s[key])]
    if not s["per_position"]:
        args.append("--no-per-position")
    if s["full_sweeps"]:
        args.append("--full-sweeps")
    if "circuits" in m:
        args += ["--circuits", "--ig-steps", str(m["circuits"]["ig_steps"]), "--circuit-edges", str(m["circuits"]["edges"])]
    args += ["--method", m["method"], "--figure", m["figure"], "--format", m["format"], "--dtype", m["dtype"],
             "--device", m["device"], "--out", m["out"]]
    return shlex.join(args)


def manifest(pair: PairResults, ln, lnfree, *, method: str, dtype: str, device: str, figure: str, fmt: str,
             out: str, url: str | None = None, circuits: dict | None = None) -> dict:
    """The manifest of one export of `pair` (the two LoadedModels it was computed on); `circuits` records
    the edge attribution exported with it ({"ig_steps", "edges"})."""
    import torch
    import transformer_lens
    import transformers

    m = {"workbench": {"version": _version(), **_commit()},
         "models": {"ln": model_entry(ln), "lnfree": model_entry(lnfree)},
         "dtype": dtype, "device": device, "settings": dataclasses.asdict(pair.settings),
         "prompt_tokens": pair.ln.str_tokens, "method": method, "figure": figure, "format": fmt, "out": str(out),
         "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "transformer_lens": getattr(transformer_lens, "__version__", None)}}
    if circuits is not None:
        m["circuits"] = circuits
    m["command"] = command(m)
    if url:
        m["app_url"] = url
    return m


# ---------------------------------------------------------------------------------------------- embedding


def embed(data: bytes, fmt: str, m: dict) -> bytes:
    """The file `data` (html / svg / png) with the manifest inside it."""
    text = json.dumps(m, sort_keys=True)  # ASCII only: json.dumps escapes the rest
    if fmt == "html":
        safe = text.replace("</", "<\\/")  # no "</script>" inside the element
        return data.replace(b"</body>", f'<script type="application/json" id="{KEY}">{safe}</script>'.encode()
                            + b"</body>", 1)
    if fmt == "svg":
        from xml.sax.saxutils import escape

        svg = data.decode()
        end = re.search(r"<svg\b[^>]*>", svg).end()
        return (svg[:end] + f'<metadata id="{KEY}">{escape(text)}</metadata>' + svg[end:]).encode()
    if fmt == "png":  # a tEXt chunk right after IHDR (8-byte signature, then IHDR: 4 + 4 + 13 + 4 bytes)
        body = b"tEXt" + KEY.encode() + b"\0" + text.encode("ascii")
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        return data[:33] + chunk + data[33:]
    raise ValueError(fmt)


def read(path) -> dict:
    """The manifest of an exported file (any format above, or a .manifest.json), in one sentence if none."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise AttributionInputError(f"Cannot read {path} ({err.strerror or err}).") from None
    found = None
    if raw.startswith(b"\x89PNG"):
        pos = 8
        while pos + 8 <= len(raw) and found is None:
            (n,) = struct.unpack(">I", raw[pos:pos + 4])
            kind, body = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + n]
            if kind == b"tEXt" and body.startswith(KEY.encode() + b"\0"):
                found = body[len(KEY) + 1:].decode("latin-1")
            pos += 12 + n
    elif raw.startswith(b"PK"):
        import io
        import zipfile

        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            found = zf.read("manifest.json").decode() if "manifest.json" in zf.namelist() else None
    else:
        text = raw.decode("utf-8", "replace")
        hit = re.search(rf'<(?:script|metadata)[^>]*id="{KEY}"[^>]*>(.*?)</(?:script|metadata)>', text, re.S)
        if hit:
            from xml.sax.saxutils import unescape

            found = unescape(hit.group(1)).replace("<\\/", "</")
        else:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            if isinstance(data, dict):
                found = json.dumps(data.get("manifest", data if "models" in data else None))
    try:
        m = json.loads(found) if found else None
    except ValueError:
        m = None
    side = path.with_name(path.name + ".manifest.json")
    if m is None and side.is_file():  # a CSV's manifest lies beside it
        return read(side)
    if not isinstance(m, dict) or not {"models", "settings", "dtype", "device"} <= set(m):
        raise AttributionInputError(f"{path} holds no lnfree export manifest; give a file written by "
                                    f"attribution.export or the app's downloads, or its .manifest.json.")
    return m


def check_weights(m: dict, ln, lnfree) -> list[str]:
    """A line for each model whose weights are not the manifest's (the numbers may then differ)."""
    lines = []
    for side, model in (("ln", ln), ("lnfree", lnfree)):
        want = m["models"][side].get("weights_sha256")
        if want and weight_hashes(model.info.path) != want:
            lines.append(f"warning: the weights of {m['models'][side]['spec']!r} are not the ones the manifest "
                         f"records (their sha256 differ); the numbers may differ from the original export.")
    return lines
