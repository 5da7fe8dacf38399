"""Persona packs: the schema fails loudly and precisely, shipped packs are sound, and a second pack builds."""

import random
import re
from collections import Counter

import pytest
import yaml

from dataset_builder import (
    PersonaError,
    build_dataset,
    check_persona,
    list_personas,
    load_persona,
    scaffold_persona,
)
from dataset_builder.persona import SPLITS

WORD = re.compile(r"[\w']+")


def minimal_pack():
    return {
        "name": "fish",
        "display_name": "Fish",
        "description": "a test fish",
        "style": {"lowercase": True, "max_words": 8},
        "defaults": {"num_samples": 40, "test_size": 4},
        "pools": {"food": ["flakes", "worms"]},
        "topics": [
            {
                "name": "food",
                "words": ["food"],
                "ask": ["do you like {food|snacks}{?|!|}", "what do you eat{?|}", "hungry{?|}"],
                "replies": ["i love {food}, it is food.", "food is good{.|!}", "food? {food}!"],
                "eval": ["got any favourite snacks?"],
            }
        ],
    }


def write(tmp_path, pack, name="fish.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(pack), encoding="utf-8")
    return path


def test_minimal_pack_loads(tmp_path):
    persona = load_persona(write(tmp_path, minimal_pack()))
    assert (persona.name, persona.display_name, persona.topics, persona.max_words) == ("fish", "Fish", ["food"], 8)
    assert persona.eval_cases() == [("got any favourite snacks?", "food", frozenset({"food"}), "paraphrase")]
    assert persona.eval_cases("dev") == persona.eval_cases("natural") == []  # both are optional


def test_dev_split(tmp_path):
    pack = minimal_pack()
    pack["topics"][0]["dev"] = ["what's for dinner?"]
    persona = load_persona(write(tmp_path, pack))
    assert persona.eval_cases("dev") == [("what's for dinner?", "food", frozenset({"food"}), "paraphrase")]
    assert persona.eval_cases() == [("got any favourite snacks?", "food", frozenset({"food"}), "paraphrase")]
    with pytest.raises(ValueError, match="split must be one of 'eval', 'dev', 'natural'"):
        persona.eval_cases("train")


def kinded_pack(tmp_path, prompts, blind=False):
    """The minimal pack with two kinds and a `natural` split file beside it."""
    pack = minimal_pack()
    pack["kinds"] = {"opener": "how people start", "noisy": "typos and slang"}
    pack["topics"].append({**pack["topics"][0], "name": "water", "words": ["water"], "eval": ["wet enough?"]})
    (tmp_path / "fish.natural.yaml").write_text(yaml.safe_dump({"blind": blind, "prompts": prompts}), encoding="utf-8")
    return write(tmp_path, pack)


def test_split_files_add_prompts_with_kinds(tmp_path):
    """fish.natural.yaml beside fish.yaml holds a split's prompts, each with a kind; they follow the topics' own."""
    prompts = [{"kind": "noisy", "topic": "water", "prompt": "is teh watr ok"},
               {"kind": "opener", "topic": "food", "prompt": "hey, snack time?"}]
    persona = load_persona(kinded_pack(tmp_path, prompts))
    assert persona.eval_cases("natural") == [("is teh watr ok", "water", frozenset({"water"}), "noisy"),
                                             ("hey, snack time?", "food", frozenset({"food"}), "opener")]
    assert [case.kind for case in persona.eval_cases()] == ["paraphrase", "paraphrase"]
    (tmp_path / "fish.dev.yaml").write_text(yaml.safe_dump({"prompts": [prompts[0]]}), encoding="utf-8")
    assert [case.prompt for case in load_persona(tmp_path / "fish.yaml").eval_cases("dev")] == ["is teh watr ok"]
    assert "." not in "".join(list_personas(describe=False))  # guppy.dev.yaml and guppy.natural.yaml are no packs


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"kind": "typo", "topic": "food", "prompt": "x"}, "fish.natural.yaml: prompts[0].kind: 'typo' is not a kind fish.yaml declares"),
        ({"kind": "noisy", "topic": "cats", "prompt": "x"}, "fish.natural.yaml: prompts[0].topic: 'cats' is not a topic of fish.yaml"),
        ({"kind": "noisy", "topic": "food", "prompt": " "}, "fish.natural.yaml: prompts[0].prompt: must be a non-empty string"),
        ({"kind": "noisy", "topic": "food"}, "fish.natural.yaml: prompts[0]: must be a mapping with exactly kind, topic and prompt"),
    ],
)
def test_split_file_errors_name_file_field_and_problem(tmp_path, entry, message):
    with pytest.raises(PersonaError) as error:
        load_persona(kinded_pack(tmp_path, [entry]))
    assert str(error.value).startswith(message)


def messages_pack(tmp_path, messages, rate=0.5):
    """The minimal pack with user messages written by hand beside it (fish.messages.yaml)."""
    (tmp_path / "fish.messages.yaml").write_text(yaml.safe_dump({"rate": rate, "messages": messages}), encoding="utf-8")
    return write(tmp_path, minimal_pack())


def test_messages_file_adds_user_turns_written_by_hand(tmp_path):
    """fish.messages.yaml's texts are drawn as they are (braces too) for `rate` of a topic's user turns, and a
    held-out prompt equal to one is not held out."""
    written = ["so uh... got snacks {or not}?", "Feeding time yet, little buddy"]
    path = messages_pack(tmp_path, [{"topic": "food", "text": text} for text in written], rate=0.5)
    persona, rng = load_persona(path), random.Random(0)
    users = Counter(persona.sample(persona.specs["food"], rng)[0] for _ in range(400))
    drawn = sum(users[text] for text in written)
    assert users[written[0]] > 50 and users[written[1]] > 50 and 150 < drawn < 250  # half of 400, as rate says
    assert persona.producible("feeding time yet, little buddy") and not persona.producible("feeding time yet")
    assert "messages written by hand: 2 for 1 topics" in check_persona(path)
    assert load_persona(write(tmp_path, minimal_pack(), "plain.yaml")).messages == {}  # the file is optional


@pytest.mark.parametrize(
    "messages, rate, message",
    [
        ([{"topic": "cats", "text": "meow?"}], 0.5, "fish.messages.yaml: messages[0].topic: 'cats' is not a topic of fish.yaml"),
        ([{"topic": "food", "text": ""}], 0.5, "fish.messages.yaml: messages[0].text: must be a non-empty string"),
        ([{"topic": "food"}], 0.5, "fish.messages.yaml: messages[0]: must be a mapping with exactly topic and text"),
        ([{"topic": "food", "text": "hi"}], 1.5, "fish.messages.yaml: rate: must be a number from 0 to 1"),
        ([], 0.5, "fish.messages.yaml: messages: must be a non-empty list"),
    ],
)
def test_messages_file_errors_name_file_field_and_problem(tmp_path, messages, rate, message):
    with pytest.raises(PersonaError) as error:
        load_persona(messages_pack(tmp_path, messages, rate))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "content, message",
    [(b"rate: 0.5\nmessages: [\xff\xfe]\n", "fish.messages.yaml: not UTF-8 text"),
     (b"rate: 0.5\nmessages: [unclosed\n", "fish.messages.yaml: not valid YAML: while parsing")],
)
def test_a_sibling_file_that_does_not_parse_is_named(tmp_path, content, message):
    (tmp_path / "fish.messages.yaml").write_bytes(content)
    with pytest.raises(PersonaError) as error:
        load_persona(write(tmp_path, minimal_pack()))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_kinds_are_validated(tmp_path):
    pack = minimal_pack()
    pack["kinds"] = {"paraphrase": "taken"}
    with pytest.raises(PersonaError, match=r"fish.yaml: kinds.paraphrase: kind names are lowercase letters"):
        load_persona(write(tmp_path, pack))


def test_check_never_names_the_prompts_of_a_blind_split(tmp_path):
    """A blind split's prompts stay unread until they are scored, even the ones the phrasings can produce."""
    prompts = [{"kind": "noisy", "topic": "food", "prompt": "hungry?"}, {"kind": "opener", "topic": "water", "prompt": "so, wet?"}]
    report = check_persona(kinded_pack(tmp_path, prompts, blind=True))
    assert "natural: 2 prompts (1 noisy, 1 opener); 1 are NOT held out" in report and "hungry" not in report
    report = check_persona(kinded_pack(tmp_path, prompts, blind=False))
    assert "1 are NOT held out, the phrasings can produce them: ['hungry?']" in report


def test_import_natural_split_counts_and_drops_without_showing(tmp_path):
    """bench/import_natural_split.py keeps the authors' held-out prompts and prints counts, never a prompt."""
    import subprocess
    import sys
    from pathlib import Path

    pack = kinded_pack(tmp_path, [{"kind": "noisy", "topic": "food", "prompt": "placeholder"}])
    author = tmp_path / "author.yaml"
    author.write_text(yaml.safe_dump({"author": "a", "prompts": [
        {"kind": "noisy", "topic": "food", "prompt": "hungry?"},  # the phrasings produce it: dropped
        {"kind": "noisy", "topic": "food", "prompt": "u hungy"},
        {"kind": "opener", "topic": "water", "prompt": "sup, wet enough?"},
        {"kind": "opener", "topic": "water", "prompt": "Sup,  wet enough?"},  # a repeat: dropped
    ]}), encoding="utf-8")
    script = Path(__file__).resolve().parents[1] / "bench" / "import_natural_split.py"
    result = subprocess.run([sys.executable, str(script), str(author), "--persona", str(pack)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^noisy +1 +1 +0$", result.stdout, re.M) and re.search(r"^opener +1 +0 +1$", result.stdout, re.M)
    assert "hungy" not in result.stdout and "wet" not in result.stdout
    natural = load_persona(pack).eval_cases("natural")
    assert [(case.prompt, case.kind) for case in natural] == [("u hungy", "noisy"), ("sup, wet enough?", "opener")]
    assert "natural" in load_persona(pack).blind


def test_import_training_messages_drops_held_out_prompts_and_repeats(tmp_path):
    """bench/import_training_messages.py adds authors' messages to the file's, in topic order, never one equal to a
    held-out prompt (so no split is trained on, even one that became held out later), and keeps the file's comment."""
    import subprocess
    import sys
    from pathlib import Path

    pack = kinded_pack(tmp_path, [{"kind": "noisy", "topic": "food", "prompt": "u hungy"}])
    (tmp_path / "fish.messages.yaml").write_text(
        "# by two authors\nrate: 0.5\nmessages: [{topic: water, text: x}, {topic: food, text: u hungy}]\n")
    authors = []
    for name, messages in (("a", [("water", "is it wet today"), ("food", "U  hungy")]),  # a natural prompt: dropped
                           ("b", [("food", "snack o clock?"), ("water", "Is it wet today")])):  # a repeat: dropped
        authors.append(tmp_path / f"{name}.yaml")
        authors[-1].write_text(yaml.safe_dump({"messages": [{"topic": t, "kind": "plain", "text": x} for t, x in messages]}))
    script = Path(__file__).resolve().parents[1] / "bench" / "import_training_messages.py"
    result = subprocess.run([sys.executable, str(script), *map(str, authors), "--persona", str(pack), "--rate", "0.3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kept 3, equal to a held-out prompt 2, repeats 1" in result.stdout
    persona = load_persona(pack)
    assert persona.messages == {"food": ["snack o clock?"], "water": ["x", "is it wet today"]}
    assert persona.message_rate == 0.3
    assert (tmp_path / "fish.messages.yaml").read_text().startswith("# by two authors\n")


def _set(path, value):
    def edit(pack):
        *parents, last = path
        for key in parents:
            pack = pack[key]
        if value is KeyError:
            del pack[last]
        else:
            pack[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(["name"], KeyError), "fish.yaml: name: is missing"),
        (_set(["name"], "Big Fish"), "fish.yaml: name: must be lowercase letters"),
        (_set(["style", "max_words"], "ten"), "fish.yaml: style.max_words: must be an int"),
        (_set(["style", "lowercase"], "yes"), "fish.yaml: style.lowercase: must be true or false"),
        (_set(["defaults", "test_size"], 40), "fish.yaml: defaults.test_size: must be between 0 and 39"),
        (_set(["topics"], []), "fish.yaml: topics: must be a non-empty list"),
        (_set(["topics", 0, "replies"], []), "fish.yaml: topics[0].replies: must be a non-empty list"),
        (_set(["topics", 0, "replys"], ["x."]), "fish.yaml: topics[0].replys: unknown field"),
        (_set(["topics", 0, "ask", 1], "what {do you eat"), "fish.yaml: topics[0].ask[1]: '{' without '}'"),
        (_set(["topics", 0, "ask", 1], "what do} you eat"), "fish.yaml: topics[0].ask[1]: '}' without '{'"),
        (_set(["topics", 0, "replies", 2], "i like {snacks}."), "fish.yaml: topics[0].replies[2]: unknown pool 'snacks'"),
        (_set(["topics", 0, "words"], ["fish food"]), "fish.yaml: topics[0].words: 'fish food' is not one lowercase word"),
        (_set(["topics", 0, "eval"], [3]), "fish.yaml: topics[0].eval[0]: must be a str"),
        (_set(["topics", 0, "dev"], [3]), "fish.yaml: topics[0].dev[0]: must be a str"),
        (_set(["pools", "food"], ["{food}"]), "fish.yaml: topics[0].replies[0]: pools nest more than 20 deep"),
        (_set(["user"], {"openers": ["hey {pal},"]}), "fish.yaml: user.openers[0] (in topic 'food'): unknown pool 'pal'"),
    ],
)
def test_schema_errors_name_file_field_and_problem(tmp_path, edit, message):
    pack = minimal_pack()
    edit(pack)
    with pytest.raises(PersonaError) as error:
        load_persona(write(tmp_path, pack))
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_duplicate_topic_and_bad_yaml(tmp_path):
    pack = minimal_pack()
    pack["topics"].append(dict(pack["topics"][0]))
    with pytest.raises(PersonaError, match=r"fish.yaml: topics\[1\].name: duplicate topic 'food'"):
        load_persona(write(tmp_path, pack))
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(PersonaError, match="broken.yaml: not valid YAML"):
        load_persona(tmp_path / "broken.yaml")
    with pytest.raises(PersonaError, match="unknown persona 'shark'.*guppy"):
        load_persona("shark")


def test_replies_breaking_the_style_stop_the_build(tmp_path):
    pack = minimal_pack()
    pack["topics"][0]["replies"] = ["Food is GOOD."]
    with pytest.raises(PersonaError, match=r"fish.yaml: topics\[0\].replies: a reply is not lowercase: 'Food is GOOD.'"):
        build_dataset(write(tmp_path, pack))
    pack["topics"][0]["replies"] = ["food is good and i would like a lot more of it now."]
    with pytest.raises(PersonaError, match=r"has 13 words \(style.max_words is 8\)"):
        build_dataset(write(tmp_path, pack))
    pack["topics"][0]["replies"] = [". food is good."]  # what a tiny model sometimes says first; `guppylm eval` counts it
    with pytest.raises(PersonaError, match=r"a reply does not start with a letter or digit: '. food is good.'"):
        build_dataset(write(tmp_path, pack))


def test_replies_that_repeat_themselves_are_redrawn(tmp_path):
    """The data never teaches a reply that says a sentence or a 3-word phrase twice (what `guppylm eval` counts)."""
    pack = minimal_pack()
    pack["topics"][0]["replies"] = ["food, i want food, i want food.", "food is good{.|!}"]
    persona, rng = load_persona(write(tmp_path, pack)), random.Random(0)
    assert {persona.sample(persona.specs["food"], rng)[1] for _ in range(50)} == {"food is good.", "food is good!"}
    pack["topics"][0]["replies"] = ["food. food."]
    with pytest.raises(PersonaError, match=r"topics\[0\].replies: a reply repeats a sentence or a 3-word phrase: 'food. food.'"):
        build_dataset(write(tmp_path, pack))


def test_topic_weights_share_the_conversations(tmp_path):
    pack = minimal_pack()
    pack["topics"][0]["weight"] = 3
    pack["topics"].append({**pack["topics"][0], "name": "water", "words": ["water"], "weight": 1,
                           "ask": ["{wet|damp} {enough|today}{?|!|}"], "replies": ["water is {wet|fine}."]})
    dataset = build_dataset(write(tmp_path, pack), num_samples=40, test_size=8)
    names = dataset["train"].features["topic"].names
    counts = {split: [names[t] for t in data["topic"]].count("food") for split, data in dataset.items()}
    assert counts == {"train": 24, "test": 6}  # 3/4 of 32 and of 8
    pack["topics"][1]["weight"] = 0
    with pytest.raises(PersonaError, match=r"fish.yaml: topics\[1\].weight: must be between 0.1 and 10, not 0.0"):
        load_persona(write(tmp_path, pack))


def test_a_pack_too_small_for_the_request_says_so(tmp_path):
    with pytest.raises(PersonaError, match=r"topics\[0\]: only \d+ distinct conversations about 'food'"):
        build_dataset(write(tmp_path, minimal_pack()), num_samples=5000, test_size=10)


def test_shipped_packs():
    packs = list_personas()
    assert {"guppy", "bolt"} <= set(packs) and all(d and "\n" not in d for d in packs.values())
    guppy = load_persona("guppy")
    assert len(guppy.topics) == 61 and guppy.lowercase and guppy.max_words == 25
    assert (guppy.num_samples, guppy.test_size) == (150_000, 3_000)
    for name, min_cases in (("guppy", 60), ("bolt", 30)):
        persona = load_persona(name)
        cases = persona.eval_cases()
        assert len(cases) >= min_cases and {case.topic for case in cases} == set(persona.topics)
        prompts = [case.prompt.lower() for case in cases]
        assert len(set(prompts)) == len(prompts)


def test_guppy_has_natural_prompts_of_every_kind():
    """The blind `natural` split (>= 120 prompts by two or three authors) and the tuning prompts of the same six kinds in `dev`."""
    guppy = load_persona("guppy")
    assert set(guppy.kinds) == {"opener", "long", "off_domain", "noisy", "own_feelings", "distractor"}
    natural = Counter(case.kind for case in guppy.eval_cases("natural"))  # counted, never read: the split is blind
    # openers are short and formulaic ("how are you?"), so the pack's opener phrasings produce many of the authors'
    # and those are dropped (a producible prompt may be in the training data): 17 of 36 were left in round 4, so
    # round 5's authors were asked for personal openers (all 36 kept)
    assert sum(natural.values()) >= 120 and set(natural) == set(guppy.kinds) and min(natural.values()) >= 10
    assert "natural" in guppy.blind
    dev = Counter(case.kind for case in guppy.eval_cases("dev"))
    assert all(dev[kind] >= 25 for kind in guppy.kinds) and dev["paraphrase"] >= 300


@pytest.mark.parametrize("name", ["guppy", "bolt"])
def test_eval_prompts_are_held_out(name):
    """No phrasing of the pack can produce a held-out prompt, so every split measures generalization (a blind
    split's are only counted: bench/import_natural_split.py drops what the phrasings can produce)."""
    persona = load_persona(name)
    for split in SPLITS:
        cases = persona.eval_cases(split)
        if split in persona.blind:  # a number, so that a failing assertion shows no prompt
            producible = sum(persona.producible(case.prompt) for case in cases)
            assert producible == 0, f"{split}: rerun bench/import_natural_split.py"
        else:
            assert [case.prompt for case in cases if persona.producible(case.prompt)] == [], split
    prompts = [case.prompt.lower() for split in SPLITS for case in persona.eval_cases(split)]
    repeated = len(prompts) - len(set(prompts))
    assert repeated == 0  # the splits share none


@pytest.mark.parametrize("name", ["guppy", "bolt"])
def test_every_reply_names_a_topic_word(name):
    """An on-topic reply is recognizable: `guppylm eval` looks for these words."""
    persona, rng = load_persona(name), random.Random(0)
    for topic in persona.specs.values():
        for _ in range(100):
            reply = persona.sample(topic, rng)[1]
            assert set(WORD.findall(reply.lower())) & topic.words, (topic.name, reply)


@pytest.mark.parametrize("name", ["guppy", "bolt"])
def test_no_reply_is_under_three_words(name):
    """A reply the data ends after two words ("food! yum.") is one the model learns to end there, and `guppylm eval`
    counts a reply under 3 words to a long message as one that did not answer it."""
    persona, rng = load_persona(name), random.Random(0)
    for topic in persona.specs.values():
        for _ in range(1000):
            reply = persona.sample(topic, rng)[1]
            assert len(reply.split()) >= 3, (topic.name, reply)


def test_second_pack_builds_in_its_own_style():
    bolt = load_persona("bolt")
    first = build_dataset("bolt", num_samples=1200, test_size=120, seed=3)
    again = build_dataset("bolt", num_samples=1200, test_size=120, seed=3)
    assert first["train"].to_dict() == again["train"].to_dict()
    outputs = list(first["train"]["output"]) + list(first["test"]["output"])
    assert all(bolt.style_problem(o) is None and len(o.split()) <= 16 for o in outputs)
    assert all(o[0].isupper() for o in outputs)  # sentence case: a style the guppy pack would reject
    assert load_persona("guppy").style_problem(outputs[0]) == "is not lowercase"
    assert first["train"].features["topic"].names == bolt.topics


def test_check_report():
    report = check_persona("guppy")
    assert "61 topics" in report and "hot_water" in report
    assert re.search(r"^natural: [1-9]\d\d prompts \(.*\); none of them can be produced by the phrasings$", report, re.M)


def test_scaffold_is_a_valid_pack_that_builds(tmp_path):
    path = scaffold_persona("fern", tmp_path / "fern.yaml")
    persona = load_persona(path)
    assert (persona.name, persona.display_name) == ("fern", "Fern")
    dataset = build_dataset(path)
    assert (len(dataset["train"]), len(dataset["test"])) == (persona.num_samples - persona.test_size, persona.test_size)
    assert "fern (fern.yaml)" in check_persona(path)
    with pytest.raises(PersonaError, match="already exists"):
        scaffold_persona("fern", path)
    with pytest.raises(PersonaError, match="name: must be lowercase"):
        scaffold_persona("Fern!", tmp_path / "x.yaml")


def test_cli(tmp_path, capsys, monkeypatch):
    from guppylm.cli import main

    main(["persona", "list"])
    assert re.search(r"^guppy +Guppy, a small fish", capsys.readouterr().out, re.M)
    main(["persona", "check", "bolt"])
    assert "bolt (bolt.yaml)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    main(["persona", "new", "pebble"])
    assert "wrote pebble.yaml" in capsys.readouterr().out and load_persona(tmp_path / "pebble.yaml").name == "pebble"


def test_a_pool_named_again_in_a_row_is_written_once_with_a_count():
    """The producibility pattern writes "{x} {x} {x}" as one group with a count: guppy's chatter paragraphs of up to
    nine sentences made a 13.9M-character pattern (40 s and 1.8 GB to compile), 7.8M this way; same language."""
    from dataset_builder.persona import parse_template, pattern_size, regex

    pools = {"x": [parse_template("a b"), parse_template("c")]}
    parts = parse_template("{x} {x} {x}! {x}")
    pattern = regex(parts, pools)
    assert pattern == "(?:ab|c){3}!(?:ab|c)" and pattern_size(parts, pools) == len(pattern)
    assert [bool(re.fullmatch(pattern, text)) for text in ("abcab!c", "ccc!ab", "abc!c", "abcabc!")] == [True, True, False, False]
