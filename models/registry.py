"""Known model specs: the GPT-2 family, the paper's LN-free releases, the demo pair.

Shapes of hub models are listed so that memory estimates (and `lnfree.remove
--dry-run`) need no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).parent
DEMO_DIRS = {"demo": MODELS_DIR / "demo", "demo-lnfree": MODELS_DIR / "demo-lnfree"}


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_ctx: int = 1024
    vocab: int = 50257

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        """The shape of a GPT-2 `config.json` (as a dict)."""
        return cls(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg.get("n_positions", 1024), cfg["vocab_size"])

    @property
    def params(self) -> int:
        """Parameter count of a GPT2LMHeadModel of this shape (tied unembedding)."""
        d, L = self.n_embd, self.n_layer
        block = 12 * d * d + 13 * d  # attn (4d^2+4d) + mlp (8d^2+5d) + 2 LNs (4d)
        return self.vocab * d + self.n_ctx * d + L * block + 2 * d

    def describe(self) -> str:
        return f"{self.n_layer} layers x {self.n_embd} ({self.n_head} heads, context {self.n_ctx}, vocab {self.vocab})"


GPT2_SHAPES = {
    "gpt2": Shape(12, 768, 12),
    "gpt2-medium": Shape(24, 1024, 16),
    "gpt2-large": Shape(36, 1280, 20),
    "gpt2-xl": Shape(48, 1600, 25),
}

# LN model -> its LN-free twin (the paper's releases; our demo pair).
PAIRS = {
    "gpt2": "schaeff/gpt2-small_LNFree300",
    "gpt2-medium": "schaeff/gpt2-medium_LNFree500",
    "gpt2-large": "schaeff/gpt2-large_LNFree600",
    "gpt2-xl": "schaeff/gpt2-xl_LNFree800",
    "demo": "demo-lnfree",
}
# The vanilla fine-tuning controls released with the paper.
VANILLA = {
    "gpt2": "schaeff/gpt2-small_vanilla300",
    "gpt2-medium": "schaeff/gpt2-medium_vanilla500",
    "gpt2-large": "schaeff/gpt2-large_vanilla600",
    "gpt2-xl": "schaeff/gpt2-xl_vanilla800",
}
EXTRA_LNFREE = {"apollo-research/gpt2_noLN": "gpt2"}

HUB_MODELS: dict[str, Shape] = dict(GPT2_SHAPES)
for _base, _twin in PAIRS.items():
    if _base in GPT2_SHAPES:
        HUB_MODELS[_twin] = GPT2_SHAPES[_base]
        HUB_MODELS[VANILLA[_base]] = GPT2_SHAPES[_base]
for _twin, _base in EXTRA_LNFREE.items():
    HUB_MODELS[_twin] = GPT2_SHAPES[_base]


def split_revision(spec: str) -> tuple[str, str | None]:
    """`NAME@REVISION` (a branch, tag or commit of a known hub model) -> (NAME, REVISION); anything else,
    a local path with an @ included, -> (spec, None)."""
    name, at, revision = str(spec).rpartition("@")
    if at and name in HUB_MODELS and revision:
        return name, revision
    return str(spec), None


def hub_name(spec: str) -> str:
    """The spec without its @revision: what the registry's tables are keyed by."""
    return split_revision(spec)[0]


def shape_of(spec: str) -> Shape | None:
    """The shape of a hub model (without downloading it) or of a local directory's config.json;
    None when neither is at hand."""
    if hub_name(spec) in HUB_MODELS:
        return HUB_MODELS[hub_name(spec)]
    from models.validate import read_json_object  # (here: it imports torch, and this module stays light)

    path = DEMO_DIRS.get(spec, Path(spec).expanduser()) / "config.json"
    try:
        return Shape.from_config(read_json_object(path))  # never blocks: a FIFO config.json is refused
    except (OSError, ValueError, KeyError, TypeError):
        return None


def demo_name(spec: str | None) -> str | None:
    """`demo` or `demo-lnfree` when `spec` names one of them, by name or by its directory; else None."""
    if not spec:
        return None
    if spec in DEMO_DIRS:
        return spec
    try:
        path = Path(spec).expanduser().resolve()
    except OSError:
        return None
    return next((name for name, d in DEMO_DIRS.items() if path == d.resolve()), None)


def is_demo(spec: str) -> bool:
    """Whether `spec` names the demo model (not its LN-free twin), by name or by its directory."""
    return demo_name(spec) == "demo"


def base_of(spec: str) -> str | None:
    """The LN model that a known LN-free (or vanilla) spec was fine-tuned from."""
    spec = hub_name(spec)
    for base, twin in PAIRS.items():
        if spec in (twin, VANILLA.get(base)):
            return base
    return EXTRA_LNFREE.get(spec)


def lnfree_twin(spec: str) -> str | None:
    """The known LN-free twin of an LN spec, if any."""
    return PAIRS.get(hub_name(spec))
