"""Replies that repeat themselves: does a generation setting fix them, or the data? Measured on a trained model.

A reply repeats when it says a sentence twice or a 3-word phrase twice within its sentences
(dataset_builder.persona.repeats, the rule `guppylm eval` reports and the dataset builder enforces on its replies).
For each setting below, put into the model's generation_config as generation_config.json would carry it, the
pack's held-out prompts of --split are answered greedily (as `guppylm eval` does) and --samples times each by
sampling with the model's own settings (as chat does, seeded); the table gives the share of repeating replies,
on-topic and in-style rates for both. transformers applies both settings to the prompt too: no_repeat_ngram_size
bans any 3-gram of the message, <|im_end|> included, and repetition_penalty lowers every token the message used.

  python bench/repetition.py --model runs/guppy [--split dev] [--samples 3]
"""

import torch

from common import bench_parser, report, setup
from dataset_builder import load_persona
from guppylm.evaluate import greedy_replies, score_replies
from guppylm.inference import load_model

SETTINGS = {
    "none": {},
    "no_repeat_ngram_size 3": dict(no_repeat_ngram_size=3),
    "no_repeat_ngram_size 4": dict(no_repeat_ngram_size=4),
    "repetition_penalty 1.1": dict(repetition_penalty=1.1),
    "repetition_penalty 1.3": dict(repetition_penalty=1.3),
}


def measure(model, tokenizer, pack, split, samples, seed):
    """Scores of greedy replies, and of `samples` sampled replies per prompt, under the model's generation_config."""
    cases = pack.eval_cases(split)
    prompts = [case.prompt for case in cases]
    greedy = score_replies(pack, split, cases, greedy_replies(model, tokenizer, prompts))["scores"]
    torch.manual_seed(seed)
    drawn = greedy_replies(model, tokenizer, prompts * samples, sample=True)
    sampled = score_replies(pack, split, cases * samples, drawn)["scores"]
    return greedy, sampled


def main():
    parser = bench_parser(__doc__, repeats=1)
    parser.add_argument("--model", default="runs/guppy")
    parser.add_argument("--split", default="dev", choices=("eval", "dev"))
    parser.add_argument("--samples", type=int, default=3, help="sampled replies per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = setup(args)
    model, tokenizer = load_model(args.model)
    pack = load_persona(model.config.persona)
    if args.quick:
        args.samples, pack.split_cases = 1, {}  # the topics' own prompts only
    # the settings are measured from none: a model saved with one of them in its generation_config starts without it
    base = {**model.generation_config.to_dict(), "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}
    rows = []
    for name, setting in SETTINGS.items():
        model.generation_config.update(**{**base, **setting})
        greedy, sampled = measure(model, tokenizer, pack, args.split, args.samples, args.seed)
        rows.append(dict(setting=name, prompts=greedy["prompts"],
                         greedy_repeating=greedy["repeating"], greedy_on_topic=greedy["on_topic"], greedy_in_style=greedy["in_style"],
                         sampled_repeating=sampled["repeating"], sampled_on_topic=sampled["on_topic"], sampled_in_style=sampled["in_style"]))
        print(rows[-1], flush=True)
    columns = [("setting", "generation_config", ""), ("prompts", "prompts", "d"),
               ("greedy_repeating", "greedy: repeating", ".1%"), ("greedy_on_topic", "on-topic", ".1%"), ("greedy_in_style", "in style", ".1%"),
               ("sampled_repeating", f"sampled ×{args.samples}: repeating", ".1%"), ("sampled_on_topic", "on-topic", ".1%"),
               ("sampled_in_style", "in style", ".1%")]
    method = (f"Model {args.model}; the {pack.name} pack's {args.split} prompts, answered greedily and {args.samples}× sampled "
              f"(temperature {base.get('temperature')}, top-k {base.get('top_k')}, top-p {base.get('top_p')}, seed {args.seed}) "
              "under each generation_config setting.")
    report(args, "repetition", env, rows, columns, method)


if __name__ == "__main__":
    main()
