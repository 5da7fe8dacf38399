"""Training time against dataset size, model size and process count, all through guppylm.train.train.

data       the cpu preset for a fixed number of epochs (--epochs, default 1) over datasets of 15K/30K/60K/120K
           conversations from dataset_builder (seed 42, 5% held out): the steps grow with the data.
model      tiny / cpu / 9m, each with its own batch size and learning rate, a fixed number of steps (--model-steps)
           on the default dataset.
processes  the cpu preset for --process-steps steps under `accelerate launch`: 1 process x 2 threads at batch 32
           against 2 gloo-connected processes x 1 thread at batch 16 each: same effective batch and steps, equal work.
Every run is one training run (no repeats: each takes minutes); the evaluation suite is off (--no-eval).

  python bench/scaling.py                        # ~15 min on 2 idle cores
  python bench/scaling.py --only processes
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bench_parser, peak_rss_mb, plot, report, reset_peak_rss, setup
from guppylm.recipe import TRAIN_PRESETS
from guppylm.train import train

NEVER = 10**9  # eval_every / checkpoint_every: no periodic held-out loss or checkpoints inside the timed loop


def run_train(output_dir, **options):
    """One in-process training run: its summary plus wall time and peak RSS."""
    reset_peak_rss()
    start = time.perf_counter()
    summary = train(output_dir=str(output_dir), run_eval=False, eval_every=NEVER, checkpoint_every=NEVER, **options)
    wall = time.perf_counter() - start
    return dict(
        preset=summary["preset"],
        parameters=summary["parameters"],
        train_samples=summary["train_samples"],
        batch_size=summary["effective_batch_size"],
        steps=summary["steps"],
        epochs=round(summary["steps"] * summary["effective_batch_size"] / summary["train_samples"], 2),
        tokens=summary["tokens"],
        wall_seconds=round(wall, 1),
        train_seconds=summary["train_seconds"],
        tokens_per_second=summary["tokens_per_second"],
        steps_per_second=round(summary["steps"] / summary["train_seconds"], 2),
        peak_rss_mb=peak_rss_mb(),
    )


def data_scaling(args, env, work):
    from dataset_builder import build_dataset, save_dataset

    batch = TRAIN_PRESETS["cpu"]["batch_size"]
    rows = []
    for n in args.sizes:
        folder = work / f"data-{n}"
        start = time.perf_counter()
        save_dataset(build_dataset("guppy", num_samples=n, test_size=n // 20, seed=42), "guppy", folder)
        build_seconds = time.perf_counter() - start
        steps = math.ceil(args.epochs * (n - n // 20) / batch)
        rows.append(dict(samples=n, build_seconds=round(build_seconds, 1), **run_train(work / f"run-{n}", preset="cpu", dataset=str(folder), max_steps=steps)))
        print(rows[-1], flush=True)
    columns = [("samples", "samples", ","), ("build_seconds", "build s", ".1f"), ("steps", "steps", ","), ("epochs", "epochs", ".2f"),
               ("tokens", "tokens", ","), ("train_seconds", "train s", ".1f"), ("wall_seconds", "train() wall s", ".1f"),
               ("tokens_per_second", "tokens/s", ","), ("peak_rss_mb", "peak RSS MB", ".0f")]
    method = (f"The cpu preset (batch {batch}, 1 process, {env['threads']} threads) for {args.epochs} epoch(s) of each dataset "
              "size; one run each. build s: dataset_builder build + save. train s: the training loop (final held-out loss "
              "included); train() wall adds loading, tokenizer, encoding and saving the model folder.")
    report(args, "scaling_data", env, rows, columns, method)
    plot(args.output_dir / "scaling_data.png", {"training loop": ([r["samples"] for r in rows], [r["train_seconds"] for r in rows]),
                                                "train() wall": ([r["samples"] for r in rows], [r["wall_seconds"] for r in rows])},
         "training conversations", "seconds", f"cpu preset, {args.epochs} epoch(s): time against dataset size", env, logx=True, logy=True)


def model_scaling(args, env, work):
    rows = []
    for preset in ("tiny", "cpu", "9m"):
        rows.append(run_train(work / f"model-{preset}", preset=preset, max_steps=args.model_steps))
        print(rows[-1], flush=True)
    columns = [("preset", "preset", ""), ("parameters", "params", ","), ("batch_size", "batch", "d"), ("steps", "steps", ","),
               ("train_seconds", "train s", ".1f"), ("steps_per_second", "steps/s", ".2f"), ("tokens_per_second", "tokens/s", ","),
               ("peak_rss_mb", "peak RSS MB", ".0f")]
    method = (f"Each preset with its own batch size and learning rate for {args.model_steps} steps on the default dataset, "
              f"1 process, {env['threads']} threads; one run each, warm-up steps included in train s.")
    report(args, "scaling_model", env, rows, columns, method)
    plot(args.output_dir / "scaling_model.png", {"tokens/s": ([r["parameters"] for r in rows], [r["tokens_per_second"] for r in rows])},
         "parameters", "training tokens/s", "Training throughput against model size (tiny, cpu, 9m)", env, logx=True, logy=True)


def launch(processes, steps, batch_size, threads, output_dir):
    """`accelerate launch` the cpu preset; returns the run's summary, wall seconds and the process count it logged."""
    command = [  # `accelerate launch`, run by this Python
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        *(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
        "-m", "guppylm.train", "--preset", "cpu", "--max-steps", str(steps), "--batch-size", str(batch_size),
        "--output-dir", str(output_dir), "--no-eval", "--eval-every", str(NEVER), "--checkpoint-every", str(NEVER),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    logged = re.search(r"processes (\d+)", result.stdout + result.stderr)
    logged = int(logged.group(1)) if logged else None
    if logged != processes:  # e.g. no gloo: each process trains alone, and the comparison would be meaningless
        raise RuntimeError(f"asked for {processes} processes, train.py logged {logged}:\n{result.stdout[-2000:]}")
    return json.loads(Path(output_dir, "training_summary.json").read_text()), wall, logged


def process_scaling(args, env, work):
    batch, cores = TRAIN_PRESETS["cpu"]["batch_size"], args.threads
    rows = []
    for processes in (1, 2):
        summary, wall, logged = launch(processes, args.process_steps, batch // processes, max(cores // processes, 1), work / f"procs-{processes}")
        rows.append(dict(processes=processes, logged_processes=logged, threads_per_process=max(cores // processes, 1),
                         batch_per_process=batch // processes, effective_batch=summary["effective_batch_size"], steps=summary["steps"],
                         tokens=summary["tokens"], wall_seconds=round(wall, 1), train_seconds=summary["train_seconds"],
                         tokens_per_second=summary["tokens_per_second"]))
        print(rows[-1], flush=True)
    for row in rows:
        row["speedup"] = round(rows[0]["train_seconds"] / row["train_seconds"], 2)
    columns = [("processes", "processes", "d"), ("logged_processes", "log says", "d"), ("threads_per_process", "threads each", "d"),
               ("batch_per_process", "batch each", "d"), ("effective_batch", "effective batch", "d"), ("steps", "steps", ","),
               ("train_seconds", "train s", ".1f"), ("wall_seconds", "launch wall s", ".1f"), ("tokens_per_second", "tokens/s", ","),
               ("speedup", "speedup (train s)", ".2f")]
    method = (f"`accelerate launch [--multi_gpu] --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no "
              f"--num_cpu_threads_per_process {cores}/N -m guppylm.train --preset cpu --max-steps {args.process_steps} "
              f"--batch-size 32/N --no-eval`: same effective batch and steps, so equal work; {cores} cores shared by the processes; "
              "one run each. launch wall includes starting Python, the dataset, tokenizer and encoding in every process.")
    report(args, "scaling_processes", env, rows, columns, method)


def main():
    parser = bench_parser(__doc__, repeats=1)
    parser.add_argument("--only", nargs="+", choices=["data", "model", "processes"], default=["data", "model", "processes"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15_000, 30_000, 60_000, 120_000])
    parser.add_argument("--epochs", type=float, default=1.0, help="data section: epochs per dataset size")
    parser.add_argument("--model-steps", type=int, default=200)
    parser.add_argument("--process-steps", type=int, default=1000)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.epochs, args.model_steps, args.process_steps = [1000, 2000], 1.0, 5, 10
    env = setup(args)
    with tempfile.TemporaryDirectory(prefix="guppy-scaling-") as work:
        for section in args.only:
            {"data": data_scaling, "model": model_scaling, "processes": process_scaling}[section](args, env, Path(work))


if __name__ == "__main__":
    main()
