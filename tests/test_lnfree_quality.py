"""lnfree.quality: cross-entropy and the induction probe against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lnfree.quality import induction_batch, induction_losses


class Copier(torch.nn.Module):
    """A perfect induction "model": where the current token occurred before, predict the token that
    followed it (logit 30); elsewhere, uniform logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.anchor = vocab, torch.nn.Parameter(torch.zeros(1))  # token_losses reads the device

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            for t, tok in enumerate(row):
                earlier = [j for j in range(t) if row[j] == tok]
                if earlier:
                    logits[b, t, row[earlier[-1] + 1]] = 30.0
        return type("Out", (), {"logits": logits})


def test_induction_losses_match_their_definition():
    vocab, length = 5000, 10
    ind = induction_losses(Copier(vocab), vocab, bos_id=7, n_seq=4, length=length)
    seq = induction_batch(vocab, 4, length, 0, bos_id=7)
    assert (seq[:, 0] == 7).all() and (seq[:, 1:] != 7).all() and seq.shape == (4, 1 + 2 * length)
    assert torch.equal(seq[:, 1 : 1 + length], seq[:, 1 + length :])
    assert all(len(set(r.tolist())) == length for r in seq[:, 1 : 1 + length])  # this seed: no repeats
    # So the first copy is unpredictable to the copier (uniform: log vocab per token) and every
    # token of the second copy after its first is predicted with logit 30 over vocab-1 zeros.
    assert ind["first_copy"] == pytest.approx(math.log(vocab), abs=1e-5)
    assert ind["second_copy"] == pytest.approx(math.log(1 + (vocab - 1) * math.exp(-30)), abs=1e-6)
