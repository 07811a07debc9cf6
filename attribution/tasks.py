"""Prompt sets: induction, IOI and custom clean/corrupt pairs, tokenised for one model.

Every task ends up as a `Task`: equal-length clean and corrupted token batches,
the answer and counterfactual token per prompt, and the metric position.  The
metric (attribution.metric) is logit[answer] - logit[counterfactual] at that
position, or the answer logit alone when there is no counterfactual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.errors import AttributionInputError
from attribution.metric import from_logits

# Candidate words; only those that are single tokens (with a leading space) in the model's tokenizer are used.
NAMES = ["Mary", "John", "James", "David", "Peter", "Paul", "Sarah", "Tom", "Anne", "Mark", "Luke", "Adam",
         "Moses", "Aaron", "Jacob", "Joseph", "Daniel", "Samuel", "Simon", "Martha", "Ruth", "Esther",
         "Henry", "Richard", "Edward", "George", "Hamlet", "Romeo", "Juliet", "Kate", "Alice", "Bob",
         "Michael", "Robert", "William", "Elizabeth", "Jane", "Lucy", "Thomas", "Philip"]
PLACES = ["store", "city", "house", "garden", "temple", "market", "field", "church", "river", "castle"]
OBJECTS = ["drink", "book", "ring", "letter", "sword", "cup", "gift", "coin", "bread", "crown"]
TASKS = ("induction", "ioi", "custom")
IOI_TEMPLATE = "When {io} and {s} went to the {place}, {s2} gave a {obj} to"


# The app's default custom task, a line in the style of the demo's corpus (KJV + Shakespeare): both demo
# models predict " Saul", copying the name that followed "David said unto" before (a copy behaviour, like
# the induction task's); with " Moses" there instead, both prefer " Moses" (the metric changes sign).
PRESET = {"prompt": "And David said unto Saul, Take thy rod, and stretch out thine hand. And David said unto",
          "answer": " Saul", "counterfactual": " Moses",
          "corrupt": "And David said unto Moses, Take thy rod, and stretch out thine hand. And David said unto"}

@dataclass
class Task:
    name: str
    clean: torch.Tensor                 # [B, T] token ids
    corrupt: torch.Tensor | None        # [B, T] or None (custom task without a corrupted prompt)
    answer: torch.Tensor                # [B]
    counterfactual: torch.Tensor | None  # [B] or None: metric is then the answer logit
    position: int                       # non-negative metric position

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-prompt metric [B] from logits [B, T, V] (the batch may be a multiple of B: patch variants)."""
        last = logits[:, self.position]
        reps = last.shape[0] // self.answer.shape[0]
        cf = None if self.counterfactual is None else self.counterfactual.repeat(reps)
        return from_logits(last, self.answer.repeat(reps), cf)


def bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with the BOS token prepended (as GPT-2 saw documents in training)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = bos_id(tokenizer)
    return ([bos] if bos is not None else []) + ids


def single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise AttributionInputError(
            f"The {what} {text!r} is not a single token: it splits into {pieces}; give one token "
            f"(usually with a leading space, e.g. ' Mary')."
        )
    return ids[0]


def single_token_words(tokenizer, words: list[str]) -> list[str]:
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def check_length(n_tokens: int, n_ctx: int, what: str) -> None:
    if n_tokens > n_ctx:
        raise AttributionInputError(
            f"The {what} is {n_tokens} tokens long but the model's context is {n_ctx}; shorten it.")


def resolve_position(position: int, n_tokens: int) -> int:
    pos = position + n_tokens if position < 0 else position
    if not 0 <= pos < n_tokens:
        raise AttributionInputError(
            f"Metric position {position} is outside the prompt of {n_tokens} tokens; use -1 for the last.")
    return pos


def induction(tokenizer, n_prompts: int, seq_len: int, n_ctx: int, seed: int = 0) -> Task:
    """[BOS] A A[:-1] -> answer A[-1]; corrupted: [BOS] A B[:-1] with fresh random B, counterfactual B[-1]."""
    if seq_len < 2 or n_prompts < 1:
        raise AttributionInputError("Induction needs seq_len >= 2 and n_prompts >= 1.")
    check_length(2 * seq_len, n_ctx, "induction prompt (2 x seq_len)")
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if len(pool) < 2 * seq_len:
        raise AttributionInputError(f"The tokenizer has too few tokens for seq_len {seq_len}; lower it.")
    gen = torch.Generator().manual_seed(seed)
    bos = bos_id(tokenizer)
    clean, corrupt, ans, cf = [], [], [], []
    for _ in range(n_prompts):
        perm = pool[torch.randperm(len(pool), generator=gen)[: 2 * seq_len]]
        a, b = perm[:seq_len], perm[seq_len:]  # disjoint: the corrupted copy shares nothing with A
        head = [bos] if bos is not None else []
        clean.append(head + a.tolist() + a[:-1].tolist())
        corrupt.append(head + a.tolist() + b[:-1].tolist())
        ans.append(int(a[-1]))
        cf.append(int(b[-1]))
    clean_t = torch.tensor(clean)
    return Task("induction", clean_t, torch.tensor(corrupt), torch.tensor(ans), torch.tensor(cf),
                clean_t.shape[1] - 1)


def ioi(tokenizer, n_prompts: int, n_ctx: int, seed: int = 0) -> Task:
    """IOI prompts with single-token names; corrupted: the second subject mention becomes the IO name."""
    names = single_token_words(tokenizer, NAMES)
    if len(names) < 2:
        raise AttributionInputError(
            "The model's tokenizer has fewer than two single-token names, so IOI cannot be built; "
            "use the custom task.")
    # Single-token places and objects keep every prompt the same length; fall back to a fixed word.
    places = single_token_words(tokenizer, PLACES) or PLACES[:1]
    objects = single_token_words(tokenizer, OBJECTS) or OBJECTS[:1]
    gen = torch.Generator().manual_seed(seed)
    clean, corrupt, ans, cf = [], [], [], []
    for _ in range(n_prompts):
        io_i, s_i = torch.randperm(len(names), generator=gen)[:2].tolist()
        io, s = names[io_i], names[s_i]
        place = places[int(torch.randint(len(places), (1,), generator=gen))]
        obj = objects[int(torch.randint(len(objects), (1,), generator=gen))]
        clean.append(encode(tokenizer, IOI_TEMPLATE.format(io=io, s=s, s2=s, place=place, obj=obj)))
        corrupt.append(encode(tokenizer, IOI_TEMPLATE.format(io=io, s=s, s2=io, place=place, obj=obj)))
        ans.append(tokenizer.encode(" " + io, add_special_tokens=False)[0])
        cf.append(tokenizer.encode(" " + s, add_special_tokens=False)[0])
    check_length(len(clean[0]), n_ctx, "IOI prompt")
    clean_t = torch.tensor(clean)
    return Task("ioi", clean_t, torch.tensor(corrupt), torch.tensor(ans), torch.tensor(cf),
                clean_t.shape[1] - 1)


def custom(tokenizer, prompt: str, answer: str, counterfactual: str = "", corrupt: str = "",
           n_ctx: int = 1024, position: int = -1) -> Task:
    if not prompt.strip():
        raise AttributionInputError("The prompt is empty; type the text the model should continue.")
    if not answer:
        raise AttributionInputError("The answer is empty; give the token the model should predict.")
    clean = encode(tokenizer, prompt)
    check_length(len(clean), n_ctx, "prompt")
    ans = single_token(tokenizer, answer, "answer")
    cf = single_token(tokenizer, counterfactual, "counterfactual") if counterfactual else None
    corrupt_t = None
    if corrupt:
        bad = encode(tokenizer, corrupt)
        if len(bad) != len(clean):
            raise AttributionInputError(
                f"The clean prompt is {len(clean)} tokens but the corrupted prompt is {len(bad)}; "
                f"patching needs equal lengths, so change the corrupted prompt.")
        corrupt_t = torch.tensor([bad])
    return Task("custom", torch.tensor([clean]), corrupt_t, torch.tensor([ans]),
                None if cf is None else torch.tensor([cf]), resolve_position(position, len(clean)))


def check_settings(settings) -> None:
    """One sentence for the first setting no analysis can use (before any model is loaded)."""
    if settings.task not in TASKS:
        raise AttributionInputError(f"Unknown task {settings.task!r}; use induction, ioi or custom.")
    for name, low in (("n_prompts", 1), ("top_k", 1), ("verify_top", 1)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AttributionInputError(f"{name.replace('_', '-')} must be a whole number >= {low}, not {value!r}.")


def build(tokenizer, settings, n_ctx: int) -> Task:
    """The Task that `settings` (attribution.report.Settings) describes, for this tokenizer."""
    check_settings(settings)
    if settings.task == "custom":
        return custom(tokenizer, settings.prompt, settings.answer, settings.counterfactual, settings.corrupt,
                      n_ctx, settings.position)
    if settings.position not in (-1,):
        raise AttributionInputError("The metric position can only be changed for the custom task; use -1.")
    if settings.task == "induction":
        return induction(tokenizer, settings.n_prompts, settings.seq_len, n_ctx, settings.seed)
    return ioi(tokenizer, settings.n_prompts, n_ctx, settings.seed)
