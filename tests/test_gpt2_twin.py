"""`guppylm export gpt2` and `guppylm push --format gpt2`: a stock GPT-2 folder that any program loads without remote
code and that answers exactly like Guppy; an export that would differ fails, and folders are never clobbered.
(tests/compat/test_gpt2_twin.py loads the twin under every transformers version of `make compat`.)"""

import json
import subprocess
import sys

import pytest

from conftest import PARROT_PROMPTS, greedy_reply, guppylm_command
from guppylm import export_gpt2
from guppylm.inference import load_model

# A program with only transformers: guppylm cannot be imported, nothing is trusted; prints the greedy replies.
CHAT_WITHOUT_GUPPYLM = r"""
import json, sys
sys.modules["guppylm"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
name, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(name).eval()  # trust_remote_code defaults to False
tokenizer = AutoTokenizer.from_pretrained(name)
replies = []
for prompt in prompts:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False)
    replies.append(out[0, inputs["input_ids"].shape[1]:].tolist())
print("RESULT", json.dumps({"class": type(model).__name__, "module": type(model).__module__, "replies": replies}))
"""


@pytest.fixture(scope="module")
def twin(parrot_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "guppy-gpt2"
    result = subprocess.run(guppylm_command("export", "gpt2", "--model", parrot_model_dir, "--output-dir", out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "greedy identical 6/6" in result.stdout
    return out


def guppy_replies(model_dir, prompts=PARROT_PROMPTS):
    model, tokenizer = load_model(model_dir)
    return [greedy_reply(model, tokenizer, message)[0] for message in prompts]


def chat_without_guppylm(name, env=None):
    result = subprocess.run([sys.executable, "-c", CHAT_WITHOUT_GUPPYLM, str(name), json.dumps(PARROT_PROMPTS)],
                            capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT", 1)[1])


def one_error_line(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guppylm: error: "), result.stderr
    return lines[0]


def test_twin_is_a_stock_gpt2_folder_with_a_card_and_a_report(twin, parrot_model_dir):
    assert {p.name for p in twin.iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "README.md", "export_report.json",
    }  # fmt: skip  (no modeling_*.py: nothing to trust)
    config = json.loads((twin / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in config
    assert config["activation_function"] == "relu" and config["n_positions"] == 64
    report = json.loads((twin / "export_report.json").read_text())
    assert report["verified"] and report["max_abs_logit_diff"] <= export_gpt2.ATOL and report["format"] == "gpt2"
    card = (twin / "README.md").read_text()
    assert "GPT-2 twin" in card and parrot_model_dir.name in card and "trust_remote_code" in card and str(twin) in card


@pytest.mark.slow  # fresh Python processes that import torch
def test_twin_answers_exactly_like_guppy_in_a_program_without_guppylm(twin, parrot_model_dir):
    pulled = chat_without_guppylm(twin)
    assert pulled["class"] == "GPT2LMHeadModel" and pulled["module"].startswith("transformers.models.gpt2")
    assert pulled["replies"] == guppy_replies(parrot_model_dir)  # generation_config.json's max_new_tokens, eos: the same


def test_a_twin_that_differs_fails_the_export_and_writes_nothing(parrot_model_dir, tmp_path, monkeypatch):
    state_dict = export_gpt2.gpt2_state_dict

    def slightly_off(model):
        tensors = state_dict(model)
        tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + 1e-3
        return tensors

    monkeypatch.setattr(export_gpt2, "gpt2_state_dict", slightly_off)
    with pytest.raises(RuntimeError, match="does not match the original: max"):
        export_gpt2.export_gpt2(parrot_model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # fresh Python processes that import torch
def test_overwrite_replaces_only_our_own_export_and_keeps_the_users_files(twin, parrot_model_dir, tmp_path):
    command = lambda out, *flags: subprocess.run(  # noqa: E731
        guppylm_command("export", "gpt2", "--model", parrot_model_dir, "--output-dir", out, *flags), capture_output=True, text=True, timeout=300
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    assert "is not a GPT-2 export guppylm wrote" in one_error_line(command(project, "--overwrite"))
    assert "pass --overwrite" in one_error_line(command(twin))

    (twin / "notes.txt").write_text("kept")
    (twin / "model.safetensors").write_bytes(b"stale")  # ours: replaced
    assert command(twin, "--overwrite").returncode == 0
    assert (twin / "notes.txt").read_text() == "kept" and (twin / "model.safetensors").stat().st_size > 1000
    assert not list(twin.parent.glob(".*"))  # no staging or old folder left behind


@pytest.mark.slow  # fresh Python processes that import torch
def test_push_format_gpt2_publishes_the_twin_that_loads_without_remote_code(hub, parrot_model_dir):
    result = subprocess.run(
        guppylm_command("push", "--model", parrot_model_dir, "--repo-id", "guppy/guppy-gpt2", "--format", "gpt2"),
        env=hub.env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.server.repos[("model", "guppy/guppy-gpt2")]
    files = repo.commits[repo.branches["main"]].files
    assert not any(name.endswith(".py") for name in files) and files["model.safetensors"].lfs
    assert json.loads(files["config.json"].content)["model_type"] == "gpt2"
    assert 'from_pretrained("guppy/guppy-gpt2")' in files["README.md"].content.decode()  # the card names the repo

    pulled = chat_without_guppylm("guppy/guppy-gpt2", env=hub.env())
    assert pulled["class"] == "GPT2LMHeadModel" and pulled["replies"] == guppy_replies(parrot_model_dir)
