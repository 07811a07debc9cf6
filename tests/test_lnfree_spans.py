"""lnfree.spans: repeated random-token spans and which of their targets induction can predict."""

from __future__ import annotations

import torch

from lnfree.spans import induction_targets, next_token_targets, repeated_spans


def test_repeated_spans():
    gen = torch.Generator().manual_seed(0)
    rows = repeated_spans(20, 64, 100, eot_id=5, gen=gen, lengths=(3, 20))
    assert rows.shape == (20, 64) and (rows[:, 0] == 5).all() and not (rows[:, 1:] == 5).any()
    for row in rows.tolist():
        body = row[1:]
        period = next(p for p in range(3, 21) if body[p:] == body[:-p])
        assert len(set(body[:period])) > 1  # a span of random tokens, repeated with that period
    assert repeated_spans(0, 64, 100, 5, gen).shape == (0, 64)


def test_induction_targets_are_the_tokens_a_copier_can_predict():
    """Against the definition: target j (token j+1) is predictable by induction iff the token before it
    occurred earlier in the row and what followed that earlier occurrence is the target."""
    rows = repeated_spans(16, 40, 50_000, eot_id=0, gen=torch.Generator().manual_seed(1), lengths=(3, 12))
    mask = induction_targets(rows)
    assert mask.shape == (16, 39) and mask.any(dim=1).all()
    for row, m in zip(rows.tolist(), mask.tolist(), strict=True):
        for j in range(len(row) - 1):
            earlier = [i for i in range(1, j) if row[i] == row[j]]
            assert m[j] == (bool(earlier) and row[earlier[-1] + 1] == row[j + 1]), (row, j)
    # A span that repeats within itself is predictable from its own repeat: [7, 8, 7, 8] has period 2.
    assert induction_targets(torch.tensor([[0, 7, 8, 7, 8, 7, 8]])).tolist() == [[False, False, False, True, True, True]]


def test_next_token_targets_mask_only_the_span_rows():
    """What the demo's pretraining and the toy train on: text rows keep every target; with repeats_only, span rows
    keep exactly the targets induction_targets marks and ignore (-100) the rest."""
    gen = torch.Generator().manual_seed(2)
    text = torch.randint(1, 500, (3, 30), generator=gen)
    spans = repeated_spans(2, 30, 500, eot_id=0, gen=gen, lengths=(4, 9))
    ids = torch.cat([text, spans])
    assert torch.equal(next_token_targets(ids, 3), ids[:, 1:])
    targets = next_token_targets(ids, 3, repeats_only=True)
    assert torch.equal(targets[:3], text[:, 1:])
    keep = induction_targets(spans)
    assert torch.equal(targets[3:][keep], spans[:, 1:][keep]) and (targets[3:][~keep] == -100).all()
    assert torch.equal(next_token_targets(text, 3, repeats_only=True), text[:, 1:])
