"""The paper's other findings (arXiv 2507.02559, section 5) as dataset-level analyses, one module each,
each computed by the definition of the paper's code (github.com/submarat/removing-layer-norm; the module
docstrings name its files), with our variants only on request (compare.VARIANTS):

- neurons: confidence (entropy) neurons and the effect of mean-ablating them;
- first_token: residual norms at position 0 and the attention-sink rate;
- calibration: mean output entropy, expected calibration error, reliability bins;
- dla_error: per-head NMAE between frozen-scale DLA and the true direct effect;
- compare: all of them for an LN model and its LN-free twin; cli and plots: the CLI and its figures.

Each analysis takes a TransformerBridge and held-out token chunks [N, T] (heldout_tokens; `bos` says
whether each begins with <|endoftext|>, base.BOS_PROTOCOLS) and returns
JSON-friendly values.  Work over many sequences runs in batches sized from free
memory, reports progress through `progress(fraction, text)` and stops with
AnalysisCancelled when `should_stop()` returns True.
"""

from attribution.findings.base import (
    BOS_PROTOCOLS,
    DEFAULT_BOS,
    AnalysisCancelled,
    FindingsInputError,
    heldout_tokens,
)
from attribution.findings.calibration import calibration, calibration_from_logits
from attribution.findings.compare import VARIANTS, compare_findings, findings, pair_findings, summary_table
from attribution.findings.dla_error import dataset_dla_error, head_direct_effects
from attribution.findings.first_token import attention_sink_rate, first_token_norms
from attribution.findings.neurons import ablate_neurons, confidence_neurons, logit_var

__all__ = ["BOS_PROTOCOLS", "DEFAULT_BOS", "VARIANTS", "AnalysisCancelled", "FindingsInputError", "ablate_neurons",
           "attention_sink_rate", "calibration", "calibration_from_logits", "compare_findings", "confidence_neurons",
           "dataset_dla_error", "findings", "first_token_norms", "head_direct_effects", "heldout_tokens",
           "logit_var", "pair_findings", "summary_table"]
