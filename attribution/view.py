"""A view of the workbench as plain values (no Streamlit): the widget values that the command line and a
URL's query parameters give, checked, and the query parameters of a view, so that a link reopens it."""

from __future__ import annotations

import argparse

# The sliders' ranges, which is also what a link may set them to.
RANGES = {"n_prompts": (1, 32), "seq_len": (4, 60), "top_k": (1, 30), "verify_top": (1, 100), "position": (-4096, 4096)}
TEXT = ("ln_spec", "lnfree_spec", "vanilla_spec", "prompt", "answer", "counterfactual", "corrupt")
FLAGS = ("per_position", "full_sweeps")

# What each panel shows and how to read it (one line under its header).
PANELS = {
    "1. Predictions": "The most likely next tokens at the metric position of the first clean prompt, and the "
                      "metric (batch mean) on the clean and on the corrupted prompts: patching explains the gap "
                      "between the two.",
    "2. Direct logit attribution": "Each head's and MLP's direct contribution to the metric through the final "
                                   "LayerNorm with its scale frozen at the clean value (DLA), against its true "
                                   "direct effect (DE: the metric change when its output is removed from the "
                                   "final residual, the LN recomputed). Without LN the two are equal.",
    "3. Activation patching vs attribution patching": "The effect on the metric of patching each component's "
                                                      "clean activation into the corrupted run, normalised so "
                                                      "that 0 is the corrupted and 1 the clean metric: "
                                                      "estimated from gradients (AtP; AtP* adds the QK fix and "
                                                      "GradDrop), then checked by activation patching; the "
                                                      "agreement numbers come with bootstrap intervals over "
                                                      "the prompts.",
    "4. Summary": "Every headline number in one table; the zip holds every figure with its numbers (CSV) "
                  "and the JSON of the whole analysis.",
    "5. Logit lens": "The metric read from the residual stream entering each layer (and leaving the last) "
                     "through the model's own final LN: where the answer becomes decodable.",
    "6. Attention pattern": "One head's attention on the first clean prompt: rows are query positions, "
                            "columns key positions.",
    "7. Where the twins differ": "How alike the two models' attributions are, component by component "
                                 "(Spearman and Pearson correlation, and the share of each model's top-k "
                                 "components shared, each with a bootstrap interval over the prompts), and the "
                                 "components whose value moves most from LN to LN-free. The heatmaps of "
                                 "sections 2 and 3 show the same difference as their third panel.",
    "8. Circuits": "Edges between components (embedding, each head's query / key / value input, MLPs, logits) "
                   "scored by edge attribution patching (EAP, or EAP-IG with integrated gradients) on both "
                   "models, the top edges drawn on each, and how much of the metric the top-n edges recover "
                   "when every other edge is ablated (faithfulness). Run on request.",
    "9. Dataset-level findings": "Over held-out text of the demo corpus: confidence-neuron ablation, first-token "
                                 "residual norms and attention sinks, calibration, and the DLA error per head "
                                 "(arXiv 2507.02559, section 5). Run on request.",
}


DEMO_PAIR = ("demo", "demo-lnfree")  # what the app opens on without a pair on its command line


def launch_args(argv: list[str]) -> argparse.Namespace:
    """What comes after `--` in `streamlit run app.py -- ...`, unchecked (argparse.ArgumentError if unusable)."""
    p = argparse.ArgumentParser(prog="streamlit run app.py --", add_help=False, exit_on_error=False)
    for flag in ("--ln", "--lnfree", "--vanilla", "--dtype", "--device"):
        p.add_argument(flag)
    return p.parse_known_args(argv)[0]


def opening_pair(args: argparse.Namespace) -> tuple[str | None, str]:
    """The left column's and the LN-free model's specs in the first view, from the command line alone (see
    from_launch_args); None on the left: the LN-free model's recorded base, known once it is loaded."""
    if not (args.ln or args.lnfree or args.vanilla):
        return DEMO_PAIR
    return args.vanilla or args.ln or None, args.lnfree or DEMO_PAIR[1]


def from_launch_args(argv: list[str], choices: dict[str, list[str]], custom_pair: str) -> tuple[dict, list[str]]:
    """Widget values from `streamlit run app.py -- --ln SPEC --lnfree SPEC [--vanilla SPEC] [--dtype D]
    [--device D]` (an LN-free spec alone pairs with its recorded base; a vanilla control opens on the left),
    and a sentence for each that cannot be used."""
    args = launch_args(argv)
    values, problems = {}, []
    for key in ("dtype", "device"):
        value = getattr(args, key)
        if value is not None and value in choices[key]:
            values[key] = value
        elif value is not None:
            problems.append(f"--{key} {value!r} is not available here; use one of {', '.join(choices[key])}.")
    if args.ln or args.lnfree or args.vanilla:
        values.update(pair=custom_pair, ln_spec=args.ln or "", lnfree_spec=opening_pair(args)[1])
    if args.vanilla:  # the left column starts on it
        values.update(vanilla_spec=args.vanilla, left="vanilla")
    return values, problems


def from_query(query: dict[str, str], choices: dict[str, list[str]]) -> tuple[dict, list[str]]:
    """Widget values from a URL's query parameters, and a sentence for each one that cannot be used."""
    values, problems = {}, []
    for key, raw in query.items():
        if key in TEXT or (key in choices and raw in choices[key]):
            values[key] = raw
        elif key in choices:
            problems.append(f"The link's {key}={raw!r} is not one of {', '.join(choices[key])}; it was ignored.")
        elif key in FLAGS and raw in ("true", "false"):
            values[key] = raw == "true"
        elif key in RANGES:
            lo, hi = RANGES[key]
            number = int(raw) if raw.lstrip("-").isdigit() else None
            if number is not None and lo <= number <= hi:
                values[key] = number
            else:
                problems.append(f"The link's {key}={raw!r} is not a whole number in {lo}..{hi}; it was ignored.")
        else:
            problems.append(f"The link's {key}={raw!r} is not a setting of this page; it was ignored.")
    return values, problems


def to_query(state, choice_keys: list[str]) -> dict[str, str]:
    """The query parameters of the view held in `state` (widget key -> value)."""
    keys = [*TEXT, *choice_keys, *FLAGS, *RANGES]
    return {k: (str(state[k]).lower() if isinstance(state[k], bool) else str(state[k])) for k in keys if k in state}
