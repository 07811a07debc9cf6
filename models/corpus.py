"""The embedded demo corpus (KJV + Shakespeare), packing text into n_ctx chunks, and repeated
random spans (what `pretrain_demo`'s induction experiments add to the text)."""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterable
from pathlib import Path

import torch

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.jsonl.xz"
SPLITS = ("train", "heldout")


def load_passages(split: str) -> list[str]:
    """Passages of the embedded corpus for `split` ("train" or "heldout"), in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    with lzma.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return [d["text"] for d in map(json.loads, f) if d["split"] == split]


def pack(token_lists: Iterable[list[int]], eot_id: int, n_ctx: int) -> torch.Tensor:
    """Join documents with EOT between them and cut the stream into [N, n_ctx] chunks.

    Every document is preceded by EOT (as GPT-2 was trained); the ragged tail is dropped.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.append(eot_id)
        stream.extend(ids)
    n = len(stream) // n_ctx
    return torch.tensor(stream[: n * n_ctx], dtype=torch.long).view(n, n_ctx)


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
