"""Task construction and the one-sentence errors a user can cause."""

from __future__ import annotations

import pytest
import torch

from attribution import AttributionInputError, Settings, tasks


def test_induction_structure(tokenizer):
    t = tasks.induction(tokenizer, n_prompts=3, seq_len=5, n_ctx=64, seed=0)
    assert t.clean.shape == t.corrupt.shape == (3, 10)
    bos = tokenizer.bos_token_id
    assert (t.clean[:, 0] == bos).all()
    a = t.clean[:, 1:6]
    assert torch.equal(t.clean[:, 6:], a[:, :-1])        # second copy repeats the first
    assert torch.equal(t.answer, a[:, -1])               # the answer is the next token of the copy
    assert torch.equal(t.corrupt[:, :6], t.clean[:, :6])
    for row_c, row_k in zip(t.clean, t.corrupt, strict=True):  # corrupted copy shares nothing with A
        assert not set(row_k[6:].tolist()) & set(row_c[1:6].tolist())
    assert t.position == 9
    assert torch.equal(tasks.induction(tokenizer, 3, 5, 64, seed=0).clean, t.clean)  # seeded


def test_ioi_names_single_token_and_swap(tokenizer):
    t = tasks.ioi(tokenizer, n_prompts=4, n_ctx=64, seed=0)
    assert t.clean.shape == t.corrupt.shape
    for b in range(4):
        io, s = int(t.answer[b]), int(t.counterfactual[b])
        assert io != s
        clean, corrupt = t.clean[b].tolist(), t.corrupt[b].tolist()
        diff = [i for i in range(len(clean)) if clean[i] != corrupt[i]]
        assert len(diff) == 1 and clean[diff[0]] == s and corrupt[diff[0]] == io
        assert clean.count(io) == 1 and clean.count(s) == 2
    names = tasks.single_token_words(tokenizer, tasks.NAMES)
    assert "Mary" in names and "John" in names
    assert all(len(tokenizer.encode(" " + n)) == 1 for n in names)


def test_ioi_needs_two_names(tokenizer, monkeypatch):
    monkeypatch.setattr(tasks, "NAMES", ["Mary", "Zyxwvut"])
    with pytest.raises(AttributionInputError, match="fewer than two single-token names"):
        tasks.ioi(tokenizer, 2, 64)


def test_custom_task_and_metric(tokenizer):
    t = tasks.custom(tokenizer, "When Mary and John went to the store, John gave a drink to", " Mary", " John",
                     "When Mary and John went to the store, Mary gave a drink to", n_ctx=64)
    logits = torch.randn(1, t.clean.shape[1], len(tokenizer))
    expect = logits[0, -1, t.answer[0]] - logits[0, -1, t.counterfactual[0]]
    assert torch.allclose(t.metric(logits), expect[None])
    only = tasks.custom(tokenizer, "When Mary", " and", n_ctx=64)
    assert only.corrupt is None and only.counterfactual is None
    logits = torch.randn(2, only.clean.shape[1], len(tokenizer))  # a batch of 2 patch variants
    assert torch.allclose(only.metric(logits), logits[:, -1, only.answer[0]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="When Mary", answer=" Marygold"), "not a single token: it splits into"),
    (dict(prompt="When Mary", answer=" Mary", counterfactual="xyzzy"), "counterfactual 'xyzzy' is not a single"),
    (dict(prompt="   ", answer=" Mary"), "prompt is empty"),
    (dict(prompt="When Mary", answer=""), "answer is empty"),
    (dict(prompt="When Mary", answer=" Mary", corrupt="When Mary and John"), "tokens but the corrupted prompt is"),
    (dict(prompt="When Mary " * 40, answer=" Mary"), "context is 64"),
    (dict(prompt="When Mary", answer=" Mary", position=17), "outside the prompt"),
])
def test_custom_errors_are_one_sentence(tokenizer, kwargs, message):
    with pytest.raises(AttributionInputError, match=message) as err:
        tasks.custom(tokenizer, n_ctx=64, **kwargs)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_multi_token_answer_shows_pieces(tokenizer):
    with pytest.raises(AttributionInputError) as err:
        tasks.custom(tokenizer, "When Mary", " Marygold", n_ctx=64)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" Marygold"))
    assert str(pieces) in str(err.value)


def test_build_rejects_bad_settings(tokenizer):
    with pytest.raises(AttributionInputError, match="Unknown task"):
        tasks.build(tokenizer, Settings(task="nope"), 64)
    with pytest.raises(AttributionInputError, match="context is 64"):
        tasks.build(tokenizer, Settings(task="induction", seq_len=40), 64)
    with pytest.raises(AttributionInputError, match="only be changed for the custom task"):
        tasks.build(tokenizer, Settings(task="ioi", position=3), 64)
