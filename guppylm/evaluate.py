"""The quality bar: greedy replies to held-out prompts that appear nowhere in the training data.

A reply is on-topic when it contains a word the persona pack lists for the prompt's topic, and in style
when the model chose to stop (<|im_end|>) and the reply keeps the pack's own style rules (for Guppy: lowercase,
at most its max words and sentences, ending in . ! or ?), never longer than 40 words.
"""

import re
from pathlib import Path

import torch

WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
MAX_WORDS = 40  # the bar's ceiling; a pack may ask for fewer


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts, max_new_tokens=48, batch_size=32):
    """(reply text, stopped at <|im_end|>) per prompt, batched with left padding.

    Each prompt is cut as chat cuts it (`prompt_for`: from the left, keeping the generation prompt); a batch
    generates as far as its tightest row has room, which is at least `max_new_tokens` up to half the context."""
    from guppylm.inference import prompt_for

    results = []
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_for(model, tokenizer, text, max_new_tokens) for text in prompts[start : start + batch_size]]
        width = max(p.input_ids.shape[1] for p in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(encoded):
            input_ids[row, width - p.input_ids.shape[1] :] = p.input_ids[0]
            attention_mask[row, width - p.input_ids.shape[1] :] = 1
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
            max_new_tokens=min(p.max_new_tokens for p in encoded), do_sample=False, temperature=None, top_k=None, top_p=None,
        )
        for row in output[:, width:].tolist():
            stopped = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            results.append((tokenizer.decode(row, skip_special_tokens=True), stopped))
    return results


def evaluate_model(model, tokenizer, persona="guppy", max_new_tokens=48, split="eval"):
    """Score a model on its persona pack's held-out prompts of `split` ("eval": the test split; "dev": the one to
    tune against). Returns {"scores": {...}, "cases": [...]}."""
    from dataset_builder import load_persona

    pack = load_persona(persona)
    cases = pack.eval_cases(split)
    if not cases:
        raise ValueError(f"persona {pack.name!r} has no {split!r} prompts")
    replies = greedy_replies(model, tokenizer, [prompt for prompt, _, _ in cases], max_new_tokens)
    rows = []
    for (prompt, topic, topic_words), (reply, stopped) in zip(cases, replies):
        words = WORD.findall(reply)
        rows.append(
            dict(
                prompt=prompt,
                topic=topic,
                reply=reply,
                on_topic=bool(topic_words & set(words)),
                in_style=stopped and len(words) <= MAX_WORDS and pack.style_problem(reply) is None,
            )
        )
    n = len(rows)
    scores = dict(
        persona=pack.name,
        split=split,
        prompts=n,
        on_topic=sum(r["on_topic"] for r in rows) / n,
        in_style=sum(r["in_style"] for r in rows) / n,
        topics=len({r["topic"] for r in rows}),
    )
    return {"scores": scores, "cases": rows}


def format_report(results):
    """Per-prompt lines, then the scores: what `guppylm eval` prints."""
    lines = []
    for r in results["cases"]:
        mark = ("on " if r["on_topic"] else "OFF") + (" " if r["in_style"] else "!")
        lines.append(f"[{mark}] {r['topic']:<22.22} {r['prompt']!r} -> {r['reply']!r}")
    s = results["scores"]
    lines.append(
        f"persona {s['persona']}: {s['prompts']} held-out {s['split']} prompts over {s['topics']} topics | "
        f"on-topic {s['on_topic']:.1%} | in style {s['in_style']:.1%}"
    )
    return "\n".join(lines)


def model_persona(model_name, config):
    """The persona a model was trained on: the pack file in its folder (persona.yaml, for a pack that is not
    shipped, so it works from any directory), else the shipped pack its config names."""
    from guppylm.folders import is_local, local_model

    folder = local_model(model_name)
    pack_file = Path(folder, "persona.yaml")
    return pack_file if is_local(folder) and pack_file.is_file() else getattr(config, "persona", "guppy")


def run_eval(model_name=None, persona=None, max_new_tokens=48, split="eval"):
    """`guppylm eval`: load, score, print; returns the results."""
    from guppylm.inference import load_model

    model, tokenizer = load_model(model_name)
    results = evaluate_model(model, tokenizer, persona or model_persona(model_name, model.config), max_new_tokens, split)
    print(format_report(results))
    return results
