"""Look inside Guppy: the data behind one reply, shared by the Space's "Inside Guppy" view and `guppylm chat --explain`.

Two steps, so a server can keep thousands of replies explainable without keeping their tensors:
1. `trace_reply` generates the reply with one `model.generate` call that also returns, for every step, the
   model's own scores (`output_logits`) and the scores after the logits processors - temperature, top-k, top-p:
   the distribution the token was actually drawn from (`output_scores`). It keeps a few KB: the ids and, per step,
   the probabilities of the drawn token and of the model's most likely ones (a Trace).
2. `explain_trace` rebuilds the rest from a Trace when someone looks: the tokens with the text the person typed
   for each (the tokenizer's offsets, so an unknown word shows as what was typed), and every layer's attention
   weights from one forward pass over prompt + reply.
Nothing here is specific to GuppyLM: any causal LM with a chat template and the usual config names works.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guppylm.inference import PROMPT_HEAD, generate, prompt_for, user_turn

TOP_CANDIDATES = 5  # the model's most likely tokens shown per step
SETTINGS = ("do_sample", "temperature", "top_k", "top_p")  # what decides how a token is drawn from the scores


@dataclass
class Token:
    text: str
    id: int
    kind: str  # "word", "unknown" (outside the vocabulary) or "special" (chat markers, padding)
    typed: str = ""  # for a prompt token: the characters it was read from (what the person typed, for a word)


@dataclass
class Candidate:
    token: Token
    probability: float  # after the sampling settings (0: the settings ruled it out)
    model_probability: float  # the model's own: the softmax of its logits


@dataclass
class Step:
    chosen: Token
    probability: float  # of the chosen token, after the sampling settings: what it was drawn with
    model_probability: float  # of the chosen token, the model's own
    candidates: list[Candidate]  # the model's most likely tokens, most likely first


@dataclass
class Trace:
    """One reply as generated, in a few KB: enough to rebuild its Explanation with `explain_trace`."""

    message: str
    settings: dict  # how it was drawn: do_sample, temperature, top_k, top_p (the model's defaults filled in)
    reply: str  # the text a user sees: special tokens dropped
    prompt_ids: np.ndarray  # (T_prompt,) the rendered chat template, as the model read it
    reply_ids: np.ndarray  # (T_reply,) every generated token, the closing end-of-turn marker included
    top_ids: np.ndarray  # (T_reply, K) the model's K most likely tokens at each step
    probabilities: np.ndarray  # (T_reply, 1 + K) after the settings: the drawn token, then the K candidates
    model_probabilities: np.ndarray  # (T_reply, 1 + K) the same, the model's own
    dropped: int  # message tokens cut from the front to fit the context
    room: int  # how many tokens the reply had room for
    cut: bool  # the reply stopped at that room, not at the end-of-turn marker


@dataclass
class Explanation:
    reply: str
    prompt: list[Token]
    completion: list[Token]
    steps: list[Step]  # one per completion token
    attentions: torch.Tensor  # (layers, heads, T, T) over prompt + completion
    dropped: int
    room: int
    cut: bool


@torch.no_grad()
def trace_reply(model, tokenizer, message, streamer=None, **generate_kwargs):
    """Generate a reply to `message` (streamed to `streamer` if given) and return its Trace."""
    prompt = prompt_for(model, tokenizer, message, generate_kwargs.pop("max_new_tokens", None))
    output = generate(
        model, prompt, streamer, output_scores=True, output_logits=True, return_dict_in_generate=True, **generate_kwargs
    )
    prompt_length = prompt.input_ids.shape[1]
    reply_ids = output.sequences[0, prompt_length:]  # (T_reply,)
    drawn_from = torch.cat(output.scores).float().softmax(-1)  # (T_reply, vocab); ruled-out tokens are exactly 0
    own = torch.cat(output.logits).float().softmax(-1)  # (T_reply, vocab)
    top_ids = own.topk(min(TOP_CANDIDATES, own.shape[-1])).indices  # (T_reply, K)
    columns = torch.cat([reply_ids[:, None], top_ids], dim=1)  # (T_reply, 1 + K)
    defaults = model.generation_config
    return Trace(
        message=message,
        settings={name: generate_kwargs.get(name, getattr(defaults, name)) for name in SETTINGS},
        reply=tokenizer.decode(reply_ids, skip_special_tokens=True),
        prompt_ids=prompt.input_ids[0].numpy().astype(np.int32),
        reply_ids=reply_ids.numpy().astype(np.int32),
        top_ids=top_ids.numpy().astype(np.int32),
        probabilities=drawn_from.gather(1, columns).numpy(),
        model_probabilities=own.gather(1, columns).numpy(),
        dropped=prompt.dropped,
        room=prompt.max_new_tokens,
        cut=tokenizer.eos_token_id not in reply_ids.tolist(),
    )


def _token(tokenizer, token_id, typed=""):
    if token_id == tokenizer.unk_token_id:
        kind = "unknown"
    elif token_id in tokenizer.all_special_ids:
        kind = "special"
    else:
        kind = "word"
    text = tokenizer.decode([token_id])
    return Token(text.strip() or repr(text), token_id, kind, typed)  # repr keeps a bare-whitespace token visible


def typed_texts(tokenizer, message, dropped):
    """(ids, texts) of the prompt made from `message`: each token with the characters of the rendered chat it
    was read from.

    The tokenizer's offsets point into the text before normalization, so an unknown word maps back to what was
    typed ("Zebra"), not to "<unk>". The prompt's tokens are the rendered chat's minus the `dropped` cut ones.
    """
    text = tokenizer.apply_chat_template(user_turn(message), add_generation_prompt=True, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    kept = lambda items: items[:PROMPT_HEAD] + items[PROMPT_HEAD + dropped :]
    return kept(encoding["input_ids"]), [text[start:end].strip() for start, end in kept(encoding["offset_mapping"])]


@torch.no_grad()
def explain_trace(model, tokenizer, trace):
    """The Explanation of a traced reply: tokens, steps and attention, recomputed from its ids."""
    ids, typed = typed_texts(tokenizer, trace.message, trace.dropped)
    if ids != trace.prompt_ids.tolist():
        raise ValueError("the trace does not belong to this tokenizer: its message tokenizes differently")
    prompt = [_token(tokenizer, int(i), text) for i, text in zip(trace.prompt_ids, typed)]
    completion = [_token(tokenizer, int(i)) for i in trace.reply_ids]
    steps = []
    for chosen, top, probabilities, model_probabilities in zip(
        completion, trace.top_ids, trace.probabilities, trace.model_probabilities
    ):
        candidates = [
            Candidate(_token(tokenizer, int(i)), float(p), float(m))
            for i, p, m in zip(top, probabilities[1:], model_probabilities[1:])
        ]
        steps.append(Step(chosen, float(probabilities[0]), float(model_probabilities[0]), candidates))

    sequence = torch.from_numpy(np.concatenate([trace.prompt_ids, trace.reply_ids]).astype(np.int64))
    attentions = model(sequence[None].to(model.device), output_attentions=True, use_cache=False).attentions
    return Explanation(
        reply=trace.reply,
        prompt=prompt,
        completion=completion,
        steps=steps,
        attentions=torch.cat(attentions).float().cpu(),  # layers x (1, nh, T, T) -> (layers, nh, T, T)
        dropped=trace.dropped,
        room=trace.room,
        cut=trace.cut,
    )


def explain(model, tokenizer, message, streamer=None, **generate_kwargs):
    """Generate a reply to `message` (streamed to `streamer` if given) and return its Explanation."""
    return explain_trace(model, tokenizer, trace_reply(model, tokenizer, message, streamer, **generate_kwargs))


def steps_table(explanation):
    """One line per generated token: step, chosen token, its probability after the settings and the model's own,
    then the model's most likely tokens, each with its probability after the settings.

    Tokens never contain whitespace, so every line splits on it:
    `step chosen p model_p (token p)*`, after one header line.
    """
    lines = ["step  chosen            p  model_p  most likely (p after the settings)"]
    for number, step in enumerate(explanation.steps, 1):
        candidates = "  ".join(f"{c.token.text} {c.probability:.3f}" for c in step.candidates)
        lines.append(f"{number:>4}  {step.chosen.text:<12} {step.probability:.3f}  {step.model_probability:.3f}    {candidates}")
    return "\n".join(lines)


def explain_reply(model, tokenizer, message, **generate_kwargs):
    """(Explanation, per-step table) for `guppylm chat --explain`."""
    explanation = explain(model, tokenizer, message, **generate_kwargs)
    return explanation, steps_table(explanation)


def _component(name, module):
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "norm" in type(module).__name__.lower():  # before attention: "post_attention_layernorm" is a norm
        return "norms"
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "feed_forward" in name:
        return "MLP"
    return "other"  # e.g. an LM head that is not tied to the embedding


def architecture(model):
    """The shape of the network from its config, and its parameters by component (tied weights counted once)."""
    config = model.config
    counts, seen = {}, set()
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                component = _component(name, module)
                counts[component] = counts.get(component, 0) + param.numel()
    return {
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "hidden size": config.hidden_size,
        "feed-forward size": getattr(config, "intermediate_size", None),
        "context": config.max_position_embeddings,
        "vocabulary": config.vocab_size,
        "parameters": sum(counts.values()),
        "parameters by component": counts,
    }
