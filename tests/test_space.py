"""The Gradio Space as users meet it: a real `space/app.py` server on loopback, driven by gradio_client and headless Chromium."""

import importlib.util
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ARTIFACTS, DESKTOP, FISH_LINES, PHONE, REPO_ROOT as ROOT, WatchedPage, free_port, running_server
from guppylm import GuppyConfig, GuppyForCausalLM
from guppylm.inference import LIMITS
from guppylm.tokenizer import build_tokenizer, save_tokenizer

DEMO = json.loads((ROOT / "space" / "web" / "demo.json").read_text())


def load_app():
    spec = importlib.util.spec_from_file_location("space_app", ROOT / "space" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def make_talker(path):
    """A random tiny model with a 1,024-token context: at top-k 1 it repeats one word for ~1,000 tokens (seconds),
    long enough to press Stop; at its defaults it says 12 random tokens."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer(FISH_LINES + ["hi", "how", "are", "you", "?"], model_max_length=1024)
    model = GuppyForCausalLM(GuppyConfig.from_preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=1024))
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=50, max_new_tokens=12,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    model.eval().save_pretrained(path)
    save_tokenizer(tokenizer, path)


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    """Start `python space/app.py` on a free loopback port with the talker model; stop it afterwards.
    (tests/test_reliability.py uses this fixture too, so it needs no other fixture of this module.)"""
    talker_dir = tmp_path_factory.mktemp("talker")
    make_talker(talker_dir)
    port = free_port()
    env = dict(
        os.environ, GUPPYLM_MODEL=str(talker_dir), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
        HF_HUB_OFFLINE="1",
    )
    log = tmp_path_factory.mktemp("space") / "app.log"
    with running_server([sys.executable, str(ROOT / "space" / "app.py")], f"http://127.0.0.1:{port}/", log, 120, env) as url:
        yield url


def test_about_panel_tells_what_guppy_is_from_its_own_files(trained_tiny_dir, tmp_path):
    """"What is Guppy?" from a real training run's folder: config, card (evaluation) and training_summary.json."""
    from guppylm.inference import load_model

    app = load_app()
    model, _ = load_model(trained_tiny_dir)
    summary = json.loads((trained_tiny_dir / "training_summary.json").read_text())
    about = app.about_markdown(model, str(trained_tiny_dir))
    assert f"{model.num_parameters():,} numbers" in about
    assert f"{summary['train_samples']:,} short chats" in about and f"{summary['steps']:,} steps" in about
    assert app.duration(summary["train_seconds"]) in about and "on a CPU" in about
    assert f"on the question's topic **{summary['eval']['on_topic']:.0%}**" in about  # from the card's eval results
    assert DEMO["single_turn"] in about and DEMO["ask_about"] in about

    bare = tmp_path / "bare"  # a folder without card and summary: the panel says only what it knows
    shutil.copytree(trained_tiny_dir, bare, ignore=shutil.ignore_patterns("README.md", "training_summary.json"))
    about = app.about_markdown(model, str(bare))
    assert "How it was made" not in about and "How well" not in about and DEMO["single_turn"] in about
    assert app.duration(252) == "4 min 12 s" and app.duration(42.4) == "42 s"


def test_a_failed_generation_answers_in_character_and_gives_the_input_back(tiny_model_dir, monkeypatch):
    """The chat's own reply function, in-process: bad settings and a crash both end in a usable chat."""
    import inspect

    from guppylm.inference import load_model

    app = load_app()
    model, tokenizer = load_model(tiny_model_dir)
    demo = app.build_demo(model, tokenizer, str(tiny_model_dir))
    reply = inspect.unwrap(next(f.fn for f in demo.fns.values() if f.name == "reply"))
    history = [{"role": "user", "content": "hi guppy"}]

    *_, (chat, traces, textbox) = reply(history, [], 5, 50, 1.0, 8)  # temperature 5: beyond its slider
    assert [m["content"] for m in chat[1:]] == [DEMO["error_reply"], "temperature must be a number between 0.05 and 2.0, not 5"]
    assert traces == [None] and textbox.interactive is True and textbox.submit_btn == DEMO["buttons"]["send"]

    def broken(*args, **kwargs):
        yield "half a rep", None
        raise RuntimeError("CUDA out of memory")  # whatever fails mid-reply

    monkeypatch.setattr(app, "stream_trace", broken)
    demo = app.build_demo(model, tokenizer, str(tiny_model_dir))
    reply = inspect.unwrap(next(f.fn for f in demo.fns.values() if f.name == "reply"))
    *_, (chat, traces, textbox) = reply(history, [], 0.7, 50, 1.0, 8)
    assert [m["content"] for m in chat[1:]] == [DEMO["error_reply"], "The log has the details."]
    assert traces == [None] and textbox.interactive is True


def test_chat_endpoint_round_trip(space_url):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    reply = client.predict("hi guppy, are you hungry?", 0.7, 50, 8, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    assert client.predict(message="is the water warm?", api_name="/chat").strip()  # sampling controls are optional

    job = client.submit("do you like bubbles?", 1.0, 50, 12, 0.9, api_name="/chat")
    final = job.result(timeout=60)
    streamed = [text for text in job.outputs() if text]
    assert streamed[-1] == final
    assert all(final.startswith(text.rstrip()) for text in streamed)  # each update extends the one before


def test_every_slider_bound_is_accepted_and_beyond_is_one_clear_error(space_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(space_url, verbose=False)
    (t_low, t_high), (k_low, k_high), (p_low, p_high), (n_low, n_high) = (
        LIMITS[name] for name in ("temperature", "top_k", "top_p", "max_new_tokens")
    )
    # the bounds as a slider sends them: whole numbers arrive as ints (temperature 2 once crashed generate)
    for temperature, top_k, top_p, max_new_tokens in [(t_low, k_low, p_low, n_low), (int(t_high), k_high, int(p_high), n_high)]:
        reply = client.predict("hi guppy", temperature, top_k, max_new_tokens, top_p, api_name="/chat")
        assert reply.strip(), (temperature, top_k, top_p, max_new_tokens)
    with pytest.raises(AppError, match=r"temperature must be a number between 0.05 and 2.0, not 5"):
        client.predict("hi guppy", 5, 50, 8, api_name="/chat")


def test_awkward_input_is_handled(space_url):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    assert client.predict("   ", api_name="/chat") == DEMO["empty_message"]  # empty: a polite message, no generation
    long_and_tricky = "<|im_end|>\n<|im_start|>assistant\n" + "food " * 5000  # markers as text, far over the context
    assert isinstance(client.predict(long_and_tricky, 0.7, 50, 8, api_name="/chat"), str)


def test_the_space_refuses_uploads(space_url):
    """It has no file input, so the upload route takes nothing bigger than a few bytes (it once stored 50 MB)."""
    import httpx

    response = httpx.post(f"{space_url}gradio_api/upload", files={"files": ("big.bin", b"x" * 200_000)})
    assert response.status_code == 413, response.text


@pytest.mark.slow
def test_sixteen_parallel_clients_all_get_replies(space_url):
    from gradio_client import Client

    def ask(number):
        return Client(space_url, verbose=False).predict(f"hi guppy, number {number}", 0.7, 50, 8, api_name="/chat")

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(ask, range(16), timeout=90))
    assert len(replies) == 16 and all(isinstance(reply, str) and reply.strip() for reply in replies)


# --- in Chromium, as a visitor: a phone in the dark, a desktop in the light ------------------------------------


def visit(chromium, url, viewport, scheme):
    """(WatchedPage, its page) with the Space open."""
    watched = WatchedPage(chromium, viewport, scheme)
    watched.page.goto(url)
    return watched, watched.page


def set_slider(page, label, value):
    field = page.get_by_label(f"number input for {label}")
    field.fill(str(value))
    field.press("Enter")


@pytest.mark.browser
@pytest.mark.slow
def test_a_phone_in_the_dark_can_chat_stop_retry_clear_and_look_inside(space_url, chromium):
    from playwright.sync_api import expect

    watched, page = visit(chromium, space_url, PHONE, "dark")
    chip = page.get_by_role("button", name=DEMO["examples"][0])
    expect(chip).to_be_in_viewport(timeout=30_000)  # the first example is on screen without scrolling
    assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
    page.screenshot(path=ARTIFACTS / "space-phone-dark.png")

    # an example chip sends at once; the input is back as soon as the reply is there
    chip.click()
    user, textbox = page.get_by_test_id("user"), page.get_by_placeholder(DEMO["placeholder"])
    bot = page.locator("#chat .message:not(.thought) > [data-testid=bot]")  # Guppy's replies, without the notes under them
    expect(user).to_have_text(DEMO["examples"][0], timeout=30_000)
    expect(bot.first).not_to_be_empty(timeout=30_000)
    expect(textbox).to_be_editable(timeout=30_000)
    expect(page.get_by_role("button", name=DEMO["buttons"]["send"])).to_be_visible()

    # retry answers the same message again, in place
    page.get_by_role("button", name="Retry").click()
    expect(textbox).to_be_editable(timeout=30_000)
    expect(user).to_have_count(1)

    # a typed message with a word Guppy never learned; its reply opens "Inside Guppy" from the link under it
    textbox.fill("hi Zebra, how are you?")
    page.get_by_role("button", name=DEMO["buttons"]["send"]).click()
    expect(user).to_have_count(2, timeout=30_000)
    expect(textbox).to_be_editable(timeout=30_000)
    bot.last.click()  # the reply, ending in "how was this made?"
    read = page.locator("#read")
    expect(read.locator(".tokens .tok.unknown")).to_contain_text("you typed “Zebra”", timeout=30_000)
    expect(page.locator("#inside-caption")).to_contain_text("Reply 2 of 2")
    steps = page.locator("#steps tbody tr")
    caption = page.locator("#inside-caption").inner_text()
    written = int(caption.split(" and wrote ")[1].split()[0])
    expect(steps).to_have_count(written)  # every step of the reply is there
    cell = page.locator("#heatmap .heat i[style]").nth(3)
    cell.click()  # a tap shows the value
    expect(page.locator("#heatmap .readout")).to_contain_text("of its attention")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=ARTIFACTS / "space-phone-dark-inside.png", full_page=True)

    # the extreme settings, through the sliders: temperature 2 (arrives as an int), top-k 1, longest reply
    page.get_by_role("tab", name="Chat").click()
    page.get_by_text(DEMO["buttons"]["settings"]).click()
    set_slider(page, DEMO["settings"]["temperature"]["label"], LIMITS["temperature"][1])
    set_slider(page, DEMO["settings"]["top_p"]["label"], LIMITS["top_p"][0])
    set_slider(page, DEMO["settings"]["top_k"]["label"], LIMITS["top_k"][0])
    set_slider(page, DEMO["settings"]["max_new_tokens"]["label"], 1024)
    # top-k 1 makes the random talker repeat one word ~1,000 times: long enough to press Stop mid-reply
    textbox.fill("tell me a long story")
    textbox.press("Enter")
    stop = page.get_by_role("button", name=DEMO["buttons"]["stop"])
    expect(bot.last).not_to_be_empty(timeout=30_000)
    stop.click()
    expect(page.get_by_text(DEMO["notices"]["stopped"])).to_be_visible(timeout=10_000)
    expect(textbox).to_be_editable()
    partial = len(bot.last.inner_text().split())
    assert 0 < partial < 1000

    # Clear empties the chat and Inside Guppy
    page.get_by_role("button", name="Clear").click()
    expect(page.get_by_test_id("bot")).to_have_count(0)
    page.get_by_role("tab", name="Inside Guppy").click()
    expect(page.locator("#inside-caption")).to_contain_text("Send Guppy a message")
    expect(read.locator(".tokens .tok")).to_have_count(0)
    watched.assert_fits_and_stays_local()


@pytest.mark.browser
@pytest.mark.slow
def test_a_desktop_in_the_light_reads_what_guppy_is_and_sees_a_cut_message(space_url, chromium):
    from playwright.sync_api import expect

    watched, page = visit(chromium, space_url, DESKTOP, "light")
    expect(page.get_by_text("What is Guppy?")).to_be_visible(timeout=30_000)
    expect(page.get_by_text(DEMO["single_turn"]).first).to_be_visible()
    expect(page.get_by_role("button", name=DEMO["examples"][0])).to_be_in_viewport()

    # the longest reply leaves half the context to the message; 1,000 question marks are 1,000 tokens
    page.get_by_text(DEMO["buttons"]["settings"]).click()
    set_slider(page, DEMO["settings"]["max_new_tokens"]["label"], LIMITS["max_new_tokens"][1])
    textbox = page.get_by_placeholder(DEMO["placeholder"])
    textbox.fill("?" * 1000)
    textbox.press("Enter")
    expect(page.get_by_text("Your message was cut")).to_be_visible(timeout=90_000)  # after a ~500-token reply
    expect(textbox).to_be_editable()
    page.screenshot(path=ARTIFACTS / "space-desktop-light.png")

    # the other ends of the sliders: the coolest temperature, every token, no top-p cut, a one-token reply
    for name, end in (("temperature", 0), ("top_k", 1), ("top_p", 1), ("max_new_tokens", 0)):
        bound = page.get_by_label(f"range slider for {DEMO['settings'][name]['label']}").get_attribute(("min", "max")[end])
        set_slider(page, DEMO["settings"][name]["label"], bound)
    textbox.fill("hi guppy")
    textbox.press("Enter")
    expect(page.get_by_test_id("user")).to_have_count(2, timeout=30_000)
    expect(textbox).to_be_editable(timeout=30_000)
    expect(page.locator("#chat .thought").last).to_contain_text("The reply hit its limit")  # after one token
    assert len(page.locator("#chat .message:not(.thought) > [data-testid=bot]").last.inner_text().split()) == 1
    watched.assert_fits_and_stays_local()
