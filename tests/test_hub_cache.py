"""Hub names from a local Hugging Face cache, offline (issue 20): tiny checkpoints written in the hub's own cache
layout under the real names, loaded by name through models/, models.inspect, attribution.export and lnfree.remove.

The cache is what `snapshot_download(name, allow_patterns=models.loading.HUB_FILES)` leaves behind: blobs named by
their git or LFS hash, `snapshots/<commit>/<file>` symlinks to them, `refs/main`, and the commit's tree listing
(which names a pickled weights file that the allow patterns never fetched, as on the hub).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    _get_pointer_path,
    repo_folder_name,
)

from models import load_hf, registry
from models.ln_free import ln_modules, ln_names
from tests.conftest import TEXT, tiny_model, write_lnfree

try:  # newer huggingface_hub (2.4 here) keeps each commit's file listing and checks a cached snapshot against it
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
except ImportError:
    TreeCacheEntry = write_tree_cache = None

ROOT = Path(__file__).resolve().parents[1]
LN, LNFREE, VANILLA = "gpt2", registry.PAIRS["gpt2"], registry.VANILLA["gpt2"]
SIGMAS = [0.5, 0.75, 1.0, 1.25, 1.5]  # the LN-free release's sigmas, per LN in ln_names order (not stored)


def cache_repo(cache: Path, repo_id: str, files: Path, commit: str | None = None,
               ref: str = constants.DEFAULT_REVISION) -> str:
    """Put the files of the directory `files` into the hub cache `cache` as `repo_id` at commit `commit`, which
    the branch or tag `ref` points at (default: main)."""
    storage = str(cache / repo_folder_name(repo_id=repo_id, repo_type="model"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit hash
    listing = {}
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs_sha = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else None
        blob = Path(storage, "blobs", lfs_sha or git_sha)  # the hub names a blob by its etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = _get_pointer_path(storage, commit, file.name)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(str(blob), pointer, new_blob=True)
        if TreeCacheEntry:
            listing[file.name] = TreeCacheEntry(len(data), git_sha, lfs_sha, len(data) if lfs_sha else None)
    if write_tree_cache:
        listing["pytorch_model.bin"] = TreeCacheEntry(10, "0" * 40, "0" * 64, 10)  # on the hub, never fetched
        write_tree_cache(storage, commit, listing)
    _cache_commit_hash_for_specific_revision(storage, ref, commit)
    return commit


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tokenizer):
    """HF_HOME of a cache holding tiny `gpt2`, its LN-free release (eps = 1e12, no stored sigmas) and the vanilla
    control, each 2 layers x 64 with the tiny tokenizer."""
    home = tmp_path_factory.mktemp("hf_home")
    staging = tmp_path_factory.mktemp("staging")
    sigmas = dict(zip(ln_names(2), SIGMAS, strict=True))
    for name, write in [(LN, lambda d: tiny_model(tokenizer).save_pretrained(d)),
                        (LNFREE, lambda d: write_lnfree(tiny_model(tokenizer), sigmas, d, record_sigmas=False)),
                        (VANILLA, lambda d: tiny_model(tokenizer, seed=1).save_pretrained(d))]:
        files = staging / name.replace("/", "--")
        write(files)
        tokenizer.save_pretrained(files)
        cache_repo(home / "hub", name, files)
    return home


@pytest.fixture(scope="module")
def env(hub_home):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub_home), "HF_HUB_CACHE": str(hub_home / "hub"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(env, module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_cache_is_in_the_hubs_layout(hub_home):
    """huggingface_hub's own readers find every repo, its main revision and its files."""
    cache = hub_home / "hub"
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    assert {r.repo_id for r in info.repos} == {LN, LNFREE, VANILLA}
    for repo in info.repos:
        (rev,) = repo.revisions
        assert rev.refs == {"main"}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.file_name for f in rev.files}
        assert all(f.file_path.is_symlink() and f.blob_path.is_file() for f in rev.files)
    cached = try_to_load_from_cache(LNFREE, "config.json", cache_dir=cache)
    assert Path(cached).parts[-4:-1] == ("models--schaeff--gpt2-small_LNFree300", "snapshots",
                                         hashlib.sha1(LNFREE.encode()).hexdigest())
    assert "lnfree_sigmas" not in json.loads(Path(cached).read_text())


def test_load_hf_by_name_in_process(hub_home, monkeypatch, capsys):
    # huggingface_hub read HF_HUB_CACHE and HF_HUB_OFFLINE when it was imported: set its constants instead.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ln, _, ln_info = load_hf(LN)
    _, _, lf_info = load_hf(LNFREE)
    _, _, van_info = load_hf(VANILLA)
    snapshots = hub_home / "hub" / "models--gpt2" / "snapshots"
    assert Path(ln_info.path).parent == snapshots
    assert (ln_info.ln_free, ln_info.base, ln_info.twin) == (False, None, LNFREE)
    assert (lf_info.ln_free, lf_info.sigma_source, lf_info.base, lf_info.twin) == (True, "implied", LN, LN)
    assert (van_info.ln_free, van_info.base, van_info.twin) == (False, LN, None)
    # The cached checkpoints are believed over the registry's 12 x 768, each with one warning line.
    assert ln.config.n_layer == 2 and ln.config.n_embd == 64
    lines = warnings_of(capsys.readouterr().err)
    assert len(lines) == 3 and all("not the registry's 12 layers x 768" in line for line in lines)
    assert lines[0].startswith("warning: 'gpt2' has 2 layers x 64 (4 heads, context 64, vocab 300) in its config.json")
    # No sigmas are stored: each is implied (mean |gamma| = 1) from the weights, gamma * 1e6 / sigma.
    for (name, (parent, attr, _)), sigma in zip(ln_modules(ln).items(), SIGMAS, strict=True):
        gamma = getattr(parent, attr).weight.detach().double()
        assert math.isclose(lf_info.sigmas[name], sigma / gamma.abs().mean().item(), rel_tol=1e-5)


@pytest.mark.parametrize("name, ln_free, base, twin", [(LN, False, None, LNFREE), (LNFREE, True, LN, LN),
                                                       (VANILLA, False, LN, None)])
def test_inspect_by_name(env, name, ln_free, base, twin):
    r = run(env, "models.inspect", name)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["spec"], out["ln_free"], out["base"], out["twin"]) == (name, ln_free, base, twin)
    assert out["sigma_source"] == ("implied" if ln_free else None)
    assert (out["n_layers"], out["d_model"], out["n_heads"], out["d_vocab"]) == (2, 64, 4, 300)
    assert "/snapshots/" in out["path"]
    assert len(warnings_of(r.stderr)) == 1


def test_name_not_in_the_cache_is_one_sentence(env):
    r = run(env, "models.inspect", "gpt2-medium")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == ""
    assert len(lines) == 1 and "not in the local Hugging Face cache" in lines[0], r.stderr
    assert "`hf download gpt2-medium`" in lines[0]  # the CLI of huggingface_hub >= 0.34 (huggingface-cli went in 1.0)


def test_export_by_name(env, tmp_path):
    out = tmp_path / "results.json"
    r = run(env, "attribution.export", "--ln", LN, "--lnfree", LNFREE, "--task", "induction", "--n-prompts", 2,
            "--seq-len", 4, "--no-per-position", "--format", "json", "--out", out)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert (data["ln"]["spec"], data["lnfree"]["spec"]) == (LN, LNFREE)

    def numbers(v):
        if isinstance(v, dict):
            return [x for item in v.values() for x in numbers(item)]
        if isinstance(v, list):
            return [x for item in v for x in numbers(item)]
        return [v] if isinstance(v, int | float) and not isinstance(v, bool) else []

    values = numbers(data)
    assert values and all(math.isfinite(v) for v in values)
    assert isinstance(data["ln"]["dla_nmae"], float) and data["lnfree"]["dla_nmae"] < 1e-6


def test_remove_from_a_hub_name(env, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"{TEXT[i % 3]} Number {i}." for i in range(200)) + "\n")
    out = tmp_path / "run"
    r = run(env, "lnfree.remove", "--model", LN, "--output-dir", out, "--data", text, "--max-steps", 4,
            "--micro-batch", 2, "--grad-accum", 1, "--n-ctx", 16, "--warmup", 1, "--save-every", 0,
            "--eval-tokens", 256, "--threads", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["base"] == LN
    config = json.loads((out / "config.json").read_text())
    assert config["lnfree_base"] == LN and config["layer_norm_epsilon"] == 1e12
    assert any("not the registry's" in line for line in warnings_of(r.stderr))


def test_the_app_opens_on_hub_names(hub_home, monkeypatch):
    """The app by hub name: the LN-free release alone on the command line pairs with its base (`gpt2`), and the
    sidebar's listed pair for GPT-2 small opens the same models, from the cache, offline."""
    from tests.test_app import app, assert_complete, complete, metric

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sys, "argv", ["app.py", "--lnfree", LNFREE])
    at = app()
    at.session_state["n_prompts"], at.session_state["seq_len"] = 2, 6
    complete(at.run())
    assert_complete(at)
    assert [s.value for s in at.subheader[:2]] == [f"LN: `{LN}`", f"LN-free: `{LNFREE}`"]
    assert "gamma / sigma only" in " ".join(c.value for c in at.main.caption)  # implied sigmas, said so
    assert float(metric(at, "LN-free: DLA error (NMAE vs true direct effect)")) < 1e-6
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = app()
    at.session_state["pair"], at.session_state["n_prompts"], at.session_state["seq_len"] = f"{LN}  |  {LNFREE}", 2, 6
    complete(at.run())
    assert_complete(at)
    assert [s.value for s in at.subheader[:2]] == [f"LN: `{LN}`", f"LN-free: `{LNFREE}`"]
    at.sidebar.radio(key="left").set_value("vanilla")  # the paper's vanilla release of the pair
    complete(at.run())
    assert_complete(at)
    assert [s.value for s in at.subheader[:2]] == [f"LN: `{VANILLA}`", f"LN-free: `{LNFREE}`"]


def test_name_at_revision_loads_that_revision(tmp_path, tokenizer, monkeypatch):
    """`NAME@REVISION` (a tag or a commit) loads that snapshot of a hub model; the name keys the registry (its
    twin, recipe and shape); a revision the cache lacks offline is one sentence with the command that fetches it."""
    from lnfree.recipes import recipe_for_model
    from models import ModelSpecError

    cache = tmp_path / "hub"
    for seed, commit, ref in ((0, None, "main"), (2, "1" * 40, "v1")):
        files = tmp_path / f"seed{seed}"
        tiny_model(tokenizer, seed=seed).save_pretrained(files)
        tokenizer.save_pretrained(files)
        cache_repo(cache, LN, files, commit, ref)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    main, _, _ = load_hf(LN)
    want = tiny_model(tokenizer, seed=2).state_dict()
    for spec in (f"{LN}@v1", f"{LN}@{'1' * 40}"):
        model, _, info = load_hf(spec)
        assert Path(info.path).name == "1" * 40 and info.spec == spec and info.twin == LNFREE
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items() if k in want)
        assert not torch.equal(model.transformer.wte.weight, main.transformer.wte.weight)
        assert recipe_for_model(spec) == ("gpt2", None) and registry.shape_of(spec) == registry.HUB_MODELS[LN]
    with pytest.raises(ModelSpecError) as err:
        load_hf(f"{LN}@v2")
    assert "'gpt2' at revision 'v2' is not in the local Hugging Face cache" in str(err.value)
    assert "`hf download gpt2 --revision v2`" in str(err.value)
    assert registry.split_revision("./runs/a@b") == ("./runs/a@b", None)  # a local path keeps its @
