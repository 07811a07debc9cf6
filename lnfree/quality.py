"""Model-quality measurements shared by removal, evaluation and the demo's pretraining: CE and induction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def token_losses(model, chunks: torch.Tensor, batch_size: int = 16, top1: bool = False):
    """Per-token next-token cross-entropy (nats) of a causal LM on [N, T] chunks -> [N, T-1];
    with `top1`, also the model's most likely next token at each of those positions."""
    device = next(model.parameters()).device
    out, best = [], []
    for i in range(0, len(chunks), batch_size):
        ids = chunks[i : i + batch_size].to(device)
        logits = model(ids).logits.float()
        out.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").cpu())
        if top1:
            best.append(logits[:, :-1].argmax(-1).cpu())
    return (torch.cat(out), torch.cat(best)) if top1 else torch.cat(out)


def induction_batch(vocab_size: int, n_seq: int = 64, length: int = 50, seed: int = 0,
                    bos_id: int | None = None) -> torch.Tensor:
    """Random-token sequences repeated twice, [n_seq, 2*length (+1 with bos)].

    Tokens are drawn uniformly from the whole vocabulary except `bos_id`.
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab_size - 1, (n_seq, length), generator=g)
    if bos_id is not None:
        first = first + (first >= bos_id).long()  # skip the BOS/EOT id
    seq = torch.cat([first, first], dim=1)
    if bos_id is not None:
        seq = torch.cat([torch.full((n_seq, 1), bos_id), seq], dim=1)
    return seq


def induction_losses(model, vocab_size: int, bos_id: int | None, n_seq: int = 64,
                     length: int = 50, seed: int = 0) -> dict[str, float]:
    """Mean loss on the first copy and on the second copy of repeated random tokens.

    A model with induction heads predicts the second copy far better than the
    first (which is unpredictable: ~log(vocab) nats).
    """
    seq = induction_batch(vocab_size, n_seq, length, seed, bos_id)
    losses = token_losses(model, seq)
    offset = 1 if bos_id is not None else 0
    # losses[:, j] is the loss of predicting token j+1.
    first = losses[:, offset : offset + length - 1]  # tokens 2..length of copy 1
    second = losses[:, offset + length : offset + 2 * length - 1]  # tokens 2..length of copy 2
    return {"first_copy": first.mean().item(), "second_copy": second.mean().item()}
