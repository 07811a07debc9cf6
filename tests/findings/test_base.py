"""attribution.findings.base: progress, cancellation, memory-sized batches, input checks, held-out text."""

from __future__ import annotations

import pytest
import torch

from attribution import findings as fnd
from attribution.findings import base as fbase


def test_progress_and_cancel(ln_pair, tokens, monkeypatch):
    monkeypatch.setattr(fbase, "MAX_BATCH", 1)
    seen = []
    fnd.calibration(ln_pair[0], tokens, progress=lambda f, text: seen.append((f, text)))
    fractions = [f for f, _ in seen]
    assert len(seen) == 6 and fractions == sorted(fractions) and fractions[-1] == 1.0
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(fnd.AnalysisCancelled):
        fnd.dataset_dla_error(ln_pair[0], tokens, should_stop=stop_after_two)
    assert len(calls) == 3


def test_batch_size_follows_free_memory(ln_pair, monkeypatch):
    import models.loading

    bridge = ln_pair[0]
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: 1 << 40)
    assert fbase.batch_size(bridge, 64) == fbase.MAX_BATCH
    per_seq = 4 * 64 * (4 * 300 + 3 * 256 + (12 + 4) * 64 + 2 * 4 * 64)
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: int(per_seq * 3 / fbase.MEMORY_SHARE))
    assert fbase.batch_size(bridge, 64) == 3
    monkeypatch.setattr(models.loading, "available_bytes", lambda device: 10)
    assert fbase.batch_size(bridge, 64) == 1


def test_bad_inputs(ln_pair, tokens, tokenizer):
    bridge = ln_pair[0]
    with pytest.raises(fnd.FindingsInputError, match="context"):
        fnd.calibration(bridge, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(fnd.FindingsInputError, match="tokenizer"):
        fnd.first_token_norms(bridge, torch.full((1, 5), 300))
    with pytest.raises(fnd.FindingsInputError, match="2-D"):
        fnd.calibration(bridge, torch.zeros(5, dtype=torch.long))
    with pytest.raises(fnd.FindingsInputError, match="at least one neuron"):
        fnd.ablate_neurons(bridge, tokens, [])
    with pytest.raises(fnd.FindingsInputError, match="Neurons"):
        fnd.ablate_neurons(bridge, tokens, [256])
    with pytest.raises(fnd.FindingsInputError, match="threshold"):
        fnd.attention_sink_rate(bridge, tokens, threshold=0)
    with pytest.raises(fnd.FindingsInputError, match="lower n_seq"):
        fnd.heldout_tokens(tokenizer, 64, 10**6)
    with pytest.raises(ValueError):  # FindingsInputError is a ValueError for the app and the CLI
        fnd.heldout_tokens(tokenizer, 64, 2, source="/nonexistent.txt")
    with pytest.raises(fnd.FindingsInputError, match="BOS protocol"):
        fnd.heldout_tokens(tokenizer, 32, 2, bos="bos")


def test_heldout_tokens_are_packed_demo_text(tokenizer):
    from models.corpus import load_passages, pack

    chunks = fnd.heldout_tokens(tokenizer, 32, 3)
    texts = load_passages("heldout")
    ref = pack([tokenizer.encode(t, add_special_tokens=False) for t in texts], tokenizer.eos_token_id, 32)
    n = len(ref)
    assert chunks.shape == (3, 32) and n > 100
    for got, i in zip(chunks, [0, round((n - 1) / 2), n - 1], strict=True):  # first, middle, last
        assert torch.equal(got, ref[i])


def test_heldout_tokens_from_a_text_file(tokenizer, tmp_path):
    from models.corpus import pack

    paragraphs = ["In the beginning was the Word.", "To be, or not to be, that is the question."] * 6
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    chunks = fnd.heldout_tokens(tokenizer, 16, 2, source=str(path))
    ref = pack([tokenizer.encode(p, add_special_tokens=False) for p in paragraphs], tokenizer.eos_token_id, 16)
    assert len(ref) > 2 and torch.equal(chunks, ref[[0, len(ref) - 1]])


def test_bos_protocols(tokenizer):
    """`packed` (the default, the paper's: its DataLoader's prepend_bos=False) keeps the chunks; `prepend`
    puts <|endoftext|> first and drops the last token (the DataLoader's prepend_bos=True: [bos] + ids,
    truncated to the context)."""
    import inspect

    packed = fnd.heldout_tokens(tokenizer, 32, 3)
    assert torch.equal(fnd.heldout_tokens(tokenizer, 32, 3, bos="packed"), packed)
    prepended = fnd.heldout_tokens(tokenizer, 32, 3, bos="prepend")
    eot = tokenizer.eos_token_id
    assert prepended.shape == packed.shape
    assert (prepended[:, 0] == eot).all() and torch.equal(prepended[:, 1:], packed[:, :-1])
    assert not (packed[:, 0] == eot).all()                       # packed chunks mostly start mid-text
    for fn in (fnd.heldout_tokens, fnd.pair_findings):
        assert inspect.signature(fn).parameters["bos"].default == "packed" == fnd.DEFAULT_BOS
    assert set(fnd.BOS_PROTOCOLS) == {"packed", "prepend"}
