"""Token data for removal and evaluation: OpenWebText (streamed), the Pile subset, local text, demo corpus.

Every source yields documents; they are tokenised with the model's tokenizer,
joined with EOT and packed into n_ctx chunks (models.corpus.pack).  Training
batches are a deterministic function of the step (see `TrainData.batch`), so a
resumed or multi-process run sees exactly the chunks an uninterrupted
single-process run would.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lnfree.files import file_kind
from lnfree.spans import repeated_spans
from models.corpus import load_passages, pack

OPENWEBTEXT = "Skylion007/openwebtext"
OPENWEBTEXT_DOCS = 8_013_769  # rows of OpenWebText's train split
OWT_TEST_SIZE, OWT_SEED = 0.0005, 2357  # nanoGPT's split, used by the paper
PILE_FILTERED = "lucabaroni/apollo-pile-filtered-10k"
DATASETS = ("openwebtext", "pile-filtered", "demo")
LOCAL_HELDOUT_FRACTION = 0.05
SPAN_LENGTHS = (5, 100)  # repeated-span rows (--span-frac): span lengths, as the demo's pretraining


class DataError(ValueError):
    """Unreadable or unusable data; the message is one sentence for the user."""


def heldout_indices(n_rows: int) -> set[int]:
    """Row indices of nanoGPT's validation split (the paper's) of a dataset of n_rows rows.

    datasets' train_test_split(test_size=0.0005, seed=2357) takes the first
    ceil(test_size * n) entries of np.random.default_rng(seed).permutation(n);
    recomputing them lets a streamed dataset reproduce the split without the
    whole download.
    """
    n_test = math.ceil(OWT_TEST_SIZE * n_rows)
    return set(np.random.default_rng(OWT_SEED).permutation(n_rows)[:n_test].tolist())


def parquet_files(path: Path) -> list[Path]:
    """The .parquet files under a folder (a dataset in the hub's format), or none."""
    return sorted(p for p in path.rglob("*.parquet") if p.is_file()) if path.is_dir() else []


def dataset_arg(value: str) -> str:
    """--dataset: a name, or a local folder of a dataset in the hub's format (parquet files)."""
    if value in DATASETS or parquet_files(Path(value)):
        return value
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(DATASETS)}, or a folder holding a dataset in the hub's format "
        f"(.parquet files, as `hf download NAME --repo-type dataset --local-dir DIR` writes), not {value!r}")


def is_streamed(source: str) -> bool:
    """Hub datasets and local hub-format datasets are read as streams, up to the tokens a run needs."""
    return source in ("openwebtext", "pile-filtered") or bool(parquet_files(Path(source)))


def _split_stream(rows: Iterable[dict], n_rows: int, split: str, where: str) -> Iterator[str]:
    """The split's texts of a stream of n_rows rows, in row order (nanoGPT's split, see heldout_indices)."""
    test = heldout_indices(n_rows)
    want_test = split == "heldout"
    for i, row in enumerate(rows):
        if "text" not in row:
            raise DataError(f"{where} has no `text` column (it has {', '.join(row) or 'none'}).")
        if (i in test) == want_test:
            yield row["text"]


def _stream_local(path: Path, split: str) -> Iterator[str]:
    """A dataset in the hub's format on disk (e.g. a local copy of OpenWebText), streamed with the same
    load_dataset(..., streaming=True) call as the hub's; its train split's rows are counted from the
    parquet footers, so the held-out split is the one train_test_split would give on the whole dataset."""
    import datasets
    import pyarrow.parquet as pq

    try:
        files = datasets.load_dataset_builder(str(path)).config.data_files["train"]
        n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        rows = datasets.load_dataset(str(path), split="train", streaming=True)
        yield from _split_stream(rows, n_rows, split, repr(str(path)))
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"Could not read the dataset in {str(path)!r} ({type(err).__name__}); give a folder "
                        f"with the parquet files of a train split.") from None


def _stream_hub(name: str, split: str) -> Iterator[str]:
    import datasets

    try:
        if name == "openwebtext":
            rows = datasets.load_dataset(OPENWEBTEXT, split="train", streaming=True)
            yield from _split_stream(rows, OPENWEBTEXT_DOCS, split, OPENWEBTEXT)
        else:  # pile-filtered: an evaluation set, the same documents for either split
            yield from (row["text"] for row in datasets.load_dataset(PILE_FILTERED, split="train",
                                                                     streaming=True))
    except (OSError, ValueError, ConnectionError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"Could not stream {name} from the Hugging Face hub ({type(err).__name__}); "
                        f"check network access or use --data PATH with local text.") from None


def check_source(source: str) -> None:
    """Refuse a local data path that does not exist or is neither a file nor a folder (a named pipe or a
    device would block the read forever), by its type, without opening it."""
    if source in DATASETS:
        return
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise DataError(f"Data path {source!r} does not exist.") from None
    except OSError as err:
        raise DataError(f"Data path {source!r} cannot be read ({err.strerror}).") from None
    if stat.S_ISDIR(mode):
        _data_files(Path(source))  # each file of the folder, by its type too
    elif not stat.S_ISREG(mode):
        raise DataError(f"Data path {source!r} is {file_kind(mode)}, not a file or a folder; give a .txt or "
                        f".jsonl file, or a folder of them.")


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and not p.is_dir())
    for f in files:
        check_source(str(f))
    if not files:
        hint = (" (for its .parquet files, a dataset in the hub's format, use --dataset DIR)"
                if parquet_files(path) else "")
        raise DataError(f"{str(path)!r} holds no .txt or .jsonl files{hint}.")
    return files


def _local_documents(path: Path) -> list[str]:
    check_source(str(path))
    docs: list[str] = []
    for f in _data_files(path):
        try:
            if f.suffix == ".jsonl":
                for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                            raise DataError(f"{f}:{n} has no string field `text`.")
                        docs.append(row["text"])
            elif f.suffix == ".txt":
                docs.append(f.read_text(encoding="utf-8"))
            else:
                raise DataError(f"{str(f)!r} is neither .txt nor .jsonl; give text or JSON-lines files.")
        except (UnicodeDecodeError, json.JSONDecodeError, OSError) as err:
            raise DataError(f"Could not read {str(f)!r} ({type(err).__name__}); give UTF-8 .txt or "
                            f".jsonl files.") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{str(path)!r} holds no text.")
    return docs


def _split_text(text: str, split: str) -> list[str]:
    """One document without paragraphs: its last LOCAL_HELDOUT_FRACTION of characters (from a space or a
    line break on) are held out, the rest is training text."""
    cut = int(len(text) * (1 - LOCAL_HELDOUT_FRACTION))
    space = min((i for i in (text.find(" ", cut), text.find("\n", cut)) if i >= 0), default=cut)
    return [text[space:] if split == "heldout" else text[:space]]


def documents(source: str, split: str) -> Iterable[str]:
    """Documents of `source` ("openwebtext", "pile-filtered", "demo", a local hub-format dataset, or local
    text) for a split.

    Local data: whole .txt files (or paragraphs, for a single file) and .jsonl rows;
    the last LOCAL_HELDOUT_FRACTION of them (at least one) are held out.  A single
    document without paragraphs holds out the last LOCAL_HELDOUT_FRACTION of its text.
    """
    if source == "demo":
        return load_passages("train" if split == "train" else "heldout")
    if source in ("openwebtext", "pile-filtered"):
        return _stream_hub(source, split)
    if parquet_files(Path(source)):
        return _stream_local(Path(source), split)
    docs = _local_documents(Path(source))
    if len(docs) == 1:  # one long text file: split it into paragraphs so that it can be held out
        docs = [p for p in docs[0].split("\n\n") if p.strip()]
        if len(docs) == 1:
            return _split_text(docs[0], split)
    n_held = max(1, int(len(docs) * LOCAL_HELDOUT_FRACTION))
    return docs[len(docs) - n_held:] if split == "heldout" else docs[: len(docs) - n_held]


def tokenize_chunks(docs: Iterable[str], tokenizer, n_ctx: int, max_tokens: int | None = None,
                    desc: str = "tokenising", batch: int = 256, bos: bool = False) -> torch.Tensor:
    """Pack documents into [N, n_ctx] chunks (each starting with EOT with `bos`, see models.corpus.pack),
    stopping once max_tokens are collected.

    Documents are tokenised `batch` at a time (the fast tokenizer's batch path).
    """
    eot = tokenizer.eos_token_id
    lists: list[list[int]] = []
    total = 0
    bar = tqdm(desc=desc, unit="tok", unit_scale=True, total=max_tokens, leave=False)
    it = iter(docs)
    while max_tokens is None or total < max_tokens + n_ctx:
        group = list(itertools.islice(it, batch))
        if not group:
            break
        for ids in tokenizer(group, verbose=False)["input_ids"]:
            lists.append(ids)
            total += len(ids) + 1
            bar.update(len(ids) + 1)
    bar.close()
    chunks = pack(lists, eot, n_ctx, bos)
    if max_tokens is not None:
        chunks = chunks[: max(1, math.ceil(max_tokens / n_ctx))]
    return chunks


class TrainData:
    """Training chunks addressed by a global index: epoch e uses a seeded permutation of all chunks.

    Streaming sources are materialised up to the tokens the run needs (max_tokens).
    """

    def __init__(self, chunks: torch.Tensor, seed: int):
        if len(chunks) == 0:
            raise DataError("The training data is shorter than one context window; give more text or a lower "
                            "--n-ctx.")
        # int32 halves the memory of a materialised stream (GPT-2 vocabularies fit easily).
        self.chunks, self.seed = chunks.to(torch.int32), seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.chunks), generator=g)
        return self._perms[epoch]

    def rows(self, start: int, count: int) -> torch.Tensor:
        n = len(self.chunks)
        idx = [int(self._perm(i // n)[i % n]) for i in range(start, start + count)]
        return self.chunks[idx].long()

    def batch(self, step: int, micro: int, seqs_per_step: int, micro_index: int) -> torch.Tensor:
        """The micro_index-th micro-batch of optimizer step `step` (1-based), over all processes."""
        return self.rows((step - 1) * seqs_per_step + micro_index * micro, micro)


def load_train_eval(source: str, tokenizer, n_ctx: int, train_tokens: int | None, eval_tokens: int,
                    seed: int, span_frac: float = 0.0, bos: bool = False) -> tuple[TrainData, torch.Tensor]:
    """Training data and held-out chunks for `source` (demo / openwebtext / a local path).

    With `span_frac` > 0 that fraction of the training chunks are repeated random-token spans
    (lnfree.spans.repeated_spans), so that fine-tuning keeps exercising the induction heads;
    the held-out chunks stay text.  With `bos` every text chunk, held-out ones too, starts with EOT (the
    span rows always do).
    """
    streamed = is_streamed(source)
    train = tokenize_chunks(documents(source, "train"), tokenizer, n_ctx,
                            train_tokens if streamed else None, desc="tokenising train", bos=bos)
    if span_frac > 0:
        n = round(len(train) * span_frac / (1 - span_frac))
        gen = torch.Generator().manual_seed(seed)
        spans = repeated_spans(n, n_ctx, len(tokenizer), tokenizer.eos_token_id, gen, SPAN_LENGTHS)
        train = torch.cat([train, spans])
    held = tokenize_chunks(documents(source, "heldout"), tokenizer, n_ctx, eval_tokens, desc="tokenising held-out",
                           bos=bos)
    if len(held) == 0:
        raise DataError(f"The held-out split of {source} (its last {LOCAL_HELDOUT_FRACTION:.0%}) is shorter than "
                        f"one context window of {n_ctx} tokens; give more text or a lower --n-ctx.")
    return TrainData(train, seed), held
