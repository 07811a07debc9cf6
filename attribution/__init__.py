"""Attribution on loaded models: DLA and its error, activation patching, AtP / AtP*, plots, export.

No Streamlit here: app.py imports this package, never the reverse.
"""

from attribution.errors import AttributionInputError, ExportUnavailable
from attribution.report import analyse, attention_pattern, compare
from attribution.results import ModelResults, PairResults, Settings

__all__ = ["AttributionInputError", "ExportUnavailable", "ModelResults", "PairResults", "Settings", "analyse",
           "attention_pattern", "compare"]
