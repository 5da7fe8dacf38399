"""Time to quality: wall seconds of `guppylm train` from nothing until the held-out eval suite reaches the bar.

Method: step budgets, each a complete run. train() has no hook to score the model mid-run, and its cosine
schedule ends at max_steps, so a model taken from the middle of a long run is not what a shorter recipe gives.
Each point is therefore one separate run of the real command, from an empty cache:

    HF_HOME=<empty folder> guppylm train --preset P --max-steps S --output-dir <tmp>

wall time = building the default dataset, the tokenizer, training, saving the folder and the held-out evaluation,
Python start-up included. Time to quality = the wall seconds of the smallest budget whose greedy replies reach
--bar on-topic and --style-bar in style. The preset's own step count is the recipe; its run checks the target
(cpu: end to end <= 300 s on 2 cores; 9m: to the bar in <= 60 s on one H100). On a machine with CUDA, train()
uses the GPU and bf16 by itself.

  python bench/time_to_quality.py                             # cpu preset, 500/1000/2000/3000 steps, ~15 min on 2 idle cores
  python bench/time_to_quality.py --preset 9m --budgets 250 500 1000 2000 3000    # on a GPU
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import bench_parser, check, median, plot, report, setup
from guppylm.recipe import TRAIN_PRESETS

BUDGETS = {"cpu": [500, 1000, 2000, 3000], "9m": [250, 500, 1000, 2000, 3000], "tiny": [20, 40, 60]}
TARGETS = {"cpu": ("the cpu recipe end to end <= 300 s on 2 cores", 300), "9m": ("the 9m recipe to the quality bar in <= 60 s on one H100", 60)}


def run_recipe(preset, steps, threads, extra_args):
    """One `guppylm train` from an empty cache; its training summary with the outside wall seconds."""
    with tempfile.TemporaryDirectory(prefix="guppy-ttq-") as work:
        env = {**os.environ, "HF_HOME": str(Path(work, "hf")), "OMP_NUM_THREADS": str(threads)}
        output = Path(work, "model")
        command = [sys.executable, "-m", "guppylm.cli", "train", "--preset", preset, "--max-steps", str(steps),
                   "--output-dir", str(output), *extra_args]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        summary = json.loads((output / "training_summary.json").read_text())
    return dict(summary, wall_seconds=wall)


def main():
    parser = bench_parser(__doc__, repeats=1)
    parser.add_argument("--preset", default="cpu", choices=list(TRAIN_PRESETS))
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="step budgets (default: per preset; the recipe's own is always added)")
    parser.add_argument("--bar", type=float, default=0.9, help="on-topic rate that counts as reaching quality (the issue's bar: 90 %%)")
    parser.add_argument("--style-bar", type=float, default=1.0, help="in-style rate that counts as reaching quality (every reply)")
    parser.add_argument("--compile", action="store_true", help="pass --compile to guppylm train")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None, help="pass to guppylm train")
    args = parser.parse_args()
    recipe_steps = TRAIN_PRESETS[args.preset]["max_steps"]
    budgets = sorted(set(args.budgets or BUDGETS[args.preset]) | {recipe_steps})
    if args.quick:
        args.repeats, budgets = 1, args.budgets or [10, 30]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = setup(args, device)
    extra = (["--compile"] if args.compile else []) + (["--mixed-precision", args.mixed_precision] if args.mixed_precision else [])

    rows = []
    for steps in budgets:
        runs = [run_recipe(args.preset, steps, args.threads, extra) for _ in range(args.repeats)]
        first = runs[0]
        row = dict(
            steps=steps,
            recipe=steps == recipe_steps,
            parameters=first["parameters"],
            epochs=round(steps * first["effective_batch_size"] / first["train_samples"], 2),
            wall_seconds=round(median([r["wall_seconds"] for r in runs]), 1),
            train_seconds=round(median([r["train_seconds"] for r in runs]), 1),
            tokens_per_second=round(median([r["tokens_per_second"] for r in runs])),
            final_train_loss=first["final_train_loss"],
            final_eval_loss=first["final_eval_loss"],
            on_topic=median([r["eval"]["on_topic"] for r in runs]),
            in_style=median([r["eval"]["in_style"] for r in runs]),
            device=first["device"],
            precision=first["precision"],
            all_wall_seconds=[round(r["wall_seconds"], 1) for r in runs],
        )
        row["reached"] = row["on_topic"] >= args.bar and row["in_style"] >= args.style_bar
        rows.append(row)
        print({k: row[k] for k in ("steps", "wall_seconds", "train_seconds", "on_topic", "in_style", "reached")}, flush=True)

    reached = [r for r in rows if r["reached"]]
    time_to_quality = reached[0]["wall_seconds"] if reached else None
    checks = []
    if args.preset in TARGETS and not args.quick:
        target, limit = TARGETS[args.preset]
        recipe = next(r for r in rows if r["recipe"])
        seconds = recipe["wall_seconds"] if args.preset == "cpu" else time_to_quality
        checks.append(check(f"{target} (bar: on-topic >= {args.bar:.0%}, in style >= {args.style_bar:.0%})",
                            f"{seconds} s, recipe's on-topic {recipe['on_topic']:.1%}, in style {recipe['in_style']:.1%} on {recipe['device']}",
                            seconds is not None and seconds <= limit and recipe["reached"]))
    checks.append(check(f"time to quality ({args.preset})", f"{time_to_quality} s" if reached else "bar not reached at any budget", bool(reached)))

    columns = [("steps", "steps", ","), ("epochs", "epochs", ".2f"), ("wall_seconds", "wall s (end to end)", ".1f"),
               ("train_seconds", "training loop s", ".1f"), ("tokens_per_second", "tokens/s", ","), ("final_eval_loss", "held-out loss", ".3f"),
               ("on_topic", "on-topic", ".1%"), ("in_style", "in style", ".1%"), ("reached", "reached bar", "")]
    method = (
        f"Preset {args.preset} on {device} (mixed precision: {rows[0]['precision']}), one complete `guppylm train --max-steps S` per budget from an "
        f"empty HF_HOME (dataset build, tokenizer, training, save, held-out eval; Python start-up included), "
        f"{args.repeats} run(s) per budget, median wall. Each budget is its own recipe (the cosine schedule ends at S), not a "
        f"snapshot of a longer run. Bar: on-topic >= {args.bar:.0%} and in style >= {args.style_bar:.0%} of the persona's "
        "held-out prompts; time to quality = wall seconds of the smallest budget that reaches it."
    )
    name = f"time_to_quality_{args.preset}_{device}"
    report(args, name, env, rows, columns, method, checks, preset=args.preset, bar=args.bar, style_bar=args.style_bar,
           time_to_quality_seconds=time_to_quality)
    walls = [r["wall_seconds"] for r in rows]
    plot(args.output_dir / f"{name}.png", {"on-topic": (walls, [r["on_topic"] for r in rows]), "in style": (walls, [r["in_style"] for r in rows])},
         "wall seconds, end to end (one run per step budget)", "held-out rate",
         f"{args.preset} preset on {device}: quality against time ({', '.join(map(str, budgets))} steps)", env,
         hline=(args.bar, f"on-topic bar {args.bar:.0%}"))


if __name__ == "__main__":
    main()
