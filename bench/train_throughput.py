"""Training throughput per preset: our training step against a plain padded, fp32, eager-attention baseline, in the same run.

ours      train.py's data path (data.py: Conversations -> LengthGroupedBatches -> collate: similar lengths batched, right
          padding to the batch's longest sample, no attention mask), SDPA attention, and its step (AdamW 0.9/0.95,
          weight decay 0.1, clip 1.0, loss.item() every step); Accelerate's thin wrapper and the LR schedule left out.
baseline  the reference implementation's approach, same architecture, same samples, same batch size: shuffled
          fixed batches, every sample right-padded to the full context with an attention mask, eager attention, fp32.
Tokens are real (non-pad) tokens. Each row: warm-up steps, then REPEATS windows of timed steps; the table gives
the median window. "vs baseline" is the row's tokens/s over the baseline's, both measured in this run.
With --device cuda: also bf16 autocast and torch.compile, and MFU = achieved FLOP/s / --peak-tflops.

  python bench/train_throughput.py                     # CPU, presets tiny cpu 9m, ~10 min on 2 idle cores
  python bench/train_throughput.py --device cuda --peak-tflops 989   # H100 SXM dense bf16 peak
"""

import gc
import itertools
import time
from functools import partial

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from common import bench_parser, median, peak_rss_mb, report, reset_peak_rss, setup, sync
from guppylm.configuration_guppylm import PRESETS, GuppyConfig
from guppylm.modeling_guppylm import GuppyForCausalLM
from guppylm.data import Conversations, LengthGroupedBatches, collate, load_conversations
from guppylm.tokenizer import chat_tokenizer
from guppylm.recipe import MIN_USER_WORD_COUNT, REPLY_START_WEIGHT, TRAIN_PRESETS, UNK_RATE
from guppylm.train import weighted_lm_loss
from search_cpu_recipe import training_flops

WINDOW = {"tiny": 50, "cpu": 20, "9m": 10}  # timed steps per repeat: ~1-10 s each on 2 idle CPU cores; x10 on a GPU
WARMUP = 5  # untimed steps first: allocator, thread pool and caches settle
COMPILE_WARMUP = 30  # torch.compile compiles on the first shapes and again once it sees lengths vary


def collate_full_context(samples, pad_id, context):
    """The baseline's batch: collate's right padding continued to the full context, plus the attention mask."""
    batch = collate(samples, pad_id)
    extra = context - batch["input_ids"].shape[1]
    input_ids = F.pad(batch["input_ids"], (0, extra), value=pad_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": F.pad(batch["labels"], (0, extra), value=-100)}


def variants(device, all_variants=False):
    rows = [dict(variant="ours fp32", precision="fp32", compile=False)]
    if device.type == "cuda" or all_variants:
        rows += [
            dict(variant="ours bf16", precision="bf16", compile=False),
            dict(variant="ours fp32 + compile", precision="fp32", compile=True),
            dict(variant="ours bf16 + compile", precision="bf16", compile=True),
        ]
    return rows + [dict(variant="baseline: padded to context, eager, fp32", precision="fp32", compile=False, baseline=True)]


def measure(preset, variant, samples, tokenizer, device, window, warmup, repeats, seed=42):
    """Steps/s and tokens/s of one (preset, variant): the median of `repeats` windows of `window` steps."""
    hp, baseline = TRAIN_PRESETS[preset], variant.get("baseline", False)
    config = GuppyConfig.from_preset(
        preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation="eager" if baseline else "sdpa",
    )
    pad, context = tokenizer.pad_token_id, config.max_position_embeddings
    if baseline:
        loader = DataLoader(samples, batch_size=hp["batch_size"], shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed),
                            collate_fn=partial(collate_full_context, pad_id=pad, context=context))
    else:
        lengths = [len(s) for s in samples.samples]
        loader = DataLoader(samples, batch_sampler=LengthGroupedBatches(lengths, hp["batch_size"], seed),
                            collate_fn=partial(collate, pad_id=pad, reply_start_weight=REPLY_START_WEIGHT))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch, never exhausted

    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model = GuppyForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=hp["learning_rate"], betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    forward = torch.compile(model) if variant["compile"] else model

    def step():
        """One optimizer step; returns (real tokens, token positions computed)."""
        batch = next(batches)
        tokens, positions = int((batch["labels"] != -100).sum()), batch["input_ids"].numel()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant["precision"] == "bf16"):
            if baseline:
                loss = forward(**batch).loss
            else:  # train.py's loss: weighted, the reply's first token counting more
                loss = weighted_lm_loss(forward(input_ids=batch["input_ids"]).logits, batch["labels"], batch["loss_weights"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # train.py logs every step's loss; on a GPU this waits for the step
        return tokens, positions

    for _ in range(COMPILE_WARMUP if variant["compile"] else warmup):
        step()
    seconds, tokens, positions = [], [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        counts = [step() for _ in range(window)]
        sync(device)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(c[0] for c in counts))
        positions.append(sum(c[1] for c in counts))
    n_params = model.num_parameters()
    mean_length = sum(map(len, samples.samples)) / len(samples)
    tokens_per_second = median([t / s for t, s in zip(tokens, seconds)])
    row = dict(
        preset=preset,
        **{k: v for k, v in variant.items() if k != "baseline"},
        attention=config._attn_implementation,
        parameters=n_params,
        batch_size=hp["batch_size"],
        steps_per_second=round(median([window / s for s in seconds]), 3),
        tokens_per_second=round(tokens_per_second),
        padding=round(1 - sum(tokens) / sum(positions), 3),  # fraction of computed positions that were padding
        # useful work only: real tokens, attention over the mean real length; padding earns nothing
        gflops_per_second=round(training_flops(n_params, config.hidden_size, config.num_hidden_layers, tokens_per_second, mean_length) / 1e9, 1),
        peak_rss_mb=peak_rss_mb(),
        gpu_peak_mb=round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        window_steps=window,
        window_seconds=[round(s, 3) for s in seconds],
    )
    del model, optimizer, forward
    gc.collect()
    return row


def main():
    parser = bench_parser(__doc__)
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=["tiny", "cpu", "9m"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--all-variants", action="store_true", help="bf16 and torch.compile on CPU too (always on with cuda)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense TFLOP/s for MFU (H100 SXM bf16: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU here: the GPU section (bf16 vs fp32, torch.compile on/off, MFU) is skipped. Run it on a machine with CUDA.")
        return
    if args.quick:
        args.repeats = 2
    env = setup(args, device)

    # the real default dataset, as `guppylm train` loads it; --quick builds a small one in memory
    if args.quick:
        from dataset_builder import build_dataset

        split = build_dataset("guppy", num_samples=3000, test_size=100)["train"]
    else:
        split = load_conversations()["train"]
    tokenizer = chat_tokenizer(split, min_user_word_count=MIN_USER_WORD_COUNT)  # as `guppylm train` builds it
    windows = {p: 2 if args.quick else WINDOW[p] * (10 if device.type == "cuda" else 1) for p in args.presets}
    warmup = 1 if args.quick else WARMUP
    encoded = {}  # max length -> Conversations, shared by the presets with the same context
    rows = []
    for preset in args.presets:
        context = PRESETS[preset]["max_position_embeddings"]
        if context not in encoded:
            encoded[context] = Conversations(split["messages"], tokenizer, context, unk_rate=UNK_RATE, seed=42)
        preset_rows = [measure(preset, v, encoded[context], tokenizer, device, windows[preset], warmup, args.repeats) for v in variants(device, args.all_variants)]
        baseline = preset_rows[-1]["tokens_per_second"]
        for row in preset_rows:
            row["vs_baseline"] = round(row["tokens_per_second"] / baseline, 2)
            if args.peak_tflops:
                row["mfu"] = round(row["gflops_per_second"] / (args.peak_tflops * 1e3), 4)
            print({k: row[k] for k in ("preset", "variant", "steps_per_second", "tokens_per_second", "vs_baseline")}, flush=True)
        rows += preset_rows

    columns = [
        ("preset", "preset", ""), ("parameters", "params", ","), ("variant", "variant", ""), ("batch_size", "batch", "d"),
        ("steps_per_second", "steps/s", ".2f"), ("tokens_per_second", "tokens/s", ","), ("vs_baseline", "vs baseline", ".2f"),
        ("padding", "padding", ".0%"), ("gflops_per_second", "GFLOP/s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
    ]
    if device.type == "cuda":
        columns += [("gpu_peak_mb", "GPU peak MB", "d"), ("mfu", "MFU", ".1%")]
    method = (
        f"Training throughput on {device}. Each row: {warmup} warm-up steps ({COMPILE_WARMUP} with torch.compile), then "
        f"{env['repeats']} windows of {', '.join(f'{windows[p]} steps ({p})' for p in args.presets)}; median window. "
        "Tokens are real (non-pad) tokens. ours = train.py's data path and step (length-grouped batches padded to their "
        "longest sample, SDPA); baseline = every sample padded to the full context with an attention mask, eager attention, "
        "fp32, shuffled fixed batches; same model, samples and batch size. GFLOP/s counts useful work: 6 x params + "
        "12 x layers x hidden x mean length per real token. Peak RSS is the whole process's, data and libraries included."
    )
    report(args, f"train_throughput_{device.type}", env, rows, columns, method)


if __name__ == "__main__":
    main()
