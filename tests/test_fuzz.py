"""Systematic mutations of everything guppylm reads from outside: model-folder config fields, tokenizer files, chat
templates, persona packs and dataset rows. Each case runs in a forked child under a memory and a time limit
(tests/limits.py), and must end in a correct result or one clear line that names the file - never a traceback from
deep inside a library, a hang, or gigabytes of memory.

Hypothesis draws the mutations, derandomized (the same cases on every run) and with bounded example counts so the
module takes a minute or two. A failure prints the smallest mutation that breaks the rule.
"""

import json
import os
import re
import shutil
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from guppylm.tokenizer import CHAT_TEMPLATE
from limits import bounded

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked children tokenize; tokenizers warns if the parent used threads

pytestmark = pytest.mark.slow
FUZZ = settings(
    derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)  # fmt: skip

# a refusal of a model folder names the file it found wrong
MODEL_FILE = re.compile(r"\b(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|model\.safetensors|chat_template\.jinja)|no chat template")
DELETE = object()

# values that break things: wrong types, zero, negatives, huge numbers, NaN and infinities, odd text
VALUES = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**9, 10**30, 0.5, 1e-30, 1e30]),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", "NaN", "<|im_end|>", "guppylm", "float64", "../../etc/passwd"]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-2, 100), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 10), max_size=2),
)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A saved tiny model, loaded once in this process so that forked children start with everything imported."""
    from guppylm.inference import load_model

    folder = tmp_path_factory.mktemp("fuzz-base")
    make_tiny_model(folder)
    load_model(folder)
    return folder


def load_and_reply(folder):
    """What `guppylm chat --prompt` does: load the folder and stream a reply. Returns the reply's token count."""
    import torch

    from guppylm.inference import generation_kwargs, load_model, stream_reply

    torch.manual_seed(0)
    model, tokenizer = load_model(folder)
    *_, (text, reply) = stream_reply(model, tokenizer, "hi <|im_end|> food? " * 20, **generation_kwargs(max_new_tokens=4))
    return len(reply.prompt.input_ids[0])


def mutated_folder(base, tmp_path, name, edit):
    """A copy of the base model folder with `edit(folder)` applied; a fresh folder per example."""
    folder = tmp_path / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    edit(folder)
    return folder


def assert_works_or_names_the_file(outcome, case):
    """The folder loads and answers, or load_model raised one line that names the file it found wrong."""
    if "ok" in outcome:
        return
    message = outcome.get("message", "")
    assert outcome["error"] in ("OSError", "FileNotFoundError"), (case, outcome)
    assert "\n" not in message and MODEL_FILE.search(message), (case, outcome)


def mutate(data, mutations):
    """Apply (dotted field path, value or DELETE) mutations to parsed JSON/YAML `data`, in place."""
    for path, value in mutations:
        *parents, key = path.split(".")
        node = data
        for part in parents:
            node = node[int(part) % len(node)] if isinstance(node, list) and node else node.setdefault(part, {}) if isinstance(node, dict) else None
            if node is None:
                break
        if not isinstance(node, (dict, list)) or (isinstance(node, list) and not node):
            continue  # a mutation before this one replaced the path with a scalar
        if isinstance(node, list):
            key = int(key) % len(node) if key.isdigit() else 0
        if value is DELETE:
            node.pop(key, None) if isinstance(node, dict) else node.pop(key)
        else:
            node[key] = value
    return data


def edit_json(name, mutations):
    """An edit of the model folder's JSON file `name`."""

    def edit(folder):
        (folder / name).write_text(json.dumps(mutate(json.loads((folder / name).read_text()), mutations)))

    return edit


# --- config.json ------------------------------------------------------------------------------------------------

CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "hidden_dropout", "attention_dropout", "layer_norm_eps", "initializer_range",
    "use_cache", "persona", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "dtype",
    "model_type", "architectures", "auto_map", "transformers_version",
    # what PretrainedConfig and from_pretrained also read
    "num_labels", "id2label", "torch_dtype", "quantization_config", "output_attentions", "output_hidden_states",
    "return_dict", "is_encoder_decoder", "pruned_heads", "chunk_size_feed_forward", "attn_implementation",
    "_attn_implementation", "problem_type", "max_length", "num_beams",
]  # fmt: skip
SIZE_VALUES = st.sampled_from([0, -4, 1, 3, 31, 33, 64, 1_000_000, 1_500_000, 2**40])


@settings(FUZZ, max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), st.one_of(st.just(DELETE), VALUES, SIZE_VALUES)), min_size=1, max_size=3))
def test_config_json_mutations(base_model, tmp_path, mutations):
    folder = mutated_folder(base_model, tmp_path, "config", edit_json("config.json", mutations))
    assert_works_or_names_the_file(bounded(load_and_reply, folder), mutations)


# --- tokenizer.json and tokenizer_config.json --------------------------------------------------------------------

TOKENIZER_FIELDS = [
    "model.vocab.hi", "model.vocab.<unk>", "model.vocab.<|im_end|>", "model.unk_token", "model.type",
    "added_tokens.0.id", "added_tokens.3.id", "added_tokens.2.content", "added_tokens.1.special", "added_tokens",
    "truncation", "padding", "post_processor", "normalizer", "pre_tokenizer", "decoder", "model", "version",
    "normalizer.normalizers.4.strip_left", "pre_tokenizer.pretokenizers.0.replacement", "decoder.prepend_scheme",
]  # fmt: skip
TOKENIZER_CONFIG_FIELDS = [
    "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "padding_side", "tokenizer_class",
    "clean_up_tokenization_spaces", "model_input_names", "extra_special_tokens", "additional_special_tokens",
    "added_tokens_decoder", "chat_template", "auto_map", "backend", "truncation_side", "split_special_tokens",
]  # fmt: skip
TRUNCATIONS = st.fixed_dictionaries({
    "direction": st.sampled_from(["Right", "Left"]), "max_length": st.integers(0, 2**40),
    "strategy": st.sampled_from(["LongestFirst", "OnlyFirst", "OnlySecond"]), "stride": st.integers(0, 2**40),
})  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(
    st.lists(st.tuples(st.sampled_from(TOKENIZER_FIELDS), st.one_of(st.just(DELETE), VALUES, TRUNCATIONS)), max_size=2),
    st.lists(st.tuples(st.sampled_from(TOKENIZER_CONFIG_FIELDS), st.one_of(st.just(DELETE), VALUES)), max_size=2),
)
def test_tokenizer_file_mutations(base_model, tmp_path, tokenizer_json, tokenizer_config):
    def edit(folder):
        edit_json("tokenizer.json", tokenizer_json)(folder)
        edit_json("tokenizer_config.json", tokenizer_config)(folder)

    folder = mutated_folder(base_model, tmp_path, "tokenizer", edit)
    assert_works_or_names_the_file(bounded(load_and_reply, folder), (tokenizer_json, tokenizer_config))


# --- generation_config.json ---------------------------------------------------------------------------------------

GENERATION_FIELDS = [
    "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "num_beams",
    "num_return_sequences", "num_beam_groups", "eos_token_id", "pad_token_id", "bos_token_id", "repetition_penalty",
    "cache_implementation", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id",
    "length_penalty", "no_repeat_ngram_size", "typical_p", "epsilon_cutoff", "min_p",
]  # fmt: skip


@settings(FUZZ, max_examples=120)
@given(st.lists(st.tuples(st.sampled_from(GENERATION_FIELDS), st.one_of(st.just(DELETE), VALUES)), min_size=1, max_size=3))
def test_generation_config_mutations(base_model, tmp_path, mutations):
    folder = mutated_folder(base_model, tmp_path, "generation", edit_json("generation_config.json", mutations))
    assert_works_or_names_the_file(bounded(load_and_reply, folder), mutations)


# --- chat templates ----------------------------------------------------------------------------------------------

GOOD = [
    "{% for message in messages %}", "<|im_start|>{{ message['role'] }}\n", "{{ message['content'] | replace('<', '< ') }}",
    "<|im_end|>\n", "{% endfor %}", "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
]  # fmt: skip
PIECES = GOOD + [
    "{% for i in range(100000) %}", "{% for m in messages %}", "{% endfor %}", "{{ 'a' * 3000000000 }}",
    "{{ 9 ** 9 ** 9 }}", "{{ '%0999999999d' % 1 }}", "{{ 'a' | center(3000000000) }}", "{{ 'x' | indent(10**9) }}",
    "{% set ns = namespace(x='a') %}", "{% set x = 'aa' ~ 'bb' %}", "{% set c = message['content'] %}", "{% set c = c ~ c %}",
    "{{ c }}", "{% set content = message['content'] | replace('<', '< ') %}", "{{ content }}", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ lipsum(100000) }}", "{{ range(10**9) | list }}", "{{ messages | tojson(indent=1000000) }}",
    "{{ message.content | replace('', 'xxxxxxxxxxxxxxxx') }}", "{{ raise_exception('no') }}", "{% for x in messages recursive %}",
    "{{ cycler(1, 2).next() }}", "{{ ''.__class__.__mro__ }}", "{{ message['content'] | trim | lower | upper | e }}",
    "{% if messages[0]['role'] == 'system' %}", "{% endif %}", "{% generation %}", "{% endgeneration %}", "{%", "}}",
    "{{ messages[0]['content'] ~ messages[0]['content'] }}", "{% include 'x' %}", "{% break %}", "{{ x.y.z }}",
]  # fmt: skip


def render_checked(folder, template):
    """What load_model checks for a chat template; returns whether it was accepted (tokenizer already loaded)."""
    from transformers import AutoTokenizer

    from guppylm import validate
    from guppylm.tokenizer import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(folder)
    validate.check_chat_template(template, "chat_template.jinja")
    validate.check_chat_format(tokenizer, template, "chat_template.jinja", CHAT_TEMPLATE)
    # accepted: then any conversation renders in bounded time and memory, however long or hostile
    long = [{"role": "user", "content": "<" * 100_000}, {"role": "assistant", "content": "{{ 'a' * 10**9 }}"}] * 50
    return len(tokenizer.apply_chat_template(long, chat_template=template, tokenize=False))


WITH_GENERATION_TAGS = GOOD[:2] + ["{% generation %}", GOOD[2], "{% endgeneration %}"] + GOOD[3:]  # TRL's assistant-only loss
OWN = [CHAT_TEMPLATE]  # guppylm's, as train saves it


@settings(FUZZ, max_examples=80)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=7))
@example(pieces=OWN).via("guppylm's own template")
@example(pieces=GOOD).via("the same format, written another way")
@example(pieces=WITH_GENERATION_TAGS).via("with TRL's generation tags")
def test_chat_template_mutations(base_model, pieces):
    template = "".join(pieces)
    outcome = bounded(render_checked, base_model, template, seconds=30)
    if pieces in (OWN, GOOD, WITH_GENERATION_TAGS):
        assert outcome.get("ok", 0) > 10_000_000, outcome  # accepted, and a 10 MB conversation rendered within the limits
    elif "ok" not in outcome:
        assert outcome["error"] == "ValueError", (template, outcome)
        assert "\n" not in outcome["message"] and outcome["message"].startswith("chat_template.jinja: "), (template, outcome)


# --- persona packs -----------------------------------------------------------------------------------------------

POOL_TEXT = st.lists(st.sampled_from(["{p0}", "{p1}", "{p2}", "{p3}", "{a|b|}", "{|}", "x", " ", "{", "}", "|", "{x|{y|z}}", ""]), max_size=6)
PACK_FIELDS = ["name", "display_name", "description", "style.max_words", "style.lowercase", "style.max_sentences",
               "defaults.num_samples", "defaults.test_size", "user.opener_rate", "topics.0.words", "topics.0.eval",
               "topics.0.name", "user", "pools", "topics"]  # fmt: skip


def checked_pack(path):
    from dataset_builder import check_persona

    return check_persona(path, samples_per_topic=5)


@settings(FUZZ, max_examples=30)
@given(
    st.dictionaries(st.sampled_from(["p0", "p1", "p2", "p3"]), st.lists(POOL_TEXT.map("".join), min_size=1, max_size=3), max_size=4),
    st.lists(st.tuples(st.sampled_from(PACK_FIELDS), st.one_of(st.just(DELETE), VALUES)), max_size=2),
)
def test_persona_pack_mutations(tmp_path, pools, mutations):
    import yaml
    from test_boundaries import scaffold

    data = scaffold()
    data["pools"] = {**data["pools"], **pools}
    data["topics"][0]["ask"] = data["topics"][0]["ask"] + [" ".join(f"{{{name}}}" for name in pools) + " hi"]
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump(mutate(data, mutations)))
    outcome = bounded(checked_pack, path, seconds=30)
    if "ok" not in outcome:
        assert outcome["error"] == "PersonaError", (pools, mutations, outcome)
        assert "\n" not in outcome["message"] and outcome["message"].startswith("pack.yaml: "), (pools, mutations, outcome)


# --- dataset rows, through `guppylm train` -------------------------------------------------------------------------

MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "<|im_end|>system", "", "tool"]),
                           "content": st.one_of(st.text(max_size=20), st.sampled_from(["", "<|im_end|>", "x" * 5000]))}),
    st.fixed_dictionaries({"content": st.text(max_size=5)}),
    st.fixed_dictionaries({"role": st.just("user")}),
)  # fmt: skip
GOOD_ROW = [{"role": "user", "content": "hi guppy"}, {"role": "assistant", "content": "hello. i am a fish."}]
ROWS = st.lists(st.one_of(st.just(GOOD_ROW), st.lists(MESSAGE, max_size=3), st.text(max_size=8), st.none(), st.integers()), max_size=6)


def train_cli(dataset, output):
    """`guppylm train` on `dataset` in this (forked) process, stdout and stderr captured: (exit code, stderr)."""
    import tempfile

    from guppylm.cli import main

    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        os.dup2(err.fileno(), 2)  # what libraries write to the file descriptors...
        os.dup2(out.fileno(), 1)
        sys.stderr, sys.stdout = err, out  # ...and what Python code prints (pytest has replaced sys.stderr)
        try:
            main(["train", "--dataset", str(dataset), "--output-dir", str(output), "--preset", "tiny", "--max-steps", "2",
                  "--batch-size", "2", "--eval-every", "1", "--no-eval"])  # fmt: skip
            code = 0
        except SystemExit as exit:
            code = exit.code
        sys.stdout.flush()
        sys.stderr.flush()
        err.seek(0)
        return code, err.read()


@settings(FUZZ, max_examples=15)
@given(ROWS, ROWS)
def test_dataset_row_mutations_through_train(tmp_path, train_rows, test_rows):
    """Rows as JSON lines (parquet needs one type per column; JSON lets a row be anything): training either runs or
    stops with one line. The data path itself is guppylm.train's (issue 20's dataset rows are h17's rows there)."""
    dataset = tmp_path / "dataset"
    shutil.rmtree(dataset, ignore_errors=True)
    (dataset / "data").mkdir(parents=True)
    for split, rows in (("train", [GOOD_ROW, GOOD_ROW] + train_rows), ("test", test_rows)):
        lines = [json.dumps({"messages": row}) for row in rows]
        (dataset / "data" / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    outcome = bounded(train_cli, dataset, tmp_path / f"out-{len(os.listdir(tmp_path))}", seconds=120, memory=3 << 30)
    assert "ok" in outcome, outcome
    code, stderr = outcome["ok"]
    errors = [line for line in stderr.splitlines() if line.startswith("guppylm: error:")]
    assert "Traceback" not in stderr and (code == 0 or (code == 1 and len(errors) == 1)), (train_rows, test_rows, stderr[-2000:])
    if not all(map(is_conversation, train_rows + test_rows)):  # never trained on silently
        assert code == 1, (train_rows, test_rows, stderr[-2000:])
    elif test_rows:
        assert code == 0, (train_rows, test_rows, stderr[-2000:])


def is_conversation(row):
    """What training accepts: a non-empty list of {role, content} strings, roles the chat template knows, a reply."""
    from guppylm.tokenizer import ROLES

    messages = row if isinstance(row, list) else []
    well_formed = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    return bool(messages) and well_formed and all(m["role"] in ROLES for m in messages) and any(m["role"] == "assistant" for m in messages)
