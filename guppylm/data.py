"""The training data: a dataset's conversations, checked and cut to fit, tokenized with the chat template, batched
per optimizer step and collated into tensors with per-token loss weights.

Turns are found from the chat template's structure: the reply starts after the template's generation prompt
(`<|im_start|>assistant\\n`), which message text can never produce (tokenizer.turn_headers). A conversation longer
than the context is cut the way inference cuts a prompt (inference.build_prompt): the user's words give way from
their start, and the reply stays.
"""

import hashlib
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from guppylm.errors import hub_errors
from guppylm.tokenizer import ROLES, turn_headers

REQUIRED_COLUMNS = ("messages",)
# A message is cut to context x CHARS_PER_TOKEN characters before it is tokenized: no token is that long on average
# in text a model can learn from, and a 10 MB message then costs what a 4 KB one does.
CHARS_PER_TOKEN = 32


class DataError(ValueError):
    """A dataset that cannot be trained on; the message is one line that names the dataset, the split and the row."""


# --- loading ---------------------------------------------------------------------------------------------------


def load_conversations(dataset=None, persona="guppy", seed=42):
    """A DatasetDict with a train split (and usually a test split): a local folder, a Hub repo id, or (None) the
    persona's default build."""
    from datasets import DatasetDict, load_dataset

    name = str(dataset) if dataset is not None else str(default_dataset(persona, seed))
    with hub_errors(name, "dataset"):
        try:
            data = load_dataset(name)
        except ValueError as error:  # a damaged file; some datasets versions decode (and reject) non-UTF-8 bytes here
            raise DataError(f"dataset {name!r} cannot be read: {str(error).strip().splitlines()[0]}") from None
    if not isinstance(data, DatasetDict) or "train" not in data:
        raise DataError(f"dataset {name!r} has no 'train' split")
    for split in data.values():
        missing = [c for c in REQUIRED_COLUMNS if c not in split.column_names]
        if missing:
            raise DataError(f"dataset {name!r} lacks the column {missing[0]!r} (found: {', '.join(split.column_names)})")
    return data


def default_dataset(persona, seed):
    """Folder of the persona's default dataset, built on first use and cached, keyed by the pack (every file of it:
    an edited messages file is new data), the builder and the seed. A file lock makes concurrent trainings on one
    HF_HOME build it once, the others wait and read it."""
    import dataset_builder
    from dataset_builder.persona import pack_files
    from filelock import FileLock
    from huggingface_hub.constants import HF_HOME

    pack = dataset_builder.load_persona(persona)
    recipe = hashlib.sha256(str(seed).encode())
    for source in [*pack_files(pack).values(), *sorted(Path(dataset_builder.__file__).parent.glob("*.py"))]:
        recipe.update(source.read_bytes())
    folder = Path(HF_HOME, "guppylm", "datasets", f"{pack.name}-seed{seed}-{recipe.hexdigest()[:12]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(folder.name + ".lock")):
        if not (folder / "README.md").exists():
            print(f"building the {pack.name} dataset (once: it is cached in {folder})", flush=True)
            partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
            dataset_builder.save_dataset(dataset_builder.build_dataset(pack, seed=seed), pack, partial)
            shutil.rmtree(folder, ignore_errors=True)  # a folder without its card is an interrupted build
            os.replace(partial, folder)  # a finished folder or none: never half a dataset
    return folder


# --- checking ----------------------------------------------------------------------------------------------------


def checked_conversations(split, where, context):
    """The split's conversations as lists of {role, content}, each message cut to what the context can hold
    (`cut_text`). DataError, one line naming `where` and the row, on an empty split or a row that is no conversation."""
    if len(split) == 0:
        raise DataError(f"{where} is empty")
    limit = context * CHARS_PER_TOKEN
    conversations = []  # its length is the row being read
    try:
        for messages in split["messages"]:
            problem = conversation_problem(messages)
            if problem:
                raise DataError(f"{where}, row {len(conversations)}: {problem}")
            conversations.append([{"role": m["role"], "content": cut_text(m["content"], m["role"] != "assistant", limit)} for m in messages])
    except UnicodeDecodeError as error:  # a file's bytes are decoded row by row, as they are read
        raise DataError(f"{where}, row {len(conversations)}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    return conversations


def conversation_problem(messages):
    """Why `messages` is not a conversation training can use, or None."""
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list of {{role, content}} messages, not {short(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(key), str) for key in ("role", "content")):
            return f"message {i} is not a {{role, content}} pair of strings: {short(message)}"
        if message["role"] not in ROLES:
            return f"message {i} has the role {short(message['role'])}; the chat template knows {', '.join(ROLES)}"
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant message, so no reply to learn"
    return None


def short(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def cut_text(text, keep_end, limit):
    """At most `limit` characters of `text`, cut at a space where there is one: its end when `keep_end` (a user's
    question is at the end of the message, and inference keeps the end too), else its start (a reply)."""
    if len(text) <= limit:
        return text
    if keep_end:
        text = text[-limit:]
        return text[text.find(" ") + 1 :]  # find() is -1 without a space: the whole cut
    text = text[:limit]
    space = text.rfind(" ")
    return text[:space] if space > 0 else text


# --- tokenized conversations --------------------------------------------------------------------------------------


def header_ends(ids, header):
    """Positions right after each occurrence of `header` (a list of ids) in `ids`."""
    n = len(header)
    return [i + n for i, token in enumerate(ids) if token == header[0] and ids[i : i + n] == header]


def fit_context(ids, reply_header, max_length):
    """Cut a tokenized conversation to `max_length` tokens as inference cuts a prompt: the tokens before the last
    reply give way from their start, keeping the first turn's header (`<|im_start|> user`), the end of the message
    and the reply; a reply too long even then keeps its start. Returns (ids, None | "message" | "reply")."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, None
    head = 2  # <|im_start|> and the first turn's role
    message_end = header_ends(ids, reply_header)[-1] - len(reply_header) - 1  # the <|im_end|> closing the message
    if excess <= message_end - head:
        return ids[:head] + ids[head + excess :], "message"
    shortest = ids[:head] + ids[message_end:] if message_end >= head else ids  # (a reply that opens the conversation)
    return shortest[:max_length], "reply"


def turn_spans(ids, header, end_id):
    """(start, end) of the text of each turn that opens with `header`: up to its <|im_end|>, or to the end."""
    return [(start, next((i for i in range(start, len(ids)) if ids[i] == end_id), len(ids))) for start in header_ends(ids, header)]


class Conversations(Dataset):
    """Chat-templated conversations as (token ids, positions where a reply starts), cut to `max_length`, with the
    user's words optionally hidden behind <unk>.

    Replacing a fraction of user tokens by <unk> teaches the model to answer around words it has never seen,
    which is what held-out prompts are full of (bench/FINDINGS: +6 points on-topic). The choice is a pure
    function of (seed, epoch, index), so a resumed run sees exactly the batches an uninterrupted one would.
    `cut` counts the conversations that did not fit: {"message": cut from the left, "reply": cut at its end}.
    """

    def __init__(self, conversations, tokenizer, max_length, unk_rate=0.0, seed=0):
        user_header, reply_header = turn_headers(tokenizer)
        im_end = tokenizer.eos_token_id  # <|im_end|> closes every turn
        texts = tokenizer.apply_chat_template(list(conversations), tokenize=False)
        self.samples, self.reply_starts, self.user_spans, self.cut = [], [], [], Counter()
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:  # cut below, not here
            ids, cut = fit_context(ids, reply_header, max_length)
            if cut:
                self.cut[cut] += 1
            self.samples.append(ids)
            self.reply_starts.append([i for i in header_ends(ids, reply_header) if i < len(ids)])
            self.user_spans.append(turn_spans(ids, user_header, im_end))
        self.unk_id, self.unk_rate, self.seed, self.epoch = tokenizer.unk_token_id, unk_rate, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        ids, starts = self.samples[index], self.reply_starts[index]
        if not self.unk_rate:
            return ids, starts
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        user = lambda i: any(start <= i < end for start, end in self.user_spans[index])
        return [self.unk_id if user(i) and rng.random() < self.unk_rate else t for i, t in enumerate(ids)], starts


# --- batches ---------------------------------------------------------------------------------------------------


class LengthGroupedBatches:
    """Batches of similar-length samples, so right padding wastes little and no packing crosses samples.

    Shuffle, sort by length within windows of 50 batches, cut, shuffle the batches: seeded per epoch. A batch that
    would be short is dropped (`drop_last`): the next epoch draws it among new ones.
    """

    def __init__(self, lengths, batch_size, seed, drop_last=True):
        self.lengths, self.batch_size, self.seed, self.drop_last, self.epoch = lengths, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * 50
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]

    def __len__(self):
        return len(self.lengths) // self.batch_size if self.drop_last else -(-len(self.lengths) // self.batch_size)


def micro_batches(step_batch, process_index, num_processes, accumulation):
    """This process's share of one optimizer step's batch, as `accumulation` micro-batches of sample indices.

    Every process draws the same step batches (the same seed), and process p takes micro-batches p*A ... p*A+A-1
    of it: contiguous slices of a length-sorted batch, so each stays length-grouped. 1 process x 32, 2 processes x 16
    and 2 accumulation steps x 16 thus see exactly the same 32 conversations at every optimizer step."""
    size = len(step_batch) // (num_processes * accumulation)
    first = process_index * accumulation
    return [step_batch[(first + m) * size : (first + m + 1) * size] for m in range(accumulation)]


def collate(samples, pad_id, reply_start_weight=1.0):
    """Right-pad (ids, reply starts) samples to the longest. Causal attention never looks right, so real tokens never
    see padding and no attention mask is needed; padding is excluded from the loss by label -100.

    `loss_weights` weighs each token as a prediction target: 1, 0 for padding, and `reply_start_weight` for the
    first token of each reply: see `train.weighted_lm_loss`.
    """
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    loss_weights = torch.zeros(input_ids.shape)
    for row, (ids, reply_starts) in enumerate(samples):
        input_ids[row, : len(ids)] = labels[row, : len(ids)] = torch.tensor(ids)
        loss_weights[row, : len(ids)] = 1.0
        loss_weights[row, reply_starts] = reply_start_weight
    return {"input_ids": input_ids, "labels": labels, "loss_weights": loss_weights}
