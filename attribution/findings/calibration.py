"""Calibration of next-token predictions: mean output entropy, expected calibration error, reliability bins.

As the paper's code (mech_interp/inference_analysis/analyse_models.py: MetricsSummary.plot_calibration and
calculate_ece_with_ci, over every prediction that run_inference.py records): 10 equal-width bins by default,
a confidence c in bin i when edge[i] <= c < edge[i + 1] (np.digitize), 1.0 in the last bin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attribution.findings import base

N_BINS = 10  # the paper's plot_calibration default


def calibration_from_logits(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = N_BINS) -> dict:
    """Entropy, ECE and reliability bins of next-token predictions: logits [..., V], targets [...]."""
    acc = _CalibrationAccumulator(n_bins, logits.device)
    logp = F.log_softmax(logits.float(), dim=-1)
    conf, pred = logp.max(-1)
    acc.add(-logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1), conf.exp(),
            (pred == targets).float())
    return acc.result()


class _CalibrationAccumulator:
    """Sums per confidence bin; bin b holds confidences in [edge_b, edge_b+1) with the edges
    np.linspace(0, 1, n + 1)'s (float64), the last bin including 1."""

    def __init__(self, n_bins: int, device):
        if n_bins < 1:
            raise base.FindingsInputError("Use at least one calibration bin.")
        self.n_bins = n_bins
        self.conf = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.correct = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.count = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.ce = self.entropy = 0.0
        self.n = 0
        self.edges = torch.arange(n_bins + 1, dtype=torch.float64, device=device) * (1.0 / n_bins)
        self.edges[-1] = 1.0                                   # exactly np.linspace(0, 1, n_bins + 1)

    def add(self, ce, entropy, conf, correct) -> None:
        conf, correct = conf.flatten().double(), correct.flatten().double()
        b = (torch.bucketize(conf, self.edges, right=True) - 1).clamp(0, self.n_bins - 1)  # np.digitize - 1
        self.conf.index_add_(0, b, conf)
        self.correct.index_add_(0, b, correct)
        self.count.index_add_(0, b, torch.ones_like(conf))
        self.ce += float(ce.double().sum())
        self.entropy += float(entropy.double().sum())
        self.n += conf.numel()

    def result(self) -> dict:
        n = max(self.n, 1)
        bins = []
        for b in range(self.n_bins):
            c = float(self.count[b])
            bins.append({"lo": float(self.edges[b]), "hi": float(self.edges[b + 1]), "count": int(c),
                         "confidence": float(self.conf[b] / c) if c else None,
                         "accuracy": float(self.correct[b] / c) if c else None})
        ece = float((self.conf - self.correct).abs().sum() / n)  # sum_b n_b/N |conf_b - acc_b|
        return {"entropy": self.entropy / n, "ece": ece, "ce": self.ce / n,
                "accuracy": float(self.correct.sum() / n), "confidence": float(self.conf.sum() / n),
                "n_predictions": self.n, "n_bins": self.n_bins, "bins": bins}


@torch.no_grad()
def calibration(bridge, tokens: torch.Tensor, n_bins: int = N_BINS, progress: base.Progress = None,
                should_stop: base.ShouldStop = None) -> dict:
    """Mean output entropy (nats) and the expected calibration error of top-1 next-token predictions.

    Over every prediction at positions 0..T-2 of every sequence: confidence is the
    top-1 probability, correct means the top-1 token is the actual next token.
    With equal-width bins over [0, 1], ECE = sum_b (n_b / N) |mean confidence_b -
    accuracy_b|.  Also returns CE, overall accuracy and mean confidence.
    """
    tokens = base.check_tokens(bridge, tokens)
    acc = _CalibrationAccumulator(n_bins, tokens.device)
    for batch in base.batches(tokens, base.batch_size(bridge, tokens.shape[1]), progress, should_stop, "calibration"):
        s = base.next_token_stats(bridge(batch), batch)
        acc.add(s["ce"], s["entropy"], s["confidence"], s["correct"])
    return acc.result()

