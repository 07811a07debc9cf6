"""`python -m lnfree.push RUN_DIR REPO_ID` against a hub endpoint served here on 127.0.0.1.

The endpoint answers the four calls huggingface_hub makes for create_repo + create_commit (repos/create,
validate-yaml, preupload, commit) and keeps what it is sent, so the test reads back the upload set, the card
and its metadata.  It takes every file as a "regular" upload: the LFS / xet transfer of large files that the
real hub asks for is not exercised here.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from transformers import GPT2LMHeadModel

from lnfree.push import model_card, upload_set
from tests.test_lnfree_cli import ENV, TRAIN, remove


class FakeHub(BaseHTTPRequestHandler):
    repos: dict = {}

    def log_message(self, *args):  # quiet
        pass

    def reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.headers.get("Authorization") != "Bearer hf_local_test_token":
            return self.reply(401, {"error": "Invalid credentials"})
        if parts[:2] == ["api", "validate-yaml"]:
            text = json.loads(body)["content"]
            yaml.safe_load(text.split("---")[1])  # the front matter parses
            return self.reply(200, {"errors": [], "warnings": []})
        if parts[:3] == ["api", "repos", "create"]:
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo.startswith("someone-else/"):
                return self.reply(403, {"error": "You don't have the rights to create a model under this namespace"})
            self.repos.setdefault(repo, {"visibility": req.get("visibility"), "files": {}, "commits": []})
            return self.reply(200, {"url": f"http://{self.headers['Host']}/{repo}"})
        if parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo = f"{parts[2]}/{parts[3]}"
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            lines = [json.loads(x) for x in body.splitlines() if x.strip()]
            assert lines[0]["key"] == "header"
            self.repos[repo]["commits"].append(lines[0]["value"]["summary"])
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64"
                self.repos[repo]["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return self.reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'a' * 40}",
                                    "commitOid": "a" * 40, "pullRequestUrl": None})
        return self.reply(404, {"error": f"no route {self.path}"})


@pytest.fixture(scope="module")
def hub():
    FakeHub.repos = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub.repos
    server.shutdown()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_ln_dir, text_data):
    out = tmp_path_factory.mktemp("push") / "run"
    remove("--model", tiny_ln_dir, "--data", text_data, "--output-dir", out, *TRAIN, "--max-steps", 6,
           "--save-every", 0)
    return out


def push(*args, env):
    return subprocess.run([sys.executable, "-m", "lnfree.push", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


def hub_env(endpoint, tmp_path, token="hf_local_test_token"):
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def test_push_uploads_the_run_and_its_card(hub, finished_run, tmp_path):
    endpoint, repos = hub
    proc = push(finished_run, "me/tiny-lnfree", "--private", env=hub_env(endpoint, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pushed" in proc.stdout and "me/tiny-lnfree" in proc.stdout
    repo = repos["me/tiny-lnfree"]
    assert repo["visibility"] == "private" and len(repo["commits"]) == 1
    names = {p.name for p in upload_set(finished_run)}
    assert names >= {"config.json", "model.safetensors", "run.json", "metrics.jsonl", "tokenizer.json"}
    assert set(repo["files"]) == names | {"README.md"}
    for name in names:  # byte for byte
        assert repo["files"][name] == (finished_run / name).read_bytes(), name
    card = repo["files"]["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "layernorm-free" in meta["tags"]
    assert "base_model" not in meta  # a local base is not a hub model
    assert (finished_run / "README.md").read_text().strip().splitlines()[0] in card  # the run's own card
    assert 'GPT2LMHeadModel.from_pretrained("me/tiny-lnfree")' in card
    # What was uploaded is the run's model: it loads in plain transformers with the run's logits.
    got = tmp_path / "downloaded"
    got.mkdir()
    for name, data in repo["files"].items():
        (got / name).write_bytes(data)
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        a, b = (GPT2LMHeadModel.from_pretrained(d).eval()(ids).logits for d in (finished_run, got))
    assert torch.equal(a, b)


def test_the_card_of_a_gpt2_twin_names_its_base(finished_run):
    run = {**json.loads((finished_run / "run.json").read_text()), "base": "gpt2", "data": "openwebtext"}
    meta = yaml.safe_load(model_card(run, finished_run, "me/gpt2-lnfree").split("---")[1])
    assert meta["base_model"] == "gpt2" and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "mit" and meta["datasets"] == ["Skylion007/openwebtext"]
    vanilla = model_card({**run, "kind": "vanilla"}, finished_run, "me/gpt2-vanilla")
    assert "vanilla-fine-tune" in yaml.safe_load(vanilla.split("---")[1])["tags"] and "lnfree_sigmas" not in vanilla.split("## Loading")[1]


def test_dry_run_lists_the_upload_and_sends_nothing(hub, finished_run, tmp_path):
    endpoint, repos = hub
    proc = push(finished_run, "me/dry", "--dry-run", env=hub_env("http://127.0.0.1:9", tmp_path, token=None))
    assert proc.returncode == 0, proc.stderr
    assert "would upload to me/dry" in proc.stdout and "model.safetensors" in proc.stdout
    assert "me/dry" not in repos


@pytest.mark.parametrize("case", ["offline", "no_token", "bad_token", "forbidden", "unfinished", "bad_id",
                                  "unreachable"])
def test_push_errors_are_one_sentence_and_publish_nothing(case, hub, finished_run, tmp_path):
    endpoint, repos = hub
    run, repo, env = finished_run, f"me/{case}", hub_env(endpoint, tmp_path)
    words = {"offline": "HF_HUB_OFFLINE", "no_token": "hf auth login", "bad_token": "HTTP 401",
             "forbidden": "HTTP 403", "unfinished": "no finished run", "bad_id": "not a hub repository id",
             "unreachable": "could not reach"}[case]
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    elif case == "no_token":
        env.pop("HF_TOKEN")
    elif case == "bad_token":
        env["HF_TOKEN"] = "hf_wrong"
    elif case == "forbidden":
        repo = "someone-else/model"
    elif case == "unfinished":
        run = tmp_path / "unfinished"
        run.mkdir()
        (run / "run_config.json").write_text("{}")
    elif case == "bad_id":
        repo = "me/bad name!"
    elif case == "unreachable":
        env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="1")
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    proc = push(run, repo, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert words in lines[0] and "Traceback" not in proc.stderr
    assert repo not in repos and not any(r["commits"] for name, r in repos.items() if name != "me/tiny-lnfree")
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == before  # read, never written
