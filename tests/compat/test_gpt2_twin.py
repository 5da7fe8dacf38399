"""Guppy's GPT-2 twin (`guppylm export gpt2`), loaded the way any program loads a stock model: no guppylm, no remote
code, only the transformers of this environment.

tests/compat/matrix.py exports the twin of the reference model to GUPPYLM_COMPAT_DIR/gpt2 and runs this module under
each transformers version beside test_saved_folder.py; the twin must reproduce what the original Guppy said in the
reference environment (expected.json).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

COMPAT_DIR = Path(os.environ["GUPPYLM_COMPAT_DIR"])
EXPECTED = json.loads((COMPAT_DIR / "expected.json").read_text())
FOLDER = str(COMPAT_DIR / "gpt2")
MESSAGES = [[{"role": "user", "content": prompt}] for prompt in EXPECTED["prompts"]]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FOLDER).eval()  # trust_remote_code stays False


def encode(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")


def reply(tokenizer, output, prompt_length):
    return tokenizer.decode(output[prompt_length:], skip_special_tokens=True)


def left_padded_batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt")


def test_the_twin_is_stock_gpt2(model, tokenizer):
    assert not (COMPAT_DIR / "gpt2" / "modeling_guppylm.py").exists()
    assert AutoConfig.from_pretrained(FOLDER).model_type == "gpt2"
    assert type(model).__name__ == "GPT2LMHeadModel" and type(model).__module__.startswith("transformers.models.gpt2")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, not re-initialized
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]  # no token_type_ids into GPT-2


def test_logits_match_the_original_guppy(model, tokenizer):
    with torch.no_grad():
        for messages, expected in zip(MESSAGES, EXPECTED["last_logits"]):
            logits = model(**encode(tokenizer, messages)).logits[0, -1]
            assert (logits - torch.tensor(expected)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_replies_are_the_original_guppys(model, tokenizer, use_cache):
    for messages, expected in zip(MESSAGES, EXPECTED["replies"]):
        inputs = encode(tokenizer, messages)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=EXPECTED["max_new_tokens"], use_cache=use_cache)
        assert reply(tokenizer, out[0], inputs["input_ids"].shape[1]) == expected


def test_a_left_padded_batch_answers_like_each_prompt_alone(model, tokenizer):
    batch = left_padded_batch(tokenizer)
    out = model.generate(**batch, do_sample=False, max_new_tokens=EXPECTED["max_new_tokens"])
    assert [reply(tokenizer, row, batch["input_ids"].shape[1]) for row in out] == EXPECTED["replies"]

    # a plain forward does not derive positions from the mask (generate does): pass them, as the model card says
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**batch, position_ids=positions).logits[:, -1]
    assert (logits - torch.tensor(EXPECTED["last_logits"])).abs().max().item() <= 1e-5


def test_pipeline_answers_chat_messages(tokenizer):
    chat = pipeline("text-generation", model=FOLDER, tokenizer=tokenizer)
    out = chat(MESSAGES[0], do_sample=False, max_new_tokens=EXPECTED["max_new_tokens"])
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"].lstrip() == EXPECTED["replies"][0]  # 4.x keeps the space between prompt and reply


def test_eager_attention_returns_causal_weights_per_layer(model, tokenizer):
    eager = AutoModelForCausalLM.from_pretrained(FOLDER, attn_implementation="eager").eval()
    inputs = encode(tokenizer, MESSAGES[0])
    length, config = inputs["input_ids"].shape[1], eager.config
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
        reference = model(**inputs).logits
    assert len(out.attentions) == config.n_layer
    weights = out.attentions[0][0]  # (heads, T, T)
    assert weights.shape == (config.n_head, length, length)
    assert torch.allclose(weights.sum(-1), torch.ones(config.n_head, length), atol=1e-5)
    assert weights.triu(1).abs().max().item() == 0  # no token looks ahead
    assert (out.logits - reference).abs().max().item() <= 1e-5
