"""Checks of a model directory's small files before anything heavy: file kinds, JSON, config.json, tokenizer.

Each failure is a ModelSpecError: one sentence naming the file and what to do.  Nothing here opens a file
before os.stat says it is a regular file: reading a FIFO or a device could block forever.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from models.errors import ModelSpecError
from models.ln_free import LN_FREE_MIN_EPS, ln_names

# Suffixes of the files transformers may open while loading a model and its tokenizer.
READ_SUFFIXES = (".json", ".txt", ".safetensors", ".model", ".jinja")
# The JSON files besides config.json that transformers parses (model and tokenizer).
OTHER_JSON = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json")
MAX_JSON_BYTES = 64 << 20  # GPT-2's biggest (tokenizer.json) is 1.4 MB; a larger "JSON" file is not one
SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "vocab_size")
RESAVE = "restore it, or re-save the model with save_pretrained"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular(file: Path) -> int:
    """The size of `file`; anything but an existing regular file is refused by its type, unopened."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise ModelSpecError(f"{file} does not exist (or is a broken link); {RESAVE}.") from None
    except OSError as err:
        raise ModelSpecError(f"{file} cannot be examined ({err.strerror}); check its permissions.") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelSpecError(f"{file} is {_kind(st.st_mode)}, not a file; replace it with the real file.")
    return st.st_size


def check_entries(path: Path) -> None:
    """Every file of `path` that transformers may read is a regular file (a FIFO there would hang it)."""
    for entry in sorted(path.iterdir()):
        if entry.name.endswith(READ_SUFFIXES) and entry.exists():
            check_regular(entry)


def read_json(file: Path):
    """The parsed content of a UTF-8 JSON file, or one sentence saying what is wrong with it."""
    size = check_regular(file)
    if size == 0:
        raise ModelSpecError(f"{file} is empty; {RESAVE}.")
    if size > MAX_JSON_BYTES:
        raise ModelSpecError(f"{file} is {size / 2**20:.0f} MiB, far too big for this JSON file; {RESAVE}.")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ModelSpecError(f"{file} is not UTF-8 text (bad byte at offset {err.start}); {RESAVE}.") from None
    except OSError as err:
        raise ModelSpecError(f"{file} cannot be read ({err.strerror}); check its permissions.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelSpecError(f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                             f"{RESAVE}.") from None


def read_json_object(file: Path) -> dict:
    value = read_json(file)
    if not isinstance(value, dict):
        raise ModelSpecError(f"{file} holds a JSON {type(value).__name__}, not a JSON object; {RESAVE}.")
    return value


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_config(path: Path, spec: str) -> dict:
    """`path`/config.json as a dict, checked to be a GPT-2 config whose shape keys we can rely on."""
    file = path / "config.json"
    cfg = read_json_object(file)
    if cfg.get("model_type") != "gpt2":
        raise ModelSpecError(
            f"{spec!r} is a {cfg.get('model_type') or 'unknown'!s} model; this workbench handles GPT-2 "
            f"(model_type gpt2) checkpoints only."
        )
    for key in SHAPE_KEYS:
        if key not in cfg:
            raise ModelSpecError(f"{file} has no {key}; a GPT-2 config needs {', '.join(SHAPE_KEYS)}: {RESAVE}.")
    for key in (*SHAPE_KEYS, "n_positions", "n_inner"):
        if key in cfg and not _is_positive_int(cfg[key]) and not (key == "n_inner" and cfg[key] is None):
            raise ModelSpecError(f"{file}: {key} is {cfg[key]!r}, not a positive integer; fix it in config.json.")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ModelSpecError(f"{file}: n_embd {cfg['n_embd']} is not divisible by n_head {cfg['n_head']}; "
                             f"fix one of them in config.json.")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not (_is_number(eps) and math.isfinite(eps) and eps > 0):
        raise ModelSpecError(f"{file}: layer_norm_epsilon is {eps!r}, not a positive finite number; fix it in "
                             f"config.json (1e-5 for GPT-2, 1e12 for an LN-free checkpoint).")
    _check_lnfree_keys(cfg, file)
    return cfg


def _check_lnfree_keys(cfg: dict, file: Path) -> None:
    """lnfree_base names a model; lnfree_sigmas (of an LN-free config) holds one positive finite sigma per LN."""
    base = cfg.get("lnfree_base")
    if base is not None and not (isinstance(base, str) and base.strip()):
        raise ModelSpecError(f"{file}: lnfree_base is {base!r}, not a model spec; set it to the LN model's "
                             f"name or directory, or remove it.")
    sigmas = cfg.get("lnfree_sigmas")
    if cfg.get("layer_norm_epsilon", 1e-5) < LN_FREE_MIN_EPS or not sigmas:
        return  # no sigmas recorded: they are implied from the weights
    if not isinstance(sigmas, dict):
        raise ModelSpecError(f"{file}: lnfree_sigmas is a JSON {type(sigmas).__name__}, not an object "
                             f"{{LN name: sigma}}; fix it, or remove it to have the sigmas implied.")
    names = ln_names(cfg["n_layer"])
    for name in sigmas:
        if name not in names:
            raise ModelSpecError(f"{file}: lnfree_sigmas has a sigma for {name!r}, which a {cfg['n_layer']}-layer "
                                 f"GPT-2 does not have; the sigmas belong to another model: fix or remove them.")
    for name in names:
        if name not in sigmas:
            raise ModelSpecError(f"{file}: lnfree_sigmas has no sigma for {name!r}; record every LN's sigma, or "
                                 f"remove lnfree_sigmas to have them all implied from the weights.")
        value = sigmas[name]
        why = ("not a number" if not _is_number(value) else "not a finite number" if not math.isfinite(value)
               else "not positive" if value <= 0 else None)
        if why:
            raise ModelSpecError(f"{file}: the sigma of {name!r} in lnfree_sigmas is {value!r}, {why}; fix it "
                                 f"(it divides the LN's input), or remove lnfree_sigmas to have it implied.")


def check_transformers_config(cfg: dict, file: Path) -> None:
    """The rest of config.json, as transformers will read it (its own checks, and the activation's name)."""
    from transformers import GPT2Config
    from transformers.activations import ACT2FN

    act = cfg.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in ACT2FN:
        raise ModelSpecError(f"{file}: activation_function {act!r} is unknown to transformers; fix it in "
                             f"config.json (GPT-2 uses gelu_new).")
    if cfg.get("add_cross_attention"):
        raise ModelSpecError(f"{file} asks for cross-attention (add_cross_attention), which a GPT-2 language "
                             f"model has no weights for; set it to false.")
    try:
        GPT2Config.from_dict(cfg)
    except (TypeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelSpecError(f"{file} has a value transformers refuses ({first}); fix it in config.json.") from None


def check_tokenizer_files(path: Path) -> None:
    """A tokenizer is there (without one transformers makes a tokenizer that encodes any text to nothing)."""
    if not ((path / "tokenizer.json").exists() or
            ((path / "vocab.json").exists() and (path / "merges.txt").exists())):
        raise ModelSpecError(f"{path} has no tokenizer (tokenizer.json, or vocab.json with merges.txt); save the "
                             f"model's tokenizer there with `tokenizer.save_pretrained(dir)`.")
    for name in OTHER_JSON:
        if (path / name).exists():
            read_json_object(path / name)


def check_tokenizer(tokenizer, cfg: dict, path: Path) -> None:
    """The loaded tokenizer encodes text, and every token id it can produce has a row in the embedding."""
    size, vocab = len(tokenizer), cfg["vocab_size"]
    if size > vocab:
        raise ModelSpecError(f"The tokenizer in {path} has {size} tokens but config.json's vocab_size (the "
                             f"embedding's rows) is {vocab}; use the tokenizer the model was trained with.")
    if not tokenizer("Hello world.")["input_ids"]:
        raise ModelSpecError(f"The tokenizer in {path} encodes text to no tokens; save the model's real "
                             f"tokenizer there with `tokenizer.save_pretrained(dir)`.")
