"""The training recipe: the defaults of every number that decides the trained weights, and `Recipe`, which checks them.

Light on purpose (no torch, no transformers at import): `guppylm train --help` shows these defaults from here, so
each number is written once.
"""

import json
from dataclasses import asdict, dataclass

from guppylm.validate import number

# Optimization settings per size preset (the architectures are in configuration_guppylm.PRESETS).
# "cpu" was chosen by bench/search_cpu_recipe.py: see the README for the measurements behind it.
TRAIN_PRESETS = {
    "9m": dict(batch_size=64, learning_rate=1e-3, max_steps=3000, warmup_steps=100),
    "cpu": dict(batch_size=32, learning_rate=3e-3, max_steps=4000, warmup_steps=30),
    "tiny": dict(batch_size=16, learning_rate=5e-3, max_steps=60, warmup_steps=5),
}
UNK_RATE = 0.25  # fraction of user tokens hidden as <unk> (data.Conversations)
# a word users say fewer times in the train split is not learned: it reads as <unk>. 32 since the pack's hand-written
# messages (each drawn ~5 times) joined: at 8 they doubled the vocabulary and the output layer's cost
MIN_USER_WORD_COUNT = 32
REPLY_START_WEIGHT = 5.0  # loss weight of the reply's first token (weighted_lm_loss)
SEED = 42
EVAL_EVERY = 250  # steps between held-out losses
CHECKPOINT_EVERY = 500  # steps between checkpoints


# --- the recipe: every number checked before anything is touched ---------------------------------------------------


def default_preset():
    import torch

    return "9m" if torch.cuda.is_available() else "cpu"


def checked(name, value, low, high=None, integer=True, above=False, below=False):
    """`value` if it is a number (an integer when `integer`) in the range, else a ValueError naming the range."""
    number(name, value, low, high, whole=integer, strict=True, low_open=above, high_open=below)
    return value


@dataclass
class Recipe:
    """What decides the trained weights: data, model size and optimization. None takes the preset's value."""

    preset: str = None  # cpu, 9m or tiny (default: cpu, or 9m with a GPU)
    dataset: str = None  # a dataset folder or Hub repo id (default: build the persona's)
    persona: str = "guppy"  # a pack name or a path to a pack file: the default dataset and the evaluation prompts
    max_steps: int = None  # optimizer steps
    batch_size: int = None  # conversations per process and micro-batch
    learning_rate: float = None  # peak, after warmup; cosine decay to 0 at max_steps
    warmup_steps: int = None
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.1  # on matrices only
    unk_rate: float = UNK_RATE
    min_user_word_count: int = MIN_USER_WORD_COUNT
    reply_start_weight: float = REPLY_START_WEIGHT
    seed: int = SEED
    config_overrides: dict = None  # changes to the preset's architecture (bench/ searches with it)

    def __post_init__(self):
        from guppylm import PRESETS  # imports transformers: not at the top, which `guppylm --help` reads

        self.preset = self.preset or default_preset()
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = TRAIN_PRESETS[self.preset]
        for key in ("batch_size", "learning_rate", "max_steps"):
            if getattr(self, key) is None:
                setattr(self, key, preset[key])
        self.dataset = None if self.dataset is None else str(self.dataset)
        self.persona = str(self.persona)
        checked("max_steps", self.max_steps, 1)
        if self.warmup_steps is None:  # the preset's, within a short run
            self.warmup_steps = min(preset["warmup_steps"], self.max_steps)
        checked("batch_size", self.batch_size, 1)
        checked("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        checked("warmup_steps", self.warmup_steps, 0, self.max_steps)
        checked("learning_rate", self.learning_rate, 0, 1, integer=False, above=True)
        checked("weight_decay", self.weight_decay, 0, 1, integer=False)
        checked("unk_rate", self.unk_rate, 0, 1, integer=False, below=True)  # 1 would hide every user word
        checked("min_user_word_count", self.min_user_word_count, 1)
        checked("reply_start_weight", self.reply_start_weight, 0, 100, integer=False)
        checked("seed", self.seed, 0, 2**32 - 1)  # numpy's seed range, which set_seed seeds too

    def step_batch_size(self, processes):
        """Conversations per optimizer step: per process and micro-batch, times processes, times accumulation."""
        return self.batch_size * processes * self.gradient_accumulation_steps

    def json(self):
        """The recipe as JSON types, as checkpoints record it."""
        return json.loads(json.dumps(asdict(self)))
