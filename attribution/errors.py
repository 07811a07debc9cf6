"""Errors a user can cause; each message is one sentence that says what to do."""


class AttributionInputError(ValueError):
    """Bad settings or prompts (multi-token answer, length mismatch, empty or too-long prompt)."""


class ExportUnavailable(RuntimeError):
    """A figure format that this machine cannot produce (PNG/SVG without a browser for kaleido)."""


class AnalysisCancelled(Exception):
    """Raised when a long analysis's `should_stop()` returned True; its partial work is discarded."""
