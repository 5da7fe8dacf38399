"""Persona packs: a YAML file that describes a character, loaded and validated into a `Persona`.

A pack names the character, its style rules and its topics; each topic has user phrasings (`ask`), reply
templates (`replies`), held-out evaluation prompts (`eval`) and the words that make a reply on-topic (`words`).
More held-out prompts, each with a kind ("opener", "long", ...), may sit in sibling files named after the pack
and the split (guppy.natural.yaml); user messages written by hand, drawn as they are, in guppy.messages.yaml.
personas/_scaffold.yaml documents every field. Templates are plain text with two kinds of slot, nested freely:
    {pool}     one entry of a named pool (the topic's own `pools` first, then the pack's)
    {a|b|}     one of the inline choices; an empty choice makes the part optional
"""

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple

import yaml

PERSONA_DIR = files("dataset_builder") / "personas"  # package data: a wheel install has it too
SCAFFOLD = PERSONA_DIR / "_scaffold.yaml"  # `guppylm persona new` copies it; the leading _ keeps it out of the list

_NAME = re.compile(r"[a-z][a-z0-9_-]*")
WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")  # a lowercase word of a reply, as `words` lists them
_POOL_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# Held-out prompt sets: "eval" is the test set, "dev" the one to tune against, "natural" a blind test set of what
# people type first. A topic's own `eval`/`dev` prompts are of kind PARAPHRASE; split files give each prompt a kind.
SPLITS = ("eval", "dev", "natural")
PARAPHRASE = "paraphrase"
# Replies hold letters, digits, spaces, . , ! ? and apostrophes inside words: the word-level tokenizer's alphabet.
_REPLY_TEXT = re.compile(r"(?:[A-Za-z0-9 ,.!?]|(?<=[A-Za-z])'(?=[A-Za-z]))+")


class PersonaError(ValueError):
    """A pack that cannot be used; the message names the file, the field and what is wrong."""


# --- templates -----------------------------------------------------------------------------------
# A parsed template is a list of parts: literal strings, Choice (a list of alternatives, each a list of parts)
# and Ref (a pool name). Expanding, counting and matching are three walks over that one structure.


class Choice(list):
    pass


@dataclass(frozen=True)
class Ref:
    name: str


def parse_template(text):
    """'hi {name|you}{q}' -> ['hi ', Choice([[Ref('name')], ['you']]), Ref('q')]; ValueError on bad braces."""
    stack = [[[]]]  # one level per open brace: its alternatives so far, each a list of parts
    for token in re.split(r"([{}|])", text):
        if token == "{":
            stack.append([[]])
            if len(stack) > MAX_DEPTH:
                raise ValueError(f"braces nest more than {MAX_DEPTH} deep")
        elif token == "}":
            if len(stack) == 1:
                raise ValueError("'}' without '{'")
            alternatives = stack.pop()
            if len(alternatives) > 1:
                stack[-1][-1].append(Choice(alternatives))
            elif len(alternatives[0]) == 1 and _POOL_NAME.fullmatch(alternatives[0][0]):
                stack[-1][-1].append(Ref(alternatives[0][0]))
            else:
                inner = "".join(map(str, alternatives[0]))
                raise ValueError(f"'{{{inner}}}' is neither a pool name nor a choice with '|'")
        elif token == "|":
            if len(stack) == 1:
                raise ValueError("'|' outside braces")
            stack[-1].append([])
        elif token:
            stack[-1][-1].append(token)
    if len(stack) > 1:
        raise ValueError("'{' without '}'")
    return stack[0][0]


def _options(part, pools):
    return pools[part.name] if isinstance(part, Ref) else part


def tidy(text):
    """Single spaces, none before punctuation: optional parts may leave either behind."""
    return re.sub(r" ([,.!?])", r"\1", " ".join(text.split()))


def repeats(text):
    """Whether `text` says a sentence twice, or a 3-word phrase twice within its sentences:
    "he is my friend. he is my friend." and "i like the snail. the snail is my friend, i like the snail." do."""
    sentences = [s for s in (tuple(WORD.findall(part)) for part in re.split(r"[.!?]+", text.lower())) if s]
    trigrams = [s[i : i + 3] for s in sentences for i in range(len(s) - 2)]
    return len(set(sentences)) < len(sentences) or len(set(trigrams)) < len(trigrams)


def expand(parts, rng, pools):
    """One random text from a parsed template (untidied). Bounded: a pack's templates pass `expansion_size`."""
    return "".join(p if isinstance(p, str) else expand(rng.choice(_options(p, pools)), rng, pools) for p in parts)


# Templates nest, and pools refer to pools: a pack of 20 pools, each three references to the next, has 3**20
# expansions of a single text. So the walks below evaluate each pool once (a fan-out pack costs its size, not
# its expansions), counts stop growing at MAX_COUNT, and a pack is refused whose texts or pattern outgrow
# MAX_EXPANSION or MAX_PATTERN.
MAX_SAMPLES = 10_000_000  # conversations in one dataset (guppy's: 150,000)
MAX_DEPTH = 20  # pools and choices inside each other
MAX_COUNT = 10**15  # counts are estimates: "more than 10**15" is as good as the exact number
MAX_EXPANSION = 2_000  # characters and slots in one expansion: a turn that long never fits a context
MAX_WORK = 5_000_000  # template parts the checks visit, over all topics: each topic walks the shared pools again
MAX_PATTERN = 20_000_000  # characters of the regex `Persona.producible` compiles (guppy's: about 7.8 million, ~20 s to compile)


def fold(parts, pools, literal, options, sequence, memo=None, depth=0, repeat=None):
    """A template evaluated bottom-up: `literal(text)` for text, `options([values])` for a slot's alternatives,
    `sequence([values])` for parts in a row, and, if given, `repeat(value, n)` for a pool named n times in a row
    with only spaces between (see `_runs`). Each pool is evaluated once (`memo`); ValueError for a slot naming an
    unknown pool, or nesting deeper than MAX_DEPTH (a pool that refers to itself)."""
    memo = {} if memo is None else memo
    if depth > MAX_DEPTH:
        raise ValueError(f"pools nest more than {MAX_DEPTH} deep; does a pool refer to itself?")
    values = []
    for part, times in _runs(parts) if repeat else ((part, 1) for part in parts):
        if isinstance(part, str):
            values.append(literal(part))
            continue
        if isinstance(part, Ref) and part.name not in pools:
            raise ValueError(f"unknown pool '{part.name}'")
        if isinstance(part, Ref) and part.name in memo:
            value = memo[part.name]
        else:
            value = options([fold(option, pools, literal, options, sequence, memo, depth + 1, repeat)
                             for option in _options(part, pools)])
            if isinstance(part, Ref):
                memo[part.name] = value
        values.append(repeat(value, times) if times > 1 else value)
    return sequence(values)


def _runs(parts):
    """Parts as (part, times): a pool named again right after itself with only spaces between is one run. The
    pattern, which ignores spaces, writes the run's alternatives once with a count ("{chatter} {chatter} {chatter}"
    in the chatter paragraphs: `(?:...){3}`), not n times."""
    runs, i = [], 0
    while i < len(parts):
        part, times = parts[i], 1
        while (isinstance(part, Ref) and i + 2 < len(parts) and isinstance(parts[i + 1], str)
               and not parts[i + 1].strip() and parts[i + 2] == part):
            times, i = times + 1, i + 2
        runs.append((part, times))
        i += 1
    return runs


def _capped_product(values):
    total = 1
    for value in values:
        total = min(total * value, MAX_COUNT)
    return total


def count(parts, pools):
    """How many texts a template can expand to (an upper bound: different choices may give the same text), at most
    MAX_COUNT."""
    return fold(parts, pools, lambda text: 1, lambda values: min(sum(values), MAX_COUNT), _capped_product)


def expansion_size(parts, pools, memo=None):
    """The most characters plus slots one expansion of a template can take: the work `expand` may do. Templates of
    one scope may share a `memo`."""
    return fold(parts, pools, lambda text: len(text) + 1, lambda values: max(values) + 1, sum, memo)


def nodes(parts):
    """Parts of a parsed template, inside choices too but not through pool references: what a walk of it visits."""
    return sum(1 + sum(nodes(option) for option in part) if isinstance(part, Choice) else 1 for part in parts)


def _literal_pattern(text):
    return re.escape("".join(text.lower().split()))


def pattern_size(parts, pools):
    """The length of `regex(parts, pools)`, computed without building it."""
    return fold(parts, pools, lambda text: len(_literal_pattern(text)), lambda values: sum(values) + len(values) + 3,
                sum, repeat=lambda size, times: size + len(f"{{{times}}}"))


def regex(parts, pools):
    """A regex source matching every expansion with whitespace removed and lowercased."""
    return fold(parts, pools, _literal_pattern, lambda values: "(?:" + "|".join(values) + ")", "".join,
                repeat=lambda pattern, times: f"{pattern}{{{times}}}")  # a pool's pattern is one (?:...) group


# --- the pack ------------------------------------------------------------------------------------


class Case(NamedTuple):
    """One held-out prompt and how to score the reply to it."""

    prompt: str
    topic: str
    words: frozenset  # the reply is on-topic when it names one of these
    kind: str  # PARAPHRASE, or a kind the pack declares ("opener", "long", ...)


@dataclass
class Topic:
    name: str
    words: frozenset  # a reply naming one of these is on-topic
    ask: list  # parsed user phrasings
    replies: list  # parsed reply templates
    eval: list  # held-out prompts, plain text: the test split, scored once a recipe is chosen
    dev: list  # held-out prompts to tune data and recipes against, so `eval` stays unseen
    pools: dict  # name -> list of parsed templates; the pack's pools merged under the topic's own
    field: str  # "topics[3]", for error messages
    weight: float  # its share of the conversations, relative to the other topics' (1 by default)


@dataclass
class Persona:
    name: str
    display_name: str
    description: str  # one line
    about: str  # a paragraph for the dataset card
    lowercase: bool
    max_words: int
    max_sentences: int
    num_samples: int
    test_size: int
    openers: list  # parsed; put before the user's phrasing with probability opener_rate
    closers: list  # parsed; put after it with probability closer_rate
    opener_rate: float
    closer_rate: float
    capitalize_rate: float  # how often the user's first letter is a capital
    specs: dict  # topic name -> Topic, in pack order
    source: Path  # the pack file
    kinds: dict  # kind of held-out prompt -> what it is, for the split files
    split_cases: dict  # split -> [Case] from its split file (guppy.natural.yaml), if there is one
    blind: frozenset  # splits whose prompts tools name only by count until they are scored
    messages: dict  # topic name -> user messages written by hand (guppy.messages.yaml), drawn as they are
    message_rate: float  # how often a topic's user turn is one of its messages rather than a phrasing

    @property
    def topics(self):
        return list(self.specs)

    def eval_cases(self, split="eval"):
        """Held-out prompts of `split` (one of SPLITS) as [Case]: the topics' own, in pack order, then the split file's."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, not {split!r}")
        own = [Case(prompt, t.name, t.words, PARAPHRASE) for t in self.specs.values() for prompt in getattr(t, split, [])]
        return own + self.split_cases.get(split, [])

    def sample(self, topic, rng):
        """One (user input, reply) about `topic`; PersonaError if its replies keep breaking the style rules."""
        pick = lambda templates: expand(rng.choice(templates), rng, topic.pools)
        messages = self.messages.get(topic.name)
        user = rng.choice(messages) if messages and rng.random() < self.message_rate else pick(topic.ask)
        if self.openers and rng.random() < self.opener_rate:
            user = pick(self.openers) + " " + user
        if self.closers and rng.random() < self.closer_rate:
            user = user + " " + pick(self.closers)
        user = tidy(user)
        if rng.random() < self.capitalize_rate:
            user = user[:1].upper() + user[1:]
        # a draw may run long or repeat itself ("i hide. i hide."): draw again. Guppy's `excited` replies failed ten
        # draws in a row once in a 150,000-conversation build, so a pack gets a hundred before it is called broken
        for _ in range(100):
            reply = tidy(pick(topic.replies))
            problem = self.style_problem(reply) or ("repeats a sentence or a 3-word phrase" if repeats(reply) else None)
            if problem is None:
                return user, reply
        raise PersonaError(f"{self.source.name}: {topic.field}.replies: a reply {problem}: {reply!r}")

    def style_problem(self, reply):
        """Why `reply` breaks the pack's style rules, or None."""
        words = len(reply.split())
        if not _REPLY_TEXT.fullmatch(reply):
            return "has characters other than letters, digits, spaces, . , ! ? and apostrophes inside words"
        if self.lowercase and reply != reply.lower():
            return "is not lowercase"
        if not 1 <= words <= self.max_words:
            return f"has {words} words (style.max_words is {self.max_words})"
        sentences = len(re.findall(r"[.!?]+", reply))
        if sentences > self.max_sentences:
            return f"has {sentences} sentences (style.max_sentences is {self.max_sentences})"
        if not reply[0].isalnum():  # ". i like quiet better.": a tiny model's slip the data never teaches
            return "does not start with a letter or digit"
        if reply[-1] not in ".!?":
            return "does not end with . ! or ?"
        return None

    def wrap(self, frame):
        """A user phrasing with its optional opener and closer, as one template."""
        return [Choice([[], *self.openers])] + frame + [Choice([[], *self.closers])]

    def producible(self, text):
        """Whether some topic's phrasings can produce `text` (ignoring case and spaces): then it is not held out."""
        return self._user_pattern.fullmatch("".join(text.lower().split())) is not None

    @cached_property
    def _user_pattern(self):  # one regex over every phrasing of every topic; compiling it takes a second
        phrasings = [(self.wrap([Choice(t.ask + [[m] for m in self.messages.get(t.name, [])])]), t.pools)
                     for t in self.specs.values()]
        size = sum(pattern_size(parts, pools) for parts, pools in phrasings)
        if size > MAX_PATTERN:
            raise PersonaError(f"{self.source.name}: topics: the user phrasings make a pattern of {size:,} characters to "
                               f"check held-out prompts against; at most {MAX_PATTERN:,} (do pools repeat entries?)")
        return re.compile("|".join(regex(parts, pools) for parts, pools in phrasings))


def load_persona(name_or_path):
    """A validated Persona from a shipped pack name ("guppy") or a path to a .yaml file."""
    if isinstance(name_or_path, Persona):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PERSONA_DIR / f"{name_or_path}.yaml"
        if str(name_or_path).startswith("_") or not path.is_file():
            shipped = ", ".join(list_personas(describe=False))
            raise PersonaError(f"unknown persona '{name_or_path}': shipped packs are {shipped}, or give a .yaml path")
    if not path.is_file():
        raise PersonaError(f"{path}: no such file")
    if path.stat().st_size > MAX_PACK_BYTES:
        raise PersonaError(f"{path.name}: {path.stat().st_size:,} bytes; a pack may hold at most {MAX_PACK_BYTES:,}")
    data = _parse_yaml(path)
    if _size(data, MAX_PACK_NODES) > MAX_PACK_NODES:
        raise PersonaError(f"{path.name}: holds more than {MAX_PACK_NODES:,} values (its aliases counted at each use)")
    persona = _validate(data, path.resolve())
    files = pack_files(persona)
    for split in SPLITS:
        if split in files:
            persona.split_cases[split], blind = _load_split_file(persona, files[split])
            persona.blind |= {split} if blind else set()
    if "messages" in files:
        persona.messages, persona.message_rate = _load_messages_file(persona, files["messages"])
    return persona


def sibling_path(pack_path, part):
    """Where a pack's split file or messages file lives: guppy.yaml -> guppy.natural.yaml, guppy.messages.yaml."""
    return Path(pack_path).with_name(f"{Path(pack_path).stem}.{part}.yaml")


def pack_files(persona):
    """The files a pack is made of, by part: None for its .yaml, then each split and messages file it has."""
    siblings = {part: sibling_path(persona.source, part) for part in (*SPLITS, "messages")}
    return {None: Path(persona.source), **{part: path for part, path in siblings.items() if path.is_file()}}


MAX_PACK_BYTES = 10 << 20  # guppy.yaml has about 0.2 MB


MAX_PACK_NODES = 1_000_000  # strings, lists and mappings, counted each time an alias repeats them (guppy: ~25,000)


def _size(data, limit):
    """How many values `data` holds, a YAML alias's counted at each use, or `limit` + 1 if more: the work the checks
    below will do. (Aliases cost nothing to load, but 1,000 pools that alias one list of 1,000 entries are a
    million templates to check.)"""
    stack, count = [data], 0
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            stack += value
    return count


def list_personas(describe=True):
    """Shipped packs: name -> one-line description."""
    names = sorted(p.name.removesuffix(".yaml") for p in PERSONA_DIR.iterdir() if p.name.endswith(".yaml"))
    names = [name for name in names if not name.startswith("_") and "." not in name]  # not split files
    return {name: load_persona(name).description if describe else "" for name in names}


def _validate(data, path):
    """Check every field of a parsed pack file and build the Persona; PersonaError on the first problem."""

    def fail(field, problem):
        raise PersonaError(f"{path.name}: {field}: {problem}")

    def section(data, field, required, optional=()):
        """A mapping with exactly the required keys and maybe the optional ones (catches typos)."""
        if not isinstance(data, dict):
            fail(field or "(top level)", "must be a mapping")
        prefix = f"{field}." if field else ""
        for key in required:
            if key not in data:
                fail(prefix + key, "is missing")
        for key in data:
            if key not in (*required, *optional):
                fail(prefix + str(key), f"unknown field (expected one of: {', '.join((*required, *optional))})")
        return data

    def typed(value, field, kind, low=None, high=None):
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fail(field, f"must be {'an' if kind is int else 'a'} {kind.__name__}, not {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            fail(field, f"must be between {low} and {high}, not {value}")
        if kind is str and not value.strip():
            fail(field, "must not be empty")
        return value

    def strings(value, field, empty_ok=False):
        if not isinstance(value, list) or not value:
            fail(field, "must be a non-empty list")
        return [item if empty_ok and item == "" else typed(item, f"{field}[{i}]", str) for i, item in enumerate(value)]

    def templates(value, field):
        parsed = []
        for i, text in enumerate(strings(value, field, empty_ok=True)):  # "" is a useful pool entry
            try:
                parsed.append(parse_template(text))
            except ValueError as error:
                fail(f"{field}[{i}]", str(error))
        return parsed

    def pools(value, field):
        if not isinstance(value, dict):
            fail(field, "must be a mapping of pool name to list")
        for key in value:
            if not isinstance(key, str) or not _POOL_NAME.fullmatch(key):
                fail(f"{field}.{key}", "pool names are lowercase letters, digits and _")
        return {key: templates(entries, f"{field}.{key}") for key, entries in value.items()}

    top = ("name", "display_name", "description", "style", "defaults", "topics")
    section(data, "", top, ("about", "user", "pools", "kinds"))
    name = typed(data["name"], "name", str)
    if not _NAME.fullmatch(name):
        fail("name", f"must be lowercase letters, digits, - and _, starting with a letter, not {name!r}")
    style = section(data["style"], "style", ("lowercase", "max_words"), ("max_sentences",))
    if not isinstance(style["lowercase"], bool):
        fail("style.lowercase", "must be true or false")
    defaults = section(data["defaults"], "defaults", ("num_samples", "test_size"))
    num_samples = typed(defaults["num_samples"], "defaults.num_samples", int, 1, MAX_SAMPLES)
    user_keys = ("frames", "openers", "closers")
    user = section(data.get("user", {}), "user", (), (*user_keys, "opener_rate", "closer_rate", "capitalize_rate"))
    user_templates = {key: templates(user[key], f"user.{key}") if key in user else [] for key in user_keys}
    shared = pools(data.get("pools", {}), "pools")

    if not isinstance(data["topics"], list) or not data["topics"]:
        fail("topics", "must be a non-empty list")
    specs, work = {}, 0
    shared_nodes = sum(nodes(template) for entries in shared.values() for template in entries)
    for i, raw in enumerate(data["topics"]):
        field = f"topics[{i}]"
        section(raw, field, ("name", "words", "ask", "replies", "eval"), ("pools", "dev", "weight"))
        topic = typed(raw["name"], f"{field}.name", str)
        if topic in specs:
            fail(f"{field}.name", f"duplicate topic '{topic}'")
        words = frozenset(strings(raw["words"], f"{field}.words"))
        for word in sorted(words):
            if not re.fullmatch(r"[a-z0-9']+", word):
                fail(f"{field}.words", f"{word!r} is not one lowercase word")
        ask, replies = templates(raw["ask"], f"{field}.ask"), templates(raw["replies"], f"{field}.replies")
        own = pools(raw.get("pools", {}), f"{field}.pools")
        scope = {**shared, **own}
        # every slot must resolve to a pool in the topic's scope, the pack's shared user templates included
        places = [(f"{field}.ask[{j}]", t) for j, t in enumerate(ask)]
        places += [(f"{field}.replies[{j}]", t) for j, t in enumerate(replies)]
        for key, shared_templates in user_templates.items():
            places += [(f"user.{key}[{j}] (in topic '{topic}')", t) for j, t in enumerate(shared_templates)]
        work += shared_nodes + sum(nodes(t) for entries in own.values() for t in entries) + sum(nodes(t) for _, t in places)
        if work > MAX_WORK:
            fail(field, f"the pack is too big to check: its topics come to {work:,} template parts with their pools "
                        f"(at most {MAX_WORK:,})")
        sizes = {}  # one walk of the topic's pools for all its places
        for place, parts in places:
            try:
                size = expansion_size(parts, scope, sizes)
            except ValueError as error:
                fail(place, str(error))
            if size > MAX_EXPANSION:
                fail(place, f"can expand to {size:,} characters and slots; one turn may take at most {MAX_EXPANSION:,}")
        eval_prompts = strings(raw["eval"], f"{field}.eval")
        dev_prompts = strings(raw["dev"], f"{field}.dev") if "dev" in raw else []
        weight = typed(raw.get("weight", 1.0), f"{field}.weight", float, 0.1, 10)
        specs[topic] = Topic(topic, words, ask + user_templates["frames"], replies, eval_prompts, dev_prompts, scope, field, weight)

    kinds = data.get("kinds", {})
    if not isinstance(kinds, dict):
        fail("kinds", "must be a mapping of kind name to what it is")
    for kind, meaning in kinds.items():
        if not isinstance(kind, str) or not _POOL_NAME.fullmatch(kind) or kind == PARAPHRASE:
            fail(f"kinds.{kind}", f"kind names are lowercase letters, digits and _ ('{PARAPHRASE}' is taken)")
        typed(meaning, f"kinds.{kind}", str)

    description = typed(data["description"], "description", str)
    if "\n" in description.strip():
        fail("description", "must be one line")
    return Persona(
        name=name,
        display_name=typed(data["display_name"], "display_name", str),
        description=description,
        about=typed(data.get("about", description), "about", str).strip(),
        lowercase=style["lowercase"],
        max_words=typed(style["max_words"], "style.max_words", int, 1),
        max_sentences=typed(style.get("max_sentences", 1_000), "style.max_sentences", int, 1),
        num_samples=num_samples,
        test_size=typed(defaults["test_size"], "defaults.test_size", int, 0, num_samples - 1),
        openers=user_templates["openers"],
        closers=user_templates["closers"],
        opener_rate=typed(user.get("opener_rate", 0.0), "user.opener_rate", float, 0, 1),
        closer_rate=typed(user.get("closer_rate", 0.0), "user.closer_rate", float, 0, 1),
        capitalize_rate=typed(user.get("capitalize_rate", 0.0), "user.capitalize_rate", float, 0, 1),
        specs=specs,
        source=path,
        kinds=kinds,
        split_cases={},
        blind=frozenset(),
        messages={},
        message_rate=0.0,
    )


# libyaml's parser when PyYAML has it (its wheels do): the same documents, 5x faster (the messages file: 0.3 s, not 1.6 s)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(path):
    """The document in a pack file, or a PersonaError that names the file and what is wrong."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
    except UnicodeDecodeError:
        raise PersonaError(f"{path.name}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise PersonaError(f"{path.name}: not valid YAML: {' '.join(str(error).split())}") from None


def _read_sibling(path, required, optional):
    """The mapping in a pack's sibling file (a split or its messages), with `required` keys and no unknown ones."""
    if path.stat().st_size > MAX_PACK_BYTES:
        raise PersonaError(f"{path.name}: {path.stat().st_size:,} bytes; a pack's file may hold at most {MAX_PACK_BYTES:,}")
    data = _parse_yaml(path)
    if not isinstance(data, dict) or required not in data:
        raise PersonaError(f"{path.name}: {required}: is missing")
    for key in data:
        if key not in (required, *optional):
            expected = ", ".join(sorted((required, *optional)))
            raise PersonaError(f"{path.name}: {key}: unknown field (expected one of: {expected})")
    if not isinstance(data[required], list) or not data[required]:
        raise PersonaError(f"{path.name}: {required}: must be a non-empty list")
    return data


def _load_messages_file(persona, path):
    """({topic: [message]}, rate) from `messages: [{topic, text}]` and `rate`, topics of `persona`."""

    def fail(field, problem):
        raise PersonaError(f"{path.name}: {field}: {problem}")

    data = _read_sibling(path, "messages", ("about", "rate"))
    rate = data.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        fail("rate", f"must be a number from 0 to 1 (how often a topic's user turn is one of its messages), not {rate!r}")
    messages = {}
    for i, entry in enumerate(data["messages"]):
        field = f"messages[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"topic", "text"}:
            fail(field, "must be a mapping with exactly topic and text")
        if entry["topic"] not in persona.specs:
            fail(f"{field}.topic", f"{entry['topic']!r} is not a topic of {persona.source.name}")
        text = entry["text"]
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_EXPANSION:
            fail(f"{field}.text", f"must be a non-empty string of at most {MAX_EXPANSION:,} characters")
        messages.setdefault(entry["topic"], []).append(text)
    return messages, float(rate)


def _load_split_file(persona, path):
    """([Case], blind) from a split file: `prompts: [{kind, topic, prompt}]`, kinds and topics of `persona`."""

    def fail(field, problem):
        raise PersonaError(f"{path.name}: {field}: {problem}")

    data = _read_sibling(path, "prompts", ("about", "blind"))
    if not isinstance(data.get("blind", False), bool):
        fail("blind", "must be true or false")
    cases = []
    for i, entry in enumerate(data["prompts"]):
        field = f"prompts[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"kind", "topic", "prompt"}:
            fail(field, "must be a mapping with exactly kind, topic and prompt")
        kind, topic, prompt = entry["kind"], entry["topic"], entry["prompt"]
        if kind not in persona.kinds:
            declared = ", ".join(persona.kinds) or "none"
            fail(f"{field}.kind", f"{kind!r} is not a kind {persona.source.name} declares (kinds: {declared})")
        if topic not in persona.specs:
            fail(f"{field}.topic", f"{topic!r} is not a topic of {persona.source.name}")
        if not isinstance(prompt, str) or not prompt.strip():
            fail(f"{field}.prompt", "must be a non-empty string")
        cases.append(Case(prompt, topic, persona.specs[topic].words, kind))
    return cases, data.get("blind", False)


def check_persona(name_or_path, samples_per_topic=100):
    """Validate a pack, try its templates, and return a printable report of how much variety it holds."""
    persona = load_persona(name_or_path)
    rng = random.Random(0)
    lines = [
        f"{persona.name} ({persona.source.name}): {persona.description}",
        f"style: {'lowercase, ' if persona.lowercase else ''}1 to {persona.max_words} words per reply"
        + (f" in at most {persona.max_sentences} sentences" if persona.max_sentences < 1_000 else "") + "; "
        f"defaults: {persona.num_samples:,} conversations, {persona.test_size:,} of them for test",
        f"{'topic':20s} {'phrasings':>9s} {'user inputs':>15s} {'replies':>7s} {'reply texts':>11s} {'eval':>4s} {'dev':>4s}",
    ]
    totals = [0, 0, 0]  # user inputs, replies, conversations
    for topic in persona.specs.values():
        for _ in range(samples_per_topic):  # raises on a reply that breaks the style rules
            persona.sample(topic, rng)
        inputs = count(persona.wrap([Choice(topic.ask)]), topic.pools)  # one walk: the sum over the phrasings
        replies = count([Choice(topic.replies)], topic.pools)
        totals = [totals[0] + inputs, totals[1] + replies, totals[2] + inputs * replies]
        lines.append(
            f"{topic.name:20s} {len(topic.ask):9d} {inputs:15,d} "
            f"{len(topic.replies):7d} {replies:11,d} {len(topic.eval):4d} {len(topic.dev):4d}"
        )
    lines += [
        f"{len(persona.topics)} topics; estimated distinct user inputs {totals[0]:,}, replies {totals[1]:,}, "
        f"conversations {totals[2]:,} (upper bounds: different choices can give the same text)",
        f"{samples_per_topic} sampled conversations per topic follow the style rules",
    ]
    if persona.messages:
        written = sum(map(len, persona.messages.values()))
        lines.append(f"messages written by hand: {written:,} for {len(persona.messages)} topics, each such topic's user "
                     f"turn for {persona.message_rate:.0%} of its conversations")
    for split in SPLITS:
        cases = persona.eval_cases(split)
        if not cases:
            continue
        kinds = Counter(case.kind for case in cases)
        producible = [case.prompt for case in cases if persona.producible(case.prompt)]
        named = f": {producible}" if split not in persona.blind else " (a blind split: not named here)"
        lines.append(
            f"{split}: {len(cases)} prompts ({', '.join(f'{n} {kind}' for kind, n in kinds.items())}); "
            + (f"{len(producible)} are NOT held out, the phrasings can produce them{named}" if producible else
               "none of them can be produced by the phrasings")
        )
    return "\n".join(lines)


def scaffold_persona(name, output=None):
    """Write a small valid pack named `name`, documented field by field, to edit; returns its path."""
    if not _NAME.fullmatch(name):
        raise PersonaError(f"name: must be lowercase letters, digits, - and _, starting with a letter, not {name!r}")
    path = Path(output or f"{name}.yaml")
    if path.exists():
        raise PersonaError(f"{path}: already exists; choose another --output")
    text = SCAFFOLD.read_text(encoding="utf-8").replace("__name__", name).replace("__Name__", name.capitalize())
    _validate(yaml.safe_load(text), path)  # the scaffold must stay valid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
