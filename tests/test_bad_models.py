"""Bad model directories: each ends in one sentence (exit 2, no traceback) and leaves the user's files as they were.

Every case damages a copy of a tiny LN or LN-free checkpoint in one way.  Most run in-process through
`models.inspect.main` (cheap); the ones that could hang (FIFOs) and a few others run as real subprocesses.
Then: the valid models still load with unchanged numbers, and the pair check (models.check_pair).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from models import ModelSpecError, check_pair, load_hf
from models import inspect as inspect_cli
from models.ln_free import ln_modules
from tests.conftest import tiny_model, tiny_tokenizer, write_lnfree

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


# --- damage helpers: each edits a copied checkpoint directory in place --------------------------------------

def edit_config(fn):
    def damage(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        fn(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    return damage


def set_config(**changes):
    return edit_config(lambda cfg: cfg.update(changes))


def drop_config(key):
    return edit_config(lambda cfg: cfg.pop(key))


def set_sigma(value):
    return edit_config(lambda cfg: cfg["lnfree_sigmas"].update({"blocks.0.ln2": value}))


def edit_weights(fn):
    def damage(path: Path):
        tensors = load_file(path / WEIGHTS)
        fn(tensors)
        save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    return damage


def fill_weight(name, value):
    return edit_weights(lambda t: t[name].fill_(value))


def poke_weight(name, value):
    def fn(t):
        t[name].view(-1)[3] = value
    return edit_weights(fn)


def write_bytes(name, data: bytes):
    def damage(path: Path):
        (path / name).write_bytes(data)
    return damage


def rename(name, new_name):
    def damage(path: Path):
        (path / name).rename(path / new_name)
    return damage


def dangling_link(name):
    def damage(path: Path):
        (path / name).unlink()
        (path / name).symlink_to(path / "gone.json")
    return damage


def empty_dir(path: Path):
    for p in path.iterdir():
        p.unlink()


def make_dir(name):
    def damage(path: Path):
        (path / name).unlink()
        (path / name).mkdir()
    return damage


def make_fifo(name):
    def damage(path: Path):
        (path / name).unlink()
        os.mkfifo(path / name)
    return damage


def truncate(name, keep: float):
    def damage(path: Path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def delete(*names):
    def damage(path: Path):
        for name in names:
            (path / name).unlink()
    return damage


def both(*damages):
    def damage(path: Path):
        for d in damages:
            d(path)
    return damage


def spec_is(name):
    """Not damage but a mistake in the spec: name a file inside the directory."""
    return lambda path: str(path / name)


def extra_layer(t):
    for k in [k for k in t if k.startswith("transformer.h.1.")]:
        t[k.replace("h.1.", "h.2.")] = t[k].clone()


def shrink_vocab(path: Path):
    """A consistent checkpoint whose embedding (200 rows) is smaller than its tokenizer (300 tokens)."""
    edit_weights(lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"][:200].clone()}))(path)
    set_config(vocab_size=200)(path)


def no_tokenizer(path: Path):
    for p in path.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            p.unlink()


def unrecorded_zero_ln(path: Path):
    drop_config("lnfree_sigmas")(path)
    fill_weight("transformer.h.0.ln_2.weight", 0.0)(path)


def shard(path: Path):
    """Split the weights into two shards with an index (as save_pretrained does for big models)."""
    tensors = load_file(path / WEIGHTS)
    (path / WEIGHTS).unlink()
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in files.items():
        save_file({k: tensors[k] for k in keys}, path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


LATIN1_CONFIG = b'{"model_type": "gpt2", "name": "caf\xe9", "n_layer": 2}'
RANDOM_BYTES = bytes(range(256)) * 40
HUGE_HEADER = (10**15).to_bytes(8, "little") + b"{}"
LN0 = "transformer.h.0.ln_1.weight"

# (id, which tiny model, damage (returns the spec to give, or None for the directory), a phrase of the sentence)
CASES = [
    # config.json
    ("config_not_json", "ln", write_bytes("config.json", b'{"model_type": "gpt2",'), "not valid json"),
    ("config_empty", "ln", write_bytes("config.json", b""), "is empty"),
    ("config_latin1", "ln", write_bytes("config.json", LATIN1_CONFIG), "not utf-8"),
    ("config_list", "ln", write_bytes("config.json", b"[1, 2]"), "json object"),
    ("config_is_dir", "ln", make_dir("config.json"), "is a directory"),
    ("config_fifo", "ln", make_fifo("config.json"), "named pipe"),
    ("config_missing", "ln", delete("config.json"), "no config.json"),
    ("config_dangling_link", "ln", dangling_link("config.json"), "no config.json"),
    ("config_foreign", "ln", set_config(model_type="llama"), "gpt-2"),
    ("config_no_n_layer", "ln", drop_config("n_layer"), "n_layer"),
    ("config_n_layer_word", "ln", set_config(n_layer="two"), "n_layer"),
    ("config_n_layer_zero", "ln", set_config(n_layer=0), "n_layer"),
    ("config_n_layer_float", "ln", set_config(n_layer=2.5), "n_layer"),
    ("config_n_layer_bool", "ln", set_config(n_layer=True), "n_layer"),
    ("config_n_head_indivisible", "ln", set_config(n_head=3), "divisible"),
    ("config_n_embd_vs_weights", "ln", set_config(n_embd=32), "shape"),
    ("config_n_layer_vs_weights", "ln", set_config(n_layer=3), "missing"),
    ("config_n_positions_vs_weights", "ln", set_config(n_positions=32), "shape"),
    ("config_vocab_vs_weights", "ln", set_config(vocab_size=400), "shape"),
    ("config_eps_string", "ln", set_config(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
    ("config_eps_negative", "ln", set_config(layer_norm_epsilon=-1e-5), "layer_norm_epsilon"),
    ("config_eps_nan", "ln", set_config(layer_norm_epsilon=math.nan), "layer_norm_epsilon"),
    ("config_activation_unknown", "ln", set_config(activation_function="swish2"), "activation_function"),
    ("config_n_inner_word", "ln", set_config(n_inner="big"), "n_inner"),
    ("config_untied_no_lm_head", "ln", set_config(tie_word_embeddings=False), "lm_head.weight"),
    ("config_base_not_text", "lnfree", set_config(lnfree_base=5), "lnfree_base"),
    # weights
    ("weights_missing_tensor", "ln", edit_weights(lambda t: t.pop("transformer.h.1.mlp.c_fc.weight")), "missing"),
    ("weights_wrong_shape", "ln", edit_weights(lambda t: t.update({LN0: torch.ones(32)})), "shape"),
    ("weights_extra_layer", "ln", edit_weights(extra_layer), "transformer.h.2"),
    ("weights_integer", "ln", edit_weights(lambda t: t.update({LN0: torch.ones(64, dtype=torch.int64)})),
     "floating"),
    ("weights_nan", "ln", poke_weight("transformer.wte.weight", math.nan), "nan or infinite"),
    ("weights_inf", "ln", poke_weight("transformer.h.1.attn.c_proj.weight", math.inf), "nan or infinite"),
    ("weights_empty", "ln", write_bytes(WEIGHTS, b""), "is empty"),
    ("weights_truncated", "ln", truncate(WEIGHTS, 0.5), "truncated"),
    ("weights_header_only", "ln", truncate(WEIGHTS, 0.01), "truncated"),
    ("weights_random", "ln", write_bytes(WEIGHTS, RANDOM_BYTES), "safetensors"),
    ("weights_huge_header", "ln", write_bytes(WEIGHTS, HUGE_HEADER), "safetensors"),
    ("weights_is_dir", "ln", make_dir(WEIGHTS), "is a directory"),
    ("weights_fifo", "ln", make_fifo(WEIGHTS), "named pipe"),
    ("weights_missing", "ln", delete(WEIGHTS), "no .safetensors"),
    ("weights_other_name", "ln", rename(WEIGHTS, "weights.safetensors"), WEIGHTS),
    ("weights_pickled_only", "ln", both(delete(WEIGHTS), write_bytes("pytorch_model.bin", b"x")), "pickled"),
    ("shards_missing_shard", "ln", both(shard, delete("model-00002-of-00002.safetensors")), "model-00002"),
    ("shards_index_garbage", "ln", both(shard, write_bytes("model.safetensors.index.json", b"{")),
     "not valid json"),
    ("shards_index_lies", "ln", both(shard, truncate("model-00001-of-00002.safetensors", 0.3)), "truncated"),
    # tokenizer
    ("tokenizer_none", "ln", no_tokenizer, "tokenizer"),
    ("tokenizer_vocab_over_embedding", "ln", shrink_vocab, "vocab_size"),
    ("tokenizer_json_garbage", "ln", write_bytes("tokenizer.json", b"\x00\x01garbage"), "tokenizer.json"),
    ("tokenizer_json_list", "ln", write_bytes("tokenizer.json", b"[]"), "tokenizer.json"),
    ("tokenizer_fifo", "ln", make_fifo("tokenizer.json"), "named pipe"),
    ("tokenizer_config_is_dir", "ln", make_dir("tokenizer_config.json"), "is a directory"),
    ("generation_config_fifo", "ln", make_fifo("generation_config.json"), "named pipe"),
    # LN-free metadata
    ("lnfree_zero_ln_implied", "lnfree", unrecorded_zero_ln, "zero"),
    ("lnfree_nan_ln", "lnfree", fill_weight("transformer.h.1.ln_1.weight", math.nan), "nan or infinite"),
    ("lnfree_inf_ln", "lnfree", poke_weight("transformer.ln_f.weight", math.inf), "nan or infinite"),
    ("lnfree_sigma_word", "lnfree", set_sigma("abc"), "blocks.0.ln2"),
    ("lnfree_sigma_null", "lnfree", set_sigma(None), "blocks.0.ln2"),
    ("lnfree_sigma_zero", "lnfree", set_sigma(0), "positive"),
    ("lnfree_sigma_negative", "lnfree", set_sigma(-1), "positive"),
    ("lnfree_sigma_nan", "lnfree", set_sigma(math.nan), "finite"),
    ("lnfree_sigma_inf", "lnfree", set_sigma(math.inf), "finite"),
    ("lnfree_sigmas_list", "lnfree", set_config(lnfree_sigmas=[1.0, 2.0]), "lnfree_sigmas"),
    ("lnfree_sigmas_partial", "lnfree", edit_config(lambda c: c["lnfree_sigmas"].pop("ln_final")), "ln_final"),
    ("lnfree_sigmas_foreign", "lnfree", edit_config(lambda c: c["lnfree_sigmas"].update({"blocks.7.ln1": 1.0})),
     "blocks.7.ln1"),
    # the spec itself
    ("spec_is_config_file", "ln", spec_is("config.json"), "is a file"),
    ("spec_is_weights_file", "ln", spec_is(WEIGHTS), "is a file"),
    ("spec_empty_dir", "ln", empty_dir, "no config.json"),
]
# Run as real subprocesses (with a timeout): the ones that could hang, and one that once loaded silently
# (each costs ~6 s of imports on a busy machine).
SUBPROCESS = {"config_fifo", "weights_fifo", "tokenizer_fifo", "generation_config_fifo", "weights_missing_tensor"}


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under `path`: a hash for regular files, the kind of anything else (never opened)."""
    out = {}
    for p in sorted(path.rglob("*")):
        mode = os.lstat(p).st_mode
        if stat.S_ISREG(mode):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = f"mode {stat.S_IFMT(mode):o}"
    return out


@pytest.fixture(scope="module")
def sources(tiny_ln_dir, tiny_lnfree_dir):
    return {"ln": tiny_ln_dir, "lnfree": tiny_lnfree_dir}


def run_subprocess(spec: str) -> tuple[int, str, str]:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "models.inspect", spec], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env=env)
    return res.returncode, res.stdout, res.stderr


def run_in_process(spec: str, capsys) -> tuple[int, str, str]:
    code = inspect_cli.main([spec])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case, kind, damage, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_model_is_one_sentence(case, kind, damage, phrase, sources, tmp_path, capsys):
    path = tmp_path / "model"
    shutil.copytree(sources[kind], path)
    spec = damage(path) or str(path)
    before = snapshot(path)
    code, out, err = run_subprocess(spec) if case in SUBPROCESS else run_in_process(spec, capsys)
    assert "Traceback" not in err
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert snapshot(path) == before


def test_bad_cases_cover_the_issue():
    names = {c[0] for c in CASES}
    assert len(names) == len(CASES)
    assert SUBPROCESS <= names


# --- valid models: still load, numbers unchanged ------------------------------------------------------------

def ids_for(n_vocab, n=3, length=12):
    return torch.randint(0, n_vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_valid_ln_model_loads_unchanged(tiny_ln_dir, tokenizer):
    ids = ids_for(len(tokenizer))
    ref = GPT2LMHeadModel.from_pretrained(tiny_ln_dir, dtype=torch.float64, attn_implementation="eager").eval()
    model, tok, info = load_hf(str(tiny_ln_dir), "float64")
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() < 1e-10
    assert not info.ln_free and info.sigmas is None and info.sigma_source is None
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_valid_lnfree_model_loads_unchanged(tiny_lnfree_dir, tokenizer, tiny_sigmas):
    model, _, info = load_hf(str(tiny_lnfree_dir), "float64")
    assert info.ln_free and info.sigmas == tiny_sigmas and info.sigma_source == "stored"
    plain = load_file(tiny_lnfree_dir / WEIGHTS)
    for name, (parent, attr, hf_name) in ln_modules(model).items():
        ln = getattr(parent, attr)
        stored = plain[f"{hf_name}.weight"].double()
        assert ln.sigma == tiny_sigmas[name]
        assert torch.equal(ln.weight, stored * tiny_sigmas[name] / 1e6)  # the same de-scaling as before


def test_sharded_model_loads_like_one_file(tiny_ln_dir, tmp_path, tokenizer):
    shutil.copytree(tiny_ln_dir, tmp_path / "m")
    shard(tmp_path / "m")
    ids = ids_for(len(tokenizer))
    with torch.no_grad():
        a = load_hf(str(tiny_ln_dir), "float64")[0](ids).logits
        b = load_hf(str(tmp_path / "m"), "float64")[0](ids).logits
    assert torch.equal(a, b)


def test_inspect_json_says_where_sigmas_came_from(tiny_ln_dir, tiny_lnfree_dir, tmp_path, tokenizer, tiny_sigmas,
                                                  capsys):
    assert inspect_cli.main([str(tiny_ln_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sigma_source"] is None and out["sigmas"] is None
    assert inspect_cli.main([str(tiny_lnfree_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sigma_source"] == "stored" and out["sigmas"] == tiny_sigmas
    model = tiny_model(tokenizer)
    write_lnfree(model, {n: 2.0 for n in ln_modules(model)}, tmp_path, record_sigmas=False)
    tokenizer.save_pretrained(tmp_path)
    assert inspect_cli.main([str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sigma_source"] == "implied" and out["ln_free"] is True


def test_zero_ln_weight_with_stored_sigma_loads(tiny_lnfree_dir, tmp_path):
    """An all-zero gamma with a recorded sigma is a function the file defines (the block reads zeros)."""
    shutil.copytree(tiny_lnfree_dir, tmp_path / "m")
    fill_weight("transformer.h.0.ln_2.weight", 0.0)(tmp_path / "m")
    model, _, info = load_hf(str(tmp_path / "m"))
    assert info.sigma_source == "stored" and model.transformer.h[0].ln_2.weight.abs().max() == 0


# --- the pair check -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_infos(tiny_ln_dir, tiny_lnfree_dir, tokenizer, tmp_path_factory):
    infos = {"ln": load_hf(str(tiny_ln_dir))[2], "lnfree": load_hf(str(tiny_lnfree_dir))[2]}
    one_layer = tmp_path_factory.mktemp("lnfree_one_layer")
    model = tiny_model(tokenizer, n_layer=1)
    write_lnfree(model, {n: 1.0 for n in ln_modules(model)}, one_layer)
    tokenizer.save_pretrained(one_layer)
    infos["lnfree_1_layer"] = load_hf(str(one_layer))[2]
    other_tok = tmp_path_factory.mktemp("lnfree_other_tokenizer")
    shutil.copytree(tiny_lnfree_dir, other_tok, dirs_exist_ok=True)
    tiny_tokenizer(vocab_size=280).save_pretrained(other_tok)
    infos["lnfree_other_tokenizer"] = load_hf(str(other_tok))[2]
    return infos


def test_good_pair_passes(pair_infos):
    check_pair(pair_infos["ln"], pair_infos["lnfree"])


@pytest.mark.parametrize("ln, lnfree, phrase", [
    ("lnfree", "ln", "swap them"),
    ("ln", "ln", "is an LN model"),
    ("lnfree", "lnfree", "is an LN-free model"),
    ("ln", "lnfree_1_layer", "n_layer"),
    ("ln", "lnfree_other_tokenizer", "tokenizer"),
])
def test_bad_pairs_are_one_sentence(pair_infos, ln, lnfree, phrase):
    with pytest.raises(ModelSpecError, match=phrase) as err:
        check_pair(pair_infos[ln], pair_infos[lnfree])
    assert "\n" not in str(err.value)


def test_pair_tokenizer_compared_by_content(pair_infos):
    """Same vocabulary size, different tokens: still refused."""
    other = dataclasses.replace(pair_infos["lnfree"], tokenizer_digest="0" * 64)
    with pytest.raises(ModelSpecError, match="tokenizer"):
        check_pair(pair_infos["ln"], other)
