"""The default guppy dataset: sizes, balance, held-out split, style, variety, the saved folder and its card."""

import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from datasets import ClassLabel, DatasetDict, List, Value, load_from_disk

from dataset_builder import build_and_save, build_dataset, load_persona, save_dataset


@pytest.fixture(scope="module")
def persona():
    return load_persona("guppy")


@pytest.fixture(scope="module")
def sizes(persona):
    """Rows per split of the default build (test_persona pins the pack's numbers themselves)."""
    return {"train": persona.num_samples - persona.test_size, "test": persona.test_size}


@pytest.fixture(scope="module")
def built(tmp_path_factory, persona):
    """The full default build (150,000 conversations), saved once for the whole module."""
    folder = tmp_path_factory.mktemp("guppy")
    dataset = build_dataset(persona)
    save_dataset(dataset, persona, folder)
    return dataset, folder


@pytest.fixture(scope="module")
def columns(built):
    return {name: split.select_columns(["input", "output", "topic"])[:] for name, split in built[0].items()}


def test_sizes_and_features(built, persona, sizes):
    dataset, _ = built
    assert {name: len(split) for name, split in dataset.items()} == sizes
    features = dataset["train"].features
    assert features["messages"] == List({"role": Value("string"), "content": Value("string")})
    assert features["input"] == features["output"] == Value("string")
    assert features["topic"] == ClassLabel(names=persona.topics)
    row = dataset["test"][0]
    assert row["messages"] == [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output"]}]


def test_topics_all_present_and_shared_by_weight(columns, persona, sizes):
    """Each topic's share of a split is its weight's (feelings, human_feelings and confusion weigh more), in whole
    numbers: within one of the exact share in each of the two draws (all samples, test) train is the difference of."""
    weights = [persona.specs[topic].weight for topic in persona.topics]
    assert len(set(weights)) > 1  # the pack's shares are unequal, so this checks the weighting
    for name, total in sizes.items():
        counts = Counter(columns[name]["topic"])
        assert sorted(counts) == list(range(len(persona.topics)))
        assert all(abs(counts[i] - total * weight / sum(weights)) < 2 for i, weight in enumerate(weights))


def test_no_pair_is_in_both_splits(columns):
    pairs = {name: list(zip(c["input"], c["output"])) for name, c in columns.items()}
    assert not set(pairs["train"]) & set(pairs["test"])
    assert len(set(pairs["train"])) == len(pairs["train"])


def test_replies_follow_the_style(columns, persona):
    outputs = columns["train"]["output"] + columns["test"]["output"]
    assert all(persona.style_problem(o) is None for o in outputs)
    assert all(o == o.lower() and 1 <= len(o.split()) <= 25 and re.fullmatch(r"[a-z0-9 ',.!?]+", o) for o in outputs)


def test_user_side_is_varied(columns):
    inputs = columns["train"]["input"]
    assert len(set(inputs)) > 20_000  # the reference data had 715
    for mark in "?,'!.":
        assert sum(mark in text for text in inputs) > 1_000, mark
    assert sum(text[:1].isupper() for text in inputs) > 5_000


def test_eval_prompts_are_not_dataset_inputs(columns, persona):
    normal = lambda text: " ".join(text.lower().split())
    inputs = {normal(text) for c in columns.values() for text in c["input"]}
    cases = persona.eval_cases() + persona.eval_cases("dev")
    assert [case.prompt for case in cases if normal(case.prompt) in inputs] == []


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    folders = []
    for run, seed in enumerate((7, 7, 8)):
        folders.append(tmp_path / str(run))
        build_and_save(folders[-1], persona="guppy", num_samples=3_000, test_size=300, seed=seed)
    files = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"]
    assert all((folders[0] / f).read_bytes() == (folders[1] / f).read_bytes() for f in files)
    assert (folders[0] / files[2]).read_bytes() != (folders[2] / files[2]).read_bytes()


def test_card_metadata_matches_the_data(built, columns, persona, sizes):
    dataset, folder = built
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "mit" and meta["language"] == "en" and meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == "100K<n<1M" and meta["pretty_name"] == "Guppy conversations"
    assert meta["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}],
        }
    ]
    info = meta["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == sizes
    topic = next(f for f in info["features"] if f["name"] == "topic")
    assert list(topic["dtype"]["class_label"]["names"].values()) == persona.topics
    for heading in ("## Persona", "## Topics", "## How it was generated", "## Statistics", "## Limitations"):
        assert heading in text
    hot_water = persona.topics.index("hot_water")
    counts = {name: Counter(c["topic"])[hot_water] for name, c in columns.items()}
    assert f"| hot_water | {counts['train']} | {counts['test']} |" in text
    assert f"unique user inputs: {len(set(columns['train']['input'] + columns['test']['input']))}" in text


def test_messages_written_by_hand_are_drawn_at_the_packs_rate(built, columns, persona):
    """guppy.messages.yaml's texts are user turns as written for `rate` of the conversations (those without an
    opener or closer are equal to one), and the card names the file."""
    written = {" ".join(text.lower().split()) for texts in persona.messages.values() for text in texts}
    inputs = [" ".join(text.lower().split()) for text in columns["train"]["input"]]
    bare = persona.message_rate * (1 - persona.opener_rate) * (1 - persona.closer_rate)
    assert len(written) > 3000 and 0.8 * bare < sum(map(written.__contains__, inputs)) / len(inputs) < 1.1 * bare
    assert f"{persona.name}.messages.yaml" in (built[1] / "README.md").read_text()


def test_load_dataset_in_a_fresh_process(built, persona):
    _, folder = built
    code = (
        "import sys; from datasets import load_dataset; d = load_dataset(sys.argv[1]); "
        "print(len(d['train']), len(d['test']), d['train'].features['topic'].names[2], d['test'][0]['messages'][1]['role'])"
    )
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["147000", "3000", persona.topics[2], "assistant"]


def test_save_to_disk_round_trip(tmp_path):
    dataset = build_dataset("guppy", num_samples=600, test_size=60)
    dataset.save_to_disk(tmp_path / "arrow")
    loaded = load_from_disk(tmp_path / "arrow")
    assert isinstance(loaded, DatasetDict) and loaded["test"].to_dict() == dataset["test"].to_dict()
    assert loaded["train"].features == dataset["train"].features


def test_cli_build_prints_statistics(tmp_path, capsys):
    from guppylm.cli import main

    main(["dataset", "build", "--output-dir", str(tmp_path), "--persona", "bolt", "--num-samples", "1200", "--test-size", "120"])
    out = capsys.readouterr().out
    for needle in ("battery", "unique inputs", "word-level vocabulary", "tokens per sample", "mean", "p99", "max"):
        assert needle in out
    assert (tmp_path / "data" / "train-00000-of-00001.parquet").is_file()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="test_size < num_samples"):
        build_dataset("guppy", num_samples=100, test_size=100)
