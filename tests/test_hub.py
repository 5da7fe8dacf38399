"""The Hub round trip, against tests/hub_server.py: push with the guppylm CLI, pull by repo id with the plain
transformers / datasets APIs in fresh processes, re-push, serve offline from the cache, and fail in one line.

Client steps run in subprocesses: huggingface_hub reads HF_ENDPOINT at import, and a fresh process is what a
user has. The `hub` fixture (conftest.py) gives each test an empty server and the environment that reaches it.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer


MODEL_CARD = """---
license: mit
language: [en]
library_name: transformers
pipeline_tag: text-generation
tags: [guppylm, tiny]
datasets: [guppy/chats]
model-index:
- name: tiny-guppy
  results:
  - task: {type: text-generation}
    dataset: {name: guppy chats, type: guppy/chats}
    metrics: [{type: perplexity, value: 12.5}]
---
# tiny guppy

A test fish.
"""

# Loads a repo id with nothing but transformers: guppylm must not be importable, so the config, the model
# class and the chat template all come from the Hub (the same check as test_model.py runs on a folder).
PULL_WITHOUT_GUPPYLM = r"""
import json, sys
sys.modules["guppylm"] = None  # any `import guppylm` now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
repo = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
messages = [{"role": "user", "content": "hello guppy"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    logits = model(**ids).logits
max_new_tokens = GenerationConfig.from_pretrained(repo).max_new_tokens
print("RESULT", json.dumps({"ids": ids["input_ids"].tolist(), "logits": logits.tolist(), "max_new_tokens": max_new_tokens}))
"""

# The path `guppylm chat --model REPO_ID` takes.
PULL_WITH_CHAT = r"""
import json, sys
import torch
from guppylm.inference import load_model
model, tokenizer = load_model(sys.argv[1])
messages = [{"role": "user", "content": "hello guppy"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    logits = model(**ids).logits
print("RESULT", json.dumps({"ids": ids["input_ids"].tolist(), "logits": logits.tolist()}))
"""


def run(hub, args, env=None, expect_ok=True):
    """Run `python ARGS` in a fresh process against `hub`; check the token never shows in its output."""
    result = subprocess.run(
        [sys.executable, *args], env=env or hub.env(), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180
    )
    output = result.stdout + result.stderr
    assert hub.token not in output
    if expect_ok:
        assert result.returncode == 0, output[-3000:]
    return result


def cli(hub, *args, **env):
    return run(hub, ["-m", "guppylm.cli", *args], hub.env(**env), expect_ok=False)


def result_of(process):
    return json.loads(process.stdout.split("RESULT", 1)[1])


def reference_logits(model_dir):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "hello guppy"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return ids["input_ids"].tolist(), model(**ids).logits


def head(hub, repo_type, repo_id):
    repo = hub.server.repos[(repo_type, repo_id)]
    return repo.commits[repo.branches["main"]]


def assert_token_never_written(hub):
    secret = hub.token.encode()
    for repo in hub.server.repos.values():
        for commit in repo.commits.values():
            assert not any(secret in blob.content for blob in commit.files.values()), f"token pushed to {repo.id}"
    for path in Path(hub.hf_home).rglob("*"):
        assert not (path.is_file() and secret in path.read_bytes()), f"token written to {path}"


def dead_endpoint():
    with socket.socket() as sock:  # a port nobody listens on: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def one_error_line(result):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guppylm: error: "), result.stderr
    return lines[0]


# --- model --------------------------------------------------------------------------------------------


def test_model_push_pull_repush_and_offline(hub, tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_model(model_dir, seed=0)
    (model_dir / "README.md").write_text(MODEL_CARD)
    (model_dir / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (model_dir / ".env").write_text(f"HF_TOKEN={hub.token}\n")  # stray files that must stay home
    (model_dir / "checkpoint-10").mkdir()
    (model_dir / "checkpoint-10" / "optimizer.pt").write_bytes(bytes(16))

    # push: the CLI, then the repo holds exactly the model folder's artifacts, weights and plot as LFS
    result = run(hub, ["-m", "guppylm.cli", "push", "--model", str(model_dir), "--repo-id", "guppy/tiny-guppy"])
    assert f"{hub.endpoint}/guppy/tiny-guppy" in result.stdout
    files = head(hub, "model", "guppy/tiny-guppy").files
    assert set(files) == {
        ".gitattributes", "README.md", "loss_curve.png", "config.json", "generation_config.json", "model.safetensors",
        "configuration_guppylm.py", "modeling_guppylm.py", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    }  # fmt: skip
    assert files["model.safetensors"].lfs and files["loss_curve.png"].lfs and not files["config.json"].lfs
    assert files["README.md"].content.decode() == MODEL_CARD
    assert json.loads(files["config.json"].content)["auto_map"]["AutoModelForCausalLM"] == "modeling_guppylm.GuppyForCausalLM"

    # re-push new weights to the same repo: a new commit on main, and the pull below must see them
    first, (_, old_logits) = head(hub, "model", "guppy/tiny-guppy").sha, reference_logits(model_dir)
    make_tiny_model(model_dir, seed=1)
    run(hub, ["-m", "guppylm.cli", "push", "--model", str(model_dir), "--repo-id", "guppy/tiny-guppy"])
    assert head(hub, "model", "guppy/tiny-guppy").sha != first

    # pull in a process where guppylm cannot be imported: same prompt ids, identical logits
    ids, logits = reference_logits(model_dir)
    assert not torch.equal(logits, old_logits)
    pulled = result_of(run(hub, ["-c", PULL_WITHOUT_GUPPYLM, "guppy/tiny-guppy"], hub.env()))
    assert pulled["ids"] == ids and torch.equal(torch.tensor(pulled["logits"]), logits)
    assert pulled["max_new_tokens"] == 12  # generation_config.json made the trip

    # offline, with the server unreachable: `guppylm chat`'s loader serves the repo id from HF_HOME
    requests = len(hub.server.log)
    offline = hub.env(HF_HUB_OFFLINE=1, HF_ENDPOINT=dead_endpoint())
    pulled = result_of(run(hub, ["-c", PULL_WITH_CHAT, "guppy/tiny-guppy"], offline))
    assert torch.equal(torch.tensor(pulled["logits"]), logits)
    assert len(hub.server.log) == requests
    assert_token_never_written(hub)


def test_model_push_with_token_flag_to_a_private_branch(hub, tmp_path):
    make_tiny_model(tmp_path / "model")
    args = ["push", "--model", tmp_path / "model", "--repo-id", "guppy/secret", "--private", "--revision", "v1", "--token", hub.token]
    run(hub, ["-m", "guppylm.cli", *map(str, args)], hub.env(HF_TOKEN=None))
    repo = hub.server.repos[("model", "guppy/secret")]
    assert repo.private and set(repo.branches) == {"main", "v1"}
    assert "model.safetensors" in repo.commits[repo.branches["v1"]].files
    assert "model.safetensors" not in repo.commits[repo.branches["main"]].files


# --- dataset ------------------------------------------------------------------------------------------


DATASET_CARD = """---
license: mit
language: [en]
task_categories: [text-generation]
pretty_name: Guppy chats
---
# Guppy chats

Single-turn conversations with a small fish.
"""

PULL_DATASET = r"""
import json, sys
from datasets import load_dataset
data = load_dataset(sys.argv[1])
print("RESULT", json.dumps({split: {"rows": data[split].to_list(), "features": repr(data[split].features)} for split in data}))
"""

# The path `guppylm train --dataset REPO_ID` takes.
PULL_WITH_TRAIN = r"""
import json, sys
from guppylm.train import load_conversations
data = load_conversations(sys.argv[1])
print("RESULT", json.dumps({split: {"rows": data[split].to_list(), "features": repr(data[split].features)} for split in data}))
"""


def make_tiny_dataset(folder):
    """A DatasetDict shaped like dataset_builder's, saved as parquet shards next to a card."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    features = Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "input": Value("string"),
            "output": Value("string"),
            "topic": ClassLabel(names=["food", "water", "bubbles"]),
        }
    )

    def rows(start, count):
        pairs = [(f"question {i}?", f"blub {i}.") for i in range(start, start + count)]
        return {
            "messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs],
            "input": [q for q, _ in pairs],
            "output": [a for _, a in pairs],
            "topic": [i % 3 for i in range(count)],
        }

    data = DatasetDict(train=Dataset.from_dict(rows(0, 12), features=features), test=Dataset.from_dict(rows(100, 4), features=features))
    for split, dataset in data.items():
        dataset.to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(DATASET_CARD)
    return data


def test_dataset_push_then_load_dataset_and_train_offline(hub, tmp_path):
    folder = tmp_path / "dataset"
    data = make_tiny_dataset(folder)
    expected = {split: {"rows": data[split].to_list(), "features": repr(data[split].features)} for split in data}

    result = run(hub, ["-m", "guppylm.cli", "dataset", "push", "--dataset", str(folder), "--repo-id", "guppy/chats"])
    assert f"{hub.endpoint}/datasets/guppy/chats" in result.stdout
    files = head(hub, "dataset", "guppy/chats").files
    assert all(blob.lfs for path, blob in files.items() if path.endswith(".parquet"))
    card = files["README.md"].content.decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert card.endswith(DATASET_CARD.split("---\n", 2)[2])  # our prose, under datasets' metadata
    assert metadata["license"] == "mit" and metadata["pretty_name"] == "Guppy chats"
    assert {c["config_name"] for c in metadata["configs"]} == {"default"} and "dataset_info" in metadata

    assert result_of(run(hub, ["-c", PULL_DATASET, "guppy/chats"])) == expected
    offline = hub.env(HF_HUB_OFFLINE=1, HF_ENDPOINT=dead_endpoint())
    assert result_of(run(hub, ["-c", PULL_WITH_TRAIN, "guppy/chats"], offline)) == expected
    assert_token_never_written(hub)


# --- Space --------------------------------------------------------------------------------------------


def space_folder(tmp_path):
    """A copy of the repo's space/ (or a stand-in while it is being written) plus build junk that must not ship."""
    folder = tmp_path / "space"
    real = REPO_ROOT / "space"
    if all((real / name).is_file() for name in ("app.py", "README.md", "requirements.txt")):
        shutil.copytree(real, folder, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    else:
        folder.mkdir()
        (folder / "README.md").write_text("---\ntitle: Guppy\nsdk: gradio\napp_file: app.py\nlicense: mit\n---\n# Chat with Guppy\n")
        (folder / "app.py").write_text('import os\nMODEL = os.environ.get("GUPPYLM_MODEL", "guppy/tiny-guppy")\n')
        (folder / "requirements.txt").write_text("transformers\n")
    for junk in ("web/node_modules/left-pad/index.js", "web/vendor/ort.wasm", "web/model/model.onnx", ".env"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_text("not for the Space\n")
    (folder / "__pycache__").mkdir(exist_ok=True)
    (folder / "__pycache__" / "app.cpython-311.pyc").write_bytes(bytes(8))
    (folder / "old.txt").write_text("from a previous deploy\n")
    return folder


PUSH_SPACE_TWICE = r"""
import sys
from pathlib import Path
from guppylm.hub import push_space
folder = Path(sys.argv[1])
push_space("guppy/first-model", "guppy/guppy-chat", space_dir=folder)
(folder / "old.txt").unlink()  # gone from space/ means gone from the Space
push_space("guppy/tiny-guppy", "guppy/guppy-chat", space_dir=folder)
"""


def test_space_push_configures_the_model_and_mirrors_the_folder(hub, tmp_path):
    from huggingface_hub import SpaceCard

    folder = space_folder(tmp_path)
    run(hub, ["-c", PUSH_SPACE_TWICE, str(folder)])

    repo = hub.server.repos[("space", "guppy/guppy-chat")]
    files = repo.commits[repo.branches["main"]].files
    assert {"app.py", "README.md", "requirements.txt", "guppylm/__init__.py", "guppylm/chat.py"} <= set(files)
    assert "old.txt" not in files  # the Space mirrors the folder
    assert not [path for path in files if any(junk in path for junk in ("node_modules", "__pycache__", "web/vendor", "web/model", ".env"))]
    card = SpaceCard(files["README.md"].content.decode())
    assert card.data.sdk == "gradio" and repo.sdk == "gradio"
    assert card.data.models == ["guppy/tiny-guppy"]
    assert (card.data.get("app_file") or "app.py") in files
    assert repo.variables == {"GUPPYLM_MODEL": "guppy/tiny-guppy"}  # app.py reads it; updated on re-push


# --- errors: one line, exit code 1, no traceback, no token ---------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        pytest.param(dict(HF_TOKEN=None), "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`", id="no-token"),
        pytest.param(dict(HF_TOKEN="hf_wrong_token_12345"), "rejected the token (401)", id="wrong-token"),
        pytest.param(dict(HF_ENDPOINT=dead_endpoint()), "cannot reach the Hub at http://127.0.0.1:", id="no-network"),
        pytest.param(dict(HF_HUB_OFFLINE=1), "HF_HUB_OFFLINE=1 is set; unset it to push", id="offline"),
    ],
)
def test_push_errors_are_one_clear_line(hub, tmp_path, env, expected):
    make_tiny_model(tmp_path / "model")
    result = cli(hub, "push", "--model", str(tmp_path / "model"), "--repo-id", "guppy/tiny-guppy", **env)
    assert expected in one_error_line(result)
    assert "hf_wrong_token_12345" not in result.stdout + result.stderr
    assert not hub.server.repos


def test_folders_are_checked_before_anything_is_sent(tmp_path):
    from guppylm.hub import HubError, push_dataset, push_model, push_space

    make_tiny_model(tmp_path / "model")
    (tmp_path / "model" / "modeling_guppylm.py").unlink()
    with pytest.raises(HubError, match=r"model folder .* is missing modeling_guppylm.py"):  # auto_map points at it
        push_model(tmp_path / "model", "guppy/x")
    with pytest.raises(HubError, match=r"is missing config.json, model.safetensors, tokenizer.json, tokenizer_config.json"):
        push_model(tmp_path, "guppy/x")
    with pytest.raises(HubError, match="model folder not found"):
        push_model(tmp_path / "nowhere", "guppy/x")
    (tmp_path / "README.md").write_text(DATASET_CARD)
    with pytest.raises(HubError, match="holds no parquet files"):
        push_dataset(tmp_path, "guppy/x")
    with pytest.raises(HubError, match=r"space folder .* is missing app.py, requirements.txt"):
        push_space("guppy/x", "guppy/y", space_dir=tmp_path)


# Every way a pull by repo id fails, through the loaders `guppylm chat` / `guppylm train` use and through
# `hub_errors`, each run the way the CLI runs a command: what it prints on stderr, and its exit code.
PULL_ERRORS = r"""
import contextlib, io, json, sys
from datasets import load_dataset
from transformers import AutoModelForCausalLM
from guppylm.inference import load_model
from guppylm.cli import run
from guppylm.hub import hub_errors
from guppylm.train import load_conversations

def with_hub_errors(load, repo_type):
    def go(repo_id):
        with hub_errors(repo_id, repo_type):
            load(repo_id)
    return go

loaders = {
    "chat": load_model,
    "train": load_conversations,
    "model": with_hub_errors(lambda repo_id: AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True), "model"),
    "dataset": with_hub_errors(load_dataset, "dataset"),
}
results = {}
for case in sys.argv[1:]:
    name, repo_id = case.split("=")
    stderr, code = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            run(lambda: loaders[name](repo_id))
        except SystemExit as exit:
            code = exit.code
    results[case] = {"code": code, "stderr": stderr.getvalue()}
print("RESULT", json.dumps(results))
"""


def pull_errors(hub, env, *cases):
    results = result_of(run(hub, ["-c", PULL_ERRORS, *cases], env))
    for case, result in results.items():
        assert result["code"] == 1 and result["stderr"].startswith("guppylm: error: "), (case, result)
        assert result["stderr"].count("\n") == 1 and "Traceback" not in result["stderr"], (case, result)
    return {case: result["stderr"].strip() for case, result in results.items()}


def test_pull_errors_are_one_clear_line(hub):
    from hub_server import Blob

    secret = hub.server.create_repo("model", "guppy/secret", private=True)
    hub.server.commit_files(secret, "main", {"config.json": Blob(b"{}", lfs=False)}, "add config")

    # no token: missing repos, and a private one, are "not found"
    cases = ("chat=guppy/missing", "train=guppy/missing", "model=guppy/secret", "dataset=guppy/missing")
    errors = pull_errors(hub, hub.env(HF_TOKEN=None), *cases)
    assert "guppy/missing" in errors["chat=guppy/missing"] and "guppy/missing" in errors["train=guppy/missing"]
    not_found = f"not found on {hub.endpoint} (check the id, and that your token can see it)"
    assert errors["model=guppy/secret"] == f"guppylm: error: model repository 'guppy/secret' {not_found}"
    assert errors["dataset=guppy/missing"] == f"guppylm: error: dataset repository 'guppy/missing' {not_found}"

    # offline, and not in the cache
    cases = ("chat=guppy/missing", "train=guppy/missing", "model=guppy/missing", "dataset=guppy/missing")
    offline = pull_errors(hub, hub.env(HF_HUB_OFFLINE=1), *cases)
    for kind in ("model", "dataset"):
        expected = f"guppylm: error: HF_HUB_OFFLINE=1 and {kind} repository 'guppy/missing' is not in the cache"
        assert offline[f"{kind}=guppy/missing"].startswith(expected)
