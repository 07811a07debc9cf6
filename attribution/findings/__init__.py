"""The paper's other findings (arXiv 2507.02559, section 5) as dataset-level analyses, one module each:

- neurons: confidence (entropy) neurons and the effect of mean-ablating them;
- first_token: residual norms at position 0 and the attention-sink rate;
- calibration: mean output entropy, expected calibration error, reliability bins;
- dla_error: per-head NMAE between frozen-scale DLA and the true direct effect;
- compare: all of them for an LN model and its LN-free twin; cli and plots: the CLI and its figures.

Each analysis takes a TransformerBridge and held-out token chunks [N, T] and returns
JSON-friendly values.  Work over many sequences runs in batches sized from free
memory, reports progress through `progress(fraction, text)` and stops with
AnalysisCancelled when `should_stop()` returns True.
"""

from attribution.findings.base import AnalysisCancelled, FindingsInputError, heldout_tokens
from attribution.findings.calibration import calibration, calibration_from_logits
from attribution.findings.compare import compare_findings, findings, pair_findings, summary_table
from attribution.findings.dla_error import dataset_dla_error, head_direct_effects
from attribution.findings.first_token import attention_sink_rate, first_token_norms
from attribution.findings.neurons import ablate_neurons, confidence_neurons, unembed_projection

__all__ = ["AnalysisCancelled", "FindingsInputError", "ablate_neurons", "attention_sink_rate", "calibration",
           "calibration_from_logits", "compare_findings", "confidence_neurons", "dataset_dla_error", "findings",
           "first_token_norms", "head_direct_effects", "heldout_tokens", "pair_findings", "summary_table",
           "unembed_projection"]
