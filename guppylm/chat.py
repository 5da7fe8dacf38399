"""Talking to a trained Guppy: load a model folder or Hub repo, build the prompt, stream the reply.

The CLI, the evaluator and the Gradio Space all go through these functions, and every reply comes
from `model.generate` with the KV cache.
"""

import os
import re
import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from guppylm.errors import HubError, hub_errors

DEFAULT_MODEL = "runs/guppy"  # where `make demo` / `guppylm train` put the model


def default_model():
    """The model to load when none is named: $GUPPYLM_MODEL, else the one `make demo` trained."""
    return os.environ.get("GUPPYLM_MODEL") or DEFAULT_MODEL


def load_model(name_or_path=None, device="cpu"):
    """(model, tokenizer) from a local folder or a Hub repo id, in eval mode.

    The model is built from guppylm's own classes (registered with the Auto classes on import), so loading
    a folder or a repo never runs Python code that came with it. Weights load from safetensors only.
    """
    from guppylm import GuppyConfig  # also registers GuppyLM with the Auto classes
    from transformers.utils import logging

    name_or_path = str(name_or_path or default_model())
    if _looks_local(name_or_path):
        folder = Path(name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"no model at {name_or_path!r}: train one with `guppylm train` (or `make demo`)")
        missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{name_or_path!r} is not a complete model folder: missing {', '.join(missing)}")
    logging.disable_progress_bar()
    try:
        with hub_errors(name_or_path):  # a repo id: "not found on <endpoint>", "not in the cache", ...
            config_dict, _ = GuppyConfig.get_config_dict(name_or_path)  # plain JSON, no code involved
            if config_dict.get("model_type") != GuppyConfig.model_type:
                raise ValueError(f"its config describes a {config_dict.get('model_type')!r} model, not a {GuppyConfig.model_type!r} one")
            config = GuppyConfig.from_dict(config_dict)
            # trust_remote_code=False: an auto_map in tokenizer_config.json would otherwise ask "run the custom code? [y/N]" on stdin
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
            model, info = AutoModelForCausalLM.from_pretrained(
                name_or_path, config=config, use_safetensors=True, trust_remote_code=False,
                ignore_mismatched_sizes=True, output_loading_info=True,  # checked below: transformers would re-initialize them
            )
    except HubError:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"cannot load the model {name_or_path!r}: {reason}") from error
    damaged = sorted({*info["missing_keys"], *info["unexpected_keys"], *(key for key, *_ in info["mismatched_keys"])})
    if damaged:  # a damaged file, or weights from another config: never chat with randomly re-initialized layers
        raise OSError(
            f"cannot load the model {name_or_path!r}: its weights do not match its config.json "
            f"({len(damaged)} tensors missing, extra or misshapen, e.g. {damaged[0]})"
        )
    return model.to(device).eval(), tokenizer


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _looks_local(name):
    # a Hub id is "namespace/name"; anything else (absolute, ./relative, deeper paths) is a folder
    return os.path.isabs(name) or name.startswith(".") or name.count("/") != 1 or os.path.exists(name)


def encode_prompt(tokenizer, message, max_length):
    """Token ids (1, T) of a single-turn prompt ending in the generation prompt, at most `max_length` long.

    An over-long message is cut from the left: the turn markers and the generation prompt are kept, the
    start of the message goes. Returns (input_ids, number of message tokens dropped).
    """
    # lone surrogates (undecodable bytes in argv, "\ud800" in JSON) cannot be UTF-8 encoded: U+FFFD, as TextEncoder does
    message = re.sub("[\ud800-\udfff]", "\ufffd", message)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    excess = len(ids) - max_length
    if excess > 0:
        head = 2  # <|im_start|> user
        ids = ids[:head] + ids[head + excess :]
    return torch.tensor([ids]), max(excess, 0)


def generation_kwargs(greedy=False, temperature=None, top_k=None, top_p=None, max_new_tokens=None):
    """generate() arguments on top of the model's generation_config.json; None keeps its default."""
    overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    return kwargs


def prompt_budget(model, max_new_tokens):
    """Tokens left for the prompt once the reply's room is reserved inside the context."""
    max_new_tokens = max_new_tokens or model.generation_config.max_new_tokens or 0
    return max(model.config.max_position_embeddings - max_new_tokens, 8)


def stream_generation(tokenizer, run):
    """Call `run(streamer)` on a worker thread; yield (text so far, None) as tokens arrive, then (text, its result).

    `run` calls `model.generate(..., streamer=streamer)`; an exception in it is raised here, in the caller.
    """
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def work():
        try:
            return run(streamer)
        finally:
            streamer.end()  # wakes the reader below even if generate failed (a second end() is harmless)

    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(work)
        text = ""
        for piece in streamer:
            if piece:  # the streamer also sends empty strings (the skipped prompt, held-back text)
                text += piece
                yield text, None
        yield text, job.result()


def stream_reply(model, tokenizer, message, **generate_kwargs):
    """Yield the reply's text as it grows, one decoded token at a time."""
    input_ids, _ = encode_prompt(tokenizer, message, prompt_budget(model, generate_kwargs.get("max_new_tokens")))
    input_ids = input_ids.to(model.device)

    def run(streamer):
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **generate_kwargs)

    for text, done in stream_generation(tokenizer, run):
        if done is None:
            yield text


def chat(model_name=None, prompt=None, seed=None, explain=False, **options):
    """The `guppylm chat` loop: one reply for `prompt`, or an interactive session until EOF."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # the CLI reports truncation itself, in words
    model, tokenizer = load_model(model_name)
    generate_kwargs = generation_kwargs(**options)
    if seed is not None:
        torch.manual_seed(seed)

    def answer(message):
        _, dropped = encode_prompt(tokenizer, message, prompt_budget(model, generate_kwargs.get("max_new_tokens")))
        if dropped:
            print(f"(your message was {dropped} tokens too long for Guppy's memory; it read only the end)", file=sys.stderr)
        if explain:
            from guppylm.explain import explain_reply

            reply, table = explain_reply(model, tokenizer, message, **generate_kwargs)
            print(f"guppy> {reply}\n{table}", flush=True)
            return
        shown = ""
        print("guppy> ", end="", flush=True)
        for reply in stream_reply(model, tokenizer, message, **generate_kwargs):
            print(reply[len(shown) :], end="", flush=True)
            shown = reply
        print(flush=True)

    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; give Guppy something to read")
        answer(prompt)
        return
    print("talk to guppy (single-turn: each message is answered on its own). ctrl-d to leave.", file=sys.stderr)
    while True:
        try:
            message = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if message.strip():
            answer(message)
