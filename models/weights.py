"""A GPT-2 checkpoint's weights, checked from the safetensors headers before loading and by value after.

transformers fills a tensor missing from the file with random values and drops one it has no place for,
both silently here (load_hf silences its warnings).  A safetensors header lists every tensor's name, dtype,
shape and byte range, so the complete set and the shapes are checked without reading any data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from models.errors import ModelSpecError
from models.validate import check_regular, read_json_object

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # the safetensors format's own limit
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that old checkpoints store: not weights
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
REDO = "re-save or re-download the model"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, checked against the file's size."""
    size = check_regular(file)
    if size == 0:
        raise ModelSpecError(f"{file} is empty; {REDO}.")

    def broken(why: str) -> ModelSpecError:
        return ModelSpecError(f"{file} is not a complete safetensors file ({why}); {REDO}.")

    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > MAX_HEADER:
            raise broken("its first 8 bytes are no header length")
        if n > size - 8:
            raise broken(f"its header needs {n} bytes but {size - 8} follow: it is truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise broken("its header is not JSON") from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = all(map(_count, (*shape, begin, end))) and end - begin == math.prod(shape) * DTYPE_BYTES[dtype]
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise broken(f"the entry of tensor {name!r} is malformed")
        tensors[name] = (dtype, shape)
        spans.append((begin, end))
    pos = 0  # the tensors' data must tile the rest of the file exactly
    for begin, end in sorted(spans):
        if begin != pos:
            raise broken("its tensors' data overlap or leave gaps")
        pos = end
    data = size - 8 - n
    if pos > data:
        raise broken(f"its tensors need {pos} bytes of data but {data} are there: it is truncated")
    if pos < data:
        raise broken(f"{data - pos} unexplained bytes follow its last tensor")
    return tensors


def weights_file(path: Path) -> Path:
    """The file that names the weights: model.safetensors, or the index of a sharded checkpoint."""
    for name in (SINGLE, INDEX):
        if (path / name).exists():
            return path / name
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise ModelSpecError(f"{path} has no {SINGLE} (nor {INDEX}), only {', '.join(others)}; name the "
                             f"weights file {SINGLE}.")
    raise ModelSpecError(f"{path} has no .safetensors weights.")


def read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor of the checkpoint in `path` (one file or shards)."""
    file = weights_file(path)
    if file.name == SINGLE:
        return read_header(file)
    weight_map = read_json_object(file).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise ModelSpecError(f"{file} has no weight_map {{tensor: shard file}}; {REDO}.")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not (path / shard).exists():
            raise ModelSpecError(f"{file} names the shard {shard!r}, which is not in {path}; {REDO}.")
        header = read_header(path / shard)
        for name, where in weight_map.items():
            if where == shard and name not in header:
                raise ModelSpecError(f"{file} puts tensor {name!r} in {shard}, which does not hold it; {REDO}.")
        tensors.update(header)
    return tensors


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of a GPT2LMHeadModel with this config.json, by name, with its shape (Conv1D: [in, out])."""
    d, vocab, n_ctx = cfg["n_embd"], cfg["vocab_size"], cfg.get("n_positions", 1024)
    inner = cfg.get("n_inner") or 4 * d
    block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
             "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
             "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, d),
             "mlp.c_proj.bias": (d,)}
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (n_ctx, d)}
    for i in range(cfg["n_layer"]):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in block.items()})
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    if cfg.get("tie_word_embeddings", True) is False:
        shapes["lm_head.weight"] = (vocab, d)  # untied: the file must hold the unembedding too
    return shapes


def check_weights(path: Path, cfg: dict) -> None:
    """The checkpoint holds every tensor of a GPT-2 with this config, in floating point, of the right shapes,
    and nothing transformers would drop."""
    where = weights_file(path)
    # The original GPT-2 files name the base model's tensors without the "transformer." prefix.
    found = {n if n.startswith(("transformer.", "lm_head.")) else f"transformer.{n}": v
             for n, v in read_tensors(path).items()}
    expected = expected_shapes(cfg)
    if "lm_head.weight" in found:
        expected.setdefault("lm_head.weight", (cfg["vocab_size"], cfg["n_embd"]))
    missing = [n for n in expected if n not in found]
    if missing:
        raise ModelSpecError(f"{where} is missing {len(missing)} tensor(s) of the {cfg['n_layer']}-layer GPT-2 its "
                             f"config.json describes (first {missing[0]!r}), which transformers would fill with "
                             f"random values; {REDO}, or fix config.json if its shape is wrong.")
    for name, shape in expected.items():
        dtype, have = found[name]
        if have != shape:
            raise ModelSpecError(f"{where}: tensor {name!r} has shape {list(have)} but config.json (n_embd "
                                 f"{cfg['n_embd']}, vocab_size {cfg['vocab_size']}, n_positions "
                                 f"{cfg.get('n_positions', 1024)}) implies {list(shape)}; use the config.json "
                                 f"saved with these weights.")
        if dtype not in FLOAT_DTYPES:
            raise ModelSpecError(f"{where}: tensor {name!r} is stored as {dtype}, not floating point; {REDO}.")
    extra = [n for n in found if n not in expected and not n.endswith(BUFFERS)]
    if extra:
        raise ModelSpecError(f"{where} holds tensor {extra[0]!r}, which the {cfg['n_layer']}-layer GPT-2 of its "
                             f"config.json has no place for (transformers would drop it); check n_layer in "
                             f"config.json.")


def check_finite(model: torch.nn.Module, where: Path, dtype: torch.dtype) -> None:
    """Every loaded parameter is finite (a NaN weight would turn every number downstream into NaN)."""
    for name, param in model.named_parameters():
        if torch.isfinite(param).all():
            continue
        bad = int((~torch.isfinite(param)).sum())
        if dtype == torch.float16:
            raise ModelSpecError(f"{where}: tensor {name!r} has {bad} NaN or infinite values once loaded in "
                                 f"float16 (its range may be too small for them); load it in float32 or bfloat16.")
        raise ModelSpecError(f"{where}: tensor {name!r} holds {bad} NaN or infinite values; the checkpoint is "
                             f"damaged: {REDO}.")
