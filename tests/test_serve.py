"""`transformers serve` on Guppy's GPT-2 twin: the OpenAI-style /v1/chat/completions returns Guppy's greedy reply,
whole and streamed, from a server on 127.0.0.1 that never goes online (HF_HUB_OFFLINE=1).

`transformers serve` needs transformers' `serving` extras (openai, fastapi, uvicorn), which the test extras install.
"""

import json
import os
import sys
import urllib.request

import pytest

from conftest import PARROT_PROMPTS, free_port, greedy_reply, running_server
from guppylm.export_gpt2 import export_gpt2
from guppylm.inference import load_model, prompt_for


@pytest.fixture(scope="module")
def served(parrot_model_dir, tmp_path_factory):
    """(base URL, the twin's folder, the original Guppy and its tokenizer) with `transformers serve TWIN` running."""
    folder = tmp_path_factory.mktemp("serve")
    export_gpt2(parrot_model_dir, folder / "gpt2")
    model, tokenizer = load_model(parrot_model_dir)
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder / "gpt2"),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # the folder is the one model it serves
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with running_server(command, f"http://127.0.0.1:{port}/health", folder / "serve.log", 180, env=env) as health:
        yield health.removesuffix("/health"), str(folder / "gpt2"), model, tokenizer


def guppy_says(model, tokenizer, message):
    """Guppy's greedy reply and the reply room the prompt policy gives it (the server is told the same)."""
    _, text = greedy_reply(model, tokenizer, message)
    return text, prompt_for(model, tokenizer, message).max_new_tokens


def post(url, body):
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=60)


@pytest.mark.slow  # the server imports torch and transformers' serving stack
def test_chat_completions_answer_like_guppy_whole_and_streamed(served):
    url, name, model, tokenizer = served
    for message in PARROT_PROMPTS[:4]:
        expected, room = guppy_says(model, tokenizer, message)
        # temperature 0 is greedy; max_tokens keeps prompt + reply inside the context (the server's default is 1024)
        body = {"model": name, "messages": [{"role": "user", "content": message}], "temperature": 0, "max_tokens": room}
        with post(url, body) as response:
            answer = json.load(response)
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected}
        assert answer["choices"][0]["finish_reason"] == "stop"  # it ended with <|im_end|>, as Guppy does

        with post(url, {**body, "stream": True}) as response:
            chunks = [json.loads(line.removeprefix(b"data: ")) for line in response if line.startswith(b"data: ")]
        pieces = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks]
        assert len([piece for piece in pieces if piece]) > 1 and "".join(pieces) == expected  # token by token
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
