"""GuppyForCausalLM speaks transformers' protocol: loss, cache, padding, generate, save/load, remote code."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from guppylm import PRESETS, GuppyConfig, GuppyForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GuppyForCausalLM(GuppyConfig.from_preset("tiny", vocab_size=50)).eval()


def test_presets_build_the_documented_architectures():
    nine = GuppyForCausalLM(GuppyConfig.from_preset("9m", vocab_size=4096))
    assert (nine.config.num_hidden_layers, nine.config.hidden_size, nine.config.num_attention_heads) == (6, 384, 6)
    assert (nine.config.intermediate_size, nine.config.max_position_embeddings) == (768, 128)
    assert 8e6 < nine.num_parameters() < 10e6  # "~9M" with a 4K vocabulary; the head is tied, so counted once
    assert nine.lm_head.weight is nine.model.embed_tokens.weight
    assert set(PRESETS) == {"9m", "cpu", "tiny"}
    with pytest.raises(ValueError, match="unknown preset"):
        GuppyConfig.from_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        GuppyConfig(hidden_size=100, num_attention_heads=3)


def test_loss_is_shifted_cross_entropy_that_ignores_padding(model):
    ids = torch.randint(4, 50, (1, 12))
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.allclose(model(ids, labels=ids).loss, expected, atol=1e-6)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)  # right padding with <pad> (id 0)
    assert torch.allclose(model(padded, labels=padded).loss, expected, atol=1e-6)


def test_incremental_decoding_with_the_cache_matches_a_full_forward(model):
    ids = torch.randint(4, 50, (2, 10))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 10):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_greedy_generate_is_the_same_with_and_without_cache(model):
    ids = torch.randint(4, 50, (1, 7))
    kwargs = dict(max_new_tokens=25, do_sample=False, eos_token_id=None)
    assert model.generate(ids, use_cache=True, **kwargs).tolist() == model.generate(ids, use_cache=False, **kwargs).tolist()


def test_left_padded_batch_generates_exactly_what_each_prompt_does_alone(model):
    short, long = torch.randint(4, 50, (1, 4)), torch.randint(4, 50, (1, 9))
    kwargs = dict(max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()
    out = model.generate(batch, attention_mask=mask, **kwargs)
    assert out[0, 5:].tolist() == model.generate(short, **kwargs)[0].tolist()
    assert out[1].tolist() == model.generate(long, **kwargs)[0].tolist()


def test_sampling_and_beam_search_work_through_generate(model):
    ids = torch.randint(4, 50, (1, 5))
    torch.manual_seed(1)
    first = model.generate(ids, do_sample=True, top_k=10, temperature=0.8, max_new_tokens=10, eos_token_id=None)
    torch.manual_seed(1)
    again = model.generate(ids, do_sample=True, top_k=10, temperature=0.8, max_new_tokens=10, eos_token_id=None)
    assert first.tolist() == again.tolist() and first.shape == (1, 15)
    beams = model.generate(ids, num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=8, eos_token_id=None)
    assert beams.shape == (3, 13) and torch.equal(beams[:, :5], ids.expand(3, -1))


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    config = GuppyConfig.from_preset("tiny", vocab_size=50)
    sdpa = GuppyForCausalLM(config).eval()
    eager = GuppyForCausalLM(GuppyConfig.from_preset("tiny", vocab_size=50, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids = torch.randint(4, 50, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    real = mask.bool()  # padded positions attend to nothing; their outputs are unused and differ by backend
    assert torch.allclose(sdpa(ids, attention_mask=mask).logits[real], eager(ids, attention_mask=mask).logits[real], atol=1e-5)


def test_positions_past_the_context_are_a_clear_error(model):
    with pytest.raises(ValueError, match="position 64 is past the model's context of 64 tokens"):
        model(torch.randint(4, 50, (1, 65)))


def test_save_load_round_trip_keeps_weights_tied_and_logits_identical(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").exists()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # stored once, as the embedding
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_guppylm.GuppyForCausalLM"
    assert (tmp_path / "modeling_guppylm.py").exists() and (tmp_path / "configuration_guppylm.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GuppyForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(4, 50, (1, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


REMOTE_LOAD = r"""
import sys, json
sys.modules["guppylm"] = None  # guppylm must not be importable: everything comes from the folder
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path)  # plain: with stdin closed, no remote code is needed for it
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello guppy"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
logits = model(**ids).logits[0, -1]
chat = pipeline("text-generation", model=path, trust_remote_code=True)
out = chat([{"role": "user", "content": "are you hungry?"}], max_new_tokens=5, do_sample=False)
print("RESULT", json.dumps({"logits": logits.tolist(), "reply_role": out[0]["generated_text"][-1]["role"]}))
"""


def test_saved_folder_loads_in_a_process_without_guppylm(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tiny_model_dir)], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    remote = json.loads(result.stdout.split("RESULT", 1)[1])
    assert remote["reply_role"] == "assistant"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello guppy"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.allclose(torch.tensor(remote["logits"]), model(**ids).logits[0, -1], atol=1e-6)


def test_the_readme_snippet_runs_as_written(tmp_path, trained_tiny_dir):
    """README's "Use it from another program" block, verbatim, in a folder whose runs/guppy is a trained model."""
    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    snippet = readme.split("## Use it from another program", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "guppy").symlink_to(trained_tiny_dir)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "the snippet printed no reply"
