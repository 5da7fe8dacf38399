"""Look inside Guppy: the data behind one reply, shared by the Space's "Inside Guppy" view and `guppylm chat --explain`.

One `model.generate` call gives the reply and, for every step, the scores after the logits processors
(temperature, top-k, top-p): the distribution that step's token was actually drawn from. One forward pass
over prompt + reply with `output_attentions=True` then gives every layer's attention weights.
Nothing here is specific to GuppyLM: any causal LM with a chat template and the usual config names works.
"""

from dataclasses import dataclass

import torch
from torch import nn

from guppylm.inference import generate, prompt_for

TOP_CANDIDATES = 5  # candidates shown per step


@dataclass
class Token:
    text: str
    id: int
    kind: str  # "word", "unknown" (outside the vocabulary) or "special" (chat markers, padding)


@dataclass
class Step:
    chosen: Token
    probability: float  # of the chosen token, under the processed distribution
    candidates: list[tuple[Token, float]]  # the most likely tokens with nonzero probability, most likely first


@dataclass
class Explanation:
    reply: str  # the text a user sees: special tokens dropped
    prompt: list[Token]  # the rendered chat template, as the model read it
    completion: list[Token]  # every generated token, the closing end-of-turn marker included
    steps: list[Step]  # one per completion token
    attentions: torch.Tensor  # (layers, heads, T, T) over prompt + completion
    dropped: int  # message tokens cut from the front to fit the context
    room: int  # how many tokens the reply had room for
    cut: bool  # the reply stopped at that room, not at the end-of-turn marker


def _token(tokenizer, token_id):
    if token_id == tokenizer.unk_token_id:
        kind = "unknown"
    elif token_id in tokenizer.all_special_ids:
        kind = "special"
    else:
        kind = "word"
    text = tokenizer.decode([token_id])
    return Token(text.strip() or repr(text), token_id, kind)  # repr keeps a bare-whitespace token visible


@torch.no_grad()
def explain(model, tokenizer, message, streamer=None, **generate_kwargs):
    """Generate a reply to `message` (streamed to `streamer` if given) and return its Explanation."""
    prompt = prompt_for(model, tokenizer, message, generate_kwargs.pop("max_new_tokens", None))
    output = generate(model, prompt, streamer, output_scores=True, return_dict_in_generate=True, **generate_kwargs)
    sequence = output.sequences[0]  # (T,) prompt + completion
    prompt_length = prompt.input_ids.shape[1]

    steps = []
    for scores, token_id in zip(output.scores, sequence[prompt_length:].tolist()):
        probs = scores[0].float().softmax(-1)  # (vocab,); tokens the processors removed are exactly 0
        top = probs.topk(TOP_CANDIDATES)
        candidates = [(_token(tokenizer, i), p) for p, i in zip(top.values.tolist(), top.indices.tolist()) if p > 0]
        steps.append(Step(_token(tokenizer, token_id), probs[token_id].item(), candidates))

    attentions = model(sequence[None], output_attentions=True, use_cache=False).attentions  # layers x (1, nh, T, T)
    tokens = [_token(tokenizer, i) for i in sequence.tolist()]
    return Explanation(
        reply=tokenizer.decode(sequence[prompt_length:], skip_special_tokens=True),
        prompt=tokens[:prompt_length],
        completion=tokens[prompt_length:],
        steps=steps,
        attentions=torch.cat(attentions).float().cpu(),
        dropped=prompt.dropped,
        room=prompt.max_new_tokens,
        cut=tokenizer.eos_token_id not in sequence[prompt_length:].tolist(),
    )


def steps_table(explanation):
    """One line per generated token: step, chosen token, its probability, then the top candidates.

    Tokens never contain whitespace, so every line splits on it:
    `step chosen p (token p)*`, after one header line.
    """
    lines = ["step  chosen            p  top candidates"]
    for number, step in enumerate(explanation.steps, 1):
        candidates = "  ".join(f"{token.text} {p:.3f}" for token, p in step.candidates)
        lines.append(f"{number:>4}  {step.chosen.text:<12} {step.probability:.3f}  {candidates}")
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
