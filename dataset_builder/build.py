"""Generate a persona's conversations, split them, and save them as parquet files plus a dataset card."""

import random
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, SplitDict, SplitInfo, Value
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData

from .persona import MAX_SAMPLES, PersonaError, load_persona

TEMPLATES = files("dataset_builder") / "templates"  # package data: a wheel install has it too
# Words (apostrophes kept inside) and single punctuation marks: a stand-in for the word-level tokenizer built later.
_TOKEN = re.compile(r"[\w']+|[^\w\s]")
_SIZE_CATEGORIES = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (float("inf"), "n>1M")]


def features(persona):
    return Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "input": Value("string"),
            "output": Value("string"),
            "topic": ClassLabel(names=persona.topics),
        }
    )


def build_dataset(persona="guppy", num_samples=None, test_size=None, seed=42):
    """A DatasetDict of single-turn conversations, balanced over topics.

    The test split is held out by reply: no reply of a test conversation appears anywhere in train, so its loss
    measures replies the model never saw (see `_split_topic`). No (input, output) pair is in both splits either.
    """
    persona = load_persona(persona)
    num_samples = persona.num_samples if num_samples is None else num_samples
    test_size = persona.test_size if test_size is None else test_size
    if not 0 <= test_size < num_samples <= MAX_SAMPLES:
        raise ValueError(f"need 0 <= test_size < num_samples <= {MAX_SAMPLES:,}, got test_size={test_size}, num_samples={num_samples}")
    rng = random.Random(seed)
    seen, splits = set(), {"train": [], "test": []}
    weights = [topic.weight for topic in persona.specs.values()]
    samples, tests = _shares(num_samples, weights), _shares(test_size, weights)
    for label, topic in enumerate(persona.specs.values()):
        train, test = _split_topic(persona, topic, samples[label], tests[label], rng, seen)
        splits["test"] += [(*pair, label) for pair in test]
        splits["train"] += [(*pair, label) for pair in train]
    columns = lambda rows: {
        "messages": [[{"role": "user", "content": i}, {"role": "assistant", "content": o}] for i, o, _ in rows],
        "input": [i for i, _, _ in rows],
        "output": [o for _, o, _ in rows],
        "topic": [t for _, _, t in rows],
    }
    for rows in splits.values():
        rng.shuffle(rows)
    schema = features(persona).arrow_schema  # carries the features, ClassLabel names included, as metadata
    return DatasetDict({name: Dataset(pa.table(columns(rows), schema=schema)) for name, rows in splits.items()})


def _shares(total, weights):
    """`total` split in proportion to `weights`, in whole numbers: each gets the floor of its exact share, and the
    rest go one each to the largest remainders, the first topics first (equal weights: total // n, the first
    total % n topics one more)."""
    exact = [total * weight / sum(weights) for weight in weights]
    shares = [int(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _split_topic(persona, topic, n, n_test, rng, seen):
    """(train, test) conversations about `topic`, n in all, n_test of them in test, no reply text in both.

    The topic's n conversations are drawn; the reply texts drawn least often go to test, rarest first, until they
    cover n_test conversations (so train loses the fewest, and the most common replies stay in train); train is
    then topped up with new draws that avoid those replies. Replies are combinations of template parts, so a
    held-out reply is new as a sentence, not in its words."""
    pairs = _distinct_pairs(persona, topic, n, rng, seen)
    if n_test == 0:
        return pairs, []
    counts = Counter(reply for _, reply in pairs)  # in first-drawn order, which breaks ties below
    held, covered = set(), 0
    for reply in sorted(counts, key=counts.__getitem__):
        if covered >= n_test:
            break
        held.add(reply)
        covered += counts[reply]
    if len(held) == len(counts):
        raise PersonaError(
            f"{persona.source.name}: {topic.field}: only {len(counts)} distinct replies about '{topic.name}' in {n} "
            f"conversations, too few to hold {n_test} out for the test split; add replies, or ask for a smaller test split"
        )
    test = [pair for pair in pairs if pair[1] in held][:n_test]
    train = [pair for pair in pairs if pair[1] not in held]
    return train + _distinct_pairs(persona, topic, n - n_test - len(train), rng, seen, avoid=held), test


def _distinct_pairs(persona, topic, n, rng, seen, avoid=()):
    """n conversations about `topic` that are new to `seen` (which they join), with no reply in `avoid`:
    duplicates teach nothing."""
    pairs, tries = [], 0
    while len(pairs) < n:
        tries += 1
        if tries > 20 * n + 100:
            raise PersonaError(
                f"{persona.source.name}: {topic.field}: only {len(pairs)} distinct conversations about '{topic.name}' "
                f"in {tries - 1} tries, {n} needed; add phrasings or replies, or ask for fewer samples"
            )
        pair = persona.sample(topic, rng)
        if pair not in seen and pair[1] not in avoid:
            seen.add(pair)
            pairs.append(pair)
    return pairs


# --- statistics ----------------------------------------------------------------------------------


def statistics(dataset_dict):
    """Counts that describe a built dataset, for the console and the dataset card."""
    names = dataset_dict["train"].features["topic"].names
    # one batch per split: iterating a column would decode row by row
    columns = {name: split.select_columns(["input", "output", "topic"])[:] for name, split in dataset_dict.items()}
    rows = [pair for c in columns.values() for pair in zip(c["input"], c["output"])]
    tokens = {text: _TOKEN.findall(text) for pair in set(rows) for text in pair}  # each distinct text once
    lengths = sorted(len(tokens[i]) + len(tokens[o]) for i, o in rows)
    per_topic = {name: dict.fromkeys(dataset_dict, 0) for name in names}
    for split_name, c in columns.items():
        for label in c["topic"]:
            per_topic[names[label]][split_name] += 1
    return {
        "splits": {name: len(split) for name, split in dataset_dict.items()},
        "per_topic": per_topic,
        "unique_inputs": len({i for i, _ in rows}),
        "unique_outputs": len({o for _, o in rows}),
        "unique_pairs": len(set(rows)),
        "vocab_size": len({token for text_tokens in tokens.values() for token in text_tokens}),
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_p99": lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))],
        "tokens_max": lengths[-1],
    }


def format_statistics(stats):
    lines = [f"{'topic':24s} " + " ".join(f"{name:>6s}" for name in stats["splits"])]
    for topic, counts in stats["per_topic"].items():
        lines.append(f"{topic:24s} " + " ".join(f"{counts[name]:6d}" for name in stats["splits"]))
    lines += [
        f"{'total':24s} " + " ".join(f"{n:6d}" for n in stats["splits"].values()),
        f"unique inputs {stats['unique_inputs']:,}, outputs {stats['unique_outputs']:,}, "
        f"pairs {stats['unique_pairs']:,}",
        f"word-level vocabulary {stats['vocab_size']:,}",
        f"tokens per sample (words + punctuation): mean {stats['tokens_mean']:.1f}, "
        f"p99 {stats['tokens_p99']}, max {stats['tokens_max']}",
    ]
    return "\n".join(lines)


# --- saving --------------------------------------------------------------------------------------


def save_dataset(dataset_dict, persona, output_dir):
    """Write data/{split}-00000-of-00001.parquet and a README.md dataset card that `load_dataset(output_dir)` reads."""
    persona = load_persona(persona)
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for name, split in dataset_dict.items():  # the arrow table carries the features in its schema metadata
        pq.write_table(split.with_format("arrow")[:], output_dir / "data" / f"{name}-00000-of-00001.parquet")

    stats = statistics(dataset_dict)
    total = sum(stats["splits"].values())
    card_data = DatasetCardData(
        license="mit",
        language="en",
        task_categories=["text-generation"],
        size_categories=next(c for limit, c in _SIZE_CATEGORIES if total < limit),
        pretty_name=f"{persona.display_name} conversations",
        tags=["synthetic", "conversational", "persona", "guppylm"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in dataset_dict],
            }
        ],
    )
    splits = SplitDict()
    for name, split in dataset_dict.items():
        splits.add(SplitInfo(name=name, num_bytes=split.data.nbytes, num_examples=len(split)))
    size = sum(s.num_bytes for s in splits.values())
    info = DatasetInfo(features=features(persona), splits=splits, dataset_size=size)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    train, first = dataset_dict["train"], {}  # the first train row of each topic, as its example
    for index, label in enumerate(train.select_columns(["topic"])[:]["topic"]):
        first.setdefault(label, index)
    examples = {persona.topics[label]: train[index] for label, index in first.items()}
    card = DatasetCard.from_template(
        card_data,
        template_str=(TEMPLATES / "dataset_card.md").read_text(encoding="utf-8"),
        persona=persona,
        stats=stats,
        examples=examples,
    )
    card.save(output_dir / "README.md")



def build_and_save(output_dir, persona="guppy", num_samples=None, test_size=None, seed=42):
    """Build, save and print the statistics: what `guppylm dataset build` runs."""
    persona = load_persona(persona)
    dataset_dict = build_dataset(persona, num_samples, test_size, seed)
    save_dataset(dataset_dict, persona, output_dir)
    print(format_statistics(statistics(dataset_dict)))
    return dataset_dict
