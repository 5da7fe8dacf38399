"""Choose the `cpu` preset by measurement: train candidates end to end, score each on the pack's dev prompts.

Every candidate runs the real `guppylm.train.train` on the default dataset, single process, fp32, 2 threads,
and reports wall time, tokens/s, achieved GFLOP/s, losses and the on-topic / in-style rates on the `dev` split.
The search never looks at the `eval` split: that one is the test set, scored once for the chosen recipe.
Usage: python bench/search_cpu_recipe.py [--quick] [--only NAME ...]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from guppylm.inference import load_model
from guppylm.evaluate import evaluate_model
from guppylm.train import train

# name: (architecture overrides on the cpu preset, optimizer settings)
SMALL = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512)
MEDIUM = dict(num_hidden_layers=3, hidden_size=192, num_attention_heads=4, intermediate_size=768)
WIDE = dict(num_hidden_layers=2, hidden_size=192, num_attention_heads=4, intermediate_size=768)
CANDIDATES = {
    "2x128 b32 4000 (chosen)": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=4000)),
    "2x128 b32 4500": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=4500)),
    "2x128 b32 5000": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=5000)),
    "2x128 b32 5000 w1": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=5000, reply_start_weight=1.0)),
    "2x128 b32 5000 w10": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=5000, reply_start_weight=10.0)),
    "2x128 b32 5000 unk.15": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=5000, unk_rate=0.15)),
    "2x128 b32 5000 unk.35": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=5000, unk_rate=0.35)),
    "2x128 b32 3000": (SMALL, dict(learning_rate=3e-3, batch_size=32, max_steps=3000)),
    "2x128 b64 3000": (SMALL, dict(learning_rate=3e-3, batch_size=64, max_steps=3000)),
    "2x192 b32 4000": (WIDE, dict(learning_rate=2e-3, batch_size=32, max_steps=4000)),
    "3x192 b32 3000": (MEDIUM, dict(learning_rate=2e-3, batch_size=32, max_steps=3000)),
}


def training_flops(parameters, hidden_size, num_hidden_layers, tokens, mean_length):
    """Forward + backward ≈ 6 FLOPs per parameter per token, plus attention's 12·L·d·T_ctx per token."""
    return tokens * (6 * parameters + 12 * num_hidden_layers * hidden_size * mean_length)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    parser.add_argument("--output", default="bench/results/cpu_recipe_search.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, (architecture, optimizer) in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = train(output_dir=out, preset="cpu", config_overrides=architecture, eval_every=10**9, checkpoint_every=10**9,
                            run_eval=False, **optimizer)
            wall = time.perf_counter() - start
            scores = evaluate_model(*load_model(out), split="dev")["scores"]
        flops = training_flops(summary["parameters"], architecture["hidden_size"], architecture["num_hidden_layers"], summary["tokens"], 30)
        rows.append(dict(name=name, **architecture, **optimizer, parameters=summary["parameters"], wall_seconds=round(wall, 1),
                         train_seconds=summary["train_seconds"], tokens_per_second=summary["tokens_per_second"],
                         gflops_per_second=round(flops / summary["train_seconds"] / 1e9, 1),
                         epochs=round(summary["steps"] * summary["effective_batch_size"] / summary["train_samples"], 2),
                         train_loss=summary["final_train_loss"], eval_loss=summary["final_eval_loss"],
                         on_topic=scores["on_topic"], in_style=scores["in_style"]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'candidate':<26} {'params':>8} {'wall s':>7} {'tok/s':>8} {'GFLOP/s':>8} {'eval loss':>9} {'dev on-topic':>12} {'style':>6}")
    for r in rows:
        print(f"{r['name']:<26} {r['parameters']:>8,} {r['wall_seconds']:>7} {r['tokens_per_second']:>8,} {r['gflops_per_second']:>8} {r['eval_loss']:>9} {r['on_topic']:>12.1%} {r['in_style']:>6.1%}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(dict(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__, rows=rows), indent=2))


if __name__ == "__main__":
    main()
