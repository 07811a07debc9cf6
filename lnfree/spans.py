"""Repeated random-token spans: training rows that exercise induction heads (LN removal's
--span-frac, and the demo's pretraining), and which of their targets induction can predict."""

from __future__ import annotations

import torch


def repeated_spans(n: int, n_ctx: int, vocab_size: int, eot_id: int, gen: torch.Generator,
                   lengths: tuple[int, int] = (16, 128)) -> torch.Tensor:
    """[n, n_ctx] sequences: EOT, then a random span (never EOT) of a length drawn from `lengths`
    (inclusive) repeated to fill n_ctx."""
    rows = [torch.empty(0, n_ctx, dtype=torch.long)]
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        span = torch.randint(0, vocab_size - 1, (length,), generator=gen)
        span = span + (span >= eot_id).long()
        body = span.repeat(-(-(n_ctx - 1) // length))[: n_ctx - 1]
        rows.append(torch.cat([torch.tensor([eot_id]), body])[None])
    return torch.cat(rows)


def induction_targets(ids: torch.Tensor) -> torch.Tensor:
    """[n, n_ctx - 1] bool: which next-token targets of repeated-span rows (`repeated_spans`) induction
    can predict: all from the second token of the second copy on.  The first copy is random, and the
    first token of the second copy follows a token seen only once.  A row's span length is its
    shortest period (a span that repeats within itself is predictable from its own repeat)."""
    body = ids[:, 1:]
    mask = torch.zeros_like(body, dtype=torch.bool)
    for r, row in enumerate(body):
        length = next(n for n in range(1, len(row) + 1) if torch.equal(row[n:], row[: len(row) - n]))
        mask[r, length + 1 :] = True
    return mask


def next_token_targets(ids: torch.Tensor, n_text: int = 0, repeats_only: bool = False) -> torch.Tensor:
    """[n, n_ctx - 1] targets for a batch whose first `n_text` rows are text and the rest repeated spans.
    With `repeats_only`, span targets induction cannot predict are -100 (cross_entropy ignores them)."""
    targets = ids[:, 1:]
    if not repeats_only or n_text >= len(ids):
        return targets
    spans = targets[n_text:].masked_fill(~induction_targets(ids[n_text:]), -100)
    return torch.cat([targets[:n_text], spans])
