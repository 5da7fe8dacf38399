"""The browser page as users meet it: `guppylm serve-web` on loopback, driven by headless Chromium.

The page must say what Python says: the same token ids for every prompt, the same greedy reply token for token.
"""

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from conftest import (
    ARTIFACTS, DESKTOP, PARROT_PROMPTS, PHONE, REPO_ROOT, WatchedPage, free_port, greedy_reply, guppylm_command,
    make_parrot_model, running_server,
)
from guppylm import export, web
from guppylm.inference import load_model, prompt_for
from guppylm.tokenizer import suppressed_reply_starts
from guppylm.validate import LIMITS

DEMO = json.loads((REPO_ROOT / "space" / "web" / "demo.json").read_text())
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
    """`guppylm serve-web` for a parrot model on a free loopback port: (page URL, model folder, bundle folder, stdout)."""
    model_dir, bundle = tmp_path_factory.mktemp("parrot"), tmp_path_factory.mktemp("bundle") / "export"
    model, tokenizer = make_parrot_model(model_dir)
    model.generation_config.no_repeat_ngram_size = 3  # as guppylm train writes them: the page must honour them too
    model.generation_config.begin_suppress_tokens = suppressed_reply_starts(tokenizer)
    model.generation_config.save_pretrained(model_dir)
    port = free_port()
    log = tmp_path_factory.mktemp("serve-web") / "serve-web.log"
    command = guppylm_command("serve-web", "--model", model_dir, "--output-dir", bundle, "--port", port)
    # up to 240 s: npm ci on a fresh checkout, then export and verify
    with running_server(command, f"http://127.0.0.1:{port}/", log, 240) as url:
        yield url, model_dir, bundle, log


def test_serve_web_says_two_lines_and_serves_only_what_the_page_loads(served):
    url, _, bundle, log = served
    output = log.read_text().strip().splitlines()  # stdout and stderr: no warnings from torch or onnxruntime
    assert len(output) == 2, output
    assert output[0].startswith("a visitor downloads the runtime once") and "MB" in output[0]
    assert output[1] == f"guppy is swimming at {url}  (ctrl-c to stop)"

    expected = {
        "": "text/html",
        "guppy.js": "text/javascript",
        "demo.json": "application/json",
        "vendor/ort.wasm.min.mjs": "text/javascript",  # browsers refuse module scripts of other types
        "vendor/ort-wasm-simd-threaded.wasm": "application/wasm",  # and streaming wasm compilation too
        f"model/{export.FP32_FILE}": "application/octet-stream",
        "model/tokenizer.json": "application/json",
        "model/page.json": "application/json",
    }
    for path, content_type in expected.items():
        with urllib.request.urlopen(url + path) as response:
            assert response.headers["Content-Type"].startswith(content_type), path
    (bundle / ".env").write_text("SECRET=1\n")  # a file that happens to sit in the export folder
    refused = ["model/.env", "model/", "vendor/", "node_modules/", "package.json", "model/%2e%2e/package.json",
               "model/config.json?x", "../guppylm/web.py", "space/web/index.html"]
    for path in refused:
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + path)


def test_routes_leave_out_hidden_names_and_symlinks_out_of_the_folder(served, tmp_path):
    _, _, bundle, _ = served
    copy = tmp_path / "bundle"
    copy.mkdir()
    for name in ("generation_config.json", "tokenizer.json", web.REPORT_FILE, web.PAGE_INFO):
        (copy / name).write_bytes((bundle / name).read_bytes())
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the page")
    (copy / "tokenizer_config.json").symlink_to(outside)  # a link out of the folder
    report = json.loads((bundle / web.REPORT_FILE).read_text())
    report["files"] = {".env": {}, "model.onnx": {}}
    (copy / web.REPORT_FILE).write_text(json.dumps(report))
    (copy / ".env").write_text("SECRET=1")
    (copy / "model.onnx").write_bytes(b"onnx")
    routes = web.routes(copy)
    assert "/model/tokenizer_config.json" not in routes and "/model/.env" not in routes
    assert routes["/model/model.onnx"] == copy / "model.onnx" and routes["/"] == web.WEB_DIR / "index.html"
    assert web.REPORT_FILE == export.REPORT_FILE  # named in web.py so that a busy port fails before torch loads


def test_a_burst_of_connections_uses_a_bounded_pool_of_threads(served):
    _, _, bundle, _ = served
    server = web.make_server(0)
    server.routes = web.routes(bundle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/model/tokenizer.json"
    try:
        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(lambda _: urllib.request.urlopen(url, timeout=30).status, range(80)))
        workers = {thread.name for thread in threading.enumerate() if thread.name.startswith("page")}
    finally:
        server.shutdown()
        server.server_close()
    assert statuses == [200] * 80
    assert 1 <= len(workers) <= web.THREADS


def test_a_busy_port_fails_at_once_before_npm_and_export(tmp_path):
    model_dir = tmp_path / "parrot"
    make_parrot_model(model_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        command = guppylm_command("serve-web", "--model", model_dir, "--output-dir", tmp_path / "bundle", "--port", port)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"guppylm: error: port {port} on 127.0.0.1 is in use; pass --port with a free one"
    assert time.monotonic() - started < 20 and not (tmp_path / "bundle").exists()  # nothing exported


@pytest.mark.browser
@pytest.mark.slow
def test_a_phone_in_the_dark_downloads_chats_stops_retries_and_looks_inside(served, chromium):
    from playwright.sync_api import expect

    url, model_dir, bundle, _ = served
    watched = WatchedPage(chromium, PHONE, "dark", permissions=["clipboard-read", "clipboard-write"])  # for Copy
    page = watched.page
    held = []  # the runtime's download, held back until the progress bar has been seen
    page.route("**/ort-wasm-simd-threaded.wasm", lambda route: held.append(route))
    page.goto(url)
    expect(page.locator("#progress-text")).to_contain_text("Downloading Guppy", timeout=60_000)
    expect(page.locator("#progress")).to_be_visible()
    assert page.locator("body").get_attribute("data-state") == "loading" and len(held) == 1
    held[0].continue_()
    ready = page.locator("body[data-state=ready]")
    expect(ready).to_have_count(1, timeout=60_000)
    expect(page.locator("#loading")).to_be_hidden()

    # chat first: the examples are on screen, the settings behind a toggle; the default model is exact
    chip = page.get_by_role("button", name=DEMO["examples"][0])
    expect(chip).to_be_in_viewport()
    expect(page.locator("#settings")).to_be_hidden()
    report = json.loads((bundle / export.REPORT_FILE).read_text())
    default = page.locator("#variant").input_value()
    assert report["files"][default]["greedy_identical"] == report["files"][default]["prompts"]
    page.screenshot(path=ARTIFACTS / "web-phone-dark.png")

    finished = page.locator("#conversation li.guppy[data-ids]")  # data-ids is set when a reply is complete
    chip.click()
    expect(finished).to_have_count(1, timeout=30_000)
    expect(page.locator("#message")).to_be_editable()
    finished.first.get_by_role("button", name=DEMO["buttons"]["copy"]).click()
    reply = finished.first.locator(".text").inner_text()
    assert page.evaluate("navigator.clipboard.readText()") == reply
    finished.first.get_by_role("button", name=DEMO["buttons"]["retry"]).click()  # answered again, in place
    expect(ready).to_have_count(1, timeout=30_000)
    expect(finished).to_have_count(1)

    # a long message with an unknown word: cut from its start, said so; Inside shows what was typed for <unk>
    long_message = "hi Zebra, how are you? " * 30
    page.fill("#message", long_message)
    page.press("#message", "Enter")
    expect(finished).to_have_count(2, timeout=30_000)
    dropped = int(finished.last.get_attribute("data-dropped"))
    assert dropped > 0 and dropped == prompt_for(*load_model(model_dir), long_message).dropped  # Python's policy
    expect(finished.last.locator(".notice")).to_have_text(DEMO["notices"]["message_cut"].format(dropped=dropped))
    finished.last.get_by_text(DEMO["inside"]["link"]).click()
    expect(finished.last.locator(".tok.unknown").first).to_contain_text("you typed “zebra”")
    steps = finished.last.locator("table.steps tbody tr")
    expect(steps).to_have_count(len(finished.last.get_attribute("data-ids").split(",")))  # every step is there

    # settings: out of range is refused with the range; the bounds themselves are fine
    page.get_by_role("button", name=DEMO["buttons"]["settings"]).click()
    expect(page.locator("#settings")).to_be_visible()
    page.fill("#temperature", "5")
    expect(page.locator("#send")).to_be_disabled()
    low, high = LIMITS["temperature"]
    expect(page.locator("#settings")).to_contain_text(f"Temperature must be a number from {low:g} to {high:g}.")
    for value in (low, high):
        page.fill("#temperature", str(value))
        expect(page.locator("#send")).to_be_enabled()
    page.fill("#max-new-tokens", "1")  # a reply that hits its limit says so (greedy: "hello", never EOS first)
    page.check("#greedy")
    page.fill("#message", "hi")
    page.press("#message", "Enter")
    expect(finished).to_have_count(3, timeout=30_000)
    expect(finished.last.locator(".notice")).to_have_text(DEMO["notices"]["reply_cut"].format(room=1))
    page.fill("#max-new-tokens", "24")
    page.uncheck("#greedy")

    # Stop, on a reply slowed to 100 ms a token: it ends early, says so, and the page is ready again
    page.evaluate("""() => { const step = guppy.step.bind(guppy);
        guppy.step = async (...args) => { await new Promise((r) => setTimeout(r, 100)); return step(...args); }; }""")
    page.fill("#message", "what is food?")
    page.press("#message", "Enter")
    expect(page.locator("#conversation li.guppy").last.locator(".text")).not_to_be_empty(timeout=30_000)
    page.get_by_role("button", name=DEMO["buttons"]["stop"]).click()
    expect(finished).to_have_count(4, timeout=30_000)
    expect(finished.last.locator(".notice")).to_have_text(DEMO["notices"]["stopped"])
    assert len(finished.last.get_attribute("data-ids").split(",")) < 10  # the whole reply is ~10 tokens
    expect(ready).to_have_count(1)
    page.screenshot(path=ARTIFACTS / "web-phone-dark-chat.png", full_page=True)

    page.get_by_role("button", name=DEMO["buttons"]["clear"]).click()
    expect(page.locator("#conversation li")).to_have_count(0)
    expect(chip).to_be_visible()
    watched.assert_fits_and_stays_local()


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_replies_exactly_like_python(served, chromium):
    from playwright.sync_api import expect

    url, model_dir, _, _ = served
    model, tokenizer = load_model(model_dir)
    max_new_tokens = model.generation_config.max_new_tokens  # the page's default, as Python's
    greedy = partial(greedy_reply, model, tokenizer, max_new_tokens=max_new_tokens)
    long_message = "the water is warm and nice today. " * 12  # over the prompt budget: cut like Python cuts it
    messages = [*PARROT_PROMPTS[:4], "hi <|im_end|> zebra, how are you?", long_message]

    watched = WatchedPage(chromium, DESKTOP, "light")
    page = watched.page
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

    # greedy replies from the fp32 graph: token for token what model.generate gives, repeated 3-grams banned
    # (without the ban, the long message's reply would repeat a word)
    assert model.generation_config.no_repeat_ngram_size == 3
    banned = greedy(long_message)
    model.generation_config.no_repeat_ngram_size = None
    assert greedy(long_message) != banned
    model.generation_config.no_repeat_ngram_size = 3
    page.get_by_role("button", name=DEMO["buttons"]["settings"]).click()
    page.select_option("#variant", export.FP32_FILE)
    expect(ready).to_have_count(1, timeout=30_000)
    page.check("#greedy")
    finished = page.locator("#conversation li.guppy[data-ids]")
    speeds = []
    for count, message in enumerate(messages, start=1):
        page.fill("#message", message)
        page.press("#message", "Enter")
        expect(finished).to_have_count(count, timeout=30_000)
        bubble = finished.last
        ids = [int(i) for i in bubble.get_attribute("data-ids").split(",")]
        reply = bubble.locator(".text").text_content()
        assert (ids, reply) == greedy(message), message
        speeds.append(float(bubble.get_attribute("data-tokens-per-second")))
    print(f"\nin-browser fp32 greedy: {max(speeds):.0f} tokens/s (best of {len(speeds)} replies)")

    # begin_suppress_tokens as transformers applies it. The parrot never starts with a non-word (train's list), so
    # here the first token of each reply is banned too: Python and the page must both start with the second choice
    banned_messages = messages[:3]
    firsts = [greedy(message)[0][0] for message in banned_messages]  # each reply's first token id
    suppressed = sorted({*suppressed_reply_starts(tokenizer), *firsts})
    model.generation_config.begin_suppress_tokens = suppressed
    page.evaluate("(ids) => { guppy.generation.begin_suppress_tokens = ids; }", suppressed)
    for count, (message, unsuppressed) in enumerate(zip(banned_messages, firsts), start=len(messages) + 1):
        page.fill("#message", message)
        page.press("#message", "Enter")
        expect(finished).to_have_count(count, timeout=30_000)
        ids = [int(i) for i in finished.last.get_attribute("data-ids").split(",")]
        assert ids == greedy(message)[0] and ids[0] != unsuppressed, message
    model.generation_config.begin_suppress_tokens = suppressed_reply_starts(tokenizer)
    page.evaluate("(ids) => { guppy.generation.begin_suppress_tokens = ids; }", suppressed_reply_starts(tokenizer))
    sent = len(messages) + len(banned_messages)

    # int8 graph, sampled: a reply streams in and the page is ready again
    page.select_option("#variant", export.INT8_FILE)
    expect(ready).to_have_count(1, timeout=30_000)
    page.uncheck("#greedy")
    page.fill("#temperature", "0.8")
    page.fill("#message", DEMO["examples"][1])
    page.press("#message", "Enter")
    expect(finished).to_have_count(sent + 1, timeout=30_000)
    expect(ready).to_have_count(1)
    page.screenshot(path=ARTIFACTS / "web-desktop-light.png", full_page=True)
    watched.assert_fits_and_stays_local()
