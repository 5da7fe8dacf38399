"""Shared fixtures: throwaway models built in-process in seconds, a local Hub, trained tiny models."""

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# Tests run servers, trainings and browsers side by side on 2 cores: OpenMP threads that spin while waiting for
# a busy core slow small models 10-20x, so every process the tests start computes on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GenerationConfig

from guppylm import GuppyConfig, GuppyForCausalLM
from guppylm.inference import generate, generation_kwargs, prompt_for
from guppylm.tokenizer import build_tokenizer, save_tokenizer

collect_ignore = ["compat"]  # run under other transformers versions, without guppylm: `make compat`
REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "artifacts"  # screenshots and load-test numbers land here (git-ignored)
CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser here
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

FISH_LINES = [
    "hello! i'm guppy, a small fish.",
    "the water is warm and nice today.",
    "i don't know what a phone is. is it food?",
    "food! i love flakes and tiny worms.",
    "the light is on, so it must be day.",
    "bubbles go up. i watch them all day.",
    "what's the glass? it's the end of the world.",
    "i swim around the rock, then the plant, then the rock again.",
    "are you the big shape that feeds me?",
    "goodbye, come back with food.",
]


def make_tiny_model(path, seed=0, preset="tiny"):
    """A randomly initialised model + tokenizer saved as a complete folder. Fast; says nothing sensible."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(FISH_LINES + ["hi", "how", "are", "you", "?"], model_max_length=64)
    config = GuppyConfig.from_preset(preset, vocab_size=len(tokenizer))
    model = GuppyForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=50, max_new_tokens=12,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return model, tokenizer


# A messages file for the scaffold pack "fern" (`persona new fern`): one hand-written user turn, drawn for half of
# the sunlight topic's conversations.
FERN_MESSAGE = "is the window bright enough for you today"
FERN_MESSAGES = f"""rate: 0.5
messages:
  - {{topic: sunlight, text: "{FERN_MESSAGE}"}}
"""

PARROT_PROMPTS = ["hi", "how are you?", "is the water warm?", "what is food?", "is the light on?",
                  "what do you watch?", "what's the glass?", "where do you swim?", "who feeds you?", "goodbye!"]


def make_parrot_model(path):
    """The tiny model after ~1 s of overfitting PARROT_PROMPTS -> FISH_LINES, saved to `path`.

    Its greedy replies are sentences of different lengths that end in EOS, so parity is checked over varied
    tokens and the stop token. A random model repeats one token up to the length limit, and a few seconds of
    real training do no better.
    """
    model, tokenizer = make_tiny_model(path)
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in zip(PARROT_PROMPTS, FISH_LINES)]
    batch = tokenizer.apply_chat_template(chats, padding=True, return_dict=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and on a busy CPU lose 20x waiting
    model.train()
    try:
        for _ in range(100):
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.generation_config.max_new_tokens = 24  # room for the longest line and its EOS
    model.eval().save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="session")
def parrot_model_dir(tmp_path_factory):
    """A saved parrot model (make_parrot_model): greedy replies of varied lengths that end in EOS. Read-only."""
    path = tmp_path_factory.mktemp("parrot")
    make_parrot_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random tiny GuppyLM folder (config with auto_map, safetensors, code, tokenizer, generation config)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(path)
    return path


# --- hub: a local Hub-protocol server (tests/hub_server.py) for the push/pull round trips -------


class LocalHub:
    """A running tests/hub_server.py plus the environment a client process needs to talk to it."""

    def __init__(self, server, hf_home):
        self.server, self.hf_home = server, hf_home
        self.endpoint, self.token = server.endpoint, server.token

    def env(self, **extra):
        """os.environ without the caller's HF_* settings (their token, their cache, HF_HUB_OFFLINE), pointed at
        this server; huggingface_hub reads these at import, so they are for fresh processes. `KEY=None` drops KEY."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_TOKEN=self.token,
            HF_HOME=str(self.hf_home),
            HF_HUB_DISABLE_XET="1",  # the server speaks plain git-LFS, not Xet
            HF_HUB_DISABLE_TELEMETRY="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env


@pytest.fixture
def hub(tmp_path_factory):
    """A fresh, empty Hub on 127.0.0.1:<random port> with one valid token; fails the test if a client
    called a route the server does not implement (protocol drift in huggingface_hub / datasets / transformers)."""
    import secrets

    from hub_server import HubServer

    server = HubServer(token=f"hf_test_{secrets.token_hex(12)}").start()
    yield LocalHub(server, tmp_path_factory.mktemp("hf_home"))
    server.stop()
    assert not server.unhandled, f"clients called routes tests/hub_server.py does not implement: {server.unhandled}"


# --- trained models -------------------------------------------------------------------------------------


def guppylm_command(*args):
    """The installed `guppylm` CLI, run with this interpreter."""
    return [sys.executable, "-m", "guppylm.cli", *map(str, args)]


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory):
    """The guppy pack's dataset at 1/20 size: the real builder, seconds to make."""
    from dataset_builder import build_dataset, save_dataset

    path = tmp_path_factory.mktemp("small-dataset")
    save_dataset(build_dataset("guppy", num_samples=3000, test_size=300, seed=0), "guppy", path)
    return path


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory, small_dataset_dir):
    """A `tiny` model trained by the real `train()` for a few seconds: a complete output folder."""
    from guppylm.train import train

    path = tmp_path_factory.mktemp("trained-tiny")
    train(output_dir=str(path), preset="tiny", dataset=str(small_dataset_dir), max_steps=150, eval_every=50, checkpoint_every=10**6)
    return path


# --- servers and the browser ------------------------------------------------------------------------------


@contextmanager
def running_server(command, url, log, timeout, env=None):
    """Start `command` (logging to `log`), wait until `url` answers, yield; terminate it afterwards."""
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, f"{command[1:3]} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{command[1:3]} did not answer within {timeout} s:\n{log.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def greedy_reply(model, tokenizer, message, max_new_tokens=None):
    """What `guppylm chat --greedy` answers: the reply's token ids (`<|im_end|>` included) and its text."""
    prompt = prompt_for(model, tokenizer, message, max_new_tokens)
    with torch.no_grad():
        output = generate(model, prompt, **generation_kwargs(greedy=True))
    ids = output[0, prompt.input_ids.shape[1] :].tolist()
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    """Debian's headless Chromium under Playwright, one per test module. Missing: skipped on a laptop, a failure in CI."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"CI needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


class WatchedPage:
    """A page in a fresh browser context that records every URL it requests and every console error."""

    def __init__(self, browser, viewport, color_scheme, **context):
        self.page = browser.new_context(viewport=viewport, color_scheme=color_scheme, **context).new_page()
        self.requests, self.errors = [], []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))

    def assert_fits_and_stays_local(self):
        """No sideways scrolling, every request to 127.0.0.1, no console errors."""
        from urllib.parse import urlsplit

        assert self.page.evaluate("document.documentElement.scrollWidth") <= self.page.viewport_size["width"]
        schemes = ("http", "https", "ws", "wss")
        outside = {urlsplit(url).hostname for url in self.requests if urlsplit(url).scheme in schemes}
        assert outside == {"127.0.0.1"}, f"requests left loopback: {outside}"
        assert not self.errors, self.errors
