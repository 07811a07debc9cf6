"""Data sources: the paper's OpenWebText split without the download, local files, deterministic batches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lnfree import data


def test_local_sources_and_heldout_split(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(38)) + "\n")
    train, held = list(data.documents(str(tmp_path), "train")), list(data.documents(str(tmp_path), "heldout"))
    assert len(train) + len(held) == 40 and len(held) == 2  # 5% held out
    assert not set(train) & set(held)
    with pytest.raises(data.DataError, match="no string field"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"txt": 1}\n')
        data.documents(str(bad), "train")


def test_batches_are_a_function_of_the_step_only():
    chunks = torch.arange(40).view(10, 4)
    d1, d2 = data.TrainData(chunks, seed=3), data.TrainData(chunks, seed=3)
    # One process with 2 micro-batches of 2 == two processes with one micro-batch each.
    step = torch.cat([d1.batch(4, 2, 4, 0), d1.batch(4, 2, 4, 1)])
    assert torch.equal(step, torch.cat([d2.batch(4, 2, 4, 0), d2.batch(4, 2, 4, 1)]))
    # An epoch visits every chunk once.
    rows = torch.cat([d1.batch(s, 2, 2, 0) for s in range(1, 6)])
    assert sorted(rows[:, 0].tolist()) == list(range(0, 40, 4))


def test_span_frac_mixes_repeated_spans_into_training_only(tmp_path, tokenizer):
    from lnfree.spans import induction_targets

    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"row {i} " * 40}) for i in range(60)) + "\n")
    plain, held = data.load_train_eval(str(text), tokenizer, 256, None, 10_000, seed=0)
    mixed, held2 = data.load_train_eval(str(text), tokenizer, 256, None, 10_000, seed=0, span_frac=0.25)
    assert torch.equal(held, held2)  # the held-out text is untouched
    n_text = len(plain.chunks)
    assert torch.equal(mixed.chunks[:n_text], plain.chunks)
    spans = mixed.chunks[n_text:].long()
    assert len(spans) == round(n_text / 3)  # a quarter of all training chunks
    eot = tokenizer.eos_token_id
    assert (spans[:, 0] == eot).all() and not (spans[:, 1:] == eot).any()
    assert spans.max() < len(tokenizer)
    # Each row is one span repeated: induction can predict everything from its second copy on.
    lengths = (~induction_targets(spans)).sum(1) - 1
    assert lengths.min() >= data.SPAN_LENGTHS[0] and lengths.max() <= data.SPAN_LENGTHS[1]
    body = spans[:, 1:]
    for row, n in zip(body, lengths.tolist(), strict=True):
        assert torch.equal(row[n:], row[:-n])


def test_one_text_without_paragraphs_holds_out_its_last_five_percent(tmp_path, tokenizer):
    text = " ".join(f"word{i}" for i in range(4000))  # one line, no blank line: one document
    path = tmp_path / "one.txt"
    path.write_text(text)
    train, = data.documents(str(path), "train")
    held, = data.documents(str(path), "heldout")
    assert train + held == text
    assert len(held) == pytest.approx(data.LOCAL_HELDOUT_FRACTION * len(text), rel=0.01)
    assert held.startswith(" ")  # cut between words
    chunks, held_chunks = data.load_train_eval(str(path), tokenizer, 16, None, 10_000, seed=0)
    assert len(chunks.chunks) > 10 * len(held_chunks) > 0


def test_short_heldout_split_says_what_to_change(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("a few words " * 30)
    with pytest.raises(data.DataError, match="shorter than one context window of 64 tokens; give more text or a "
                                             "lower --n-ctx"):
        data.load_train_eval(str(path), tokenizer, 64, None, 10_000, seed=0)


def test_named_pipes_and_devices_are_refused_without_opening_them(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")
    for source, kind in ((tmp_path / "pipe.jsonl", "a named pipe"), ("/dev/null", "a character device")):
        with pytest.raises(data.DataError, match=f"is {kind}, not a file or a folder"):
            data.documents(str(source), "train")
    (tmp_path / "ok.txt").write_text("text " * 100)
    with pytest.raises(data.DataError, match="pipe.jsonl' is a named pipe"):
        data.documents(str(tmp_path), "train")  # a folder holding one


def test_the_papers_openwebtext_split_is_train_test_split_at_its_real_size():
    """heldout_indices at OpenWebText's 8,013,769 rows: the 4,007 documents datasets would hold out."""
    datasets = pytest.importorskip("datasets")
    import numpy as np

    n = data.OPENWEBTEXT_DOCS
    split = datasets.Dataset.from_dict({"i": np.arange(n)}).train_test_split(
        test_size=data.OWT_TEST_SIZE, seed=data.OWT_SEED)
    assert data.heldout_indices(n) == set(split["test"]["i"]) and len(split["test"]) == 4007


def write_hub_dataset(root, n_rows: int, shards: int = 3, column: str = "text"):
    """A dataset in the hub's own layout (OpenWebText's: plain_text/train-0000k-of-0000n.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "plain_text").mkdir(parents=True)
    bounds = [round(k * n_rows / shards) for k in range(shards + 1)]
    for k in range(shards):
        rows = [f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + i % 30))
                for i in range(bounds[k], bounds[k + 1])]
        pq.write_table(pa.table({column: rows}), root / "plain_text" / f"train-{k:05d}-of-{shards:05d}.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: plain_text\n  data_files:\n  - split: train\n"
                                    "    path: plain_text/train-*\n---\n")
    return root


def test_a_local_hub_format_dataset_streams_with_the_papers_split(tmp_path):
    """The streaming path (load_dataset(..., streaming=True)) on a local copy in the hub's format: its held-out
    documents are train_test_split(0.0005, seed 2357)'s test rows of the same dataset, the rest train."""
    datasets = pytest.importorskip("datasets")
    root = write_hub_dataset(tmp_path / "owt", 6001)  # ceil(0.0005 * 6001) = 4 held out
    assert data.is_streamed(str(root)) and data.dataset_arg(str(root)) == str(root)
    split = datasets.load_dataset(str(root), split="train").train_test_split(
        test_size=data.OWT_TEST_SIZE, seed=data.OWT_SEED)
    held = list(data.documents(str(root), "heldout"))
    assert len(held) == 4 and sorted(held) == sorted(split["test"]["text"])
    train = list(data.documents(str(root), "train"))
    assert len(train) == 5997 and sorted(train) == sorted(split["train"]["text"])
    assert train[:2] == ["Document 0: " + " ".join(f"w{j}" for j in range(20)),
                         "Document 1: " + " ".join(f"w{(7 + j) % 97}" for j in range(21))]  # row order kept


def test_bad_hub_format_datasets_are_one_sentence(tmp_path):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="a folder holding a dataset in the hub's format"):
        data.dataset_arg(str(tmp_path))  # no parquet files
    with pytest.raises(argparse.ArgumentTypeError, match="expected one of openwebtext"):
        data.dataset_arg("openwebtxt")
    root = write_hub_dataset(tmp_path / "other", 10, shards=1, column="content")
    with pytest.raises(data.DataError, match="has no `text` column .it has content"):
        list(data.documents(str(root), "train"))
    with pytest.raises(data.DataError, match="use --dataset DIR"):
        data.check_source(str(root))  # given as --data


def test_remove_and_evaluate_read_a_local_hub_format_dataset(tmp_path, tiny_ln_dir):
    """`--dataset DIR` end to end: lnfree.remove trains on the stream's train rows and holds out its test rows;
    lnfree.evaluate reads the same held-out rows."""
    from tests.test_lnfree_cli import ENV, TRAIN, assert_user_error, remove

    root = write_hub_dataset(tmp_path / "owt", 8001)  # 5 held-out documents
    out = tmp_path / "run"
    remove("--model", tiny_ln_dir, "--dataset", root, "--output-dir", out, *TRAIN, "--max-steps", 6,
           "--save-every", 0)
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 6 and run["data"] == str(root)
    proc = subprocess.run([sys.executable, "-m", "lnfree.evaluate", "--models", str(tiny_ln_dir), str(out),
                           "--dataset", str(root), "--n-ctx", "32", "--json", str(tmp_path / "eval.json")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["models"][1]["tokens"] == run["heldout_tokens"] == 620
    assert ev["models"][1]["ce_mean"] == pytest.approx(run["heldout_ce_final"], abs=1e-4)
    (tmp_path / "empty").mkdir()
    bad = remove("--model", tiny_ln_dir, "--dataset", tmp_path / "empty", "--output-dir", tmp_path / "bad",
                 check=False)
    assert_user_error(bad, "--dataset", "hub's format")


def test_bos_chunks_start_with_eot_and_keep_the_stream():
    from models.corpus import pack

    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # stream: 0 5 6 7 0 8 9 0 10 11 12 13 (12 tokens)
    packed = pack(docs, eot_id=0, n_ctx=4)
    assert packed.tolist() == [[0, 5, 6, 7], [0, 8, 9, 0], [10, 11, 12, 13]]
    bos = pack(docs, eot_id=0, n_ctx=4, bos=True)
    assert bos.tolist() == [[0, 0, 5, 6], [0, 7, 0, 8], [0, 9, 0, 10], [0, 11, 12, 13]]
    assert bos[:, 1:].flatten().tolist() == [0, 5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13]  # nothing lost or reordered


def test_a_bos_run_trains_and_holds_out_chunks_that_start_with_eot(tiny_ln_dir, text_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ln_dir)
    train, held = data.load_train_eval(str(text_data), tok, 32, None, 4096, seed=0, span_frac=0.25, bos=True)
    eot = tok.eos_token_id
    assert (train.chunks[:, 0] == eot).all() and (held[:, 0] == eot).all()
    plain_train, plain_held = data.load_train_eval(str(text_data), tok, 32, None, 4096, seed=0)
    assert not (plain_held[:, 0] == eot).all()  # packed chunks start mid-text
