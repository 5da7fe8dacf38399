"""Train Guppy from nothing: dataset -> tokenizer -> model -> a complete `save_pretrained` folder.

Runs as `guppylm train ...` or under Accelerate: `accelerate launch -m guppylm.train ...`. Accelerate handles
devices, mixed precision, data-parallel gradients and checkpoint state; transformers gives the schedule; torch
gives AdamW; the recipe and its defaults are in recipe.py. What is left here is the loop and the summary:

    train()  =  Recipe (checked)  ->  folders (checked)  ->  prepare_data  ->  build_model  ->  run_loop  ->  save_model_folder

One optimizer step is one batch of `batch_size x processes x gradient_accumulation_steps` conversations, the same
ones whatever the split into processes and micro-batches (data.micro_batches), and the learning rate at step k is
the schedule's value at k for any number of processes.
"""

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_cosine_schedule_with_warmup

from guppylm import GuppyConfig, GuppyForCausalLM  # registered, so save_pretrained copies their code
from guppylm.checkpoints import check_checkpoints, checkpoint_dir, latest_checkpoint, load_checkpoint, remove_checkpoints, save_checkpoint, start_checkpoints
from guppylm.data import Conversations, LengthGroupedBatches, checked_conversations, collate, load_conversations, micro_batches
from guppylm.folders import FolderKind, check_output_folder, writing_folder
from guppylm.recipe import CHECKPOINT_EVERY, EVAL_EVERY, Recipe, checked
from guppylm.tokenizer import chat_tokenizer, save_tokenizer, suppressed_reply_starts

EVAL_BATCHES, EVAL_BATCH_SIZE = 20, 64  # the periodic test loss reads the first 20 batches of 64 test conversations
# What `guppylm train` writes into a model folder; training_summary.json says "guppylm wrote this folder".
# ("checkpoints" is where earlier versions kept them, inside the folder: --overwrite drops them.)
MODEL_FOLDER = FolderKind(
    "model folder",
    "training_summary.json",
    ("config.json", "model.safetensors", "*.py", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
     "special_tokens_map.json", "generation_config.json", "README.md", "loss_curve.png", "training_summary.json",
     "persona.yaml", "persona.*.yaml", "checkpoints"),
)


def choose_precision(requested):
    """(precision, who decided it): --mixed-precision when given; else what `accelerate launch` passes down (its flag
    or config file, in ACCELERATE_MIXED_PRECISION); else guppylm's default: bf16 on a GPU that has it, fp32 ("no")."""
    if requested is not None:
        if requested not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be one of no, bf16, fp16, not {requested!r}")
        return requested, "--mixed-precision"
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"], "accelerate launch"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16", "guppylm's default on a GPU with bf16"
    return "no", "guppylm's default"


def check_folders(output_dir, recipe, resume, overwrite):
    """Everything about the folders that could fail after training, checked before any work: the model folder may be
    written (new, empty, or ours with --overwrite; never a project folder or guppylm's source), the checkpoints may
    be resumed or replaced, the disk takes a megabyte. Returns the checkpoint to resume from, or None."""
    check_output_folder(output_dir, MODEL_FOLDER, overwrite)
    checkpoint = check_checkpoints(output_dir, recipe.json(), resume, overwrite)
    parent = checkpoint_dir(output_dir).parent
    probe = parent / f".{checkpoint_dir(output_dir).name}.write-test"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_bytes(b"\0" * 1024 * 1024)  # 1 MiB: a full disk fails here, not after training
        finally:
            probe.unlink(missing_ok=True)  # a failed probe must not keep what it managed to write on a full disk
    except OSError as error:
        raise OSError(f"cannot write to output directory {str(output_dir)!r}: {error.strerror or error}") from None
    return checkpoint


# --- data and model -----------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    tokenizer: object
    train: Conversations
    batches: LengthGroupedBatches  # one optimizer step's conversations per batch, the same on every process
    test_batches: list  # collated, the first EVAL_BATCHES of the test split ([] without one)
    test_label: str  # what the test loss is called: "held-out loss", "test loss", or None without a test split
    summary: str  # the log line


def prepare_data(recipe, pack, context, accelerator):
    """Load and check the conversations, train the tokenizer on the train split, tokenize both splits."""
    with accelerator.main_process_first():  # one process builds the default dataset, the others read it
        data = load_conversations(recipe.dataset, persona=pack, seed=recipe.seed)
    where = f"dataset {recipe.dataset or pack.name!r}"
    train_rows = checked_conversations(data["train"], f"{where}, split 'train'", context)
    tokenizer = chat_tokenizer({"messages": train_rows}, context, recipe.min_user_word_count)
    train = Conversations(train_rows, tokenizer, context, unk_rate=recipe.unk_rate, seed=recipe.seed)
    step_batch = recipe.step_batch_size(accelerator.num_processes)
    batches = LengthGroupedBatches([len(s) for s in train.samples], step_batch, recipe.seed)
    if len(batches) == 0:
        raise ValueError(
            f"the train split has {len(train)} conversations, fewer than one optimizer step takes ({step_batch} = "
            f"batch size {recipe.batch_size} x {accelerator.num_processes} processes x {recipe.gradient_accumulation_steps} "
            f"accumulation steps); lower --batch-size"
        )
    test_batches, test_label, test_note = [], None, "no test split, so no test loss"
    if "test" in data:
        test_rows = checked_conversations(data["test"], f"{where}, split 'test'", context)
        test_batches, test_label, test_note = prepare_test(test_rows, train_rows, tokenizer, context, recipe.seed)
    cut = f"{train.cut['message']:,} user turns cut from the left, {train.cut['reply']:,} replies cut at the end"
    summary = f"data | {where}: {len(train):,} train conversations, {test_note} | vocab {len(tokenizer):,} | {cut} (context {context})"
    return TrainingData(tokenizer, train, batches, test_batches, test_label, summary)


def prepare_test(test_rows, train_rows, tokenizer, context, seed):
    """(collated test batches, the name of their loss, a note for the log). The loss is "held-out" only when no
    test reply also appears in train (dataset_builder's test split holds replies out); otherwise "test loss"."""
    test = Conversations(test_rows, tokenizer, context)
    order = LengthGroupedBatches([len(s) for s in test.samples], EVAL_BATCH_SIZE, seed, drop_last=False)
    batches = [collate([test[i] for i in b], tokenizer.pad_token_id) for b in list(order)[:EVAL_BATCHES]]
    replies = lambda conversation: [m["content"] for m in conversation if m["role"] == "assistant"]
    seen = {reply for conversation in train_rows for reply in replies(conversation)}
    overlap = sum(any(reply in seen for reply in replies(conversation)) for conversation in test_rows)
    if overlap:
        return batches, "test loss", f"{len(test):,} test ({overlap:,} with a reply also in train)"
    return batches, "held-out loss", f"{len(test):,} test (no reply in train)"


def build_model(recipe, tokenizer, pack, accelerator, compile):
    """Model, AdamW (no weight decay on biases, norms and other 1-D parameters) and the cosine schedule, prepared."""
    config = GuppyConfig.from_preset(
        recipe.preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        persona=pack.name,
        **(recipe.config_overrides or {}),
    )
    model = GuppyForCausalLM(config)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": recipe.weight_decay},
         {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=recipe.learning_rate, betas=(0.9, 0.95), fused=accelerator.device.type == "cuda",
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.max_steps)
    if compile:
        model = torch.compile(model)
    return accelerator.prepare(model, optimizer, scheduler)


# --- the loop -------------------------------------------------------------------------------------------------------


def weighted_lm_loss(logits, labels, loss_weights, normalizer=None):
    """Next-token cross-entropy summed with per-target weights and divided by `normalizer` (default: the weights'
    sum, a weighted mean); with all weights 1 it is the model's own loss.

    Guppy's first reply word names the topic ("food! ...", "glass? ..."), so greedy decoding commits to a topic
    there, and that one token in ~30 decides whether a reply is on-topic. Weighing it 5x measured +4.6 points
    on-topic on the dev prompts at the same cost (README, "The CPU recipe")."""
    vocab_size = logits.shape[-1]
    per_token = torch.nn.functional.cross_entropy(  # flat (tokens, vocab): 2x faster than (batch, vocab, length) on CPU
        logits[:, :-1].reshape(-1, vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    )
    weights = loss_weights[:, 1:].reshape(-1)
    return (per_token * weights).sum() / (weights.sum() if normalizer is None else normalizer)


def train_step(model, optimizer, scheduler, batches, accelerator):
    """One optimizer step over this process's micro-batches; returns the step's loss over all processes.

    Each micro-batch's loss is its weighted sum over the weight of the whole step (every process, every micro-batch),
    so the gradient is that of one weighted mean over the step's conversations: 1 x 32, 2 processes x 16 and 2
    accumulation steps x 16 give the same gradient, up to float rounding."""
    total_weight = accelerator.reduce(sum(b["loss_weights"][:, 1:].sum() for b in batches).to(accelerator.device), "sum")
    normalizer = total_weight / accelerator.num_processes  # DDP averages the processes' gradients
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        last = i == len(batches) - 1  # gradients are exchanged between processes once, after the last micro-batch
        with nullcontext() if last else accelerator.no_sync(model):
            loss = weighted_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], batch["loss_weights"], normalizer)
            accelerator.backward(loss)
        step_loss += loss.detach()
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    # Once per optimizer step, on every process: the Accelerator is made with step_scheduler_with_optimizer=False,
    # because its default steps a prepared scheduler once per process per step (N processes: an N-times-too-fast
    # decay). So the learning rate at step k is the schedule's at k, for 1 or N processes and any accumulation
    # (also when fp16's loss scaler skips a step: the schedule follows the step count, not the updates).
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, "mean").item()


@torch.no_grad()
def evaluate_loss(model, batches, accelerator):
    """Mean loss per token over the test batches, shared out over the processes."""
    model = accelerator.unwrap_model(model).eval()  # each process its own share: no DDP exchange in forward
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        tokens = (batch["labels"][:, 1:] != -100).sum().to(accelerator.device)
        total += model(input_ids=batch["input_ids"].to(accelerator.device), labels=batch["labels"].to(accelerator.device)).loss.float() * tokens
        count += tokens
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


@dataclass
class Progress:
    """The whole run so far, across resumes: saved in every checkpoint, summarized at the end."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # in the loop
    total_seconds: float = 0.0  # wall time since the run began, up to the last checkpoint of a resumed run
    resumed_at: list = field(default_factory=list)
    history: dict = field(default_factory=lambda: dict(step=[], learning_rate=[], train_loss=[], eval_step=[], eval_loss=[]))


def ema(values, decay=0.9):
    """Exponential moving average of the train losses: what the progress bar and the summary show."""
    average = None
    for value in values:
        average = value if average is None else decay * average + (1 - decay) * value
    return average


def run_loop(model, optimizer, scheduler, data, recipe, progress, accelerator, output_dir, eval_every, checkpoint_every, run_started):
    """Train from `progress.step` to `recipe.max_steps`: step, log, evaluate, checkpoint. The epoch's step batches are
    a function of (seed, epoch), so a resumed run picks up exactly where the interrupted one stopped."""
    steps_per_epoch, history = len(data.batches), progress.history
    train_before, tokens_before, loop_start = progress.train_seconds, progress.tokens, time.perf_counter()
    loss_ema = ema(history["train_loss"])
    bar = tqdm(total=recipe.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="training", unit="step", mininterval=1.0)
    while progress.step < recipe.max_steps:
        epoch, position = divmod(progress.step, steps_per_epoch)
        data.batches.set_epoch(epoch)
        data.train.set_epoch(epoch)
        for step_batch in list(data.batches)[position:]:
            # 1. one optimizer step: this process's micro-batches of the step's conversations
            shares = micro_batches(step_batch, accelerator.process_index, accelerator.num_processes, recipe.gradient_accumulation_steps)
            batches = [collate([data.train[i] for i in share], data.tokenizer.pad_token_id, recipe.reply_start_weight) for share in shares]
            learning_rate = scheduler.get_last_lr()[0]
            loss = train_step(model, optimizer, scheduler, batches, accelerator)
            # 2. the record: every process knows the whole step batch, so the token count needs no exchange
            progress.step += 1
            progress.tokens += sum(len(data.train.samples[i]) for i in step_batch)
            progress.train_seconds = train_before + time.perf_counter() - loop_start
            loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
            for key, value in (("step", progress.step), ("learning_rate", learning_rate), ("train_loss", loss)):
                history[key].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{(progress.tokens - tokens_before) / (time.perf_counter() - loop_start):,.0f}")
            # 3. the test loss, now and then and at the end
            if data.test_batches and (progress.step % eval_every == 0 or progress.step == recipe.max_steps):
                history["eval_step"].append(progress.step)
                history["eval_loss"].append(evaluate_loss(model, data.test_batches, accelerator))
                if accelerator.is_main_process:
                    bar.write(f"step {progress.step}: train loss {loss_ema:.3f}, {data.test_label} {history['eval_loss'][-1]:.3f}")
            # 4. a checkpoint, atomically, with the whole run's record
            if progress.step % checkpoint_every == 0 and progress.step < recipe.max_steps:
                progress.total_seconds = time.perf_counter() - run_started
                save_checkpoint(accelerator, output_dir, asdict(progress))
            if progress.step >= recipe.max_steps:
                break
    bar.close()


# --- the run ----------------------------------------------------------------------------------------------------


def train(output_dir="runs/guppy", resume=False, overwrite=False, eval_every=EVAL_EVERY, checkpoint_every=CHECKPOINT_EVERY,
          mixed_precision=None, compile=False, run_eval=True, **recipe):
    """Train a model and write a complete `save_pretrained` folder to `output_dir`. Returns the summary dict.

    `recipe` takes the fields of `Recipe` (preset, dataset, persona, max_steps, batch_size, learning_rate, ...).
    Every number is checked, and so are the folders, before any data is built. Checkpoints go beside the model
    folder, to OUTPUT_DIR.checkpoints (guppylm.checkpoints): `resume` continues from the newest; `overwrite`
    replaces an earlier run's checkpoints or finished model, which are otherwise refused.
    """
    started = time.perf_counter()
    recipe = Recipe(**recipe)
    checked("eval_every", eval_every, 1)
    checked("checkpoint_every", checkpoint_every, 1)
    precision, decided_by = choose_precision(mixed_precision)
    from dataset_builder import load_persona

    pack = load_persona(recipe.persona)  # a bad pack fails now, not after training
    checkpoint = check_folders(output_dir, recipe, resume, overwrite)
    # cpu=True on a machine without an accelerator is what lets `accelerate launch --multi_gpu --num_processes N`
    # start N gloo-connected CPU processes; without it each process would train alone.
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=no_accelerator, mixed_precision=precision, step_scheduler_with_optimizer=False)
    set_seed(recipe.seed)
    log = accelerator.print
    log(
        f"guppylm train | processes {accelerator.num_processes} | device {accelerator.device} | precision "
        f"{accelerator.mixed_precision} (decided by {decided_by}) | model folder {output_dir}, checkpoints in {checkpoint_dir(output_dir)}"
    )

    context = GuppyConfig.from_preset(recipe.preset, **(recipe.config_overrides or {})).max_position_embeddings
    data = prepare_data(recipe, pack, context, accelerator)
    log(data.summary)
    model, optimizer, scheduler = build_model(recipe, data.tokenizer, pack, accelerator, compile)
    step_batch = recipe.step_batch_size(accelerator.num_processes)
    log(
        f"model | preset {recipe.preset} | {accelerator.unwrap_model(model).num_parameters() / 1e6:.2f}M parameters | "
        f"batch {recipe.batch_size} x {accelerator.num_processes} proc x {recipe.gradient_accumulation_steps} accum = {step_batch} | "
        f"lr {recipe.learning_rate} | steps {recipe.max_steps} ({recipe.max_steps / len(data.batches):.2f} epochs of {len(data.batches)} steps)"
    )

    progress = Progress()
    if checkpoint is not None:
        progress = Progress(**load_checkpoint(accelerator, checkpoint))
        progress.resumed_at.append(progress.step)
        log(f"resumed from {checkpoint} at step {progress.step}")
    elif resume:
        log("no checkpoint to resume from; starting fresh")
    if checkpoint is None and accelerator.is_main_process:
        start_checkpoints(output_dir, recipe.json())
    accelerator.wait_for_everyone()
    run_started = started - progress.total_seconds  # the whole run's clock: earlier segments count
    run_loop(model, optimizer, scheduler, data, recipe, progress, accelerator, output_dir, eval_every, checkpoint_every, run_started)

    summary = summarize(recipe, pack, data, progress, accelerator, scheduler, model, decided_by)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(model), data.tokenizer, pack, summary, output_dir, overwrite, run_eval, run_started)
        remove_checkpoints(output_dir)  # the model is complete: its checkpoints have served
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# --- the summary and the model folder -----------------------------------------------------------------------------


def summarize(recipe, pack, data, progress, accelerator, scheduler, model, decided_by):
    """The whole run in numbers (resumed segments included): training_summary.json and the model card."""
    history = progress.history
    return dict(
        recipe.json(),  # preset, batch_size, learning_rate, warmup_steps, weight_decay, unk_rate, seed, ...
        persona=pack.name,
        persona_display_name=pack.display_name,
        persona_description=pack.description,
        dataset=recipe.dataset or f"built in: dataset_builder persona {pack.name!r}",
        dataset_is_hub_repo=recipe.dataset is not None and not Path(recipe.dataset).exists(),
        train_samples=len(data.train),
        cut_user_turns=data.train.cut["message"],
        cut_replies=data.train.cut["reply"],
        parameters=accelerator.unwrap_model(model).num_parameters(),
        processes=accelerator.num_processes,
        effective_batch_size=recipe.step_batch_size(accelerator.num_processes),
        device=str(accelerator.device),
        precision=accelerator.mixed_precision,
        precision_decided_by=decided_by,
        steps=progress.step,
        tokens=progress.tokens,
        train_seconds=round(progress.train_seconds, 1),
        tokens_per_second=round(progress.tokens / max(progress.train_seconds, 1e-9)),
        resumed_at_steps=progress.resumed_at,
        first_train_loss=round(history["train_loss"][0], 4) if history["train_loss"] else None,
        final_train_loss=round(ema(history["train_loss"]), 4) if history["train_loss"] else None,
        final_eval_loss=round(history["eval_loss"][-1], 4) if history["eval_loss"] else None,
        eval_loss_name=data.test_label,
        final_learning_rate=scheduler.get_last_lr()[0],
        history=history,
    )


def is_shipped(pack):
    from dataset_builder.persona import PERSONA_DIR

    return pack.source == (PERSONA_DIR / f"{pack.name}.yaml").resolve()


def save_model_folder(model, tokenizer, pack, summary, output_dir, overwrite, run_eval, run_started):
    """Write everything `from_pretrained` and the Hub need into a staging folder that becomes `output_dir` at the
    end (folders.writing_folder): weights, config, code, tokenizer, generation defaults, the persona pack (all its
    files) when it is not a shipped one, loss curve, evaluation, summary and card."""
    from dataset_builder.persona import pack_files, sibling_path
    from guppylm.card import write_loss_curve, write_model_card

    model = getattr(model, "_orig_mod", model).float()  # undo torch.compile's wrapper; save fp32
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        max_new_tokens=48,  # a reply that runs into the context's end stops there with <|im_end|> (the model's forward)
        no_repeat_ngram_size=3,  # no 3-token phrase twice: "i will be here. i will be here." (bench/repetition.py)
        begin_suppress_tokens=suppressed_reply_starts(tokenizer),  # a reply starts with a word (or ends), never with "."
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with writing_folder(output_dir, MODEL_FOLDER, overwrite) as folder:
        model.save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
        if not is_shipped(pack):  # config.json names the pack; eval and the Space find it here, from any directory
            copy = folder / "persona.yaml"  # with its siblings: persona.dev.yaml, persona.messages.yaml, ...
            for part, path in pack_files(pack).items():
                shutil.copyfile(path, copy if part is None else sibling_path(copy, part))
        write_loss_curve(summary["history"], folder / "loss_curve.png", summary["eval_loss_name"])
        if run_eval:
            from guppylm.evaluate import evaluate_model

            summary["eval"] = evaluate_model(model.eval(), tokenizer, persona=pack)["scores"]
        summary["total_seconds"] = round(time.perf_counter() - run_started, 1)
        (folder / "training_summary.json").write_text(json.dumps(summary, indent=2))
        write_model_card(folder, summary, repo_id=str(output_dir))
    eval_note = f" | on-topic {summary['eval']['on_topic']:.0%}" if run_eval else ""
    print(
        f"done | {summary['steps']} steps | {summary['tokens']:,} tokens | {summary['train_seconds']} s training, "
        f"{summary['total_seconds']} s total | {summary['tokens_per_second']:,} tokens/s | train loss {summary['final_train_loss']}"
        + (f" | {summary['eval_loss_name']} {summary['final_eval_loss']}" if summary["eval_loss_name"] else "")
        + f"{eval_note} | saved to {output_dir}"
    )


if __name__ == "__main__":  # accelerate launch -m guppylm.train ARGS is `guppylm train ARGS` in every process
    import sys

    from guppylm.cli import main

    main(["train", *sys.argv[1:]])
