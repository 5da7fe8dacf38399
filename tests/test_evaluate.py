"""The quality metrics: per-kind scores, replies that repeat themselves, and a word or two to a long message."""

import re
import subprocess

import pytest
import yaml
from conftest import guppylm_command

from dataset_builder import load_persona
from guppylm.evaluate import format_report, repeats, score_replies


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("he is my friend. he is my friend.", True),  # a sentence twice
        ("the water is warm, the water is warm.", True),  # a 3-word phrase twice in one sentence
        ("i like the snail. the snail is my friend, i like the snail.", True),
        ("food! i love food. i love flakes.", False),  # "food i love" only across a sentence end
        ("blub blub. hello!", False),
        ("i feel good. i feel calm today.", False),  # two words in common are not a repeat
    ],
)
def test_repeats(reply, expected):
    assert repeats(reply) is expected


@pytest.fixture
def pack(tmp_path):
    topic = lambda name: {"name": name, "words": [name], "ask": [f"{name}?"], "replies": [f"{name}!"], "eval": [f"what about {name}"]}
    path = tmp_path / "fish.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fish", "display_name": "Fish", "description": "a test fish", "style": {"lowercase": True, "max_words": 12},
        "defaults": {"num_samples": 10, "test_size": 1}, "kinds": {"long": "chatter, then a question", "noisy": "typos"},
        "topics": [topic("food"), topic("water")],
    }), encoding="utf-8")
    long_prompt = "so today i went to the shop and then to the park and then home again, it was a long day, and now: food?"
    (tmp_path / "fish.natural.yaml").write_text(yaml.safe_dump({"prompts": [
        {"kind": "long", "topic": "food", "prompt": long_prompt},
        {"kind": "long", "topic": "water", "prompt": long_prompt.replace("food", "water")},
        {"kind": "noisy", "topic": "water", "prompt": "watr ok"},
    ]}), encoding="utf-8")
    return load_persona(path)


def test_scores_per_kind_with_repeats_and_short_replies_to_long_messages(pack):
    cases = pack.eval_cases("natural")
    replies = [("food.", True),  # on-topic, but one word to a 25-word message
               ("water is wet. water is wet.", True),  # on-topic, and it repeats
               ("water", True)]  # on-topic, out of style (no . ! or ? at the end)
    results = score_replies(pack, "natural", cases, replies)
    s = results["scores"]
    assert (s["prompts"], s["on_topic"], s["topics"]) == (3, 1.0, 2)
    assert s["in_style"] == pytest.approx(2 / 3) and s["repeating"] == pytest.approx(1 / 3)
    assert (s["long_messages"], s["short_replies_to_long"]) == (2, 1)
    assert s["kinds"] == {"long": {"prompts": 2, "on_topic": 1.0, "in_style": 1.0},
                          "noisy": {"prompts": 1, "on_topic": 1.0, "in_style": 0.0}}
    report = format_report(results)
    assert re.search(r"^long +2 +100.0% +100.0%$", report, re.M) and re.search(r"^noisy +1 +100.0% +0.0%$", report, re.M)
    assert "persona fish: 3 held-out natural prompts over 2 topics | on-topic 100.0% | in style 66.7%" in report
    assert "repeating a sentence or a 3-word phrase: 33.3% | replies under 3 words to the 2 messages over 20 words: 1" in report
    assert "[on  R] water" in report  # the repeating reply is marked


def test_one_kind_prints_no_kind_table(pack):
    cases = pack.eval_cases()
    report = format_report(score_replies(pack, "eval", cases, [("food!", True), ("food!", True)]))
    assert "on-topic 50.0%" in report and not re.search(r"^kind ", report, re.M)


def test_eval_cli_scores_the_natural_split(tiny_model_dir, pack):
    result = subprocess.run(guppylm_command("eval", "--model", tiny_model_dir, "--persona", pack.source, "--split", "natural",
                                            "--max-new-tokens", "4"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "persona fish: 3 held-out natural prompts over 2 topics" in result.stdout
    assert re.search(r"^long +2 ", result.stdout, re.M) and re.search(r"^noisy +1 ", result.stdout, re.M)
    assert "to the 2 messages over 20 words" in result.stdout
