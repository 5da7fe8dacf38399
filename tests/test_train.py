"""Training: the tiny preset end to end, resume after kill -9, 2-process accelerate launch, clear failures."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import guppylm_command
from dataset_builder import load_persona
from guppylm.modeling_guppylm import GuppyForCausalLM
from guppylm.train import LengthGroupedBatches, collate, latest_checkpoint, train, weighted_lm_loss


def test_output_folder_is_complete_and_loss_went_down(trained_tiny_dir):
    names = {p.name for p in trained_tiny_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "configuration_guppylm.py", "modeling_guppylm.py", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json", "README.md", "loss_curve.png", "training_summary.json"}
    assert expected <= names
    summary = json.loads((trained_tiny_dir / "training_summary.json").read_text())
    assert summary["steps"] == 150 and summary["processes"] == 1
    assert summary["final_train_loss"] < 0.7 * summary["first_train_loss"]
    assert 0 <= summary["eval"]["on_topic"] <= 1 and summary["eval"]["prompts"] >= 60
    generation = json.loads((trained_tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 3 and generation["do_sample"] is True
    card = (trained_tiny_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "model-index" in card and "on-topic" in card


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


def test_collate_pads_right_and_masks_padding_out_of_the_loss():
    batch = collate([[2, 5, 6, 3], [2, 7, 3]], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert batch["labels"].tolist() == [[2, 5, 6, 3], [2, 7, 3, -100]]
    assert batch["loss_weights"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # 9 stands for the assistant role token: the token after it starts the reply, unless it is padding
    weighted = collate([[2, 9, 6, 3], [2, 7, 9]], pad_id=0, reply_start_id=9, reply_start_weight=5.0)
    assert weighted["loss_weights"].tolist() == [[1, 1, 5, 1], [1, 1, 1, 0]]


def test_weighted_loss_is_the_model_loss_with_unit_weights_and_counts_weighted_tokens_more(tiny_model_dir):
    model = GuppyForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate([[2, 9, 6, 3, 5], [2, 7, 3]], pad_id=0)
    logits = model(input_ids=batch["input_ids"]).logits
    plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert torch.allclose(weighted_lm_loss(logits, batch["labels"], batch["loss_weights"]), plain, atol=1e-6)
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none")
    weighted = collate([[2, 9, 6, 3, 5]], pad_id=0, reply_start_id=9, reply_start_weight=4.0)
    expected = (per_token.sum() + 3 * per_token[1]) / (4 + 3)  # the target after 9 (position 2) counts 4 times
    assert torch.allclose(weighted_lm_loss(logits[:1], weighted["labels"], weighted["loss_weights"]), expected, atol=1e-6)


def run_train(out, dataset, *extra, **popen):
    return subprocess.Popen(
        guppylm_command("train", "--preset", "tiny", "--dataset", dataset, "--output-dir", out, "--no-eval", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, small_dataset_dir):
    args = ("--max-steps", "400", "--checkpoint-every", "50", "--eval-every", "1000")
    straight = run_train(tmp_path / "straight", small_dataset_dir, *args)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    victim = run_train(tmp_path / "killed", small_dataset_dir, *args)
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "killed")[0] == 0 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    step, _ = latest_checkpoint(tmp_path / "killed")
    assert 0 < step < 400

    resumed = run_train(tmp_path / "killed", small_dataset_dir, *args, "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log and f"at step {step}" in log
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_accelerate_launch_runs_two_real_processes_on_cpu(tmp_path, small_dataset_dir):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "guppylm.train", "--preset", "tiny",
               "--dataset", str(small_dataset_dir), "--output-dir", str(tmp_path), "--max-steps", "20", "--no-eval"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "processes 2" in log and "batch 16 x 2 proc x 1 accum = 32" in log
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 20


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
    with pytest.raises(OSError, match="cannot write to output directory"):
        train(output_dir=str(locked / "out"), preset="tiny")


def test_an_output_dir_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = subprocess.run(guppylm_command("train", "--preset", "tiny", "--output-dir", tmp_path / "file"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "cannot write to output directory" in result.stderr and "Traceback" not in result.stderr
