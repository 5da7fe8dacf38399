"""Shared by the bench/ scripts: describe the machine, take medians, read peak memory, print and save results.

Every script prints a header line (device, threads, versions, repeats, statistic) above a markdown table, writes
the same rows and header to bench/results/NAME.json, and puts the header under every figure it draws.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "guppylm-bench-quick"  # smoke runs never overwrite real results


def bench_parser(doc, repeats=5):
    """The arguments every script takes; `doc` is the script's docstring (first line = description)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], epilog="\n".join(doc.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smoke run in seconds; results go to {QUICK_RESULTS}")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2: the CPU target)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats; tables report the median")
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default {RESULTS} ({QUICK_RESULTS} with --quick)")
    return parser


def setup(args, device="cpu"):
    """Fix the thread count and return the description of the machine that goes into every output."""
    torch.set_num_threads(args.threads)
    args.output_dir = args.output_dir or (QUICK_RESULTS if args.quick else RESULTS)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return describe_machine(device, args)


def describe_machine(device, args):
    import transformers

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    env = dict(
        device=str(device),
        cpu=cpu,
        logical_cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        repeats=args.repeats,
        statistic="median",
        quick=args.quick,
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # > 0.5 before a run: not idle
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def header(env, repeats=None, statistic=None):
    """One line saying how every number below it was measured."""
    where = f"{env['gpu']} (+ {env['cpu']})" if "gpu" in env else f"CPU {env['cpu']}, {env['logical_cores']} logical cores"
    return (
        f"{where} | {env['threads']} torch threads | torch {env['torch']}, transformers {env['transformers']} | "
        f"{repeats or env['repeats']} repeats, {statistic or env['statistic']}"
        + (f" | load avg at start {env['load_average']:.2f}" if env.get("load_average") is not None else "")
        + (" | QUICK smoke run: not a measurement" if env["quick"] else "")
    )


# --- measuring ---------------------------------------------------------------------------------------


def median(values):
    return statistics.median(values)


def sync(device):
    """Wait for queued GPU work, so a timer around it measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss():
    """Restart the process's resident-memory high-water mark, so the next peak_rss_mb() covers what follows.

    Freed memory goes back to the system first (glibc keeps freed heap otherwise, and an earlier, larger run
    would count against a later one); then writing 5 to clear_refs resets the mark (Linux). Elsewhere the peak
    stays the process's lifetime peak.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb():
    """Peak resident memory of this process in MB (the whole process: libraries and loaded data included)."""
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        kb = kb // 1024 if platform.system() == "Darwin" else kb
    return round(kb / 1024, 1)


# --- outputs -----------------------------------------------------------------------------------------


def markdown_table(rows, columns):
    """columns: (key, title, format spec); a missing or None value prints as an em dash."""
    cell = lambda row, key, spec: "—" if row.get(key) is None else format(row[key], spec)
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, key, spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(args, name, env, rows, columns, method, checks=(), **extra):
    """Print the header, method, table and target checks; save all of it to OUTPUT_DIR/NAME.json."""
    print(f"\n### {name}\n\n{header(env)}\n\n{method}\n\n{markdown_table(rows, columns)}\n")
    for check in checks:
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[check["passed"]]
        print(f"- **{verdict}** {check['target']}: {check['measured']}")
    path = args.output_dir / f"{name}.json"
    path.write_text(json.dumps(dict(env=env, method=method, rows=rows, checks=list(checks), **extra), indent=2, default=str) + "\n")
    print(f"\nsaved {path}")
    return path


def check(target, measured, passed):
    """A target from the issue, what was measured, and whether it holds (None: not measured here)."""
    return dict(target=target, measured=measured, passed=passed)


def plot(path, series, xlabel, ylabel, title, env, logx=False, logy=False, hline=None):
    """Line plot of {label: (xs, ys)}, with the measurement conditions as the caption."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing, no plot: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", label=hline[1])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, header(env), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
