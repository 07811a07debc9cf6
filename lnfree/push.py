"""Publish a finished run on the Hugging Face hub: `python -m lnfree.push RUN_DIR REPO_ID`.

Uploads, in one commit, the run directory's top-level files (the exported model, its tokenizer, run.json,
metrics.jsonl) with its model card: the run's README.md under hub metadata (base model, tags, the paper) and
a section on loading it, as the paper published its releases.  Checkpoints and tracker logs stay behind.
`--dry-run` prints the upload set and the card and sends nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lnfree.config import EXIT_USER, UserError
from lnfree.remove import OneLineParser

PAPER = "arXiv 2507.02559"
GPT2_LICENSE = "mit"  # OpenAI's GPT-2 weights, as their hub cards give it


def build_parser():
    p = OneLineParser(prog="python -m lnfree.push", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="an lnfree.remove output directory (a finished run)")
    p.add_argument("repo_id", help="the hub repository to create or update, as USER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--commit-message", help="default: 'Upload <kind> twin of <base> (lnfree.remove)'")
    p.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")
    return p


def upload_set(run_dir: Path) -> list[Path]:
    """The run's top-level regular files but its README.md (replaced by the card), hidden and temporary ones."""
    return sorted(p for p in run_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name != "README.md"
                  and not p.name.endswith(".tmp"))


def read_run(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"{str(run_dir)!r} is not a directory; give an lnfree.remove output directory.")
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{str(run_dir)!r} holds no finished run (no run.json); finish it with `python -m "
                        f"lnfree.remove --output-dir {run_dir} --resume` first.") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{run_dir / 'run.json'} is not readable JSON; it is not an lnfree.remove run.") from None
    if not isinstance(run, dict) or not {"base", "kind", "heldout_ce_final"} <= set(run):
        raise UserError(f"{run_dir / 'run.json'} is not an lnfree.remove run record.")
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} has no {name}: the run did not export a model.")
    return run


def model_card(run: dict, run_dir: Path, repo_id: str) -> str:
    """The run's README.md under the hub's metadata, with how to load the model."""
    from huggingface_hub import ModelCardData

    from models.registry import HUB_MODELS, hub_name

    base = hub_name(run["base"])
    on_hub = base in HUB_MODELS
    ln_free = run["kind"] == "ln-free"
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        base_model=base if on_hub else None, base_model_relation="finetune" if on_hub else None,
        license=GPT2_LICENSE if on_hub else None,
        datasets=["Skylion007/openwebtext"] if run.get("data") == "openwebtext" else None,
        tags=["gpt2", "layernorm-free" if ln_free else "vanilla-fine-tune", "lnfree-workbench", "arxiv:2507.02559"])
    try:
        body = (run_dir / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        body = f"# {'LayerNorm-free' if ln_free else 'Vanilla fine-tuned'} twin of `{run['base']}`\n"
    loading = f"""
## Loading

A plain GPT-2 checkpoint: `transformers` loads it as it is.

```python
from transformers import GPT2LMHeadModel, AutoTokenizer
model = GPT2LMHeadModel.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```
"""
    if ln_free:
        loading += f"""
Every LayerNorm is in the paper's convention ({PAPER}): `layer_norm_epsilon = 1e12` and each LN weight
multiplied by 1e6 / sigma, so that each LN computes (x - mean(x)) / sigma * gamma + beta, a linear map (up to
a relative error of var(x) / 2e12). The lnfree workbench loads it by name (`models.load_bridge("{repo_id}")`,
a TransformerLens 4 `TransformerBridge`) with each LN's scale exactly sigma, read from `lnfree_sigmas` in
config.json.
"""
    return f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n{loading}"


def push(run_dir: Path, repo_id: str, private: bool, message: str | None, dry_run: bool) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{repo_id!r} is not a hub repository id; give USER/NAME.") from None
    if "/" not in repo_id:
        raise UserError(f"{repo_id!r} has no owner; give USER/NAME (or ORG/NAME).")
    run = read_run(run_dir)
    files = upload_set(run_dir)
    card = model_card(run, run_dir, repo_id)
    message = message or f"Upload {run['kind']} twin of {run['base']} (lnfree.remove)"
    if dry_run:
        sizes = "\n".join(f"  {p.name} ({p.stat().st_size:,} bytes)" for p in files)
        return f"would upload to {repo_id} ({message!r}):\n  README.md (the card below)\n{sizes}\n\n{card}"
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the hub; unset it (or use --dry-run).")
    api = HfApi()
    if get_token() is None:
        raise UserError("No Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again.")
    ops = [CommitOperationAdd("README.md", card.encode())]
    ops += [CommitOperationAdd(p.name, str(p)) for p in files]
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.create_commit(repo_id, ops, commit_message=message)
    return f"pushed {len(ops)} files to {url} (commit {info.oid[:12]})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.errors import (
        HTTPError as ClientError,  # its HTTP client's base error (httpx or httpx2)
    )

    try:
        print(push(Path(args.run_dir), args.repo_id, args.private, args.commit_message, args.dry_run))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = {401: "the token is not valid", 403: "the token cannot write to this repository"}.get(status, "")
        print(f"error: the hub at {constants.ENDPOINT} refused the upload (HTTP {status}"
              f"{': ' + hint if hint else ''}); nothing was published.", file=sys.stderr)
    except (OSError, ClientError) as err:  # the network
        print(f"error: could not reach the hub at {constants.ENDPOINT} ({type(err).__name__}); check the "
              f"network, then push again.", file=sys.stderr)
    return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
