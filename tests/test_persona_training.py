"""A second persona end to end: `guppylm train --persona bolt` gives a robot, and `guppylm eval` asks it the robot's questions."""

import json
import os
import subprocess

from transformers import AutoConfig, AutoTokenizer

from conftest import guppylm_command
from dataset_builder import load_persona


def test_bolt_trains_talks_in_its_own_words_and_is_evaluated_on_its_own_prompts(tmp_path):
    out, env = tmp_path / "bolt", {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # the built dataset is cached there
    train = subprocess.run(guppylm_command("train", "--persona", "bolt", "--preset", "tiny", "--max-steps", "400", "--output-dir", out),
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    assert AutoConfig.from_pretrained(out).persona == "bolt"
    vocabulary = AutoTokenizer.from_pretrained(out).get_vocab()
    assert "▁beep" in vocabulary and "▁battery" in vocabulary and "▁flakes" not in vocabulary  # a robot's words, no fish food

    pack = load_persona("bolt")
    result = subprocess.run(guppylm_command("eval", "--model", out), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    topics = len({case.topic for case in pack.eval_cases()})
    assert f"persona bolt: {len(pack.eval_cases())} held-out eval prompts over {topics} topics" in result.stdout
    scores = json.loads((out / "training_summary.json").read_text())["eval"]
    assert scores["persona"] == "bolt" and scores["in_style"] >= 0.9  # stops, and keeps the pack's length and punctuation rules
