"""A saved Guppy folder, loaded the way another program loads it: only transformers installed, no guppylm.

tests/compat/matrix.py runs this module once per transformers version, each in its own virtual environment, against
a folder and the replies and logits the reference environment measured (GUPPYLM_COMPAT_DIR/expected.json). It runs
with this folder as pytest's root (no tests/conftest.py, which needs guppylm).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

COMPAT_DIR = Path(os.environ["GUPPYLM_COMPAT_DIR"])
EXPECTED = json.loads((COMPAT_DIR / "expected.json").read_text())
FOLDER = str(COMPAT_DIR / "model")
MESSAGES = [[{"role": "user", "content": prompt}] for prompt in EXPECTED["prompts"]]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FOLDER)  # no trust_remote_code: the tokenizer is a standard one


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True).eval()


def encode(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, do_sample=False, max_new_tokens=EXPECTED["max_new_tokens"], **kwargs)


def test_guppylm_cannot_be_imported_here():
    """What the rest proves only holds if everything comes from the folder."""
    with pytest.raises(ImportError):
        import guppylm  # noqa: F401


def test_auto_classes_load_the_folders_own_code_and_a_standard_tokenizer(tokenizer):
    config = AutoConfig.from_pretrained(FOLDER, trust_remote_code=True)
    base = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)
    causal = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
    assert type(config).__name__ == "GuppyConfig" and type(config).__module__.startswith("transformers_modules")
    assert type(base).__name__ == "GuppyModel" and type(causal).__name__ == "GuppyForCausalLM"
    assert causal.lm_head.weight.data_ptr() == causal.model.embed_tokens.weight.data_ptr()  # tied, not re-initialized
    assert torch.equal(base.embed_tokens.weight, causal.model.embed_tokens.weight)
    assert type(tokenizer).__module__.startswith("transformers.")
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]


def test_autotokenizer_asks_no_question_with_stdin_closed():
    code = f"from transformers import AutoTokenizer; print(AutoTokenizer.from_pretrained({FOLDER!r}).eos_token)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0 and result.stdout.split()[-1] == "<|im_end|>", result.stderr[-2000:]


def test_logits_match_the_reference_environment(model, tokenizer):
    for messages, expected in zip(MESSAGES, EXPECTED["last_logits"]):
        logits = model(**encode(tokenizer, messages)).logits[0, -1]
        assert (logits - torch.tensor(expected)).abs().max().item() <= 1e-5


def test_greedy_replies_with_and_without_cache_match_the_reference(model, tokenizer):
    for messages, expected in zip(MESSAGES, EXPECTED["replies"]):
        inputs = encode(tokenizer, messages)
        cached, uncached = greedy(model, inputs, use_cache=True), greedy(model, inputs, use_cache=False)
        assert tokenizer.decode(cached[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == expected
        assert cached.tolist() == uncached.tolist()


def test_the_cache_is_really_used(model, tokenizer):
    """A model that drops the cache still produces text (a tiny model's greedy output barely depends on context),
    so look at the cache itself: it holds every token but the last one generated, and a step that reads it gives
    the logits of a full forward pass."""
    inputs = encode(tokenizer, MESSAGES[0])
    out = greedy(model, inputs, use_cache=True, return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert cache is not None and cache.get_seq_length() == out.sequences.shape[1] - 1

    ids = out.sequences
    step = model(ids[:, :-1], use_cache=True)
    cache = step.get("cache", step.get("past_key_values"))
    last = model(ids[:, -1:], use_cache=True, **{"cache" if "cache" in step else "past_key_values": cache})
    assert (last.logits[0, -1] - model(ids, use_cache=False).logits[0, -1]).abs().max().item() <= 1e-5


def test_a_left_padded_batch_answers_like_each_prompt_alone(model, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt")
    out = greedy(model, batch)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert replies == EXPECTED["replies"]


def test_pipeline_answers_chat_messages(tokenizer):
    chat = pipeline("text-generation", model=FOLDER, tokenizer=tokenizer, trust_remote_code=True)
    out = chat(MESSAGES[0], do_sample=False, max_new_tokens=EXPECTED["max_new_tokens"])
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    # 4.x's pipeline cuts the decoded prompt off the decoded whole, which keeps the space between them
    assert reply["content"].lstrip() == EXPECTED["replies"][0]


def test_attentions_and_hidden_states_come_back_per_layer(model, tokenizer):
    inputs = encode(tokenizer, MESSAGES[0])
    length, config = inputs["input_ids"].shape[1], model.config
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == config.num_hidden_layers and len(out.hidden_states) == config.num_hidden_layers + 1
    weights = out.attentions[0][0]  # (heads, T, T)
    assert weights.shape == (config.num_attention_heads, length, length)
    assert torch.allclose(weights.sum(-1), torch.ones(config.num_attention_heads, length), atol=1e-5)
    assert weights.triu(1).abs().max().item() == 0  # no token looks ahead
    assert torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-6)  # the last is what the head reads


def test_eager_and_sdpa_attention_agree(model, tokenizer):
    eager = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager" and model.config._attn_implementation == "sdpa"
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    assert (eager(**batch).logits[real] - model(**batch).logits[real]).abs().max().item() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    def gradients(checkpointing):
        model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        inputs = encode(tokenizer, MESSAGES[0])
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.allclose(plain[name], checkpointed[name], atol=1e-6) for name in plain)
