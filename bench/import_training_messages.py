"""Add training-message authors' files to a pack's messages file (guppy.messages.yaml).

Each author wrote from bench/training_author_brief.md: `messages: [{topic, kind, text}]`. The file's messages come
first, then the authors' in the order given. A message equal to a held-out prompt of any split (eval, dev, natural)
is dropped, so no split is trained on, as are repeats; the rest are kept in topic order. The file's leading comment
(who wrote what) is kept, to be extended by hand.

Usage: python bench/import_training_messages.py AUTHOR.yaml [AUTHOR.yaml ...] [--persona guppy] [--rate R]
"""

from collections import Counter
from pathlib import Path

import yaml
from import_natural_split import authors_parser, normal, write_pack_file

from dataset_builder import load_persona
from dataset_builder.persona import SPLITS, sibling_path


def import_messages(author_files, persona="guppy", rate=None):
    """Write the messages file (`rate`: the file's, else 0.25, unless given).

    Returns (path, Counter(kept=, held_out=, repeat=))."""
    pack = load_persona(persona)
    held_out = {normal(case.prompt) for split in SPLITS for case in pack.eval_cases(split)}
    output = sibling_path(pack.source, "messages")
    old = output.read_text(encoding="utf-8") if output.is_file() else ""
    seen, kept, counts = set(), [], Counter()
    for path in ([output] if old else []) + [Path(path) for path in author_files]:
        for i, entry in enumerate(yaml.safe_load(path.read_text(encoding="utf-8"))["messages"]):
            topic, text = entry.get("topic"), " ".join(str(entry.get("text", "")).split())
            if topic not in pack.specs or not text:
                raise SystemExit(f"{path}: messages[{i}]: needs one of the pack's topics and a text")
            key = normal(text)
            reason = "held_out" if key in held_out else "repeat" if key in seen else "kept"
            counts[reason] += 1
            if reason == "kept":
                seen.add(key)
                kept.append({"topic": topic, "text": text})
    order = {topic: i for i, topic in enumerate(pack.topics)}
    kept.sort(key=lambda message: order[message["topic"]])  # stable: authors keep their order within a topic
    comment = "".join(line for line in old.splitlines(keepends=True) if line.startswith("#"))
    rate = rate if rate is not None else (pack.message_rate if old else 0.25)
    body = dict(about="user messages written by hand, per topic", rate=rate, messages=kept)
    write_pack_file(output, comment + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=120), persona)
    return output, counts


def main():
    parser = authors_parser(__doc__)
    parser.add_argument("--rate", type=float,
                        help="share of a topic's user turns drawn from the file (default: the file's, else 0.25)")
    args = parser.parse_args()
    output, counts = import_messages(args.authors, args.persona, args.rate)
    print(f"kept {counts['kept']}, equal to a held-out prompt {counts['held_out']}, repeats {counts['repeat']} -> {output}")


if __name__ == "__main__":
    main()
