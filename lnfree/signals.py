"""SIGINT and SIGTERM, handled alike: at once (KeyboardInterrupt), or at the next safe point while deferred.

Inside `deferred()` (the training loop, the final writes) the first signal is only
noted: the loop checkpoints at the end of the step and stops, the final writes
complete.  A second signal stops at once; every write is atomic, so even then
nothing is left half-written.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"defer": 0, "pending": None}


def _handler(signum, frame):
    if _state["defer"] and _state["pending"] is None:
        _state["pending"] = signum
        # os.write, not print: a signal handler may run in the middle of another print.
        os.write(2, b"\nstopping at the end of this step; interrupt again to stop at once\n")
        return
    raise KeyboardInterrupt


@contextmanager
def installed():
    """SIGTERM behaves as SIGINT for the length of the block (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.update(defer=0, pending=None)


@contextmanager
def deferred():
    """Signals arriving in this block are noted (see `pending`) rather than raised."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


def pending() -> int | None:
    """The signal that arrived during a deferred block, if any."""
    return _state["pending"]
