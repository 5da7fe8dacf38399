"""Inference speed of a trained Guppy on CPU: ms per generated token and reply latency at batch 1, replies/s in batches.

Batch 1, greedy, over the persona's held-out prompts:
  generate, KV cache          model.generate as chat, eval and the Space call it
  generate, use_cache=False   every step re-reads the whole sequence: the reference implementation's approach
  ONNX Runtime fp32 / int8    guppylm.export.OnnxGuppy: prefill, then one token per step through the cache
                              (1 ORT thread, as the export ships it); the export is verified against PyTorch first
ms/token and the 48-token reply: every reply forced to exactly --new-tokens tokens (EOS ignored), so every backend
does the same work; prefill included. Natural reply: the greedy reply as chat gives it, stopping at <|im_end|>.
Batch 16 / 64: replies/s of evaluate.greedy_replies (model.generate, left padding, stops when every reply has).

  guppylm train --output-dir runs/guppy               # the model to measure (the cpu recipe, ~5 min)
  python bench/inference.py --model runs/guppy        # ~5 min on 2 idle cores
"""

import copy
import math
import tempfile
import time
from pathlib import Path

import torch

from common import bench_parser, check, median, peak_rss_mb, report, reset_peak_rss, setup
from guppylm.inference import generation_kwargs, load_model, prompt_for
from guppylm.evaluate import greedy_replies


def pytorch_backend(model, use_cache):
    def run(prompt_ids, new_tokens, forced):
        kwargs = generation_kwargs(greedy=True, max_new_tokens=new_tokens)
        if forced:
            kwargs["min_new_tokens"] = new_tokens  # EOS suppressed until the reply is this long
        output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), use_cache=use_cache, **kwargs)
        return output.shape[1] - prompt_ids.shape[1]

    return run


def onnx_backend(model, path):
    from guppylm.export import OnnxGuppy

    runner = OnnxGuppy(path, model.config)
    no_eos = copy.deepcopy(model.generation_config)
    no_eos.eos_token_id = None  # the reply runs to its length, as min_new_tokens makes PyTorch's

    def run(prompt_ids, new_tokens, forced):
        reply, _ = runner.greedy(prompt_ids[0].tolist(), new_tokens, no_eos if forced else model.generation_config)
        return len(reply)

    return run


def onnx_files(args):
    """{label: path} of the ONNX graphs to time: --onnx-dir's, or a fresh verified export; {} and a reason if none."""
    from guppylm import export

    folder = args.onnx_dir
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="guppy-onnx-"))
        try:
            print(export.describe(export.export_onnx(args.model, folder, quantize_int8=True)))
        except (ImportError, RuntimeError) as error:
            return {}, f"ONNX rows skipped: {error}"
    files = {"ONNX Runtime fp32": folder / export.FP32_FILE, "ONNX Runtime int8": folder / export.INT8_FILE}
    return {k: p for k, p in files.items() if p.exists()}, None


def time_batch_1(name, make_run, prompts, new_tokens, repeats):
    """One row: forced-length replies (ms/token, 48-token reply) and natural replies (latency, length)."""
    reset_peak_rss()
    run = make_run()
    for prompt_ids in prompts[:2]:  # warm-up: first-call allocations, thread pool, ORT's graph setup
        run(prompt_ids, new_tokens, forced=True)
    per_token, forced_ms, natural_ms, natural_tokens = [], [[] for _ in prompts], [[] for _ in prompts], []
    for _ in range(repeats):
        total_seconds = total_tokens = 0
        for i, prompt_ids in enumerate(prompts):
            start = time.perf_counter()
            total_tokens += run(prompt_ids, new_tokens, forced=True)
            seconds = time.perf_counter() - start
            total_seconds += seconds
            forced_ms[i].append(1000 * seconds)
            start = time.perf_counter()
            natural_tokens.append(run(prompt_ids, new_tokens, forced=False))
            natural_ms[i].append(1000 * (time.perf_counter() - start))
        per_token.append(1000 * total_seconds / total_tokens)
    row = dict(
        backend=name,
        batch_size=1,
        ms_per_token=round(median(per_token), 3),
        forced_reply_ms=round(median([median(t) for t in forced_ms]), 2),  # median prompt of its median repeat
        natural_reply_ms=round(median([median(t) for t in natural_ms]), 2),
        natural_reply_tokens=round(sum(natural_tokens) / len(natural_tokens), 1),
        peak_rss_mb=peak_rss_mb(),
    )
    print(row, flush=True)
    return row


def time_batches(model, tokenizer, prompts, batch_size, new_tokens, repeats):
    """Replies/s of greedy_replies at `batch_size`, over the prompts cycled to a whole number of batches."""
    prompts = (prompts * batch_size)[: math.ceil(len(prompts) / batch_size) * batch_size]
    reset_peak_rss()
    greedy_replies(model, tokenizer, prompts[:batch_size], new_tokens, batch_size)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        greedy_replies(model, tokenizer, prompts, new_tokens, batch_size)
        seconds.append(time.perf_counter() - start)
    row = dict(backend="generate, KV cache, left padding", batch_size=batch_size, prompts=len(prompts),
               replies_per_second=round(len(prompts) / median(seconds), 1), peak_rss_mb=peak_rss_mb())
    print(row, flush=True)
    return row


def main():
    parser = bench_parser(__doc__, repeats=3)
    parser.add_argument("--model", default="runs/guppy", help="a trained model folder (guppylm train --output-dir DIR)")
    parser.add_argument("--prompts", type=int, default=None, help="how many held-out prompts at batch 1 (default: all)")
    parser.add_argument("--new-tokens", type=int, default=48, help="reply length: forced at batch 1, the cap otherwise")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--onnx-dir", type=Path, default=None, help="an existing `guppylm export onnx --quantize` folder "
                        "(default: export and verify into a temporary folder)")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.prompts = 1, args.prompts or 4
    env = setup(args)
    from dataset_builder import load_persona

    model, tokenizer = load_model(args.model)  # a missing folder says how to train one
    texts = [case.prompt for case in load_persona(model.config.persona).eval_cases()][: args.prompts]
    prompts = [prompt_for(model, tokenizer, text, args.new_tokens).input_ids for text in texts]  # each (1, T_prompt)

    backends = {
        "generate, KV cache": lambda: pytorch_backend(model, use_cache=True),
        "generate, use_cache=False": lambda: pytorch_backend(model, use_cache=False),
    }
    onnx_note = "ONNX rows skipped (--no-onnx)."
    if not args.no_onnx:
        files, onnx_note = onnx_files(args)
        for label, path in files.items():
            backends[f"{label} (1 thread)"] = lambda path=path: onnx_backend(model, path)
    with torch.inference_mode():
        rows = [time_batch_1(name, make, prompts, args.new_tokens, args.repeats) for name, make in backends.items()]
        uncached = rows[1]["forced_reply_ms"]
        for row in rows:
            row["vs_use_cache_false"] = round(uncached / row["forced_reply_ms"], 2)
        rows += [time_batches(model, tokenizer, texts, b, args.new_tokens, args.repeats) for b in args.batch_sizes]

    kv = rows[0]
    checks = [
        check("KV-cache decoding >= 3x faster per reply than use_cache=False",
              f"{kv['vs_use_cache_false']:.2f}x ({kv['forced_reply_ms']:.1f} vs {uncached:.1f} ms per {args.new_tokens}-token reply)",
              kv["vs_use_cache_false"] >= 3),
        check("<= 5 ms per generated token at batch 1 on CPU (generate, KV cache)", f"{kv['ms_per_token']:.2f} ms", kv["ms_per_token"] <= 5),
    ]
    columns = [
        ("backend", "backend", ""), ("batch_size", "batch", "d"), ("ms_per_token", "ms/token", ".2f"),
        ("forced_reply_ms", f"{args.new_tokens}-token reply ms", ".1f"), ("vs_use_cache_false", "vs use_cache=False", ".2f"),
        ("natural_reply_ms", "natural reply ms", ".1f"), ("natural_reply_tokens", "natural reply tokens", ".1f"),
        ("replies_per_second", "replies/s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
    ]
    method = (
        f"Model {args.model} ({model.num_parameters():,} parameters), CPU, greedy. Batch 1: {len(prompts)} held-out prompts x "
        f"{env['repeats']} repeats after 2 warm-up replies; ms/token = total time / tokens over replies forced to "
        f"{args.new_tokens} tokens (prefill included), median repeat; reply times = median over prompts of each prompt's median "
        f"repeat. Natural replies stop at <|im_end|> (at most {args.new_tokens} tokens). Batches: greedy_replies over the prompts "
        f"cycled to whole batches, median of {env['repeats']}. PyTorch uses {env['threads']} threads; ONNX Runtime 1. "
        f"Peak RSS: the whole process, reset before each row. {onnx_note or ''}"
    )
    report(args, "inference_cpu", env, rows, columns, method, checks, model=str(args.model), parameters=model.num_parameters())


if __name__ == "__main__":
    main()
