"""`guppylm chat`: talk to a trained Guppy in the terminal, one message at a time, the reply streamed as it is drawn."""

import sys

import torch

from guppylm.inference import generation_kwargs, load_model, stream_reply


def notices(dropped, cut, room):
    """What to tell the user about a reply: the message was cut to fit, or the reply ran out of room."""
    lines = []
    if dropped:
        lines.append(f"(your message was {dropped} tokens too long for Guppy's memory; it read only the end)")
    if cut:
        lines.append(f"(the reply stopped at its limit of {room} tokens)")
    return lines


def chat(model_name=None, prompt=None, seed=None, explain=False, **options):
    """The `guppylm chat` loop: one reply for `prompt`, or an interactive session until EOF."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # the CLI reports truncation itself, in words
    generate_kwargs = generation_kwargs(**options)  # bad settings fail before the model loads
    model, tokenizer = load_model(model_name)
    if seed is not None:
        torch.manual_seed(seed)

    def answer(message):
        if explain:
            from guppylm.explain import explain_reply

            explanation, table = explain_reply(model, tokenizer, message, **generate_kwargs)
            print(f"guppy> {explanation.reply}\n{table}", flush=True)
            lines = notices(explanation.dropped, explanation.cut, explanation.room)
        else:
            shown = ""
            print("guppy> ", end="", flush=True)
            for text, reply in stream_reply(model, tokenizer, message, **generate_kwargs):
                print(text[len(shown) :], end="", flush=True)
                shown = text
            print(flush=True)
            lines = notices(reply.prompt.dropped, reply.cut, reply.prompt.max_new_tokens)
        for line in lines:
            print(line, file=sys.stderr)

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
