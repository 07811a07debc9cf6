"""The embedded demo corpus (KJV + Shakespeare) and packing text into n_ctx chunks."""

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


def pack(token_lists: Iterable[list[int]], eot_id: int, n_ctx: int, bos: bool = False) -> torch.Tensor:
    """Join documents with EOT between them and cut the stream into [N, n_ctx] chunks.

    Every document is preceded by EOT (as GPT-2 was trained); the ragged tail is dropped.  With `bos`
    every chunk starts with EOT as well (a constant first token, as when GPT-2 is prompted): the stream is
    cut into n_ctx - 1 tokens per chunk.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.append(eot_id)
        stream.extend(ids)
    width = n_ctx - 1 if bos else n_ctx
    n = len(stream) // width
    chunks = torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)
    return torch.cat([torch.full((n, 1), eot_id), chunks], dim=1) if bos else chunks
