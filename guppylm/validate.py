"""Checks on what comes from outside, before anything is built from it: sampling settings, and every file of a
model folder (config.json, the header of model.safetensors, the tokenizer files, generation_config.json and the
chat template).

A model folder may come from anyone (a download, a Hub repo), so its numbers are checked before a tensor is
allocated: a config.json that declares a million layers or 20 GB of weights is one line at once, not minutes of
allocation. Each failure is a ValueError whose message is one line naming the file and the field.

Light on purpose: `guppylm --help` imports it for the settings' ranges, so nothing heavy is imported at the top.
"""

import json
import math
import os
from functools import cache

# --- numbers -----------------------------------------------------------------------------------------------


def number(name, value, low, high=None, whole=False, strict=False, low_open=False, high_open=False):
    """`value` as a finite number in the range (an int if `whole`), or a ValueError: "NAME must be ... not VALUE".

    strict: only a JSON number is accepted (a file), not text that reads as one (a command line)."""
    kind = "a whole number" if whole else "a number"
    wrong = ValueError(f"{name} must be {kind} {describe_range(low, high, low_open, high_open)}, not {value!r}".lstrip())
    if strict and (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))):
        raise wrong
    try:
        result = float(value) if not isinstance(value, int) or isinstance(value, bool) else value
    except (TypeError, ValueError):
        raise wrong from None
    if isinstance(result, float) and (not math.isfinite(result) or (whole and not result.is_integer())):
        raise wrong
    too_low = result <= low if low_open else result < low
    too_high = high is not None and (result >= high if high_open else result > high)
    if too_low or too_high:
        raise wrong
    return int(result) if whole else float(result)


def describe_range(low, high=None, low_open=False, high_open=False):
    """'between 1 and 5', '1 or more', 'at least 0 and below 1', 'above 0 and at most 1': for messages and --help."""
    if high is None:
        return f"more than {low}" if low_open else f"{low} or more"
    if not (low_open or high_open):
        return f"between {low} and {high}"
    return f"{'above' if low_open else 'at least'} {low} and {'below' if high_open else 'at most'} {high}"


# (low, high) allowed for each sampling setting: beyond them a tiny model says nothing a person would want to read
LIMITS = {"temperature": (0.05, 2.0), "top_k": (1, 1000), "top_p": (0.01, 1.0), "max_new_tokens": (1, 1024)}


def checked(name, value):
    """`value` as the number the sampling setting `name` takes (2 -> 2.0 for temperature; 50.0 -> 50 for top_k)."""
    low, high = LIMITS[name]
    return number(name, value, low, high, whole=isinstance(low, int))


# --- files -------------------------------------------------------------------------------------------------

# the most bytes a file of a guppylm model folder may hold: far above any real one, far below trouble
MAX_BYTES = {"tokenizer.json": 64 << 20, "config.json": 1 << 20, "tokenizer_config.json": 1 << 20, "generation_config.json": 1 << 20}


def read_json(path, name):
    """The JSON object in the file `name` at `path`; a ValueError naming the file if it is too big, not UTF-8 JSON,
    or not an object."""
    size = os.path.getsize(path)
    if size > MAX_BYTES[name]:
        raise ValueError(f"{name}: {size:,} bytes, more than the {MAX_BYTES[name]:,} a guppylm model's {name} may hold")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{name}: nested too deeply to be a guppylm file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: must hold a JSON object, not {type(data).__name__}")
    return data


# --- config.json -------------------------------------------------------------------------------------------

# field: (low, high) for the sizes a config.json must state; the highs are far beyond any Guppy (the 9m preset:
# vocabulary ~1,200, 6 layers of 384) and small enough that one field alone cannot exhaust memory
SIZES = {
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 65_536),
    "num_hidden_layers": (1, 1_024),
    "num_attention_heads": (1, 1_024),
    "intermediate_size": (1, 262_144),
    "max_position_embeddings": (1, 8_192),  # the attention mask is (T, T): 8K positions is already 256 MB
}
# optional fields: (low, high, high excluded)
RATES = {
    "layer_norm_eps": (0.0, 1.0, False),  # above 0: checked as open at the bottom below
    "hidden_dropout": (0.0, 1.0, True),
    "attention_dropout": (0.0, 1.0, True),
    "initializer_range": (0.0, 1.0, False),
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
FLAGS = ("use_cache", "tie_word_embeddings")
DTYPES = ("float32", "float16", "bfloat16")
MAX_LABELS = 1_000  # PretrainedConfig builds an id2label dict of num_labels entries
MAX_PARAMETERS = 1_000_000_000  # 4 GB in float32; the 9m Guppy has 9 million


def check_config(config, model_type):
    """Raise a ValueError naming the field unless `config` (config.json's dict) describes a buildable `model_type`
    model within MAX_PARAMETERS. Whether the heads divide the hidden size, GuppyConfig checks itself."""
    if config.get("model_type") != model_type:
        raise ValueError(f"config.json: model_type {config.get('model_type')!r} is not {model_type!r}: this is not a guppylm model")
    for field, (low, high) in SIZES.items():
        if field not in config:
            raise ValueError(f"config.json: {field} is missing")
        number(f"config.json: {field}", config[field], low, high, whole=True, strict=True)
    for field, (low, high, high_open) in RATES.items():
        if field in config:
            number(f"config.json: {field}", config[field], low, high, strict=True,
                   low_open=field == "layer_norm_eps", high_open=high_open)  # fmt: skip
    for field in TOKEN_IDS:
        if config.get(field) is not None:
            number(f"config.json: {field}", config[field], 0, config["vocab_size"] - 1, whole=True, strict=True)
    for field in FLAGS:
        if field in config and not isinstance(config[field], bool):
            raise ValueError(f"config.json: {field} must be true or false, not {config[field]!r}")
    for field in ("dtype", "torch_dtype"):
        if config.get(field) is not None and config[field] not in DTYPES:
            raise ValueError(f"config.json: {field} must be one of {', '.join(DTYPES)}, not {config[field]!r}")
    _check_transformers_fields(config)
    if not isinstance(config.get("persona", ""), str):
        raise ValueError(f"config.json: persona must be a pack name, not {config['persona']!r}")
    count = parameter_count(config)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"config.json: its sizes describe {count:,} parameters ({count * 4 / 1e9:,.1f} GB in float32); "
            f"guppylm loads at most {MAX_PARAMETERS:,}"
        )


ATTENTION = ("eager", "sdpa")  # what modeling_guppylm implements


def _check_transformers_fields(config):
    """Fields PretrainedConfig and from_pretrained read whatever the model: wrong types there fail deep inside them."""
    if not isinstance(config.get("auto_map", {}), dict) or not all(isinstance(v, (str, list)) for v in config.get("auto_map", {}).values()):
        raise ValueError(f"config.json: auto_map must map Auto classes to module.Class names, not {config['auto_map']!r}")
    for field in ("id2label", "label2id"):
        if field in config and (not isinstance(config[field], dict) or len(config[field]) > MAX_LABELS):
            raise ValueError(f"config.json: {field} must be a mapping of at most {MAX_LABELS:,} labels")
    if "num_labels" in config:
        number("config.json: num_labels", config["num_labels"], 1, MAX_LABELS, whole=True, strict=True)
    for field in ("attn_implementation", "_attn_implementation"):
        if config.get(field) is not None and config[field] not in ATTENTION:
            raise ValueError(f"config.json: {field} must be one of {', '.join(ATTENTION)}, not {config[field]!r}")
    if config.get("quantization_config") is not None:
        raise ValueError("config.json: quantization_config: guppylm loads plain float weights, not quantized ones")
    if config.get("is_encoder_decoder", False) is not False:
        raise ValueError(f"config.json: is_encoder_decoder must be false (a Guppy is decoder-only), not {config['is_encoder_decoder']!r}")


def parameter_count(config):
    """The number of parameters GuppyForCausalLM has for `config` (a dict): what model.safetensors must hold.
    Mirrors modeling_guppylm.py (tests/test_fuzz.py checks it against every preset)."""
    vocab, hidden, ffn = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    layer = (
        2 * 2 * hidden  # input_layernorm, post_attention_layernorm: weight and bias each
        + 3 * hidden * hidden + 3 * hidden  # qkv_proj
        + hidden * hidden + hidden  # o_proj
        + ffn * hidden + ffn + hidden * ffn + hidden  # fc_in, fc_out
    )
    embeddings = (vocab + config["max_position_embeddings"]) * hidden
    lm_head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    return embeddings + config["num_hidden_layers"] * layer + 2 * hidden + lm_head  # + the final norm


# --- model.safetensors ---------------------------------------------------------------------------------------

MAX_HEADER = 1 << 20  # bytes of JSON before the tensors: a Guppy's few dozen tensors need a few KB


def check_weights(path, expected):
    """Raise a ValueError unless the safetensors file at `path` holds exactly `expected` parameters. Reads the
    header only: no tensor is loaded."""
    from safetensors import safe_open

    with open(path, "rb") as file:
        prefix = file.read(8)
    header = int.from_bytes(prefix, "little")
    if len(prefix) < 8 or header > MAX_HEADER:
        raise ValueError(f"model.safetensors: not a valid safetensors file (its header would be {header:,} bytes)")
    try:
        with safe_open(path, framework="numpy") as weights:
            count = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    except Exception as error:  # safetensors' errors are one line: "Error while deserializing header: ..."
        raise ValueError(f"model.safetensors: {str(error).strip() or type(error).__name__}") from None
    if count != expected:
        raise ValueError(
            f"model.safetensors: holds {count:,} parameters, but config.json's sizes describe {expected:,}: "
            "its weights do not match its config.json"
        )


# --- the tokenizer files ---------------------------------------------------------------------------------------


def _ids_past(values, vocab_size):
    """The first entry of `values` ((where, id) pairs) whose id is not an int in [0, vocab_size), or None."""
    return next(((where, i) for where, i in values if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size), None)


def _post_processor_ids(node, where="post_processor"):
    """(where, value) for every number in tokenizer.json's post_processor that is a token id."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not key.endswith("type_id"):  # segment numbers, not tokens
                yield from _post_processor_ids(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _post_processor_ids(value, f"{where}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield where, node


def check_tokenizer_files(tokenizer_json, tokenizer_config, vocab_size):
    """Raise a ValueError unless every token id in tokenizer.json / tokenizer_config.json (parsed dicts) is within
    config.json's `vocab_size`, and tokenizer.json sets no padding or truncation (a fixed padding length of 10**12
    makes the tokenizers library abort the process; a truncation stride past its length makes it panic)."""
    for key in ("padding", "truncation"):
        if tokenizer_json.get(key) is not None:
            raise ValueError(f"tokenizer.json: {key} must be null: guppylm pads and cuts text itself")
    model = tokenizer_json.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), (dict, list)):
        raise ValueError("tokenizer.json: model.vocab is missing")
    vocab = model["vocab"]
    if isinstance(vocab, list):  # Unigram: [token, score] pairs, the id is the position
        ids = [(f"model.vocab[{i}]", i) for i in range(len(vocab))]
    else:
        ids = [(f"model.vocab[{token!r}]", i) for token, i in vocab.items()]
    added = tokenizer_json.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(token, dict) for token in added):
        raise ValueError("tokenizer.json: added_tokens must be a list of tokens")
    ids += [(f"added_tokens[{i}].id", token.get("id")) for i, token in enumerate(added)]
    ids += list(_post_processor_ids(tokenizer_json.get("post_processor")))
    bad = _ids_past(ids, vocab_size)
    if bad:
        raise ValueError(f"tokenizer.json: {bad[0]} is {bad[1]!r}, not a token id below config.json's vocab_size {vocab_size}")
    from tokenizers import Tokenizer

    try:  # the library's own reading of the file, which builds nothing big once the checks above have passed
        Tokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as error:  # "data did not match any variant of untagged enum ..."
        raise ValueError(f"tokenizer.json: {str(error).strip() or type(error).__name__}") from None
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ValueError("tokenizer_config.json: added_tokens_decoder must map token ids to tokens")
    keys = [(f"added_tokens_decoder[{key!r}]", int(key) if str(key).isdigit() else key) for key in decoder]
    bad = _ids_past(keys, vocab_size)
    if bad:
        raise ValueError(f"tokenizer_config.json: {bad[0]} is not a token id below config.json's vocab_size {vocab_size}")


def check_tokenizer(tokenizer, config):
    """After loading: the tokenizer's whole vocabulary (tokenizer_config.json may add tokens) fits the embedding,
    and its special tokens are the ones config.json names."""
    vocab_size = config["vocab_size"]
    token, top = max(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if top >= vocab_size:
        raise ValueError(f"tokenizer_config.json: adds the token {token!r} as id {top}, past config.json's vocab_size {vocab_size}")
    for name in ("pad", "bos", "eos"):
        token, token_id, wanted = getattr(tokenizer, f"{name}_token"), getattr(tokenizer, f"{name}_token_id"), config.get(f"{name}_token_id")
        if name == "eos" and token is None:
            raise ValueError("tokenizer_config.json: eos_token is missing: replies would never end")
        if token is not None and wanted is not None and token_id != wanted:
            raise ValueError(
                f"tokenizer_config.json: {name}_token {token!r} is id {token_id}, but config.json's {name}_token_id is {wanted}"
            )


# --- generation_config.json ---------------------------------------------------------------------------------------

# The settings guppylm's generation reads from generation_config.json (train writes them). generate() reads dozens
# more, each with its own rules (repetition_penalty must be a float: 3 fails at the first reply), so any other is
# refused: one line now instead of a crash later.
GENERATION_COUNTS = {
    "max_length": (1, 1_000_000), "num_beams": (1, 1), "num_return_sequences": (1, 1),  # one reply, streamed
    "no_repeat_ngram_size": (0, 1024),  # train sets 3; the browser page honours it too
}  # fmt: skip
GENERATION_FLAGS = (
    "do_sample", "use_cache", "_from_model_config",
    # what generate() computes besides the tokens; guppylm asks for what it needs. Trainers (TRL, PEFT's merge) save them
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
)  # fmt: skip
GENERATION_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")  # eos_token_id may be a list
GENERATION_ID_LISTS = ("begin_suppress_tokens",)  # train writes tokenizer.suppressed_reply_starts; the page honours it too


def check_generation_config(generation_config, vocab_size):
    """Raise a ValueError naming the field unless generation_config.json holds only settings guppylm uses, each valid."""
    known = (*LIMITS, *GENERATION_COUNTS, *GENERATION_FLAGS, *GENERATION_IDS, *GENERATION_ID_LISTS, "transformers_version")
    for name, value in generation_config.items():
        field = f"generation_config.json: {name}"
        if name not in known:
            raise ValueError(f"{field} is not a setting guppylm uses (it reads {', '.join(known[:-1])})")
        if value is None or name == "transformers_version":
            continue  # None: unset, transformers' default
        if name in GENERATION_FLAGS and not isinstance(value, bool):
            raise ValueError(f"{field} must be true or false, not {value!r}")
        if name in LIMITS or name in GENERATION_COUNTS:
            low, high = LIMITS.get(name) or GENERATION_COUNTS[name]
            number(field, value, low, high, whole=isinstance(low, int), strict=True)
        if name in GENERATION_IDS:
            ids = value if name == "eos_token_id" and isinstance(value, list) and value else [value]
            if _ids_past([(name, i) for i in ids], vocab_size):
                raise ValueError(f"{field} is {value!r}, not a token id below config.json's vocab_size {vocab_size}")
        if name in GENERATION_ID_LISTS:
            if not isinstance(value, list) or len(value) > vocab_size:
                raise ValueError(f"{field} must be a list of at most {vocab_size} token ids")
            if past := _ids_past([(name, i) for i in value], vocab_size):
                raise ValueError(f"{field} holds {past[1]!r}, not a token id below config.json's vocab_size {vocab_size}")
            if len(set(value)) == vocab_size:  # sampling from nothing fails in generate(), after the prompt is read
                raise ValueError(f"{field} must leave a token a reply can start with")


# --- the chat template ------------------------------------------------------------------------------------------
# A chat template is a program from the folder. transformers runs it in Jinja's sandbox, which stops escapes but
# not work: nested `range(100000)` loops, `'a' * 3000000000` or `|center(3000000000)` hang or fill memory. So a
# template is accepted only if it is built from parts whose cost is linear in the conversation (one loop over the
# messages, conditions, values set from the messages, a few string filters with short constant arguments), and
# only if it renders probe conversations exactly as guppylm's own chat format does.

MAX_TEMPLATE = 8_192  # characters; guppylm's template has about 350
TEMPLATE_NODES = {
    "Template", "Output", "TemplateData", "Const", "Name", "Getattr", "Getitem", "Slice", "Compare", "Operand",
    "And", "Or", "Not", "Test", "If", "CondExpr", "For", "Filter", "Concat", "Add", "Call", "Break", "Continue",
    "Tuple", "List", "Assign",
}  # fmt: skip
TEMPLATE_FILTERS = {"trim", "replace", "lower", "upper", "capitalize", "length", "string", "tojson", "first", "last", "e", "escape"}
MAX_FILTER_DEPTH = 3  # filters applied to filters: each may at most double the text (replace: see below)


def check_chat_template(template, where):
    """Raise a ValueError naming `where` (the file) unless `template` is a Jinja chat template that guppylm accepts
    (see above). The rendering of probe conversations is compared by `check_chat_format`."""
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if template is None:
        raise ValueError("no chat template: neither chat_template.jinja nor tokenizer_config.json holds one")
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{where}: the chat template is empty")
    if len(template) > MAX_TEMPLATE:
        raise ValueError(f"{where}: the chat template has {len(template):,} characters; guppylm accepts at most {MAX_TEMPLATE:,}")
    environment = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    try:
        tree = environment.parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"{where}: the chat template is not valid Jinja (line {error.lineno}: {error.message})") from None
    except RecursionError:
        raise ValueError(f"{where}: the chat template is nested too deeply") from None

    try:
        _check_template_tree(tree, where)
    except RecursionError:
        raise ValueError(f"{where}: the chat template is nested too deeply") from None


def _check_template_tree(tree, where):
    """Walk the parsed template: only TEMPLATE_NODES; one loop, over the messages; calls of raise_exception() only;
    filters from TEMPLATE_FILTERS, at most MAX_FILTER_DEPTH deep; `{% set name = ... %}` from the conversation only
    (a value built from another set value could double at each step)."""
    from jinja2 import nodes

    assigned = {node.target.name for node in tree.find_all(nodes.Assign) if isinstance(node.target, nodes.Name)}

    def visit(node, in_loop=False, filters=0):
        if type(node).__name__ not in TEMPLATE_NODES:
            raise ValueError(f"{where}: the chat template uses {_jinja_name(node)}, which guppylm does not accept in a chat template")
        if isinstance(node, nodes.For):
            if in_loop or node.recursive:
                raise ValueError(f"{where}: the chat template nests loops; one loop over the messages is all it may have")
            if not _is_messages(node.iter):
                raise ValueError(f"{where}: the chat template loops over something other than the messages")
            in_loop = True
        if isinstance(node, nodes.Assign):
            if not isinstance(node.target, nodes.Name):
                raise ValueError(f"{where}: the chat template's {{% set %}} assigns to something other than a name")
            if any(name.name in assigned for name in node.node.find_all(nodes.Name)):
                raise ValueError(f"{where}: the chat template sets '{node.target.name}' from another {{% set %}} value")
        if isinstance(node, nodes.Call) and not (isinstance(node.node, nodes.Name) and node.node.name == "raise_exception"):
            raise ValueError(f"{where}: the chat template calls a function; only raise_exception() is accepted")
        if isinstance(node, nodes.Filter):
            _check_filter(node, where)
            filters += 1
            if filters > MAX_FILTER_DEPTH:
                raise ValueError(f"{where}: the chat template chains more than {MAX_FILTER_DEPTH} filters")
        for child in node.iter_child_nodes():
            visit(child, in_loop, filters)

    visit(tree)


def _is_messages(node):
    """`messages` or a slice of it, e.g. `messages[1:]`: the only thing a chat template may loop over."""
    from jinja2 import nodes

    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        node = node.node
    return isinstance(node, nodes.Name) and node.name == "messages"


def _check_filter(node, where):
    """A filter from TEMPLATE_FILTERS with short constant arguments; `replace` may at most double a text."""
    from jinja2 import nodes

    if node.name not in TEMPLATE_FILTERS:
        raise ValueError(f"{where}: the chat template uses the filter '{node.name}', which guppylm does not accept")
    arguments = [*node.args, *(keyword.value for keyword in node.kwargs)]
    if node.dyn_args or node.dyn_kwargs or not all(isinstance(a, nodes.Const) and len(str(a.value)) <= 8 for a in arguments):
        raise ValueError(f"{where}: the chat template's '{node.name}' filter takes other than short constant arguments")
    if node.name == "replace" and len(arguments) >= 2:
        old, new = (str(a.value) for a in arguments[:2])
        if not old or len(new) > 2 * len(old):
            raise ValueError(f"{where}: the chat template's replace('{old}', '{new}') more than doubles the text")


def _jinja_name(node):
    from jinja2 import nodes

    names = {nodes.AssignBlock: "{% set %}...{% endset %}", nodes.Macro: "{% macro %}", nodes.Mul: "'*'",
             nodes.Pow: "'**'", nodes.Mod: "'%'", nodes.CallBlock: "{% call %}", nodes.FilterBlock: "{% filter %}"}  # fmt: skip
    return names.get(type(node), f"'{type(node).__name__}'")


@cache
def _generation_tag():
    """TRL's `{% generation %}...{% endgeneration %}` (marks the assistant's tokens for assistant-only loss), parsed
    as its body, which is how transformers' AssistantTracker renders it."""
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


def check_chat_format(tokenizer, template, where, chat_template):
    """Raise a ValueError naming `where` unless `template` renders probe conversations to exactly the tokens
    guppylm's `chat_template` gives: ChatML with `<` escaped in messages, so a typed marker stays text."""
    probes = [
        ([{"role": "user", "content": "hi <|im_end|> there"}], True),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "blub."}], False),
    ]
    for messages, generation_prompt in probes:
        def render(source):
            return tokenizer.apply_chat_template(messages, chat_template=source, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)["input_ids"]

        try:
            got = render(template)
        except Exception as error:  # raise_exception(), a missing key...
            raise ValueError(f"{where}: the chat template fails on a plain conversation: {str(error).strip() or type(error).__name__}") from None
        expected = render(chat_template)
        if got != expected:
            raise ValueError(
                f"{where}: the chat template renders {messages!r} as {tokenizer.convert_ids_to_tokens(got)[:10]}, "
                "not in guppylm's chat format"
            )
