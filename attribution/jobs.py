"""A pair's analysis run in a background thread, stage by stage (report.PairAnalysis), for the app.

Each stage's results can be read as soon as the stage is done, and the page's reruns (any widget
change) neither wait for the analysis nor restart it; a cancelled job keeps its finished stages and
can be started again from there.  No Streamlit here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from attribution.errors import AnalysisCancelled
from attribution.report import STAGES, PairAnalysis
from attribution.results import PairResults, Settings

if TYPE_CHECKING:
    from models import LoadedModel


SMALL_WIDTH = 512  # models narrower than this (the demo: 256) are analysed on one CPU thread
CPU_THREADS = torch.get_num_threads()  # the intra-op threads torch chose for this process


@contextmanager
def threads_for(analysis: PairAnalysis):
    """One intra-op CPU thread while a pair of small models is analysed, all of them otherwise.  Small
    models' operations are too small to gain from more threads, and beside a browser drawing the page (the
    app's case) two threads fight it for the cores: on 2 cores the demo's new view drew complete in 1.4-1.8 s
    instead of 1.9-2.3 s.  torch keeps a count per thread, taken from the last one set anywhere when the
    thread first computes: this thread's is fixed at once, and a thread started meanwhile calls all_threads."""
    small = all(a.model.bridge.cfg.d_model < SMALL_WIDTH and a.model.bridge.W_U.device.type == "cpu"
                for a in analysis.sides)
    torch.set_num_threads(1 if small else CPU_THREADS)
    torch.get_num_threads()  # fixes this thread's count now, whatever another thread sets next
    try:
        yield
    finally:
        torch.set_num_threads(CPU_THREADS)


def all_threads() -> None:
    """Give the calling thread every intra-op thread (see threads_for): a page run that starts while a small
    pair's job runs would otherwise compute on that job's one."""
    torch.set_num_threads(CPU_THREADS)


class PairJob:
    """Both models' stages in one daemon thread.  `cancel(reason)` stops it at the next patched pass
    or stage boundary; `start()` runs what is left (a no-op while running or once complete)."""

    def __init__(self, ln: LoadedModel, lnfree: LoadedModel, settings: Settings):
        self.analysis = PairAnalysis(ln, lnfree, settings)  # bad input fails here, in the caller's thread
        self.progress: tuple[float, str] = (0.0, "waiting for the models")
        self.error: Exception | None = None
        self._cancel: str | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self.start()

    @property
    def stage(self) -> str | None:
        """The last stage done for both models."""
        return self.analysis.stage

    @property
    def results(self) -> PairResults | None:
        return self.analysis.results

    @property
    def complete(self) -> bool:
        return self.stage == STAGES[-1]

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def cancelled(self) -> str | None:
        """Why the job was cancelled ("user", "superseded"), while it stops and after; None otherwise."""
        return self._cancel

    def start(self) -> None:
        with self._changed:
            self._cancel = None
            if self._thread is None and not self.complete and self.error is None:
                self._thread = threading.Thread(target=self._work, name="pair-analysis", daemon=True)
                self._thread.start()

    def cancel(self, reason: str = "user") -> None:
        with self._changed:
            if self._thread is not None:
                self._cancel = reason
                self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Until the next progress report or the end of the job, at most `timeout` seconds."""
        with self._changed:
            if self._thread is not None:
                self._changed.wait(timeout)

    def _report(self, fraction: float, text: str) -> None:
        with self._changed:
            self.progress = (fraction, text)
            self._changed.notify_all()

    def _work(self) -> None:
        while True:
            try:
                with threads_for(self.analysis):
                    self.analysis.run(STAGES[-1], self._report, lambda: self._cancel is not None)
            except AnalysisCancelled:
                pass
            except Exception as err:  # noqa: BLE001 - the page shows it; the thread must not die silently
                self.error = err
            with self._changed:
                if self.complete:
                    self._cancel = None
                if self.complete or self.error is not None or self._cancel is not None:
                    self._thread = None
                    self._changed.notify_all()
                    return
                # cancelled, then started again before this thread noticed: go on from where it stopped


class LRU:
    """Recent values by key (the app's jobs, its findings), shared by every browser session, bounded: the
    oldest is dropped (and handed to `evict`).  A value is made under the lock, so two sessions asking
    for one key share one value; a computation made this way serialises on the models' locks anyway."""

    def __init__(self, size: int, evict: Callable[[object], None] | None = None):
        self.size, self.evict = size, evict
        self._values: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            value = self._values[key] = make()
            while len(self._values) > self.size:
                old = self._values.popitem(last=False)[1]
                if self.evict:
                    self.evict(old)
            return value
