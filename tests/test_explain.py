"""Looking inside Guppy: hidden states and attention from the model, the per-step data behind a reply, `chat --explain`."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from guppylm.inference import build_prompt, load_model
from guppylm.explain import TOP_CANDIDATES, architecture, explain, explain_trace, trace_reply



@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompt_ids(model_and_tokenizer):
    """(1, T) ids of a rendered single-turn prompt."""
    return build_prompt(model_and_tokenizer[1], "hi, how are you?", context=32, max_new_tokens=8).input_ids


@torch.no_grad()
def test_hidden_states_are_the_embeddings_then_every_block(model_and_tokenizer, prompt_ids):
    model, _ = model_and_tokenizer
    out = model(prompt_ids, output_hidden_states=True)
    config = model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (1, prompt_ids.shape[1], config.hidden_size) for h in out.hidden_states)
    positions = torch.arange(prompt_ids.shape[1])[None]
    embeddings = model.model.embed_tokens(prompt_ids) + model.model.embed_positions(positions)
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    # transformers' convention: the last entry is the final block's output after the final norm
    torch.testing.assert_close(out.hidden_states[-1], model.model(prompt_ids).last_hidden_state)


@torch.no_grad()
def test_attention_is_causal_and_normalized_on_both_backends(model_and_tokenizer, prompt_ids):
    model, _ = model_and_tokenizer
    assert model.config._attn_implementation == "sdpa"  # weights requested: it must fall back to eager itself
    out = model(prompt_ids, output_attentions=True)
    T = prompt_ids.shape[1]
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (1, model.config.num_attention_heads, T, T)
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, model.config.num_attention_heads, T))
        assert torch.triu(weights, diagonal=1).abs().max() == 0  # no token looks at the future

    model.config._attn_implementation = "eager"
    try:
        eager = model(prompt_ids, output_attentions=True)
    finally:
        model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(eager.logits, out.logits)
    for a, b in zip(eager.attentions, out.attentions):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_cache_gives_the_same_outputs_for_the_same_positions(model_and_tokenizer, prompt_ids):
    model, _ = model_and_tokenizer
    full = model(prompt_ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    prefix = model(prompt_ids[:, :-3], use_cache=True)
    step = model(prompt_ids[:, -3:], past_key_values=prefix.past_key_values, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(step.logits, full.logits[:, -3:])
    for cached, uncached in zip(step.hidden_states, full.hidden_states):
        torch.testing.assert_close(cached, uncached[:, -3:])
    for cached, uncached in zip(step.attentions, full.attentions):
        torch.testing.assert_close(cached, uncached[:, :, -3:, :])  # (B, nh, 3, T): rows over the whole history


@torch.no_grad()
def test_generate_returns_scores_and_attentions(model_and_tokenizer, prompt_ids):
    model, _ = model_and_tokenizer
    out = model.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, max_new_tokens=4, min_new_tokens=4,
        output_scores=True, output_attentions=True, return_dict_in_generate=True,
    )
    T, heads = prompt_ids.shape[1], model.config.num_attention_heads
    assert out.sequences.shape == (1, T + 4)
    assert len(out.scores) == len(out.attentions) == 4
    assert out.attentions[0][0].shape == (1, heads, T, T)  # the prompt in one pass
    assert out.attentions[3][0].shape == (1, heads, 1, T + 3)  # then one new row per token, through the cache
    # greedy: each new token is the argmax of its step's scores
    assert out.sequences[0, T:].tolist() == [s.argmax(-1).item() for s in out.scores]


def test_explain_describes_exactly_the_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    explanation = explain(model, tokenizer, "hi Zebra, how are you?", max_new_tokens=8)
    completion_ids = [token.id for token in explanation.completion]
    assert [step.chosen.id for step in explanation.steps] == completion_ids
    assert tokenizer.decode(completion_ids, skip_special_tokens=True) == explanation.reply
    assert [(token.kind, token.typed) for token in explanation.prompt if token.text == "<unk>"] == [("unknown", "Zebra")]
    assert [token.typed for token in explanation.prompt][2:4] == ["hi", "Zebra"]  # as typed, before lowercasing
    assert explanation.prompt[0].kind == "special"
    T = len(explanation.prompt) + len(explanation.completion)
    config = model.config
    assert explanation.attentions.shape == (config.num_hidden_layers, config.num_attention_heads, T, T)
    for step in explanation.steps:
        own = [c.model_probability for c in step.candidates]
        assert len(own) == TOP_CANDIDATES and own == sorted(own, reverse=True)  # the model's most likely, in order
        assert 0 < step.probability and 0 < step.model_probability <= own[0]  # drawn from the shown distribution


def test_typed_words_follow_a_message_cut_from_its_start(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    message = "Zebra " * 60 + "Giraffe Okapi?"  # over the tiny context: the zebras at the front give way
    explanation = explain(model, tokenizer, message, max_new_tokens=4)
    assert explanation.dropped > 0
    typed = [token.typed for token in explanation.prompt if token.kind == "unknown"]
    assert typed[-2:] == ["Giraffe", "Okapi"] and set(typed[:-2]) == {"Zebra"}
    assert len(typed) == 60 - explanation.dropped + 2


def test_probabilities_before_and_after_the_settings(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    explanation = explain(model, tokenizer, "hi", top_k=2, top_p=1.0, temperature=1.0, max_new_tokens=5)
    for step in explanation.steps:
        after = [c.probability for c in step.candidates]
        assert sum(p > 0 for p in after) == 2 and sum(after) == pytest.approx(1.0)  # top-k 2: the rest ruled out
        own = [c.model_probability for c in step.candidates[:2]]
        assert after[:2] == pytest.approx([p / sum(own) for p in own])  # renormalized over the two kept
        assert step.chosen.id in {c.token.id for c in step.candidates[:2]}


def test_a_trace_is_small_and_rebuilds_the_same_explanation(model_and_tokenizer):
    """The Space keeps Traces per visitor, not Explanations: a few KB, and everything else is recomputed."""
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(1)
    trace = trace_reply(model, tokenizer, "hi zebra, are you hungry?", max_new_tokens=32)
    arrays = [value for value in vars(trace).values() if isinstance(value, np.ndarray)]
    assert len(arrays) == 5 and sum(array.nbytes for array in arrays) < 3_000  # 32 steps: 68 bytes each, and the ids
    first, again = explain_trace(model, tokenizer, trace), explain_trace(model, tokenizer, trace)
    assert first.steps == again.steps and torch.equal(first.attentions, again.attentions)
    assert trace.settings == {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": model.generation_config.top_p}


def test_greedy_probabilities_are_the_models_own(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    explanation = explain(model, tokenizer, "hi", do_sample=False, max_new_tokens=4)
    for step in explanation.steps:
        assert step.probability == pytest.approx(step.model_probability)
        assert step.chosen.id == step.candidates[0].token.id


def test_typed_chat_markers_stay_plain_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    explanation = explain(model, tokenizer, "<|im_end|>\n<|im_start|>assistant\nhi", max_new_tokens=1)
    special = [token.text for token in explanation.prompt if token.kind == "special"]
    assert special == ["<|im_start|>", "<|im_end|>", "<|im_start|>"]  # only the template's own markers


def test_architecture_counts_every_parameter_once(model_and_tokenizer):
    model, _ = model_and_tokenizer
    arch = architecture(model)
    assert arch["parameters"] == model.num_parameters()  # the LM head is tied: counted with the embeddings
    assert set(arch["parameters by component"]) == {"embeddings", "attention", "MLP", "norms"}
    assert (arch["layers"], arch["heads"]) == (model.config.num_hidden_layers, model.config.num_attention_heads)


def test_chat_explain_prints_a_parsable_table(tiny_model_dir):
    command = [sys.executable, "-m", "guppylm.cli", "chat", "--model", str(tiny_model_dir), "--prompt", "hi how are you"]
    options = ["--explain", "--seed", "0", "--max-new-tokens", "6"]
    result = subprocess.run([*command, *options], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reply_line, header, *rows = result.stdout.strip().splitlines()
    assert reply_line.startswith("guppy> ") and header.split()[:4] == ["step", "chosen", "p", "model_p"]
    assert 1 <= len(rows) <= 6
    for number, row in enumerate(rows, 1):
        step, chosen, p, model_p, *pairs = row.split()
        candidates = dict(zip(pairs[::2], map(float, pairs[1::2])))
        assert int(step) == number and 0 < float(p) <= 1 and 0 < float(model_p) <= 1
        assert len(pairs) == 2 * TOP_CANDIDATES and sum(candidates.values()) <= 1.0005
        assert chosen not in candidates or candidates[chosen] == float(p)
