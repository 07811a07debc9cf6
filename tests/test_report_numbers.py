"""The headline numbers the app shows (top-k probabilities, metric on clean and corrupted prompts, logit
lens), recomputed from the plain transformers model with torch hooks."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from attribution import Settings, analyse, tasks
from attribution.report import attention_pattern
from models import load_bridge

IOI = Settings(task="custom", prompt="When Mary and John went to the store, John gave a drink to",
               answer=" Mary", counterfactual=" John",
               corrupt="When Mary and John went to the store, Mary gave a drink to", top_k=5)


@pytest.mark.parametrize("which", ["tiny_ln_dir", "tiny_lnfree_dir"])
def test_headline_numbers_match_transformers(which, request):
    path = request.getfixturevalue(which)
    model = load_bridge(str(path))
    bridge = model.bridge
    res = analyse(model, IOI)
    task = tasks.build(bridge.tokenizer, IOI, bridge.cfg.n_ctx)
    a, c = int(task.answer[0]), int(task.counterfactual[0])

    hf = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    final_resid = []
    hook = hf.transformer.ln_f.register_forward_pre_hook(lambda m, args: final_resid.append(args[0]))
    with torch.no_grad():
        out = hf(task.clean, output_hidden_states=True)
        corrupt_logits = hf(task.corrupt).logits
    hook.remove()
    logits = out.logits[0, -1]
    probs = logits.softmax(-1)
    top = probs.topk(5)
    assert [t for t, _ in res.top_tokens] == [bridge.tokenizer.decode([int(i)]) for i in top.indices]
    assert [p for _, p in res.top_tokens] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert res.metric_clean == pytest.approx((logits[a] - logits[c]).item(), abs=1e-4)
    assert res.metric_corrupt == pytest.approx((corrupt_logits[0, -1, a] - corrupt_logits[0, -1, c]).item(),
                                               abs=1e-4)
    # Logit lens: resid_pre of every block (hidden_states[0..L-1]) and the final residual, read through
    # the live final LN and the unembedding.
    streams = list(out.hidden_states[:-1]) + [final_resid[0]]
    with torch.no_grad():
        lens = [hf.lm_head(hf.transformer.ln_f(s))[0, -1] for s in streams]
    assert res.logit_lens.tolist() == pytest.approx([(x[a] - x[c]).item() for x in lens], abs=1e-4)
    assert res.logit_lens[-1] == pytest.approx(res.metric_clean, abs=1e-4)
    # The attention pattern panel: every head of every layer against transformers' own attentions.
    with torch.no_grad():
        attentions = hf(task.clean[:1], output_attentions=True).attentions
    for layer in range(bridge.cfg.n_layers):
        for head in range(bridge.cfg.n_heads):
            want = attentions[layer][0, head]
            # As the app reads it: kept by the analysis; and from a pass, when too large to keep.
            for pattern, strs in (attention_pattern(model, IOI, layer, head, res),
                                  attention_pattern(model, IOI, layer, head)):
                assert pattern.shape == tuple(want.shape)
                assert pattern.ravel().tolist() == pytest.approx(want.flatten().tolist(), abs=1e-5)
                assert len(strs) == task.clean.shape[1]
    assert res.attention is not None and "attention" not in res.to_dict()
