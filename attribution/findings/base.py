"""Plumbing shared by the findings: token checks, memory-sized batches, progress, held-out text.

Progress callbacks take (fraction in [0, 1], text); a `should_stop()` that
returns True ends the loop with AnalysisCancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from attribution.errors import AnalysisCancelled, AttributionInputError

Progress = Callable[[float, str], None] | None
ShouldStop = Callable[[], bool] | None

MEMORY_SHARE = 0.25   # share of free memory one batch may use
MAX_BATCH = 64
MAX_SOURCE_TOKENS = 4_000_000  # of a user's text file, for heldout_tokens

# How each held-out sequence begins.  The paper's code analyses packed chunks with no BOS (its DataLoader's
# prepend_bos=False in every findings script, and the packed Pile chunks of pile_eval.py for the sink rate);
# the app prepends <|endoftext|> to its prompts, as the paper's DataLoader does with prepend_bos=True.
BOS_PROTOCOLS = {
    "packed": "packed chunks, no BOS (the paper's code: prepend_bos=False)",
    "prepend": "<|endoftext|> prepended to each chunk, its last token dropped (as the app's prompts; "
               "the paper's DataLoader with prepend_bos=True)",
}
DEFAULT_BOS = "packed"


def default_bos(*specs: str) -> str:
    """The protocol a pair is analysed with unless asked otherwise: the paper's packed chunks, except when
    either model is a demo model, trained on chunks that start with <|endoftext|> (its LN-free twin breaks
    without one, whatever sits in the LN slot, e.g. a vanilla control)."""
    from models.registry import demo_name

    return "prepend" if any(demo_name(s) for s in specs if s) else DEFAULT_BOS


class FindingsInputError(AttributionInputError):
    """Bad tokens or settings for a findings analysis; the message is one sentence for the user."""


def _device(bridge) -> torch.device:
    return bridge.W_U.device


def check_tokens(bridge, tokens: torch.Tensor) -> torch.Tensor:
    """Validate held-out chunks [N, T] for `bridge` and move them to its device."""
    n_ctx, vocab = bridge.cfg.n_ctx, bridge.cfg.d_vocab
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        raise FindingsInputError("Tokens must be a 2-D integer tensor [n_seq, seq_len]; use heldout_tokens().")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise FindingsInputError("Give at least one sequence of at least 2 tokens.")
    if tokens.shape[1] > n_ctx:
        raise FindingsInputError(
            f"Sequences are {tokens.shape[1]} tokens long but the model's context is {n_ctx}; shorten them.")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise FindingsInputError(
            f"Token ids must lie in [0, {vocab}); the tokens were made with another model's tokenizer.")
    return tokens.long().to(_device(bridge))


def batch_size(bridge, seq_len: int, floats_per_token: int = 0) -> int:
    """Sequences per forward pass: a share of free memory over a per-sequence estimate.

    The estimate counts, per token, the logits and their softmax/log-softmax
    copies (4 x vocab), the MLP hidden layer, a few residual-sized tensors per
    layer, one layer's attention row, and `floats_per_token` for the analysis.
    """
    from models.loading import available_bytes

    c = bridge.cfg
    per_token = 4 * c.d_vocab + 3 * c.d_mlp + (12 + 2 * c.n_layers) * c.d_model + 2 * c.n_heads * seq_len \
        + floats_per_token
    per_seq = 4 * seq_len * per_token
    device = _device(bridge)
    free = available_bytes(str(device) if device.type == "cuda" else "cpu")
    return int(max(1, min(MAX_BATCH, MEMORY_SHARE * free // per_seq)))


def batches(tokens: torch.Tensor, size: int, progress: Progress, should_stop: ShouldStop,
             text: str) -> Iterator[torch.Tensor]:
    n = tokens.shape[0]
    for start in range(0, n, size):
        if should_stop is not None and should_stop():
            raise AnalysisCancelled(f"{text}: cancelled")
        yield tokens[start:start + size]
        if progress is not None:
            progress(min(1.0, (start + size) / n), text)


def sub_progress(progress: Progress, lo: float, hi: float, prefix: str = "") -> Progress:
    """A progress callback for a sub-task that maps its [0, 1] onto [lo, hi] of `progress`."""
    if progress is None:
        return None
    return lambda f, text: progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), prefix + text)


def next_token_stats(logits: torch.Tensor, tokens: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Per-position CE, entropy, top-1 confidence and correctness for predictions 0..T-2: each [B, T-1],
    computed in `dtype` (float32 by default, at least)."""
    logp = F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, dtype)), dim=-1)
    target = tokens[:, 1:]
    ce = -logp.gather(-1, target[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    conf, pred = logp.max(-1)
    return {"ce": ce, "entropy": entropy, "confidence": conf.exp(), "correct": (pred == target).float()}


def check_bos(bos: str) -> str:
    if bos not in BOS_PROTOCOLS:
        raise FindingsInputError(f"Unknown BOS protocol {bos!r}; use one of: {', '.join(BOS_PROTOCOLS)}.")
    return bos


def heldout_tokens(tokenizer, n_ctx: int, n_seq: int, source: str = "demo", bos: str = DEFAULT_BOS) -> torch.Tensor:
    """`n_seq` chunks [n_seq, n_ctx] of held-out text, tokenized and packed with EOT.

    The text is packed into consecutive chunks (models.corpus.pack) and `n_seq`
    of them are taken evenly spaced from first to last (deterministic, and
    representative of the whole text rather than its beginning).  source "demo" is
    the held-out split of the embedded demo corpus; otherwise a path to a UTF-8
    text file whose blank-line-separated paragraphs are the documents (at most
    MAX_SOURCE_TOKENS tokens of it are used).  bos (BOS_PROTOCOLS): "packed" keeps
    the chunks as they are (the paper's protocol); "prepend" puts EOT before each
    chunk and drops its last token, so every sequence starts with <|endoftext|>
    as the app's prompts do.
    """
    from models.corpus import load_passages, pack

    check_bos(bos)
    if n_seq < 1 or n_ctx < 2:
        raise FindingsInputError("Ask for at least one sequence of at least 2 tokens.")
    if source == "demo":
        passages = load_passages("heldout")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FindingsInputError(f"Text source {source!r} is neither `demo` nor a readable text file.")
        passages = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if eot is None:
        raise FindingsInputError("The tokenizer has no end-of-text token to separate documents.")
    ids, total = [], 0
    for text in passages:
        ids.append(tokenizer.encode(text, add_special_tokens=False, verbose=False))
        total += len(ids[-1]) + 1
        if total >= MAX_SOURCE_TOKENS:
            break
    chunks = pack(ids, eot, n_ctx)
    if chunks.shape[0] < n_seq:
        raise FindingsInputError(
            f"The held-out text gives only {chunks.shape[0]} sequences of {n_ctx} tokens; lower n_seq.")
    chunks = chunks[torch.linspace(0, chunks.shape[0] - 1, n_seq).round().long()]
    if bos == "prepend":
        chunks = torch.cat([torch.full_like(chunks[:, :1], eot), chunks[:, :-1]], 1)
    return chunks
