"""The word-level tokenizer and the chat format, defined once.

Text is NFKC-normalized, lowercased and whitespace-collapsed; each word (apostrophes kept inside, so "don't"
and "i'm" stay whole) and each punctuation symbol is one token. Tokens carry a leading "▁" when a space
preceded them, the way SentencePiece does it, so decoding restores the exact normalized text: "hi, i'm guppy."
Anything outside the vocabulary (an unseen word, an emoji, another script) becomes <unk>; nothing is dropped.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK = "<pad>", "<unk>"
IM_START = "<|im_start|>"  # opens a turn; the role name follows
IM_END = "<|im_end|>"  # closes a turn; after Guppy's reply it is the end-of-sequence token
SPECIAL_TOKENS = [PAD, UNK, IM_START, IM_END]  # ids 0..3, matching GuppyConfig's pad/bos/eos defaults
ROLES = ["user", "assistant", "system"]

# ChatML, single turn in practice. Every consumer - training, chat, the Space, the browser page - renders
# conversations with this template and nothing else. "<" in message text is followed by a space, so a user
# who types "<|im_end|>" gets plain symbols, never a turn marker. {% generation %} marks what the assistant says
# (its closing <|im_end|> included) for `return_assistant_tokens_mask` and TRL's assistant-only loss; it renders
# nothing itself (@huggingface/jinja, which the browser page uses, drops it too).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] | replace('<', '< ') %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ content }}<|im_end|>{% endif %}{{ '\\n' }}"  # a bare newline after a tag would be trimmed
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORD_OR_SYMBOL = r"▁?[\p{L}\p{N}]+(?:'[\p{L}\p{N}]+)*|▁?[^▁\p{L}\p{N}]"


def _backend(vocab=None):
    """The `tokenizers` pipeline; an empty WordLevel model until trained."""
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace("’", "'"),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            # "hi ." and "hi." are the same text; keep one spelling so both map to the same tokens
            *(normalizers.Replace(f" {p}", p) for p in ".,!?;:"),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(WORD_OR_SYMBOL), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tokenizer


def build_tokenizer(
    texts: Iterable[str], model_max_length: int = 128, rare_texts: Iterable[str] = (), min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train the word-level vocabulary and wrap it as a transformers fast tokenizer.

    Every word of `texts` is learned; a word only `rare_texts` use is learned once it occurs `min_frequency` times
    there (`chat_tokenizer` passes the replies and the users' turns).
    """
    backend = _backend()
    # role names are trained in explicitly: the chat template must never produce <unk> itself
    backend.train_from_iterator([*ROLES, *texts], trainer=word_trainer(special_tokens=SPECIAL_TOKENS))
    rare = _backend()
    rare.train_from_iterator(rare_texts, trainer=word_trainer(min_frequency=min_frequency))
    vocab, rare_vocab = backend.get_vocab(), rare.get_vocab()
    for word in sorted(rare_vocab, key=rare_vocab.get):  # most frequent first, as the trainer orders them
        vocab.setdefault(word, len(vocab))
    backend.model = models.WordLevel(vocab=vocab, unk_token=UNK)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=IM_START,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",  # batched generation appends on the right, so prompts are padded on the left
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # 4.x would add token_type_ids, which no model reads
    )


def chat_tokenizer(dataset, model_max_length: int = 128, min_user_word_count: int = 1) -> PreTrainedTokenizerFast:
    """The tokenizer training builds from a dataset with a `messages` column: every word of the replies, and the
    words users say at least `min_user_word_count` times. A rarer one reads as <unk>, as a word never seen does in
    chat, so the model learns what a message with unknown words asks (the guppy pack's `rare_*` pools), while every
    word a reply needs stays speakable."""
    return build_tokenizer(
        conversation_texts(dataset, roles=("assistant", "system")), model_max_length,
        rare_texts=conversation_texts(dataset, roles=("user",)), min_frequency=min_user_word_count,
    )


def word_trainer(**kwargs):
    return trainers.WordLevelTrainer(show_progress=False, **kwargs)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder, **kwargs):
    """`tokenizer.save_pretrained(folder)`, loadable by every transformers from 4.57 on without remote code.

    transformers 5 records the class as "TokenizersBackend", a name 4.x does not know; "PreTrainedTokenizerFast"
    is the same class under the name both read.
    """
    tokenizer.save_pretrained(folder, **kwargs)
    path = Path(folder, "tokenizer_config.json")
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, ensure_ascii=False) + "\n")


def conversation_texts(dataset, roles=None) -> Iterable[str]:
    """Every message text (of `roles`, default all) of a dataset with a `messages` column: the tokenizer's corpus."""
    for messages in dataset["messages"]:
        for message in messages:
            if roles is None or message["role"] in roles:
                yield message["content"]


def turn_headers(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """(user header, reply header): the token ids that open a user turn (`<|im_start|>user\n`) and the assistant's
    reply (the generation prompt, `<|im_start|>assistant\n`), read from the chat template itself. Message text can
    never produce them, because the template escapes "<": a user typing "assistant" gives the word, not a header."""
    probe = [{"role": "user", "content": ""}]
    turn = tokenizer.apply_chat_template(probe, return_dict=True)["input_ids"]  # <|im_start|> user <|im_end|>
    prompt = tokenizer.apply_chat_template(probe, add_generation_prompt=True, return_dict=True)["input_ids"]
    return turn[:-1], prompt[len(turn) :]


def normalize(tokenizer: PreTrainedTokenizerFast, text: str) -> str:
    """The text as the tokenizer sees it; `decode(encode(text))` gives this back when every word is known."""
    return tokenizer.backend_tokenizer.normalizer.normalize_str(text)


def suppressed_reply_starts(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of the tokens a reply must not start with: every token that is not a word or a number (special tokens,
    punctuation, emoji) except <|im_end|>.

    No reply in the data starts with one (the persona's style checks it), but a tiny model that loses track of a
    long message sometimes does (". i swim all day."), so `guppylm train` writes these ids to generation_config.json
    as `begin_suppress_tokens`: transformers, transformers.js and the browser page never draw one first.
    <|im_end|> stays allowed: at the context's last position the model offers nothing else (modeling_guppylm), so a
    prompt that fills the context gets an empty reply there rather than a failure."""
    non_words = (i for token, i in tokenizer.get_vocab().items() if not token.lstrip("▁")[:1].isalnum())
    return sorted(i for i in non_words if i != tokenizer.eos_token_id)
