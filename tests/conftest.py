"""Shared fixtures: tiny GPT-2 checkpoints written with save_pretrained (no network)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from models.ln_free import ln_modules, to_eps_convention

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(2)

EOT = "<|endoftext|>"
TEXT = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The king said unto his servants, Go ye into the city and buy bread.",
    "To be, or not to be, that is the question.",
] * 20


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=64)


def tiny_model(tokenizer, n_layer: int = 2, d_model: int = 64, n_head: int = 4, n_ctx: int = 64,
               seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with non-trivial LN weights and biases."""
    torch.manual_seed(seed)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_ctx, n_embd=d_model, n_layer=n_layer,
                     n_head=n_head, bos_token_id=eot, eos_token_id=eot, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for _, (parent, attr, _) in ln_modules(model).items():
            ln = getattr(parent, attr)
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0.0, 0.1)
    return model


def write_lnfree(model: GPT2LMHeadModel, sigmas: dict[str, float], path, record_sigmas: bool = True):
    """Save `model` as an LN-free checkpoint in the paper's convention with the given sigmas.

    The saved model computes (x - mean) / sigma * gamma + beta for every LN.
    """
    import copy

    lf = copy.deepcopy(model)
    lf.config.layer_norm_epsilon = 1e12
    if record_sigmas:
        lf.config.lnfree_sigmas = dict(sigmas)
    with torch.no_grad():
        for name, (parent, attr, _) in ln_modules(lf).items():
            ln = getattr(parent, attr)
            ln.eps = 1e12
            ln.weight.copy_(to_eps_convention(ln.weight, sigmas[name]))
    lf.save_pretrained(path)
    return lf


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_ln_dir(tmp_path_factory, tokenizer):
    """A tiny LN GPT-2 (2 layers, d_model 64) saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny_ln")
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sigmas():
    names = ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"]
    return {n: 0.5 + 0.25 * i for i, n in enumerate(names)}


@pytest.fixture(scope="session")
def tiny_lnfree_dir(tmp_path_factory, tokenizer, tiny_sigmas):
    """The tiny model as an LN-free checkpoint (eps = 1e12 convention, recorded sigmas)."""
    path = tmp_path_factory.mktemp("tiny_lnfree")
    model = tiny_model(tokenizer)
    write_lnfree(model, tiny_sigmas, path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_scale_lnfree_dir(tmp_path_factory, tokenizer):
    """The tiny model LN-free with sigmas at its activations' scale (0.02), so that the metric is not ~0."""
    path = tmp_path_factory.mktemp("tiny_lnfree_real_scale")
    names = ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"]
    write_lnfree(tiny_model(tokenizer), {n: 0.02 for n in names}, path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A small .jsonl training text (200 rows) for lnfree runs on the tiny models."""
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"{TEXT[i % 3]} Number {i}."}) + "\n")
    return path
