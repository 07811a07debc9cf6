"""A view of the workbench as plain values (no Streamlit): the widget values that the command line and a
URL's query parameters give, checked, and the query parameters of a view, so that a link reopens it."""

from __future__ import annotations

import argparse

# The sliders' ranges, which is also what a link may set them to.
RANGES = {"n_prompts": (1, 32), "seq_len": (4, 60), "top_k": (1, 30), "verify_top": (1, 100), "position": (-4096, 4096)}
TEXT = ("ln_spec", "lnfree_spec", "prompt", "answer", "counterfactual", "corrupt")
FLAGS = ("per_position", "full_sweeps")


def from_launch_args(argv: list[str], choices: dict[str, list[str]], custom_pair: str) -> tuple[dict, list[str]]:
    """Widget values from `streamlit run app.py -- --ln SPEC --lnfree SPEC [--dtype D] [--device D]`
    (an LN-free spec alone pairs with its recorded base), and a sentence for each that cannot be used."""
    p = argparse.ArgumentParser(prog="streamlit run app.py --", add_help=False, exit_on_error=False)
    for flag in ("--ln", "--lnfree", "--dtype", "--device"):
        p.add_argument(flag)
    args, _ = p.parse_known_args(argv)
    values, problems = {}, []
    for key in ("dtype", "device"):
        value = getattr(args, key)
        if value is not None and value in choices[key]:
            values[key] = value
        elif value is not None:
            problems.append(f"--{key} {value!r} is not available here; use one of {', '.join(choices[key])}.")
    if args.ln or args.lnfree:
        values.update(pair=custom_pair, ln_spec=args.ln or "", lnfree_spec=args.lnfree or "demo-lnfree")
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
