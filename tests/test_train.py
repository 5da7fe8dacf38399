"""Training: the tiny preset end to end; one schedule and one gradient for any split of the step's batch into processes
and accumulation steps (a real 2-process `accelerate launch`); resume; precision; folders that are never lost."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from conftest import FERN_MESSAGES, REPO_ROOT, guppylm_command
from dataset_builder import build_dataset, load_persona, save_dataset, scaffold_persona
from guppylm import train as training
from guppylm.checkpoints import checkpoint_dir
from guppylm.data import LengthGroupedBatches, collate, micro_batches
from guppylm.folders import FolderError
from guppylm.modeling_guppylm import GuppyForCausalLM
from guppylm.train import choose_precision, train, weighted_lm_loss

QUIET = dict(preset="tiny", run_eval=False, eval_every=10**6, checkpoint_every=10**6)


@pytest.fixture(scope="module")
def dataset_600(tmp_path_factory):
    """540 train conversations: 16 optimizer steps of 32 per epoch, so a short run crosses epoch boundaries."""
    path = tmp_path_factory.mktemp("dataset-600")
    save_dataset(build_dataset("guppy", num_samples=600, test_size=60, seed=0), "guppy", path)
    return path


def test_output_folder_is_complete_and_holds_nothing_a_hub_repo_should_not(trained_tiny_dir):
    names = {p.name for p in trained_tiny_dir.iterdir()}
    assert names == {"config.json", "model.safetensors", "configuration_guppylm.py", "modeling_guppylm.py", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md", "loss_curve.png",
                     "training_summary.json"}  # fmt: skip
    # no checkpoint, optimizer state or pickle: `hf upload` and `guppylm push` of this folder publish only the model
    assert all(p.is_file() and p.suffix not in (".bin", ".pkl", ".pt") and "optimizer" not in p.name for p in trained_tiny_dir.iterdir())
    assert not checkpoint_dir(trained_tiny_dir).exists()  # the finished run's checkpoints are gone, not moved in
    summary = json.loads((trained_tiny_dir / "training_summary.json").read_text())
    assert summary["steps"] == 150 and summary["processes"] == 1 and len(summary["history"]["train_loss"]) == 150
    assert summary["final_train_loss"] < 0.7 * summary["first_train_loss"]
    assert summary["eval_loss_name"] == "held-out loss" and summary["eval"]["prompts"] >= 60
    generation = json.loads((trained_tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 3 and generation["do_sample"] is True
    assert generation["no_repeat_ngram_size"] == 3  # replies never repeat a 3-word phrase (bench/repetition.py)
    vocab = json.loads((trained_tiny_dir / "tokenizer.json").read_text())["model"]["vocab"]
    first_banned = {token for token, i in vocab.items() if i in generation["begin_suppress_tokens"]}
    assert {".", "?", "<|im_start|>"} <= first_banned and not any(t.lstrip("▁")[:1].isalnum() for t in first_banned)
    assert "<|im_end|>" not in first_banned  # a prompt that fills the context still gets its (empty) reply
    card = (trained_tiny_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "model-index" in card and "on-topic" in card
    assert "Guppy is a tiny language model in the voice of one persona: Guppy, a small fish" in card


def test_eval_cli_scores_either_split(trained_tiny_dir, tmp_path):
    """`guppylm eval` scores the test split by default and the dev split on request; a pack without one says so."""
    guppy = load_persona("guppy")
    for split, cases in (("eval", guppy.eval_cases()), ("dev", guppy.eval_cases("dev"))):
        result = subprocess.run(guppylm_command("eval", "--model", str(trained_tiny_dir), "--split", split, "--max-new-tokens", "6"),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"persona guppy: {len(cases)} held-out {split} prompts over 61 topics" in result.stdout
        assert all(f"{prompt!r} ->" in result.stdout for prompt, *_ in cases[:5])
    topic = {"name": "food", "words": ["food"], "ask": ["hungry?"], "replies": ["food!"], "eval": ["snack time?"]}
    pack = tmp_path / "nodev.yaml"
    pack.write_text(yaml.safe_dump({"name": "nodev", "display_name": "No dev", "description": "a pack without dev prompts",
                                    "style": {"lowercase": True, "max_words": 5}, "defaults": {"num_samples": 10, "test_size": 1},
                                    "topics": [topic]}))
    result = subprocess.run(guppylm_command("eval", "--model", str(trained_tiny_dir), "--persona", str(pack), "--split", "dev"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "persona 'nodev' has no 'dev' prompts" in result.stderr


# --- batches, collation, loss ------------------------------------------------------------------------------------


def test_length_grouped_batches_are_deterministic_and_cover_the_data():
    lengths = [5 + (i * 7) % 23 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, 16, seed=3)
    sampler.set_epoch(1)
    first, again = list(sampler), list(sampler)
    assert first == again and len(first) == len(sampler) == 62
    assert sorted(i for b in first for i in b) == sorted(set(i for b in first for i in b))
    sampler.set_epoch(2)
    assert list(sampler) != first
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread <= 2  # length grouping: little padding


def test_every_layout_of_a_step_shares_out_the_same_conversations():
    step_batch = list(range(100, 132))
    for processes, accumulation in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2)):
        shares = [micro_batches(step_batch, p, processes, accumulation) for p in range(processes)]
        assert all(len(share) == accumulation for share in shares)
        assert [i for share in shares for batch in share for i in batch] == step_batch  # each once, in order


def test_collate_pads_right_and_weighs_the_reply_starts():
    batch = collate([([2, 5, 6, 3], [2]), ([2, 7, 3], [])], pad_id=0, reply_start_weight=5.0)
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert batch["labels"].tolist() == [[2, 5, 6, 3], [2, 7, 3, -100]]
    assert batch["loss_weights"].tolist() == [[1, 1, 5, 1], [1, 1, 1, 0]]


def test_weighted_loss_is_the_model_loss_with_unit_weights_and_counts_weighted_tokens_more(tiny_model_dir):
    model = GuppyForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate([([2, 9, 6, 3, 5], []), ([2, 7, 3], [])], pad_id=0)
    logits = model(input_ids=batch["input_ids"]).logits
    plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert torch.allclose(weighted_lm_loss(logits, batch["labels"], batch["loss_weights"]), plain, atol=1e-6)
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none")
    weighted = collate([([2, 9, 6, 3, 5], [2])], pad_id=0, reply_start_weight=4.0)
    expected = (per_token.sum() + 3 * per_token[1]) / (4 + 3)  # the target at position 2 counts 4 times
    assert torch.allclose(weighted_lm_loss(logits[:1], weighted["labels"], weighted["loss_weights"]), expected, atol=1e-6)
    # with a normalizer, the sum over it: what each micro-batch of a step contributes
    assert torch.allclose(weighted_lm_loss(logits[:1], weighted["labels"], weighted["loss_weights"], 14.0), expected / 2, atol=1e-6)


# --- one step, any layout: accumulation, processes, resume ----------------------------------------------------------


def train_recording_steps(out, dataset, **options):
    """train() in-process; per optimizer step, the conversations it trained on (token ids, sorted)."""
    steps, train_step = [], training.train_step

    def recording(model, optimizer, scheduler, batches, accelerator):
        rows = sorted(tuple(ids[labels != -100].tolist()) for b in batches for ids, labels in zip(b["input_ids"], b["labels"]))
        steps.append(rows)
        return train_step(model, optimizer, scheduler, batches, accelerator)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train_step", recording)
        return train(output_dir=str(out), dataset=str(dataset), **{**QUIET, **options}), steps


def test_gradient_accumulation_trains_on_the_same_steps_as_a_bigger_batch(tmp_path, dataset_600):
    """GA=2 x 16 and GA=1 x 32: the same 32 conversations at every optimizer step, every conversation once per epoch
    (an epoch is 16 steps here; the run crosses into the next), the same learning rate at every step, and the same
    losses up to float rounding: measured 1e-6 apart, where another seed's data order moves them by up to 0.1."""
    big, big_steps = train_recording_steps(tmp_path / "big", dataset_600, max_steps=24, batch_size=32)
    accumulated, accumulated_steps = train_recording_steps(tmp_path / "ga", dataset_600, max_steps=24, batch_size=16,
                                                           gradient_accumulation_steps=2)  # fmt: skip
    assert accumulated["effective_batch_size"] == big["effective_batch_size"] == 32
    assert accumulated_steps == big_steps and all(len(rows) == 32 for rows in big_steps)
    first_epoch = [row for rows in big_steps[:16] for row in rows]
    assert len(first_epoch) == 512 and len(set(first_epoch)) >= 500  # distinct conversations (a few are duplicates as text)
    assert accumulated["history"]["learning_rate"] == big["history"]["learning_rate"]
    assert max(abs(a - b) for a, b in zip(accumulated["history"]["train_loss"], big["history"]["train_loss"])) < 1e-4


def test_resume_across_an_epoch_boundary_with_accumulation_is_bit_identical_and_reports_the_whole_run(tmp_path, dataset_600, monkeypatch):
    options = dict(dataset=str(dataset_600), max_steps=24, batch_size=16, gradient_accumulation_steps=2, checkpoint_every=12)
    straight = train(output_dir=str(tmp_path / "straight"), **{**QUIET, **options})

    save_checkpoint = training.save_checkpoint

    def save_then_interrupt(*args, **kwargs):  # Ctrl-C right after the step-12 checkpoint (epoch 0 ends at step 16)
        save_checkpoint(*args, **kwargs)
        raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(training, "save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(output_dir=str(out), **{**QUIET, **options})
    assert not out.exists() and (checkpoint_dir(out) / "step-0000012" / "training_state.json").is_file()
    with pytest.raises(FolderError, match=r"holds an unfinished run \(last checkpoint: step 12\); pass --resume to continue it or --overwrite"):
        train(output_dir=str(out), **{**QUIET, **options})
    with pytest.raises(FolderError, match="were made with batch_size 16, not 32"):
        train(output_dir=str(out), resume=True, **{**QUIET, **options, "batch_size": 32, "gradient_accumulation_steps": 1})

    resumed = train(output_dir=str(out), resume=True, **{**QUIET, **options})
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == straight["history"] and resumed["resumed_at_steps"] == [12]
    for key in ("steps", "tokens", "first_train_loss", "final_train_loss", "final_eval_loss"):
        assert resumed[key] == straight[key], key
    assert resumed["train_seconds"] > 0.5 * straight["train_seconds"]  # the first segment's time is counted
    assert not checkpoint_dir(out).exists()


TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def launch_two_processes(dataset, output_dir, *extra, program=("-m", "guppylm.train")):
    """`accelerate launch` of 2 CPU processes (gloo), batch 16 each, 24 tiny steps with a checkpoint every 10."""
    options = ["--preset", "tiny", "--dataset", str(dataset), "--no-eval", "--eval-every", "1000000", "--max-steps", "24",
               "--batch-size", "16", "--checkpoint-every", "10", "--output-dir", str(output_dir), *extra]  # fmt: skip
    return subprocess.run([*TWO_PROCESSES, *program, *options], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, dataset_600):
    """A finished 2-process run, uninterrupted: its model folder."""
    folder = tmp_path_factory.mktemp("two-processes") / "model"
    result = launch_two_processes(dataset_600, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2 | device cpu" in result.stdout and "batch 16 x 2 proc x 1 accum = 32" in result.stdout
    return folder


@pytest.mark.slow
def test_two_processes_train_on_the_one_process_schedule_and_track_its_losses(tmp_path, dataset_600, two_process_run):
    """A real `accelerate launch --multi_gpu --num_processes 2` on the CPU against one process with batch 32, 24 steps
    over an epoch boundary and a checkpoint. Both train on the same 32 conversations per step, so the losses differ
    only by float rounding in the all-reduce: measured 1e-6 apart (2 cores shared by several processes), where
    another seed's data order moves them by up to 0.1. The tolerance, 1e-3, sits between."""
    steps = 24
    one = train(output_dir=str(tmp_path / "one"), dataset=str(dataset_600), max_steps=steps, batch_size=32, **QUIET)
    two = json.loads((two_process_run / "training_summary.json").read_text())
    assert two["processes"] == 2 and two["steps"] == steps and two["tokens"] == one["tokens"]

    optimizer = torch.optim.SGD([torch.zeros(1)], lr=one["learning_rate"])
    schedule = get_cosine_schedule_with_warmup(optimizer, one["warmup_steps"], steps)
    expected = []
    for _ in range(steps):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert two["history"]["learning_rate"] == one["history"]["learning_rate"] == expected
    assert two["final_learning_rate"] == one["final_learning_rate"] == 0.0  # the cosine's end, reached once
    assert max(abs(a - b) for a, b in zip(two["history"]["train_loss"], one["history"]["train_loss"])) < 1e-3


STOP_AFTER_FIRST_CHECKPOINT = """
import sys
from guppylm import train as training
from guppylm.cli import main

save_checkpoint = training.save_checkpoint

def save_then_interrupt(*args, **kwargs):  # both processes: Ctrl-C right after the step-10 checkpoint
    save_checkpoint(*args, **kwargs)
    raise KeyboardInterrupt

training.save_checkpoint = save_then_interrupt
main(["train", *sys.argv[1:]])
"""


@pytest.mark.slow
def test_two_processes_resume_bit_identical_to_an_uninterrupted_run(tmp_path, dataset_600, two_process_run):
    """Both processes stop right after the step-10 checkpoint; `accelerate launch ... --resume` finishes the run with
    the uninterrupted run's weights, bit for bit, and its losses (each process restores its own RNG and data place)."""
    stop = tmp_path / "stop_after_first_checkpoint.py"
    stop.write_text(STOP_AFTER_FIRST_CHECKPOINT)
    out = tmp_path / "model"
    interrupted = launch_two_processes(dataset_600, out, program=(str(stop),))
    assert interrupted.returncode != 0 and not out.exists()
    assert (checkpoint_dir(out) / "step-0000010" / "training_state.json").is_file()

    resumed = launch_two_processes(dataset_600, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint_dir(out) / 'step-0000010'} at step 10" in resumed.stdout
    a, b = load_file(two_process_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, summary = (json.loads((folder / "training_summary.json").read_text()) for folder in (two_process_run, out))
    assert summary["history"] == straight["history"] and summary["resumed_at_steps"] == [10]


# --- precision --------------------------------------------------------------------------------------------------


def test_precision_is_ours_then_the_launchers_then_the_default(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert choose_precision(None) == ("no", "guppylm's default")  # no GPU here
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert choose_precision(None) == ("fp16", "accelerate launch")
    assert choose_precision("bf16") == ("bf16", "--mixed-precision")
    with pytest.raises(ValueError, match="mixed_precision must be one of no, bf16, fp16, not 'fp32'"):
        choose_precision("fp32")


@pytest.mark.slow
def test_an_accelerate_config_file_decides_the_precision(tmp_path, dataset_600):
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(dict(compute_environment="LOCAL_MACHINE", distributed_type="NO", mixed_precision="bf16",
                                          num_machines=1, num_processes=1, use_cpu=True)))  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "guppylm.train",
               "--preset", "tiny", "--dataset", str(dataset_600), "--output-dir", str(tmp_path / "out"), "--max-steps", "3", "--no-eval"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith("guppylm train | processes 1 | device cpu | precision bf16 (decided by accelerate launch)")
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["precision_decided_by"] == "accelerate launch"


# --- checked before anything is touched ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("batch_size", 0, "batch_size must be a whole number 1 or more, not 0"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be a whole number 1 or more, not 0"),
        ("eval_every", 0, "eval_every must be a whole number 1 or more, not 0"),
        ("checkpoint_every", 0, "checkpoint_every must be a whole number 1 or more, not 0"),
        ("max_steps", 0, "max_steps must be a whole number 1 or more, not 0"),
        ("unk_rate", 1, "unk_rate must be a number at least 0 and below 1, not 1"),
        ("min_user_word_count", 0, "min_user_word_count must be a whole number 1 or more, not 0"),
        ("learning_rate", 0.0, "learning_rate must be a number above 0 and at most 1, not 0.0"),
        ("warmup_steps", 100, "warmup_steps must be a whole number between 0 and 60, not 100"),
        ("reply_start_weight", float("nan"), "reply_start_weight must be a number between 0 and 100, not nan"),
        ("batch_size", 2.5, "batch_size must be a whole number 1 or more, not 2.5"),
        ("seed", -1, "seed must be a whole number between 0 and 4294967295, not -1"),
        ("preset", "huge", "unknown preset 'huge'; choose one of"),
    ],
)
def test_bad_numbers_are_refused_before_any_folder_or_data(tmp_path, option, value, message):
    # a missing dataset: had anything been loaded before the check, the error would be about it
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train(output_dir=str(tmp_path / "out"), dataset=str(tmp_path / "no-such-dataset"), **{**QUIET, option: value})
    assert list(tmp_path.iterdir()) == []


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_folders_guppylm_did_not_write_are_refused_before_any_work(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "llama_finetune_epoch9.pt").write_bytes(b"weeks of work")
    (project / "README.md").write_text("my project\n")
    before = tree(tmp_path)
    missing = str(tmp_path / "no-such-dataset")  # reached only if the folder check let it through
    with pytest.raises(FolderError, match=f"{project} is not empty and is not a model folder guppylm wrote"):
        train(output_dir=str(project), dataset=missing, **QUIET)
    with pytest.raises(FolderError, match="inside guppylm's own source"):
        train(output_dir=str(REPO_ROOT / "guppylm"), dataset=missing, **QUIET)
    monkeypatch.chdir(REPO_ROOT)
    root = sorted(os.listdir(REPO_ROOT))
    with pytest.raises(FolderError, match=r"^\. is not empty and is not a model folder guppylm wrote"):  # the repository
        train(output_dir=".", dataset=missing, **QUIET)
    assert sorted(os.listdir(REPO_ROOT)) == root and tree(tmp_path) == before


def test_a_finished_model_or_an_unfinished_run_needs_a_flag(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "training_summary.json").write_text("{}")
    with pytest.raises(FolderError, match="already holds a model folder; pass --overwrite to replace it"):
        train(output_dir=str(finished), **QUIET)
    unfinished = tmp_path / "unfinished"
    (checkpoint_dir(unfinished) / "step-0000010").mkdir(parents=True)
    (checkpoint_dir(unfinished) / "recipe.json").write_text("{}")
    with pytest.raises(FolderError, match=r"unfinished.checkpoints holds an unfinished run \(last checkpoint: step 10\); pass --resume"):
        train(output_dir=str(unfinished), **QUIET)
    strange = tmp_path / "strange"
    checkpoint_dir(strange).mkdir()
    (checkpoint_dir(strange) / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match="strange.checkpoints is not empty and is not a checkpoint folder guppylm wrote"):
        train(output_dir=str(strange), **QUIET)


def test_a_training_set_smaller_than_one_step_is_a_clear_error(tmp_path):
    from datasets import Dataset

    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "blub."}] for i in range(10)]
    Dataset.from_dict({"messages": chats}).to_parquet(str(tmp_path / "ten" / "train.parquet"))
    with pytest.raises(ValueError, match=r"the train split has 10 conversations, fewer than one optimizer step takes \(16 = batch size 16"):
        train(output_dir=str(tmp_path / "out"), dataset=str(tmp_path / "ten"), **QUIET)
    assert not (tmp_path / "out").exists() and not checkpoint_dir(tmp_path / "out").exists()


def test_a_dataset_without_a_test_split_reports_no_held_out_loss(tmp_path, capsys):
    from datasets import Dataset

    chats = [[{"role": "user", "content": f"are you hungry {i}?"}, {"role": "assistant", "content": "food! always."}] for i in range(40)]
    Dataset.from_dict({"messages": chats}).to_parquet(str(tmp_path / "train-only" / "train.parquet"))
    summary = train(output_dir=str(tmp_path / "out"), dataset=str(tmp_path / "train-only"), max_steps=4, **{**QUIET, "eval_every": 2})
    output = capsys.readouterr().out
    assert "no test split, so no test loss" in output and "held-out" not in output and "test loss" not in output.split("\n", 2)[2]
    assert summary["final_eval_loss"] is None and summary["eval_loss_name"] is None and summary["history"]["eval_loss"] == []
    assert "no test loss: the dataset has no test split" in (tmp_path / "out" / "README.md").read_text()


def test_a_dataset_without_messages_is_a_clear_error(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["hi", "there"]}).to_parquet(str(tmp_path / "bad" / "train.parquet"))
    result = subprocess.run(guppylm_command("train", "--preset", "tiny", "--dataset", tmp_path / "bad", "--output-dir", tmp_path / "out"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "lacks the column 'messages'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_output_dir_fails_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(FolderError, match="is not writable"):
        train(output_dir=str(locked / "out"), preset="tiny")


def test_an_output_dir_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = subprocess.run(guppylm_command("train", "--preset", "tiny", "--output-dir", tmp_path / "file"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "is a file, not a folder" in result.stderr and "Traceback" not in result.stderr


# --- a persona pack travels with its model -----------------------------------------------------------------------


FERN_DEV = """prompts:
  - {kind: opener, topic: greetings, prompt: "morning fern, how are the leaves today?"}
  - {kind: noisy, topic: sunlight, prompt: "u gettin enuf sun ovr there??"}
"""


def test_a_pack_file_travels_with_its_model(tmp_path, monkeypatch, hub):
    """`--persona path/to/pack.yaml`: config.json names the pack, the folder carries a copy of all its files (its
    split and messages files too), `guppylm eval` finds it and its splits from any directory, the card speaks of
    that persona, not of a small fish, and `guppylm push` publishes the folder as it is, pack included, with the card
    re-rendered for the repo."""
    from test_hub import head, run
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))  # the pack's dataset is built there
    pack = scaffold_persona("fern", tmp_path / "packs" / "fern.yaml")
    (tmp_path / "packs" / "fern.dev.yaml").write_text(FERN_DEV)
    (tmp_path / "packs" / "fern.messages.yaml").write_text(FERN_MESSAGES)
    out = tmp_path / "fern-model"
    train(output_dir=str(out), persona=str(pack), max_steps=30, **{**QUIET, "run_eval": True})
    config = json.loads((out / "config.json").read_text())
    assert config["persona"] == "fern" and str(tmp_path) not in (out / "config.json").read_text()
    assert (out / "persona.yaml").read_bytes() == pack.read_bytes()
    assert (out / "persona.dev.yaml").read_text() == FERN_DEV and (out / "persona.messages.yaml").read_text() == FERN_MESSAGES
    card = (out / "README.md").read_text()
    assert "Fern is a tiny language model in the voice of one persona: Fern, a houseplant on a windowsill" in card
    assert "small fish" not in card

    prompts = {split: load_persona(pack).eval_cases(split) for split in ("eval", "dev")}
    assert [case.prompt for case in prompts["dev"] if case.kind != "paraphrase"] == [p["prompt"] for p in yaml.safe_load(FERN_DEV)["prompts"]]
    shutil.rmtree(tmp_path / "packs")  # eval must not need the original files, nor the directory it was trained from
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for split in prompts:
        result = subprocess.run(guppylm_command("eval", "--model", out, "--split", split, "--max-new-tokens", "4"), capture_output=True,
                                text=True, cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"persona fern: {len(prompts[split])} held-out {split} prompts" in result.stdout

    run(hub, ["-m", "guppylm.cli", "push", "--model", str(out), "--repo-id", "someone/fern"])
    files = head(hub, "model", "someone/fern").files
    assert set(files) == {".gitattributes", *(p.name for p in out.iterdir())} and "persona.yaml" in files
    assert 'from_pretrained("someone/fern", trust_remote_code=True)' in files["README.md"].content.decode()
