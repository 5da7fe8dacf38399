"""ONNX export: the graph's interface, its self-verification against PyTorch, and its loud failure."""

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import guppylm_command, make_parrot_model
from guppylm import export
from guppylm.inference import load_model



@pytest.fixture(scope="module")
def parrot_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parrot")
    make_parrot_model(path)
    return path


@pytest.fixture(scope="module")
def exported(parrot_model_dir, tmp_path_factory):
    """`guppylm export onnx --quantize` through the CLI: the files, and what the command printed."""
    out = tmp_path_factory.mktemp("onnx")
    result = subprocess.run(
        guppylm_command("export", "onnx", "--model", parrot_model_dir, "--output-dir", out, "--quantize"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_export_writes_the_web_bundle_and_proves_parity(exported):
    out, stdout = exported
    assert {"model.onnx", "model_int8.onnx", "tokenizer.json", "tokenizer_config.json", "config.json",
            "generation_config.json", "export_report.json"} <= {p.name for p in out.iterdir()}
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"] and tokenizer_config["unk_token"] == "<unk>"

    report = json.loads((out / "export_report.json").read_text())
    fp32, int8 = report["files"]["model.onnx"], report["files"]["model_int8.onnx"]
    assert report["verified"]
    assert fp32["max_abs_logit_diff"] < export.FP32_ATOL
    assert fp32["greedy_identical"] == fp32["prompts"] == len(export.VERIFY_PROMPTS)
    assert int8["bytes"] < fp32["bytes"]
    assert "greedy identical 6/6" in stdout  # the CLI says what it proved
    print(f"\n{stdout}")  # sizes and ms/token, for the record (pytest -s)


def test_graph_interface_is_dynamic_and_named_like_optimum(exported, parrot_model_dir):
    import onnxruntime

    out, _ = exported
    model, _ = load_model(parrot_model_dir)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = export.io_names(model.config.num_hidden_layers)
    assert [i.name for i in session.get_inputs()] == inputs and [o.name for o in session.get_outputs()] == outputs
    assert all(isinstance(dim, str) for dim in session.get_inputs()[0].shape)  # batch and length are symbolic

    # a left-padded batch of two: the attention mask and the position ids really reach the graph
    ids = torch.tensor([[0, 0, 2, 5, 6, 7], [2, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    heads = model.config.num_attention_heads
    empty = np.zeros((2, heads, 0, model.config.hidden_size // heads), np.float32)  # no cache yet
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    logits, *_ = session.run(None, {**feed, **{name: empty for name in inputs[3:]}})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(torch.from_numpy(logits)[real], expected[real], atol=export.FP32_ATOL)


def test_a_graph_that_differs_from_pytorch_fails_the_export(tiny_model_dir, tmp_path, monkeypatch):
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
        export.export_onnx(tiny_model_dir, tmp_path)
    assert json.loads((tmp_path / "export_report.json").read_text())["verified"] is False
