"""Data sources: the paper's OpenWebText split without the download, local files, deterministic batches."""

from __future__ import annotations

import json

import pytest
import torch

from lnfree import data


def test_owt_split_matches_datasets_train_test_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    n = 20_000
    monkeypatch.setattr(data, "OPENWEBTEXT_DOCS", n)
    split = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
        test_size=data.OWT_TEST_SIZE, seed=data.OWT_SEED)
    assert data.owt_test_indices() == set(split["test"]["i"])
    assert len(split["test"]) == 10


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
