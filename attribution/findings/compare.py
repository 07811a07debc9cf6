"""Every finding for one model, for an LN model and its LN-free twin, and the headline table."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from attribution.findings.base import FindingsInputError, Progress, ShouldStop, heldout_tokens, sub_progress
from attribution.findings.calibration import calibration
from attribution.findings.dla_error import dataset_dla_error
from attribution.findings.first_token import attention_sink_rate, first_token_norms
from attribution.findings.neurons import ablate_neurons, confidence_neurons
from attribution.results import jsonable

if TYPE_CHECKING:
    from models import LoadedModel

STAGES = {"neurons": 2.0, "norms": 1.0, "sinks": 1.0, "calibration": 1.0, "dla_error": 2.0}


def findings(bridge, tokens: torch.Tensor, neurons: list[int], k: int = 5, threshold: float = 0.3,
             n_bins: int = 15, progress: Progress = None, should_stop: ShouldStop = None) -> dict:
    """Every analysis for one model; `neurons` (last layer) are the ones mean-ablated."""
    total, done = sum(STAGES.values()), 0.0
    out = {"n_seq": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}

    def part(name: str) -> Progress:
        nonlocal done
        lo, done = done, done + STAGES[name]
        return sub_progress(progress, lo / total, done / total)

    out["neurons"] = confidence_neurons(bridge, k)
    out["ablation"] = ablate_neurons(bridge, tokens, neurons, part("neurons"), should_stop, individually=True)
    out["norms"] = first_token_norms(bridge, tokens, part("norms"), should_stop)
    out["sinks"] = attention_sink_rate(bridge, tokens, threshold, part("sinks"), should_stop)
    out["calibration"] = calibration(bridge, tokens, n_bins, part("calibration"), should_stop)
    out["dla_error"] = dataset_dla_error(bridge, tokens, part("dla_error"), should_stop)
    return out


def compare_findings(ln_bridge, lnfree_bridge, tokens_ln: torch.Tensor, tokens_lnfree: torch.Tensor,
                     progress: Progress = None, should_stop: ShouldStop = None, k: int = 5,
                     threshold: float = 0.3, n_bins: int = 15) -> dict:
    """All findings for an LN model and its LN-free twin: {"ln": {...}, "lnfree": {...}, "settings": {...}}.

    The confidence-neuron candidates are found in the LN model (where they act
    through the final LN's scale) and the same neuron indices are mean-ablated in
    both models (the twin is fine-tuned from the LN model, so neurons correspond);
    each model's own candidates are listed under "neurons".
    """
    if ln_bridge.cfg.d_mlp != lnfree_bridge.cfg.d_mlp or ln_bridge.cfg.n_layers != lnfree_bridge.cfg.n_layers:
        raise FindingsInputError("The two models have different shapes; compare a model with its LN-free twin.")
    neurons = [c["neuron"] for c in confidence_neurons(ln_bridge, k)]
    return jsonable({
        "settings": {"k": k, "threshold": threshold, "n_bins": n_bins, "ablated_neurons": neurons,
                     "ablated_layer": ln_bridge.cfg.n_layers - 1, "neurons_from": "ln"},
        "ln": findings(ln_bridge, tokens_ln, neurons, k, threshold, n_bins, sub_progress(progress, 0, 0.5, "LN: "),
                       should_stop),
        "lnfree": findings(lnfree_bridge, tokens_lnfree, neurons, k, threshold, n_bins,
                           sub_progress(progress, 0.5, 1, "LN-free: "), should_stop),
    })


def pair_findings(ln: LoadedModel, lnfree: LoadedModel, n_seq: int, seq_len: int | None = None,
                  source: str = "demo", progress: Progress = None, should_stop: ShouldStop = None,
                  k: int = 5, threshold: float = 0.3, n_bins: int = 15) -> dict:
    """compare_findings on `n_seq` held-out sequences of `seq_len` tokens (default: each model's n_ctx),
    with the models and every setting recorded in the result (what the app and the CLI both export)."""
    tokens = []
    for bridge in (ln.bridge, lnfree.bridge):
        n_ctx = bridge.cfg.n_ctx
        if seq_len is not None and seq_len > n_ctx:
            raise FindingsInputError(f"A sequence length of {seq_len} exceeds the model's context of {n_ctx}; "
                                     f"lower it.")
        tokens.append(heldout_tokens(bridge.tokenizer, seq_len or n_ctx, n_seq, source))
    start = time.time()
    first, second = sorted((ln, lnfree), key=id)  # one order for every thread: no deadlock
    with first.lock, second.lock:
        result = compare_findings(ln.bridge, lnfree.bridge, tokens[0], tokens[1], progress, should_stop, k=k,
                                  threshold=threshold, n_bins=n_bins)
    result["models"] = {"ln": ln.spec, "lnfree": lnfree.spec, "lnfree_is_ln_free": lnfree.ln_free,
                        "ln_is_ln_free": ln.ln_free}
    result["settings"].update({"n_seq": n_seq, "seq_len": int(tokens[0].shape[1]), "source": source,
                               "seconds": round(time.time() - start, 1)})
    return result


# (metric, unit, how to read it from one model's findings, the paper's LN -> LN-free value)
SUMMARY = [
    ("confidence-neuron ablation: delta CE", "nats", lambda r: r["ablation"]["delta_ce"],
     "changes with LN, ~0 LN-free"),
    ("confidence-neuron ablation: delta entropy", "nats", lambda r: r["ablation"]["delta_entropy"],
     "changes with LN, ~0 LN-free"),
    ("residual norm at position 0, first layer", "L2", lambda r: r["norms"]["pos0"][0], ""),
    ("residual norm at position 0, final", "L2", lambda r: r["norms"]["pos0"][-1],
     "GPT-2 medium: ~500 -> ~3,600 by layer 3 with LN; ~300-500 LN-free"),
    ("residual norm at other positions, final", "L2", lambda r: r["norms"]["rest"][-1], ""),
    ("attention-sink rate", "share", lambda r: r["sinks"]["rate"], "55.3% -> 45.3%"),
    ("mean output entropy", "nats", lambda r: r["calibration"]["entropy"], "GPT-2 small: 3.053 -> 2.794"),
    ("expected calibration error", "", lambda r: r["calibration"]["ece"], "GPT-2 small: 0.0193 -> 0.0354"),
    ("cross-entropy", "nats", lambda r: r["calibration"]["ce"], ""),
    ("DLA error (NMAE over heads)", "share", lambda r: r["dla_error"]["nmae"], "GPT-2 small: 49% -> 0%"),
]


def summary_table(result: dict) -> list[dict]:
    """One row per headline number of a compare_findings result: metric, unit, ln, lnfree, paper."""
    return [{"metric": name, "unit": unit, "ln": get(result["ln"]), "lnfree": get(result["lnfree"]),
             "paper": paper} for name, unit, get, paper in SUMMARY]
