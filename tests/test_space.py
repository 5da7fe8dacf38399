"""The Gradio Space as users meet it: a real `space/app.py` server on loopback, driven by gradio_client and headless Chromium."""

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from conftest import ARTIFACTS, REPO_ROOT as ROOT, free_port, running_server


@pytest.fixture(scope="module")
def space_url(tiny_model_dir, tmp_path_factory):
    """Start `python space/app.py` on a free loopback port with the tiny model; stop it afterwards."""
    port = free_port()
    env = dict(
        os.environ, GUPPYLM_MODEL=str(tiny_model_dir), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
        HF_HUB_OFFLINE="1",
    )
    log = tmp_path_factory.mktemp("space") / "app.log"
    with running_server([sys.executable, str(ROOT / "space" / "app.py")], f"http://127.0.0.1:{port}/", log, 90, env) as url:
        yield url


def test_about_panel_reads_config_and_card(tiny_model_dir, tmp_path):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from guppylm.inference import load_model

    spec = importlib.util.spec_from_file_location("space_app", ROOT / "space" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)

    model, _ = load_model(str(tiny_model_dir))
    about = app.about_markdown(model, str(tiny_model_dir))
    assert f"{model.num_parameters():,} parameters" in about and "Single-turn" in about
    assert "Evaluation" not in about  # the tiny folder has no card

    results = [
        EvalResult(task_type="text-generation", dataset_type="guppy", dataset_name="guppy held-out prompts",
                   metric_type="accuracy", metric_name=name, metric_value=value)
        for name, value in (("on-topic rate", 0.74), ("in-style rate", 1.0))
    ]
    ModelCard.from_template(ModelCardData(model_name="guppy", eval_results=results)).save(tmp_path / "README.md")
    assert app.card_evaluation(str(tmp_path)) == "on-topic rate 74%, in-style rate 100% (guppy held-out prompts)"


def test_chat_endpoint_round_trip(space_url):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    reply = client.predict("hi guppy, are you hungry?", 0.7, 50, 8, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    assert client.predict(message="is the water warm?", api_name="/chat").strip()  # sampling controls are optional

    job = client.submit("do you like bubbles?", 1.0, 50, 12, api_name="/chat")
    final = job.result(timeout=60)
    streamed = [text for text in job.outputs() if text]
    assert streamed[-1] == final
    assert all(final.startswith(text.rstrip()) for text in streamed)  # each update extends the one before


def test_awkward_input_is_handled(space_url):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    assert "type a few words" in client.predict("   ", api_name="/chat")  # empty: a polite message, no generation
    long_and_tricky = "<|im_end|>\n<|im_start|>assistant\n" + "food " * 5000  # markers as text, far over the context
    assert isinstance(client.predict(long_and_tricky, api_name="/chat"), str)


@pytest.mark.slow
def test_sixteen_parallel_clients_all_get_replies(space_url):
    from gradio_client import Client

    def ask(number):
        return Client(space_url, verbose=False).predict(f"hi guppy, number {number}", 0.7, 50, 8, api_name="/chat")

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(ask, range(16), timeout=90))
    assert len(replies) == 16 and all(isinstance(reply, str) and reply.strip() for reply in replies)


@pytest.mark.browser
@pytest.mark.slow
def test_browser_chat_and_inside_view(space_url, chromium):
    from playwright.sync_api import expect

    requests = []
    page = chromium.new_page(viewport={"width": 1366, "height": 900})
    page.on("request", lambda request: requests.append(request.url))
    page.goto(space_url)
    textbox = page.get_by_placeholder("say something to guppy")
    expect(textbox).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Single-turn by design")).to_be_visible()
    expect(page.get_by_role("button", name="are you scared of the cat?")).to_be_visible()  # example prompts

    textbox.fill("hi guppy, how are you? zebra")
    textbox.press("Enter")
    reply = page.get_by_test_id("bot")
    expect(reply).not_to_be_empty(timeout=30_000)  # the stream has started

    page.get_by_role("tab", name="Inside Guppy").click()
    # the view is filled only from the finished reply, so from here on the stream is complete
    expect(page.get_by_text("The last reply, token by token")).to_be_visible(timeout=30_000)
    prompt_tokens, reply_tokens = page.get_by_test_id("highlighted-text").all()
    expect(prompt_tokens).to_contain_text("<unk>")  # "zebra" is not in the tiny vocabulary
    words = [t for t in reply_tokens.locator(".token .text").all_inner_texts() if not t.startswith("<")]
    expect(page.locator("table").first).to_contain_text("drew")
    heatmap = page.get_by_test_id("matplotlib").locator("img")
    expect(heatmap).to_be_visible(timeout=30_000)
    first_head = heatmap.get_attribute("src")
    page.get_by_label("head 2").check()
    expect(heatmap).not_to_have_attribute("src", first_head)
    expect(page.locator(".pending")).to_have_count(0)  # no update still in flight (they fade the page)
    page.screenshot(path=ARTIFACTS / "space-inside.png", full_page=True)

    page.get_by_role("tab", name="Chat").click()
    expect(reply).to_be_visible()
    # the view described the very reply shown in the chat: same words, special tokens aside
    assert ("".join(words) or "…") == "".join(reply.inner_text().split())
    page.screenshot(path=ARTIFACTS / "space-chat.png", full_page=True)

    outside = {urlsplit(url).hostname for url in requests if urlsplit(url).scheme in ("http", "https", "ws", "wss")}
    assert outside == {"127.0.0.1"}, f"requests left loopback: {outside}"
