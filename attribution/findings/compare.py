"""Every finding for one model, for an LN model and its LN-free twin, and the headline table."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from attribution.findings.base import (
    BOS_PROTOCOLS,
    DEFAULT_BOS,
    FindingsInputError,
    Progress,
    ShouldStop,
    check_bos,
    heldout_tokens,
    sub_progress,
)
from attribution.findings.calibration import N_BINS, calibration
from attribution.findings.dla_error import dataset_dla_error
from attribution.findings.first_token import attention_sink_rate, first_token_norms
from attribution.findings.neurons import K, ablate_neurons, confidence_neurons
from attribution.results import jsonable
from models import check_pair

if TYPE_CHECKING:
    from models import LoadedModel

STAGES = {"neurons": 2.0, "norms": 1.0, "sinks": 1.0, "calibration": 1.0, "dla_error": 1.0}
VARIANT_STAGES = {"dla_error_all": 2.0}

VARIANTS = {  # JSON key -> what our variant is; computed only with variants=True (CLI --variants)
    "sinks.head_mean": "sink rate over (sequence, head) pairs from each head's mean attention on position 0 "
                       "over queries 1..T-1, >= threshold (the definition the paper's docstring cites)",
    "ablation.signed": "signed mean change in CE / entropy, each neuron alone and all together",
    "dla_error_all": "DLA error over every position 0..T-2 with the actual next token and the raw W_U",
}


def findings(bridge, tokens: torch.Tensor, neurons: list[int], k: int = K, threshold: float = 0.3,
             n_bins: int = N_BINS, progress: Progress = None, should_stop: ShouldStop = None,
             variants: bool = False) -> dict:
    """Every analysis for one model by the paper's definitions; `neurons` (last layer) are the ones
    mean-ablated.  variants=True adds our variants (VARIANTS), each under its own key."""
    stages = dict(STAGES, **(VARIANT_STAGES if variants else {}))
    total, done = sum(stages.values()), 0.0
    out = {"n_seq": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}

    def part(name: str) -> Progress:
        nonlocal done
        lo, done = done, done + stages[name]
        return sub_progress(progress, lo / total, done / total)

    out["neurons"] = confidence_neurons(bridge, k)
    out["ablation"] = ablate_neurons(bridge, tokens, neurons, part("neurons"), should_stop, signed=variants)
    out["norms"] = first_token_norms(bridge, tokens, part("norms"), should_stop)
    out["sinks"] = attention_sink_rate(bridge, tokens, threshold, part("sinks"), should_stop, head_mean=variants)
    out["calibration"] = calibration(bridge, tokens, n_bins, part("calibration"), should_stop)
    out["dla_error"] = dataset_dla_error(bridge, tokens, part("dla_error"), should_stop)
    if variants:
        out["dla_error_all"] = dataset_dla_error(bridge, tokens, part("dla_error_all"), should_stop, positions="all")
    return out


def compare_findings(ln_bridge, lnfree_bridge, tokens_ln: torch.Tensor, tokens_lnfree: torch.Tensor,
                     progress: Progress = None, should_stop: ShouldStop = None, k: int = K,
                     threshold: float = 0.3, n_bins: int = N_BINS, variants: bool = False) -> dict:
    """All findings for an LN model and its LN-free twin: {"ln": {...}, "lnfree": {...}, "settings": {...}}.

    The confidence-neuron candidates are found in the LN model (where they act
    through the final LN's scale; the paper ranks the original model's neurons)
    and the same neuron indices are mean-ablated in both models (the twin is
    fine-tuned from the LN model, so neurons correspond); each model's own
    candidates are listed under "neurons".
    """
    if ln_bridge.cfg.d_mlp != lnfree_bridge.cfg.d_mlp or ln_bridge.cfg.n_layers != lnfree_bridge.cfg.n_layers:
        raise FindingsInputError("The two models have different shapes; compare a model with its LN-free twin.")
    neurons = [c["neuron"] for c in confidence_neurons(ln_bridge, k)]
    return jsonable({
        "settings": {"k": k, "threshold": threshold, "n_bins": n_bins, "ablated_neurons": neurons,
                     "ablated_layer": ln_bridge.cfg.n_layers - 1, "neurons_from": "ln",
                     "definitions": "the paper's code", "variants": VARIANTS if variants else {}},
        "ln": findings(ln_bridge, tokens_ln, neurons, k, threshold, n_bins, sub_progress(progress, 0, 0.5, "LN: "),
                       should_stop, variants),
        "lnfree": findings(lnfree_bridge, tokens_lnfree, neurons, k, threshold, n_bins,
                           sub_progress(progress, 0.5, 1, "LN-free: "), should_stop, variants),
    })


def pair_findings(ln: LoadedModel, lnfree: LoadedModel, n_seq: int, seq_len: int | None = None,
                  source: str = "demo", progress: Progress = None, should_stop: ShouldStop = None,
                  k: int = K, threshold: float = 0.3, n_bins: int = N_BINS, bos: str = DEFAULT_BOS,
                  variants: bool = False) -> dict:
    """compare_findings on `n_seq` held-out sequences of `seq_len` tokens (default: each model's n_ctx),
    with the models and every setting recorded in the result (what the app and the CLI both export).

    bos: how each sequence begins (base.BOS_PROTOCOLS): "packed" (default, the
    paper's code: packed chunks, no BOS) or "prepend" (<|endoftext|> first, as the
    app's prompts).  variants=True adds our variants of the findings (VARIANTS).
    """
    check_bos(bos)
    check_pair(ln.info, lnfree.info)
    tokens = []
    for bridge in (ln.bridge, lnfree.bridge):
        n_ctx = bridge.cfg.n_ctx
        if seq_len is not None and seq_len > n_ctx:
            raise FindingsInputError(f"A sequence length of {seq_len} exceeds the model's context of {n_ctx}; "
                                     f"lower it.")
        tokens.append(heldout_tokens(bridge.tokenizer, seq_len or n_ctx, n_seq, source, bos))
    start = time.time()
    first, second = sorted((ln, lnfree), key=id)  # one order for every thread: no deadlock
    with first.lock, second.lock:
        result = compare_findings(ln.bridge, lnfree.bridge, tokens[0], tokens[1], progress, should_stop, k=k,
                                  threshold=threshold, n_bins=n_bins, variants=variants)
    result["models"] = {"ln": ln.spec, "lnfree": lnfree.spec, "lnfree_is_ln_free": lnfree.ln_free,
                        "ln_is_ln_free": ln.ln_free}
    result["settings"].update({"n_seq": n_seq, "seq_len": int(tokens[0].shape[1]), "source": source,
                               "bos": bos, "bos_protocol": BOS_PROTOCOLS[bos],
                               "seconds": round(time.time() - start, 1)})
    return result


def _top(r: dict, field: str):
    rows = r["ablation"]["per_neuron"]
    return rows[0][field] if rows else None


# (metric, unit, how to read it from one model's findings, the paper's LN -> LN-free value)
SUMMARY = [
    ("top confidence neuron ablated: median |delta CE|", "nats", lambda r: _top(r, "median_abs_delta_ce"),
     "changes with LN, ~0 LN-free"),
    ("top confidence neuron ablated: median |delta entropy|", "nats",
     lambda r: _top(r, "median_abs_delta_entropy"), "changes with LN, ~0 LN-free"),
    ("residual norm at position 0, peak over blocks", "L2", lambda r: r["norms"]["pos0_peak"],
     "GPT-2 medium: ~500 -> ~3,600 by layer 3 with LN; ~300-500 LN-free"),
    ("residual norm at position 0, final", "L2", lambda r: r["norms"]["pos0_final"], ""),
    ("residual norm at other positions, final", "L2", lambda r: r["norms"]["rest_final"], ""),
    ("attention-sink rate", "share", lambda r: r["sinks"]["rate"], "55.3% -> 45.3%"),
    ("mean output entropy", "nats", lambda r: r["calibration"]["entropy"], "GPT-2 small: 3.053 -> 2.794"),
    ("expected calibration error", "", lambda r: r["calibration"]["ece"], "GPT-2 small: 0.0193 -> 0.0354"),
    ("cross-entropy", "nats", lambda r: r["calibration"]["ce"], ""),
    ("DLA error (NMAE over heads)", "share", lambda r: r["dla_error"]["nmae"], "GPT-2 small: 49% -> 0%"),
]
SUMMARY_VARIANTS = [  # rows shown only when the result has our variants
    ("[our variant] sink rate, head mean over queries 1..T-1", "share", lambda r: r["sinks"]["head_mean"]["rate"]),
    ("[our variant] all top-k neurons ablated: mean delta CE", "delta nats",
     lambda r: r["ablation"]["signed"]["joint"]["delta_ce"]),
    ("[our variant] all top-k neurons ablated: mean delta entropy", "delta nats",
     lambda r: r["ablation"]["signed"]["joint"]["delta_entropy"]),
    ("[our variant] DLA error, all positions, next token, raw W_U", "share", lambda r: r["dla_error_all"]["nmae"]),
]


def summary_table(result: dict) -> list[dict]:
    """One row per headline number of a compare_findings result: metric, unit, ln, lnfree, paper
    (our variants' rows, marked as such, after the paper's when the result has them)."""
    rows = [{"metric": name, "unit": unit, "ln": get(result["ln"]), "lnfree": get(result["lnfree"]),
             "paper": paper} for name, unit, get, paper in SUMMARY]
    if result["settings"].get("variants"):
        rows += [{"metric": name, "unit": unit, "ln": get(result["ln"]), "lnfree": get(result["lnfree"]),
                  "paper": ""} for name, unit, get in SUMMARY_VARIANTS]
    return rows
