"""One prompt-length policy: prompt and reply always fit the context, and generation never fails mid-reply."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import guppylm_command
from guppylm.inference import build_prompt, generate, generation_kwargs, load_model, prompt_for, stream_reply
from guppylm.tokenizer import suppressed_reply_starts

HEAD, TAIL = ["<|im_start|>", "▁user"], ["<|im_end|>", "<|im_start|>", "▁assistant"]


@pytest.fixture(scope="module")
def loaded(trained_tiny_dir):
    return load_model(trained_tiny_dir)


def message_of(tokenizer, tokens):
    """A message whose prompt is exactly `tokens` long."""
    overhead = len(build_prompt(tokenizer, "", 10**6, 1).input_ids[0])
    return " ".join(["food"] * (tokens - overhead))


@pytest.mark.parametrize("extra", [0, 1, 300])
@pytest.mark.parametrize("max_new_tokens", [1, 48, 1024])
def test_prompt_and_reply_always_fit_and_the_generation_prompt_stays(loaded, extra, max_new_tokens):
    model, tokenizer = loaded
    context = model.config.max_position_embeddings
    message = message_of(tokenizer, context + extra)  # exactly the context, one more, far more
    prompt = build_prompt(tokenizer, message, context, max_new_tokens)
    tokens = tokenizer.convert_ids_to_tokens(prompt.input_ids[0].tolist())
    assert tokens[:2] == HEAD and tokens[-3:] == TAIL and set(tokens[2:-3]) == {"▁food"}
    assert len(tokens) + prompt.max_new_tokens <= context
    assert prompt.max_new_tokens == min(max_new_tokens, context - len(tokens)) >= min(max_new_tokens, context // 2)
    assert prompt.dropped == len(build_prompt(tokenizer, message, 10**6, 1).input_ids[0]) - len(tokens)


def test_a_short_message_is_never_cut_and_its_reply_may_reach_the_context(loaded):
    model, tokenizer = loaded
    prompt = prompt_for(model, tokenizer, "is the water warm?", max_new_tokens=1024)
    assert prompt.dropped == 0 and len(prompt.input_ids[0]) + prompt.max_new_tokens == model.config.max_position_embeddings


@pytest.mark.parametrize("extra", [0, 40])
def test_generate_and_stream_give_a_complete_reply_at_the_context_edge(loaded, extra):
    model, tokenizer = loaded
    message = message_of(tokenizer, model.config.max_position_embeddings + extra)
    prompt = prompt_for(model, tokenizer, message, max_new_tokens=1024)
    output = generate(model, prompt, **generation_kwargs(greedy=True))
    assert output.shape[1] <= model.config.max_position_embeddings + 1  # + the closing <|im_end|>, never fed back
    *_, (text, reply) = stream_reply(model, tokenizer, message, **generation_kwargs(greedy=True, max_new_tokens=1024))
    assert reply.text == text and reply.prompt.dropped == prompt.dropped


def test_plain_generate_ends_the_reply_at_the_last_position_instead_of_failing(tiny_model_dir):
    """A program that asks generate() for more tokens than fit (no guppylm policy): the reply stops cleanly with
    <|im_end|> where the learned positions end. (The random model never says <|im_end|> by itself.)"""
    model, tokenizer = load_model(tiny_model_dir)
    context = model.config.max_position_embeddings
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message_of(tokenizer, context - 10)}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=500, do_sample=False)
    assert out.shape[1] == context + 1 and out[0, -1].item() == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in out[0, ids["input_ids"].shape[1] : -1].tolist()

    logits = model(out[:, :context]).logits[0]  # (T, vocab)
    assert logits[-1].argmax().item() == tokenizer.eos_token_id
    assert (logits[-1] == torch.finfo(logits.dtype).min).sum().item() == logits.shape[-1] - 1  # only <|im_end|> left
    assert (logits[:-1] == torch.finfo(logits.dtype).min).sum().item() == 0  # every other position is untouched
    with pytest.raises(ValueError, match="position 64 is past the model's context of 64 tokens"):
        model(torch.ones(1, context + 1, dtype=torch.long))  # a prompt that cannot fit is refused up front


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_prompt_that_fills_the_context_still_ends_cleanly_under_the_first_token_ban(tiny_model_dir, do_sample):
    """train bans non-words as a reply's first token; at the context's last position the model offers only
    <|im_end|>, so that must stay drawable, or generate() would step past the context instead of ending the reply."""
    model, tokenizer = load_model(tiny_model_dir)
    model.generation_config.begin_suppress_tokens = suppressed_reply_starts(tokenizer)
    context = model.config.max_position_embeddings
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message_of(tokenizer, context)}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert ids["input_ids"].shape[1] == context
    out = model.generate(**ids, max_new_tokens=48, do_sample=do_sample)
    assert out[0, context:].tolist() == [tokenizer.eos_token_id]


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(temperature=float("inf")), dict(top_p=5), dict(top_k=0),
                                 dict(top_k=2.5), dict(max_new_tokens=0), dict(temperature="hot")])
def test_sampling_settings_are_checked_with_their_range(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be .* between"):
        generation_kwargs(**bad)


def test_sampling_settings_are_coerced_to_what_generate_takes():
    kwargs = generation_kwargs(temperature=2, top_k=50.0, top_p=1, max_new_tokens=48.0)
    assert kwargs == {"temperature": 2.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 48}
    assert [type(kwargs[k]) for k in ("temperature", "top_k", "top_p", "max_new_tokens")] == [float, int, float, int]


def test_chat_and_eval_cli_answer_a_message_longer_than_the_context(trained_tiny_dir, tmp_path):
    long_message = "i had a long day at work and the bus was late again. " * 20 + "are you hungry?"
    result = subprocess.run(guppylm_command("chat", "--model", trained_tiny_dir, "--prompt", long_message,
                                            "--max-new-tokens", "1000", "--greedy"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("guppy> ") and len(result.stdout.split()) > 1
    assert "too long for Guppy's memory; it read only the end" in result.stderr

    result = subprocess.run(guppylm_command("eval", "--model", trained_tiny_dir, "--max-new-tokens", "128"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"held-out eval prompts .* \| on-topic [\d.]+%", result.stdout), result.stdout[-500:]


def test_eval_keeps_the_generation_prompt_of_long_prompts(loaded):
    from guppylm.evaluate import greedy_replies

    model, tokenizer = loaded
    long = "the bus was late and my boss was grumpy. " * 30 + "are you hungry?"
    batched = greedy_replies(model, tokenizer, [long, "hi"], max_new_tokens=20)
    alone = generate(model, prompt_for(model, tokenizer, long, 20), **generation_kwargs(greedy=True))
    reply_ids = alone[0, len(prompt_for(model, tokenizer, long, 20).input_ids[0]) :].tolist()
    stopped = tokenizer.eos_token_id in reply_ids
    reply_ids = reply_ids[: reply_ids.index(tokenizer.eos_token_id)] if stopped else reply_ids
    assert batched[0] == (tokenizer.decode(reply_ids, skip_special_tokens=True), stopped)


def test_a_missing_default_model_says_how_to_train_one_at_once_offline(tmp_path):
    from conftest import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "GUPPYLM_MODEL": ""}
    for args in ([], ["--model", "runs/gupy"]):
        started = time.monotonic()
        result = subprocess.run(guppylm_command("chat", "--prompt", "hi", *args), cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 2  # no torch import, no Hub lookup (which used to retry for ~43 s)
        name = args[1] if args else "runs/guppy"
        assert result.returncode == 1
        assert result.stderr.strip() == f"guppylm: error: no model at {name} - train one with `guppylm train` or pass --model"
