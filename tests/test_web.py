"""The browser page as users meet it: `guppylm serve-web` on loopback, driven by headless Chromium.

The page must say what Python says: the same token ids for every prompt, the same greedy reply token for token.
"""

import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import torch

from conftest import ARTIFACTS, PARROT_PROMPTS, free_port, guppylm_command, make_parrot_model, running_server
from guppylm.inference import generate, generation_kwargs, load_model, prompt_for

# Texts whose tokenization is easy to get subtly wrong: NFKC, case, curly quotes, collapsed whitespace,
# punctuation spacing, apostrophes, unknown words and scripts, emoji, turn markers typed as text, nothing at all.
TRICKY_TEXTS = [
    "hi", "Hello!  I'M   Guppy , a small fish .", "don't you know?", "What’s the glass?",
    "ｆｏｏｄ！ ＦＯＯＤ？ １２３",
    "tabs\tand\nnewlines\r\n here", "  leading and trailing  ", "ß straße İstanbul", "émoji 🐟 fish!!", "中文 日本語",
    "<|im_end|> sneaky <|im_start|>assistant", "a'b'c 'quoted' it's", "numbers 42 and 3.14, 1,000", "ﬁ ligature ½", "",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`guppylm serve-web` for a parrot model on a free loopback port: (page URL, model folder)."""
    model_dir, bundle = tmp_path_factory.mktemp("parrot"), tmp_path_factory.mktemp("bundle")
    make_parrot_model(model_dir)
    port = free_port()
    log = tmp_path_factory.mktemp("serve-web") / "serve-web.log"
    command = guppylm_command("serve-web", "--model", model_dir, "--output-dir", bundle, "--port", port)
    # up to 240 s: npm ci on a fresh checkout, then export and verify
    with running_server(command, f"http://127.0.0.1:{port}/", log, 240) as url:
        yield url, model_dir


def test_server_serves_page_runtime_and_model_with_browser_mime_types(served):
    url, _ = served
    expected = {
        "": "text/html",
        "guppy.js": "text/javascript",
        "vendor/ort.wasm.min.mjs": "text/javascript",  # browsers refuse module scripts of other types
        "vendor/ort-wasm-simd-threaded.wasm": "application/wasm",  # and streaming wasm compilation too
        "model/onnx/model.onnx": "application/octet-stream",
        "model/tokenizer.json": "application/json",
    }
    for path, content_type in expected.items():
        with urllib.request.urlopen(url + path) as response:
            assert response.headers["Content-Type"].startswith(content_type), path
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(url + "model/%2e%2e/package.json")  # the model route never leaves its folder


def python_greedy(model, tokenizer, message, max_new_tokens):
    """What `guppylm chat --greedy` answers: reply ids (EOS included) and the reply text."""
    prompt = prompt_for(model, tokenizer, message, max_new_tokens)
    with torch.no_grad():
        output = generate(model, prompt, **generation_kwargs(greedy=True))
    ids = output[0, prompt.input_ids.shape[1] :].tolist()
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.browser
@pytest.mark.slow
def test_page_replies_exactly_like_python_and_stays_on_loopback(served, chromium):
    from playwright.sync_api import expect

    url, model_dir = served
    model, tokenizer = load_model(model_dir)
    max_new_tokens = model.generation_config.max_new_tokens  # the page's default, as Python's
    long_message = "the water is warm and nice today. " * 12  # over the prompt budget: cut like Python cuts it
    messages = [*PARROT_PROMPTS[:4], "hi <|im_end|> zebra, how are you?", long_message]

    requests, errors = [], []
    page = chromium.new_page(viewport={"width": 1100, "height": 900})
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(url)
    ready = page.locator("body[data-state=ready]")
    expect(ready).to_have_count(1, timeout=60_000)

    # tokenizer and chat template: the page's ids are Python's, and so are its decoded texts
    encoded = page.evaluate(
        "([texts, maxNew]) => texts.map((t) => [guppy.tokenizer.encode(t, {add_special_tokens: false}).ids,"
        " guppy.prompt(t, maxNew).ids])", [TRICKY_TEXTS + [long_message], max_new_tokens],
    )
    for text, (ids, prompt_ids) in zip(TRICKY_TEXTS + [long_message], encoded):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert prompt_ids == prompt_for(model, tokenizer, text, max_new_tokens).input_ids[0].tolist(), text
        decoded = page.evaluate("(ids) => guppy.decode(ids)", prompt_ids)
        assert decoded == tokenizer.decode(prompt_ids, skip_special_tokens=True)

    # greedy replies from the fp32 graph: token for token what model.generate gives
    page.select_option("#variant", "onnx/model.onnx")
    expect(ready).to_have_count(1, timeout=30_000)
    page.fill("#temperature", "0")
    finished = page.locator("#conversation li.guppy[data-ids]")  # data-ids is set when a reply is complete
    speeds = []
    for count, message in enumerate(messages, start=1):
        page.fill("#message", message)
        page.press("#message", "Enter")
        expect(finished).to_have_count(count, timeout=30_000)
        bubble = finished.last
        ids = [int(i) for i in bubble.get_attribute("data-ids").split(",")]
        reply = bubble.locator(".text").text_content()
        assert (ids, reply) == python_greedy(model, tokenizer, message, max_new_tokens), message
        speeds.append(float(bubble.get_attribute("data-tokens-per-second")))
    print(f"\nin-browser fp32 greedy: {max(speeds):.0f} tokens/s (best of {len(speeds)} replies)")

    # int8 graph, sampled: a reply streams in and the page is ready again
    expect(ready).to_have_count(1)
    page.select_option("#variant", "onnx/model_quantized.onnx")
    expect(ready).to_have_count(1, timeout=30_000)
    page.fill("#temperature", "0.8")
    page.get_by_role("button", name="are you hungry?").click()
    expect(finished).to_have_count(len(messages) + 1, timeout=30_000)
    expect(ready).to_have_count(1)
    page.screenshot(path=ARTIFACTS / "web-chat.png", full_page=True)

    assert not errors, errors
    outside = {urlsplit(u).hostname for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    assert outside == {"127.0.0.1"}, f"requests left loopback: {outside}"
