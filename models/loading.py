"""One loading layer: a model spec -> GPT2LMHeadModel (training) or TransformerBridge (analysis).

A spec is a hub name (see models.registry), a local Hugging Face directory, or
`demo` / `demo-lnfree`.  LN-free checkpoints (layer_norm_epsilon >= 1e6) are
loaded with exact linear LNs (models.ln_free).  Every mistake a user can make
raises ModelSpecError with one sentence that says what to do; a model directory's files are checked
(models.validate, models.weights) before the model is built, and its values after.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models import registry, validate, weights
from models.errors import ModelSpecError
from models.ln_free import is_ln_free_config, make_exact, sigma_source
from models.pair import tokenizer_digest

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
# Memory needed relative to the weights: activations, the bridge's wrappers, allocator slack.
MEMORY_OVERHEAD = 1.5


@dataclass
class ModelInfo:
    spec: str
    path: str
    ln_free: bool
    sigmas: dict[str, float] | None
    base: str | None = None  # for LN-free / fine-tuned models: the LN model they came from
    config: dict = field(default_factory=dict, repr=False)
    sigma_source: str | None = None  # LN-free: "stored" (the checkpoint's lnfree_sigmas) or "implied"
    tokenizer_size: int | None = None  # len(tokenizer), and a hash of its vocabulary (models.check_pair)
    tokenizer_digest: str | None = field(default=None, repr=False)

    @property
    def twin(self) -> str | None:
        """The spec this model is compared with: its LN-free twin or its LN base."""
        return self.base if self.ln_free else registry.lnfree_twin(self.spec)

    def ln_base(self) -> str:
        """The LN model this one was made from (recorded by lnfree.remove, or a known pair)."""
        if not self.base:
            raise ModelSpecError(f"{self.spec!r} records no base model; enter the LN model to compare it with.")
        return self.base


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded for analysis: its TransformerBridge, what was loaded (ModelInfo) and its shape.

    Analyses add hooks to the bridge for the length of a pass, and a hook fires in every pass that runs
    meanwhile: `lock` serialises the passes of threads that share the model (the app's browser sessions).
    """

    bridge: TransformerBridge  # (models.bridge; not imported here: importing TransformerLens is slow)
    info: ModelInfo
    lock: threading.RLock = field(default_factory=threading.RLock, compare=False, repr=False)

    @property
    def spec(self) -> str:
        return self.info.spec

    @property
    def ln_free(self) -> bool:
        return self.info.ln_free

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def shape(self) -> registry.Shape:
        return registry.Shape.from_config(self.info.config)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelSpecError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def resolve(spec: str) -> Path:
    """The local directory holding `spec`'s files (downloading hub models if allowed)."""
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError("The model spec is empty; give a hub name, a local directory or `demo`.")
    if spec in registry.DEMO_DIRS:
        path = registry.DEMO_DIRS[spec]
        if not (path / "model.safetensors").exists():
            how = ("python -m models.demo_training.pretrain" if spec == "demo"
                   else "python -m lnfree.remove --model demo --output-dir models/demo-lnfree")
            raise ModelSpecError(f"`{spec}` is not built yet; build it with `{how}`.")
        return path
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or (os.sep in spec and
                                                        registry.hub_name(spec) not in registry.HUB_MODELS)
    if path.exists() or looks_local:
        return _check_local_dir(path, spec)
    name, revision = registry.split_revision(spec)
    if name in registry.HUB_MODELS:
        return _download(name, revision)
    known = ", ".join(sorted(registry.HUB_MODELS)[:6])
    raise ModelSpecError(
        f"Unknown model {spec!r}: give a GPT-2 hub name ({known}, ...; NAME@REVISION for a branch, tag or "
        f"commit), `demo`, `demo-lnfree`, "
        f"or a local directory written by `lnfree.remove` or `save_pretrained`."
    )


def _check_local_dir(path: Path, spec: str) -> Path:
    if path.exists() and not path.is_dir():
        what = "a file" if path.is_file() else "not a directory"
        raise ModelSpecError(f"{spec!r} is {what}, not a model directory; give the directory that holds the "
                             f"model's files ({path.parent}?).")
    if not path.is_dir():
        raise ModelSpecError(f"Model directory {spec!r} does not exist (and it is not a known hub model); "
                             f"check the path.")
    if not (path / "config.json").exists():
        raise ModelSpecError(f"{spec!r} has no config.json; point at a Hugging Face model directory.")
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
            raise ModelSpecError(
                f"{spec!r} holds only pickled weights (.bin/.pt), which we never load; convert them with "
                f"`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
            )
        raise ModelSpecError(f"{spec!r} has no .safetensors weights.")
    return path


def _download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the local cache) a hub model's safetensors, config and tokenizer, at `revision`
    (a branch, tag or commit; default main)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    what = f"{repo_id!r} at revision {revision!r}" if revision else repr(repo_id)
    args = f"{repo_id} --revision {revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except RevisionNotFoundError:
        raise ModelSpecError(f"{repo_id!r} has no revision {revision!r} on the hub; give a branch, tag or "
                             f"commit that exists.") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise ModelSpecError(
            f"{what} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(err).__name__}); run `hf download {args}` (`huggingface-cli download {args}` with "
            f"huggingface_hub before 0.34) with network access, or point HF_HOME at a cache that holds it."
        ) from None


def warn_if_not_listed_shape(spec: str, cfg: dict) -> None:
    """A hub name whose checkpoint's shape is not the registry's (a cache holding another model under that name):
    one warning line on stderr; the checkpoint's own config.json is believed."""
    listed, found = registry.HUB_MODELS.get(registry.hub_name(spec)), registry.Shape.from_config(cfg)
    if listed is not None and found != listed:
        print(f"warning: {spec!r} has {found.describe()} in its config.json, not the registry's "
              f"{listed.describe()}; using the checkpoint's shape.", file=sys.stderr)


def read_config(path: Path, spec: str) -> dict:
    """`path`/config.json, checked to be a GPT-2 config (models.validate.read_config)."""
    return validate.read_config(path, spec)


def check_files(path: Path, spec: str) -> dict:
    """Everything about `path` that can be checked without building the model; returns its config."""
    validate.check_entries(path)
    cfg = read_config(path, spec)
    validate.check_transformers_config(cfg, path / "config.json")
    validate.check_tokenizer_files(path)
    weights.check_weights(path, cfg)
    return cfg


def estimate_bytes(cfg: dict, dtype: torch.dtype) -> int:
    """Memory to hold the model for analysis: weights times a fixed overhead factor."""
    shape = registry.Shape.from_config(cfg)
    return int(shape.params * torch.finfo(dtype).bits // 8 * MEMORY_OVERHEAD)


def available_bytes(device: str) -> int:
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def check_memory(cfg: dict, dtype: torch.dtype, device: str, spec: str, copies: int = 1) -> None:
    need = estimate_bytes(cfg, dtype) * copies
    have = available_bytes(device)
    if need > have:
        raise ModelSpecError(
            f"{spec!r} needs about {need / 2**30:.1f} GiB on {device} in {dtype} but only "
            f"{have / 2**30:.1f} GiB is free; use a smaller dtype (bfloat16), another device, or a "
            f"smaller model."
        )


def _check_device(device: str) -> str:
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError("CUDA was requested but no GPU is visible; use device `cpu`.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ModelSpecError(f"Unknown device {device!r}; use `cpu` or `cuda`.")
    return device


def load_hf(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu", bos: bool = False):
    """Load `spec` as (GPT2LMHeadModel in eval mode, tokenizer, ModelInfo); `bos`: the tokenizer prepends
    `<|endoftext|>` (TransformerLens's convention: given one that does not, it loads the tokenizer again).

    LN-free checkpoints get FixedLayerNorm modules (exact linear maps).  They are loaded and de-scaled
    in float32 (float64 if asked for) before any cast: the stored weights, gamma * 1e6 / sigma,
    overflow float16.
    """
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype, device = parse_dtype(dtype), _check_device(device)
    path = resolve(spec)
    cfg = check_files(path, spec)
    warn_if_not_listed_shape(spec, cfg)
    ln_free = is_ln_free_config(cfg)
    load_dtype = torch.float64 if dtype == torch.float64 else torch.float32 if ln_free else dtype
    check_memory(cfg, load_dtype, device, spec)
    try:
        model = GPT2LMHeadModel.from_pretrained(path, dtype=load_dtype, use_safetensors=True,
                                                attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path, **({"add_bos_token": True} if bos else {}))
    except (OSError, ValueError, SafetensorError) as err:  # what the checks above could not foresee
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ModelSpecError(f"Could not load {spec!r}: {first}") from None
    weights_at = weights.weights_file(path)
    weights.check_finite(model, weights_at, load_dtype)
    validate.check_tokenizer(tokenizer, cfg, path)
    sigmas = make_exact(model, str(weights_at)) if ln_free else None
    model.to(device, dtype).eval()
    base = cfg.get("lnfree_base") or registry.base_of(spec)
    return model, tokenizer, ModelInfo(spec, str(path), ln_free, sigmas, base, cfg,
                                       sigma_source(cfg) if ln_free else None, len(tokenizer),
                                       tokenizer_digest(tokenizer))


def load_bridge(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load `spec` as a LoadedModel (TransformerBridge and ModelInfo) for analysis.

    For LN-free models every normalisation component of the bridge computes the
    exact linear map, and its hook_scale is the constant sigma.
    """
    from models.bridge import bridge_from_hf

    model, tokenizer, info = load_hf(spec, dtype, device, bos=True)
    return LoadedModel(bridge_from_hf(model, tokenizer, info.spec), info)
