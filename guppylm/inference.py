"""Inference: load a trained Guppy, turn a message into a prompt that fits, and generate the reply.

Every consumer - `guppylm chat`, eval, explain, the ONNX export, the Space - goes through these functions, so a
message is cut, a reply is bounded and a sampling setting is checked the same way everywhere. Replies come from
`model.generate` with the KV cache. (The browser page runs the same policy in JavaScript: space/web/guppy.js.)
"""

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from guppylm.errors import HubError, hub_errors
from guppylm.folders import local_model



# --- loading -------------------------------------------------------------------------------------------


def load_model(name_or_path=None, device="cpu"):
    """(model, tokenizer) from a local folder or a Hub repo id, in eval mode.

    The model is built from guppylm's own classes (registered with the Auto classes on import), so loading
    a folder or a repo never runs Python code that came with it. Weights load from safetensors only.
    """
    from transformers.utils import logging

    from guppylm import GuppyConfig  # also registers GuppyLM with the Auto classes

    name_or_path = local_model(name_or_path)  # a missing local folder fails here, before any Hub lookup
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


# --- the prompt-length policy ---------------------------------------------------------------------------


@dataclass
class Prompt:
    input_ids: torch.Tensor  # (1, T): the chat template around the message, ending in the generation prompt
    dropped: int  # message tokens cut from its start to make room
    max_new_tokens: int  # the reply's room: what was asked for, within what the context has left


PROMPT_HEAD = 2  # <|im_start|> user: a message too long for the context gives way after these, from its start


def user_turn(message):
    """The one-message chat every prompt is rendered from."""
    # lone surrogates (undecodable bytes in argv, "\ud800" in JSON) cannot be UTF-8 encoded: U+FFFD, as TextEncoder does
    return [{"role": "user", "content": re.sub("[\ud800-\udfff]", "\ufffd", message)}]


def build_prompt(tokenizer, message, context, max_new_tokens):
    """The one prompt-length policy, for a context of `context` tokens and a reply of up to `max_new_tokens`.

    The reply keeps room for `max_new_tokens`, but never more than half the context; a longer message gives way
    from its start (the turn markers and the generation prompt stay, and so does the end of the message, where the
    question usually is); then the reply gets what the context has left, up to `max_new_tokens`. So prompt and
    reply always fit, and generation ends cleanly at the context at the latest.
    """
    ids = tokenizer.apply_chat_template(user_turn(message), add_generation_prompt=True, return_dict=True)["input_ids"]
    excess = max(len(ids) - (context - min(max_new_tokens, context // 2)), 0)
    ids = ids[:PROMPT_HEAD] + ids[PROMPT_HEAD + excess :]
    return Prompt(torch.tensor([ids]), excess, min(max_new_tokens, context - len(ids)))


def prompt_for(model, tokenizer, message, max_new_tokens=None):
    """`build_prompt` for `model`: its context, and by default the reply length its generation config asks for
    (or as long as the context allows)."""
    context = model.config.max_position_embeddings
    return build_prompt(tokenizer, message, context, max_new_tokens or model.generation_config.max_new_tokens or context)


# --- sampling settings ----------------------------------------------------------------------------------

# (low, high) allowed for each setting: beyond them a tiny model says nothing a person would want to read
LIMITS = {"temperature": (0.05, 2.0), "top_k": (1, 1000), "top_p": (0.01, 1.0), "max_new_tokens": (1, 1024)}


def checked(name, value):
    """`value` as the number `name` takes (2 -> 2.0 for temperature; 50.0 -> 50 for top_k), or a one-line ValueError."""
    low, high = LIMITS[name]
    integer = isinstance(low, int)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between {low} and {high}, not {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high or (integer and not number.is_integer()):
        raise ValueError(f"{name} must be {'a whole number' if integer else 'a number'} between {low} and {high}, not {value!r}")
    return int(number) if integer else number


def generation_kwargs(greedy=False, temperature=None, top_k=None, top_p=None, max_new_tokens=None):
    """Checked generate() arguments on top of the model's generation_config.json; None keeps its default.

    `max_new_tokens` here is what is asked for; `prompt_for` turns it into what fits."""
    overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    kwargs = {name: checked(name, value) for name, value in overrides.items() if value is not None}
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    return kwargs


# --- generating --------------------------------------------------------------------------------------------


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


def generate(model, prompt, streamer=None, **generate_kwargs):
    """`model.generate` on a Prompt, with its reply room; returns the output of generate."""
    input_ids = prompt.input_ids.to(model.device)
    generate_kwargs = {**generate_kwargs, "max_new_tokens": prompt.max_new_tokens}
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **generate_kwargs)


@dataclass
class Reply:
    text: str
    prompt: Prompt
    cut: bool  # generation stopped at its room (the context's end, or max_new_tokens), not at <|im_end|>


def stream_reply(model, tokenizer, message, **generate_kwargs):
    """Yield (reply so far, None) as it grows, one decoded token at a time; then (reply, the finished Reply)."""
    prompt = prompt_for(model, tokenizer, message, generate_kwargs.pop("max_new_tokens", None))
    for text, output in stream_generation(tokenizer, lambda streamer: generate(model, prompt, streamer, **generate_kwargs)):
        if output is None:
            yield text, None
        else:
            reply_ids = output[0, prompt.input_ids.shape[1] :].tolist()
            yield text, Reply(text, prompt, cut=tokenizer.eos_token_id not in reply_ids)
