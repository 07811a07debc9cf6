"""The app's opening pair, loaded in the background as its server starts, before any browser connects.

A cold start otherwise runs one step after another: the server starts, the browser fetches the page, and
only then does the page import torch, transformers and TransformerLens (seconds) and load both models.
Started with the server, the imports and the loading overlap the browser's page load.  Each preloaded
model is handed over once (`take`); a failed load is forgotten, so that the page's own load reports it.
This module imports nothing heavy itself: the server's start-up calls `start`.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

_pending: dict[tuple[str, str, str], Future] = {}
_lock = threading.Lock()
_known = threading.Event()  # set once _pending holds every model the thread will load
_known.set()  # nothing preloaded until `start`


def start(argv: list[str]) -> threading.Thread:
    """Import what the page needs and load the pair that `streamlit run app.py -- ARGV` opens on, in a
    daemon thread (`take` hands the models over)."""
    _known.clear()
    with _lock:
        _pending.clear()
    thread = threading.Thread(target=_load, args=(argv,), name="preload", daemon=True)
    thread.start()
    return thread


def take(spec: str, dtype: str, device: str):
    """The preloaded model for (spec, dtype, device), waiting for it if it is still loading; None if it was
    not preloaded or failed to load.  Asking for any model that was not preloaded drops the rest: the view
    has moved on from the opening pair, and they would only hold memory."""
    _known.wait()
    with _lock:
        future = _pending.pop((spec, dtype, device), None)
        if future is None:
            _pending.clear()
            return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - the page's own load of the same spec reports it
        return None


def _expect(spec: str, dtype: str, device: str) -> Future:
    with _lock:
        return _pending.setdefault((spec, dtype, device), Future())


def _load(argv: list[str]) -> None:
    try:
        import attribution.circuits  # noqa: F401 - the page's imports, so that its first run finds them done
        import attribution.export  # noqa: F401
        import attribution.findings  # noqa: F401
        from attribution.view import launch_args, opening_pair
        from models.loading import load_bridge

        args = launch_args(argv)
        ln_spec, lnfree_spec = opening_pair(args)
        dtype, device = args.dtype or "float32", args.device or "cpu"
        lnfree = _expect(lnfree_spec, dtype, device)
        ln = _expect(ln_spec, dtype, device) if ln_spec else None
    except Exception:  # noqa: BLE001 - a command line the page reports
        return
    finally:
        _known.set()
    try:
        model = load_bridge(lnfree_spec, dtype, device)
    except BaseException as err:  # noqa: BLE001 - kept for `take`, which forgets it
        lnfree.set_exception(err)
        return
    if ln is None:  # an LN-free directory alone: the page pairs it with its recorded base
        try:
            ln_spec = model.info.ln_base()
        except Exception:  # noqa: BLE001 - the page reports it
            ln_spec = None
        ln = _expect(ln_spec, dtype, device) if ln_spec else None
    lnfree.set_result(model)
    if ln is not None:
        try:
            ln.set_result(load_bridge(ln_spec, dtype, device))
        except BaseException as err:  # noqa: BLE001
            ln.set_exception(err)
