"""The quality bar: greedy replies to held-out prompts that appear nowhere in the training data.

A reply is on-topic when it contains a word the persona pack lists for the prompt's topic, and in style
when the model chose to stop (<|im_end|>) and the reply keeps the pack's own style rules (for Guppy: lowercase,
at most its max words and sentences; every pack: starting with a letter or digit, ending in . ! or ?), never
longer than 40 words. Scores are given overall and per kind of prompt ("paraphrase", "opener", "long", ...), with
two failure rates: replies that repeat themselves, and replies of a word or two to a long message.
"""

from pathlib import Path

import torch

from dataset_builder.persona import WORD, repeats

MAX_WORDS = 40  # the bar's ceiling; a pack may ask for fewer
LONG_MESSAGE, SHORT_REPLY = 20, 3  # a reply under 3 words to a message over 20 words did not answer it


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts, max_new_tokens=48, batch_size=32, sample=False):
    """(reply text, stopped at <|im_end|>) per prompt, batched with left padding.

    Each prompt is cut as chat cuts it (`prompt_for`: from the left, keeping the generation prompt); a batch
    generates as far as its tightest row has room, which is at least `max_new_tokens` up to half the context.
    `sample=True` draws the replies with the model's generation_config (as chat does; seed torch first)."""
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
            max_new_tokens=min(p.max_new_tokens for p in encoded),
            **({} if sample else dict(do_sample=False, temperature=None, top_k=None, top_p=None)),
        )
        for row in output[:, width:].tolist():
            stopped = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            results.append((tokenizer.decode(row, skip_special_tokens=True), stopped))
    return results


def evaluate_model(model, tokenizer, persona="guppy", max_new_tokens=48, split="eval"):
    """Score a model on its persona pack's held-out prompts of `split` ("eval": the test split; "dev": the one to
    tune against; "natural": the blind test of what people type first). Returns {"scores": {...}, "cases": [...]}."""
    from dataset_builder import load_persona

    pack = load_persona(persona)
    cases = pack.eval_cases(split)
    if not cases:
        raise ValueError(f"persona {pack.name!r} has no {split!r} prompts")
    replies = greedy_replies(model, tokenizer, [case.prompt for case in cases], max_new_tokens)
    return score_replies(pack, split, cases, replies)


def score_replies(pack, split, cases, replies):
    """{"scores": {...}, "cases": [...]} for the (reply text, stopped at <|im_end|>) to each Case of `split`."""
    rows = []
    for case, (reply, stopped) in zip(cases, replies):
        words = WORD.findall(reply)
        long_message = len(WORD.findall(case.prompt.lower())) > LONG_MESSAGE
        rows.append(
            dict(
                prompt=case.prompt,
                topic=case.topic,
                kind=case.kind,
                reply=reply,
                on_topic=bool(case.words & set(words)),
                in_style=stopped and len(words) <= MAX_WORDS and pack.style_problem(reply) is None,
                repeats=repeats(reply),
                long_message=long_message,
                short_to_long=long_message and len(words) < SHORT_REPLY,
            )
        )
    scores = dict(
        persona=pack.name,
        split=split,
        **rates(rows),
        topics=len({r["topic"] for r in rows}),
        kinds={kind: rates([r for r in rows if r["kind"] == kind]) for kind in dict.fromkeys(r["kind"] for r in rows)},
        repeating=sum(r["repeats"] for r in rows) / len(rows),
        long_messages=sum(r["long_message"] for r in rows),
        short_replies_to_long=sum(r["short_to_long"] for r in rows),
    )
    return {"scores": scores, "cases": rows}


def rates(rows):
    n = len(rows)
    return dict(prompts=n, on_topic=sum(r["on_topic"] for r in rows) / n, in_style=sum(r["in_style"] for r in rows) / n)


def format_report(results):
    """Per-prompt lines, then the scores (per kind when there are several): what `guppylm eval` prints."""
    lines = []
    for r in results["cases"]:
        mark = ("on " if r["on_topic"] else "OFF") + (" " if r["in_style"] else "!") + ("R" if r["repeats"] else " ")
        lines.append(f"[{mark}] {r['topic']:<16.16} {r['kind']:<12.12} {r['prompt']!r} -> {r['reply']!r}")
    s = results["scores"]
    if len(s["kinds"]) > 1:
        lines.append(f"{'kind':<12} {'prompts':>7} {'on-topic':>8} {'in style':>8}")
        lines += [f"{kind:<12} {k['prompts']:>7} {k['on_topic']:>8.1%} {k['in_style']:>8.1%}" for kind, k in s["kinds"].items()]
    lines.append(
        f"persona {s['persona']}: {s['prompts']} held-out {s['split']} prompts over {s['topics']} topics | "
        f"on-topic {s['on_topic']:.1%} | in style {s['in_style']:.1%}"
    )
    lines.append(
        f"replies repeating a sentence or a 3-word phrase: {s['repeating']:.1%} | replies under {SHORT_REPLY} words "
        f"to the {s['long_messages']} messages over {LONG_MESSAGE} words: {s['short_replies_to_long']}"
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
