"""ONNX export: transformers.js' layout, the graph's interface, its self-verification against PyTorch, transformers.js
itself (Node, from disk) replying exactly like PyTorch, and output folders that are never clobbered."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import PARROT_PROMPTS, REPO_ROOT, greedy_reply, guppylm_command
from guppylm import export
from guppylm.inference import load_model, prompt_for
from guppylm.tokenizer import suppressed_reply_starts

JS_DIR = REPO_ROOT / "tests" / "js"  # package.json + package-lock.json pin @huggingface/transformers


@pytest.fixture(scope="module")
def exported(parrot_model_dir, tmp_path_factory):
    """`guppylm export onnx --quantize` through the CLI: the folder, and what the command printed."""
    out = tmp_path_factory.mktemp("export") / "guppy-onnx"
    result = subprocess.run(
        guppylm_command("export", "onnx", "--model", parrot_model_dir, "--output-dir", out, "--quantize"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def run_cli(*args):
    return subprocess.run(guppylm_command(*args), capture_output=True, text=True, timeout=300)


def one_error_line(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guppylm: error: "), result.stderr
    return lines[0]


def test_export_writes_the_transformers_js_layout_and_proves_parity(exported):
    out, stdout = exported
    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == {
        "onnx", "onnx/model.onnx", "onnx/model_quantized.onnx", "config.json", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json", "export_report.json",
    }  # fmt: skip
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"] and tokenizer_config["unk_token"] == "<unk>"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "relu"  # a type transformers.js knows

    report = json.loads((out / "export_report.json").read_text())
    fp32, int8 = report["files"]["onnx/model.onnx"], report["files"]["onnx/model_quantized.onnx"]
    assert report["verified"] and report["format"] == "onnx"
    assert fp32["max_abs_logit_diff"] < export.FP32_ATOL
    assert fp32["greedy_identical"] == fp32["prompts"] == len(export.VERIFY_PROMPTS)
    assert int8["bytes"] < fp32["bytes"]
    assert "greedy identical 6/6" in stdout  # the CLI says what it proved
    print(f"\n{stdout}")  # sizes and ms/token, for the record (pytest -s)


def test_graph_interface_is_dynamic_and_named_like_optimum(exported, parrot_model_dir):
    import onnxruntime

    out, _ = exported
    model, _ = load_model(parrot_model_dir)
    session = onnxruntime.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = export.io_names(model.config.num_hidden_layers)
    assert [i.name for i in session.get_inputs()] == inputs and [o.name for o in session.get_outputs()] == outputs
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"] and outputs[1] == "present.0.key"
    shapes = {i.name: i.shape for i in session.get_inputs()}
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    # transformers.js fills `batch_size` with the batch and every other symbolic axis with 0 for the first step
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert shapes["past_key_values.1.value"] == ["batch_size", heads, "past_sequence_length", head_dim]

    # a left-padded batch of two: the attention mask and the position ids really reach the graph
    ids = torch.tensor([[0, 0, 2, 5, 6, 7], [2, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = np.zeros((2, heads, 0, head_dim), np.float32)  # no cache yet
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    logits, *_ = session.run(None, {**feed, **{name: empty for name in inputs[3:]}})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(torch.from_numpy(logits)[real], expected[real], atol=export.FP32_ATOL)


def with_biting_rules(model, tokenizer, messages):
    """`model` under the rules `guppylm train` writes to generation_config.json (no repeated 3-gram, no non-word first
    token), with the first token of each of `messages`' greedy replies banned as well, since the parrot never starts
    with a non-word: each reply must then start with its second choice."""
    firsts = [greedy_reply(model, tokenizer, message)[0][0] for message in messages]
    model.generation_config.no_repeat_ngram_size = 3
    model.generation_config.begin_suppress_tokens = sorted({*suppressed_reply_starts(tokenizer), *firsts})


def test_verification_applies_the_rules_generate_applies(exported, parrot_model_dir):
    """The export proves the graph with its own greedy loop; under the model's banned tokens it must still reply as
    generate() does (transformers' logits processors, not a copy of them)."""
    out, _ = exported
    model, tokenizer = load_model(parrot_model_dir)
    with_biting_rules(model, tokenizer, export.VERIFY_PROMPTS)
    assert export.verify(model, tokenizer, out, export.FP32_FILE).exact


@pytest.mark.slow  # a whole ONNX export
def test_a_graph_that_differs_from_pytorch_fails_the_export_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    export_graph = export.export_graph

    def export_a_different_model(model, path):
        with torch.no_grad():
            model.model.norm.bias += 0.5  # the exported graph gets this; PyTorch's reference is restored below
            try:
                export_graph(model, path)
            finally:
                model.model.norm.bias -= 0.5

    monkeypatch.setattr(export, "export_graph", export_a_different_model)
    with pytest.raises(RuntimeError, match="does not match PyTorch"):
        export.export_onnx(tiny_model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no folder, no half-written staging folder


# --- transformers.js ------------------------------------------------------------------------------------


def node_modules():
    """tests/js/node_modules, installed from the lockfile on first use (npm registry only, no install scripts)."""
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        if shutil.which("npm") is None:
            if os.environ.get("CI"):
                pytest.fail("CI needs Node.js 20+ and npm")
            pytest.skip("needs Node.js 20+ and npm")
        # --ignore-scripts: onnxruntime-node's post-install download; its CPU binary ships inside the package
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=JS_DIR, env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
    return JS_DIR / "node_modules"


@pytest.mark.slow  # npm ci on a fresh checkout
@pytest.mark.parametrize("dtype", ["fp32", "q8"])
def test_transformers_js_replies_like_pytorch_from_disk(exported, parrot_model_dir, dtype, tmp_path):
    """transformers.js reads generation_config.json as transformers does: its banned n-grams and first tokens too."""
    node_modules()
    out = tmp_path / "guppy-onnx"
    shutil.copytree(exported[0], out)
    model, tokenizer = load_model(parrot_model_dir)
    with_biting_rules(model, tokenizer, PARROT_PROMPTS[::2])
    model.generation_config.save_pretrained(out)
    max_new_tokens = model.generation_config.max_new_tokens
    result = subprocess.run(
        ["node", "chat.mjs", str(out), dtype, str(max_new_tokens), *PARROT_PROMPTS],
        cwd=JS_DIR, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for message, js in zip(PARROT_PROMPTS, json.loads(result.stdout), strict=True):
        prompt = prompt_for(model, tokenizer, message)
        expected, text = greedy_reply(model, tokenizer, message)
        assert js["model_type"] == "gpt2" and js["prompt"] == prompt.input_ids[0].tolist()  # same template, same ids
        assert js["ids"] == expected, message  # model.generate: token for token
        # the pipeline, given the chat messages, cuts the decoded prompt off the decoded whole (a leading space stays)
        assert js["text"].lstrip() == text, message


# --- output folders and bad input -----------------------------------------------------------------------


@pytest.mark.slow  # fresh CLI processes that import torch
def test_export_refuses_folders_it_did_not_write_and_asks_before_replacing_its_own(exported, parrot_model_dir, tmp_path):
    out, _ = exported
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    line = one_error_line(run_cli("export", "onnx", "--model", parrot_model_dir, "--output-dir", project))
    assert "is not empty and is not a transformers.js (ONNX) export guppylm wrote" in line
    line = one_error_line(run_cli("export", "onnx", "--model", parrot_model_dir, "--output-dir", out))
    assert "pass --overwrite" in line
    assert (project / "notes.txt").read_text() == "mine" and (out / "onnx" / "model.onnx").is_file()


@pytest.mark.slow  # a fresh CLI process that imports torch
def test_a_tokenizer_id_beyond_the_embedding_fails_in_one_line(parrot_model_dir, tmp_path):
    model_dir = shutil.copytree(parrot_model_dir, tmp_path / "model")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab[next(word for word, i in vocab.items() if i == 10)] = 10**9  # a damaged file: once a 4.3 GB export
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    line = one_error_line(run_cli("export", "onnx", "--model", model_dir, "--output-dir", tmp_path / "out"))
    assert "tokenizer.json: model.vocab[" in line and "is 1000000000, not a token id below config.json's vocab_size 73" in line
    assert not (tmp_path / "out").exists()
