"""Shared fixtures: throwaway models built in-process in seconds, a local Hub, trained tiny models."""

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from guppylm import GuppyConfig, GuppyForCausalLM
from guppylm.tokenizer import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

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
    tokenizer.save_pretrained(path)
    return model, tokenizer


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
