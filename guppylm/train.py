"""Train Guppy from nothing: dataset -> tokenizer -> model -> a complete `save_pretrained` folder.

Runs as `guppylm train ...` or under Accelerate: `accelerate launch -m guppylm.train ...`.
Accelerate handles devices, mixed precision, gradient accumulation, data parallelism and checkpoints;
transformers gives the schedule; torch gives AdamW. What is left here is the loop itself.
"""

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_cosine_schedule_with_warmup

from guppylm import PRESETS, GuppyConfig, GuppyForCausalLM  # registered, so save_pretrained copies their code
from guppylm.errors import hub_errors
from guppylm.tokenizer import build_tokenizer, conversation_texts, reply_start_id, save_tokenizer

# Optimization settings per size preset (the architectures are in configuration_guppylm.PRESETS).
# "cpu" was chosen by bench/search_cpu_recipe.py: see the README for the measurements behind it.
TRAIN_PRESETS = {
    "9m": dict(batch_size=64, learning_rate=1e-3, max_steps=3000, warmup_steps=100),
    "cpu": dict(batch_size=32, learning_rate=3e-3, max_steps=5000, warmup_steps=30),
    "tiny": dict(batch_size=16, learning_rate=5e-3, max_steps=60, warmup_steps=5),
}
UNK_RATE = 0.25  # fraction of user tokens hidden as <unk> (Conversations)
REPLY_START_WEIGHT = 5.0  # loss weight of the reply's first token (weighted_lm_loss)
CHECKPOINTS = "checkpoints"
REQUIRED_COLUMNS = ("messages",)


# --- data --------------------------------------------------------------------------------------------


def load_conversations(dataset=None, persona="guppy", seed=42):
    """A DatasetDict with train/test splits: a local folder, a Hub repo id, or (None) the persona's default build."""
    from datasets import DatasetDict, load_dataset

    with hub_errors(str(dataset), "dataset"):
        data = load_dataset(str(dataset) if dataset is not None else str(default_dataset(persona, seed)))
    if not isinstance(data, DatasetDict) or "train" not in data:
        raise ValueError(f"dataset {dataset!r} has no 'train' split")
    for split in data.values():
        missing = [c for c in REQUIRED_COLUMNS if c not in split.column_names]
        if missing:
            raise ValueError(f"dataset {dataset!r} lacks the column {missing[0]!r} (found: {', '.join(split.column_names)})")
    return data


def default_dataset(persona, seed):
    """Folder of the persona's default dataset, built on first use and cached, keyed by the pack, the builder and the seed."""
    import dataset_builder
    from huggingface_hub.constants import HF_HOME

    pack = dataset_builder.load_persona(persona)
    recipe = hashlib.sha256(Path(pack.source).read_bytes() + str(seed).encode())
    for source in sorted(Path(dataset_builder.__file__).parent.glob("*.py")):
        recipe.update(source.read_bytes())
    folder = Path(HF_HOME, "guppylm", "datasets", f"{pack.name}-seed{seed}-{recipe.hexdigest()[:12]}")
    if not (folder / "README.md").exists():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        dataset_builder.save_dataset(dataset_builder.build_dataset(pack, seed=seed), pack, partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)  # a finished folder or none: never half a dataset
    return folder


class Conversations(Dataset):
    """Chat-templated conversations as token ids, with the user's words optionally hidden behind <unk>.

    Replacing a fraction of user tokens by <unk> teaches the model to answer around words it has never seen,
    which is what held-out prompts are full of (bench/FINDINGS: +6 points on-topic). The choice is a pure
    function of (seed, epoch, index), so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, split, tokenizer, max_length, unk_rate=0.0, seed=0):
        texts = tokenizer.apply_chat_template(list(split["messages"]), tokenize=False)
        self.samples = [ids[:max_length] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self.unk_id, self.im_end_id = tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.unk_rate, self.seed, self.epoch = unk_rate, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        ids = self.samples[index]
        if not self.unk_rate:
            return ids
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        user_end = ids.index(self.im_end_id)  # the template: <|im_start|> user WORDS... <|im_end|> ...
        return [self.unk_id if 2 <= i < user_end and rng.random() < self.unk_rate else t for i, t in enumerate(ids)]


class LengthGroupedBatches:
    """Batches of similar-length samples, so right padding wastes little and no packing crosses samples.

    Shuffle, sort by length within windows of 50 batches, cut, shuffle the batches: seeded per epoch.
    """

    def __init__(self, lengths, batch_size, seed, drop_last=True):
        self.lengths, self.batch_size, self.seed, self.drop_last, self.epoch = lengths, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * 50
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]

    def __len__(self):
        return len(self.lengths) // self.batch_size if self.drop_last else math.ceil(len(self.lengths) / self.batch_size)


def collate(samples, pad_id, reply_start_id=None, reply_start_weight=1.0):
    """Right-pad to the longest sample. Causal attention never looks right, so real tokens never see padding
    and no attention mask is needed; padding is excluded from the loss by label -100.

    `loss_weights` weighs each token as a prediction target: 1, 0 for padding, and `reply_start_weight` for the
    first token of the reply (the one after `reply_start_id`, the assistant role token): see `weighted_lm_loss`.
    """
    length = max(map(len, samples))
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    for row, ids in enumerate(samples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    labels = input_ids.masked_fill(input_ids == pad_id, -100)
    loss_weights = (labels != -100).float()
    if reply_start_id is not None:
        reply_start = torch.zeros_like(loss_weights, dtype=torch.bool)
        reply_start[:, 1:] = (input_ids[:, :-1] == reply_start_id) & (labels[:, 1:] != -100)
        loss_weights[reply_start] = reply_start_weight
    return {"input_ids": input_ids, "labels": labels, "loss_weights": loss_weights}


def weighted_lm_loss(logits, labels, loss_weights):
    """Next-token cross-entropy averaged with per-target weights; with all weights 1 it is the model's own loss.

    Guppy's first reply word names the topic ("food! ...", "glass? ..."), so greedy decoding commits to a topic
    there, and that one token in ~30 decides whether a reply is on-topic. Weighing it 5x measured +4.6 points
    on-topic on the dev prompts at the same cost (README, "The CPU recipe")."""
    vocab_size = logits.shape[-1]
    per_token = torch.nn.functional.cross_entropy(  # flat (tokens, vocab): 2x faster than (batch, vocab, length) on CPU
        logits[:, :-1].reshape(-1, vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    )
    weights = loss_weights[:, 1:].reshape(-1)
    return (per_token * weights).sum() / weights.sum()


# --- the run -----------------------------------------------------------------------------------------


def default_preset():
    return "9m" if torch.cuda.is_available() else "cpu"


def check_output_dir(output_dir):
    """Fail before any work if the output folder cannot be written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        try:
            probe.write_bytes(b"\0" * 1024 * 1024)  # 1 MiB: a full disk fails here, not after training
        finally:
            probe.unlink(missing_ok=True)  # a failed probe must not keep what it managed to write on a full disk
    except OSError as error:
        raise OSError(f"cannot write to output directory {output_dir!r}: {error.strerror or error}") from None


def latest_checkpoint(output_dir):
    """(step, path) of the newest complete checkpoint, or (0, None). Incomplete ones never carry the final name."""
    found = [(int(p.name.split("-")[1]), p) for p in Path(output_dir, CHECKPOINTS).glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(found) if found else (0, None)


def save_checkpoint(accelerator, output_dir, step, keep=2):
    """accelerator.save_state into a temporary folder, then an atomic rename: a crash mid-write leaves the last
    good checkpoint untouched."""
    root = Path(output_dir, CHECKPOINTS)
    final, partial = root / f"step-{step:07d}", root / f".partial-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except Exception as error:  # safetensors and torch.save word a full disk their own ways ("enforce fail ... unexpected pos")
        free = shutil.disk_usage(root).free
        raise OSError(f"cannot write checkpoint {partial} ({free:,} bytes free on its disk): {error}") from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate_loss(model, dataloader, accelerator, max_batches=20):
    """Mean held-out loss per token over the first `max_batches` batches."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(dataloader):
        if i == max_batches:
            break
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.float() * tokens
        count += tokens
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


def train(
    output_dir="runs/guppy",
    preset=None,
    dataset=None,
    persona="guppy",
    max_steps=None,
    batch_size=None,
    learning_rate=None,
    warmup_steps=None,
    gradient_accumulation_steps=1,
    weight_decay=0.1,
    unk_rate=UNK_RATE,
    reply_start_weight=REPLY_START_WEIGHT,
    eval_every=250,
    checkpoint_every=500,
    seed=42,
    resume=False,
    compile=False,
    mixed_precision=None,
    run_eval=True,
    config_overrides=None,
):
    """Train a model and write a complete `save_pretrained` folder to `output_dir`. Returns the summary dict.

    `config_overrides` changes the preset's architecture (used by bench/ to search for presets).
    """
    started = time.perf_counter()
    preset = preset or default_preset()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    hp = {**TRAIN_PRESETS[preset]}
    for key, value in dict(batch_size=batch_size, learning_rate=learning_rate, max_steps=max_steps, warmup_steps=warmup_steps).items():
        if value is not None:
            hp[key] = value
    check_output_dir(output_dir)
    if mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True on a machine without an accelerator is what lets `accelerate launch --multi_gpu --num_processes N`
    # start N gloo-connected CPU processes; without it each process would train alone.
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=no_accelerator, mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    set_seed(seed)
    log = accelerator.print

    # 1. data and tokenizer: the vocabulary is every word of the training conversations
    with accelerator.main_process_first():  # one process builds the default dataset, the others read it
        data = load_conversations(dataset, persona=persona, seed=seed)
    tokenizer = build_tokenizer(conversation_texts(data["train"]))
    config = GuppyConfig.from_preset(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        persona=persona,
        **(config_overrides or {}),
    )
    tokenizer.model_max_length = config.max_position_embeddings
    train_set = Conversations(data["train"], tokenizer, config.max_position_embeddings, unk_rate=unk_rate, seed=seed)
    test_split = data["test"] if "test" in data else data["train"].select(range(min(512, len(data["train"]))))
    test_set = Conversations(test_split, tokenizer, config.max_position_embeddings)
    batches = LengthGroupedBatches([len(s) for s in train_set.samples], hp["batch_size"], seed)
    pad, reply_start = tokenizer.pad_token_id, reply_start_id(tokenizer)
    train_loader = DataLoader(train_set, batch_sampler=batches, collate_fn=lambda s: collate(s, pad, reply_start, reply_start_weight))
    test_loader = DataLoader(
        test_set, batch_sampler=LengthGroupedBatches([len(s) for s in test_set.samples], 64, seed, drop_last=False),
        collate_fn=lambda s: collate(s, pad),
    )

    # 2. model, optimizer (no weight decay on biases, norms and embeddings' 1-D params), schedule
    model = GuppyForCausalLM(config)
    n_params = model.num_parameters()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["learning_rate"], betas=(0.9, 0.95), fused=accelerator.device.type == "cuda",
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, hp["warmup_steps"], hp["max_steps"])
    if compile:
        model = torch.compile(model)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, test_loader, scheduler)

    # 3. resume: restore weights, optimizer, schedule and RNG, then skip the batches already seen
    step = 0
    if resume:
        step, checkpoint = latest_checkpoint(output_dir)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            log(f"resumed from {checkpoint} at step {step}")
        else:
            log("no checkpoint to resume from; starting fresh")
    elif accelerator.is_main_process:
        shutil.rmtree(Path(output_dir, CHECKPOINTS), ignore_errors=True)

    steps_per_epoch = len(train_loader) // gradient_accumulation_steps
    effective_batch = hp["batch_size"] * accelerator.num_processes * gradient_accumulation_steps
    log(
        f"guppylm train | preset {preset} | {n_params / 1e6:.2f}M parameters | vocab {len(tokenizer)} | "
        f"processes {accelerator.num_processes} | device {accelerator.device} | precision {mixed_precision} | "
        f"batch {hp['batch_size']} x {accelerator.num_processes} proc x {gradient_accumulation_steps} accum = {effective_batch} | "
        f"lr {hp['learning_rate']} | steps {hp['max_steps']} ({hp['max_steps'] / max(steps_per_epoch, 1):.2f} epochs of {len(train_set)})"
    )

    # 4. the loop: forward, backward, clip, step; log train loss, tokens/s, periodic held-out loss
    history = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
    model.train()
    tokens_seen, loop_start, loss_ema = 0, time.perf_counter(), None
    progress = tqdm(total=hp["max_steps"], initial=step, disable=not accelerator.is_local_main_process, desc="training", unit="step", mininterval=1.0)
    epoch = step // max(steps_per_epoch, 1)
    while step < hp["max_steps"]:
        skip = (step % max(steps_per_epoch, 1)) * gradient_accumulation_steps  # batches of this epoch already seen
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        # Accelerate re-applies its own epoch counter to the sampler when a loader starts, and a resumed run's
        # loaders start that counter at 0: set it, and our sampler and dataset directly, to the real epoch.
        loader.set_epoch(epoch)
        batches.set_epoch(epoch)
        train_set.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = weighted_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], batch["loss_weights"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens_seen += int((batch["labels"] != -100).sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = loss.item()
            loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
            history["step"].append(step)
            history["train_loss"].append(loss_value)
            elapsed = time.perf_counter() - loop_start
            progress.update(1)
            progress.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tokens_seen / elapsed:,.0f}")
            if step % eval_every == 0 or step == hp["max_steps"]:
                history["eval_step"].append(step)
                history["eval_loss"].append(evaluate_loss(model, test_loader, accelerator))
                if accelerator.is_main_process:
                    progress.write(f"step {step}: train loss {loss_ema:.3f}, held-out loss {history['eval_loss'][-1]:.3f}")
            if step % checkpoint_every == 0 and step < hp["max_steps"]:
                save_checkpoint(accelerator, output_dir, step)
            if step >= hp["max_steps"]:
                break
        epoch += 1
    progress.close()
    train_seconds = time.perf_counter() - loop_start

    # 5. the output folder: weights, config, code, tokenizer, generation defaults, card, loss curve
    summary = dict(
        preset=preset,
        persona=persona,
        parameters=n_params,
        steps=step,
        tokens=tokens_seen,
        train_seconds=round(train_seconds, 1),
        tokens_per_second=round(tokens_seen / max(train_seconds, 1e-9)),
        first_train_loss=round(history["train_loss"][0], 4) if history["train_loss"] else None,
        final_train_loss=round(loss_ema, 4) if loss_ema is not None else None,
        final_eval_loss=round(history["eval_loss"][-1], 4) if history["eval_loss"] else None,
        processes=accelerator.num_processes,
        device=str(accelerator.device),
        precision=mixed_precision,
        effective_batch_size=effective_batch,
        learning_rate=hp["learning_rate"],
        warmup_steps=hp["warmup_steps"],
        weight_decay=weight_decay,
        unk_rate=unk_rate,
        reply_start_weight=reply_start_weight,
        seed=seed,
        dataset=str(dataset) if dataset else f"built in: dataset_builder persona {persona!r}",
        dataset_is_hub_repo=dataset is not None and not Path(dataset).exists(),
        train_samples=len(train_set),
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(model), tokenizer, output_dir, summary, history, started, run_eval)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_model_folder(model, tokenizer, output_dir, summary, history, started, run_eval):
    """Write everything `from_pretrained` and the Hub need, then evaluate and write the card."""
    from guppylm.card import write_loss_curve, write_model_card

    model = getattr(model, "_orig_mod", model).float()  # undo torch.compile's wrapper; save fp32
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        max_new_tokens=48,  # a reply that runs into the context's end stops there with <|im_end|> (the model's forward)
        no_repeat_ngram_size=3,  # no 3-token phrase twice: "i will be here. i will be here." (bench/repetition.py)
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(output_dir)
    save_tokenizer(tokenizer, output_dir)
    write_loss_curve(history, Path(output_dir) / "loss_curve.png")
    results = None
    if run_eval:
        from guppylm.evaluate import evaluate_model

        results = evaluate_model(model.eval(), tokenizer, persona=summary["persona"])
        summary["eval"] = results["scores"]
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_model_card(output_dir, summary)
    print(
        f"done | {summary['steps']} steps | {summary['tokens']:,} tokens | {summary['train_seconds']} s training, "
        f"{summary['total_seconds']} s total | {summary['tokens_per_second']:,} tokens/s | "
        f"train loss {summary['final_train_loss']} | held-out loss {summary['final_eval_loss']}"
        + (f" | on-topic {results['scores']['on_topic']:.0%}" if results else "")
        + f" | saved to {output_dir}"
    )


if __name__ == "__main__":  # accelerate launch -m guppylm.train ARGS is `guppylm train ARGS` in every process
    import sys

    from guppylm.cli import main

    main(["train", *sys.argv[1:]])
