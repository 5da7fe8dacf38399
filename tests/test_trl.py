"""TRL and PEFT used as their docs say: SFTTrainer on the `messages` column with assistant-only loss (the chat
template's {% generation %} markers), with padding-free packing (the model's block-diagonal mask), and with LoRA
(trained, merged, saved, reloaded by guppylm, chatting)."""

import pytest
import torch
from torch.nn import functional as F

from peft import LoraConfig, get_peft_model  # the test extras: pip install -e '.[test]'
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from guppylm import GuppyConfig, GuppyForCausalLM
from guppylm.export_gpt2 import to_gpt2
from guppylm.inference import generate, generation_kwargs, load_model, prompt_for
from guppylm.tokenizer import build_tokenizer, conversation_texts, save_tokenizer

STEPS = 20


@pytest.fixture(scope="module")
def built():
    """A small built dataset: the guppy pack's real builder, 120 conversations, the `messages` column only."""
    from dataset_builder import build_dataset

    return build_dataset("guppy", num_samples=120, test_size=12, seed=0)["train"].select_columns(["messages"])


@pytest.fixture(scope="module")
def tokenizer(built):
    return build_tokenizer(conversation_texts(built), model_max_length=64)


@pytest.fixture(scope="module")
def chats(built, tokenizer):
    """The conversations that fit the tiny model's 64 positions (the pack's long messages run to ~100 tokens)."""
    length = lambda row: len(tokenizer.apply_chat_template(row["messages"], return_dict=True)["input_ids"])
    fitting = built.filter(lambda row: length(row) <= tokenizer.model_max_length)
    assert len(fitting) > 0.8 * len(built)
    return fitting


def tiny_model(tokenizer):
    torch.manual_seed(0)
    return GuppyForCausalLM(GuppyConfig.from_preset("tiny", vocab_size=len(tokenizer)))


def sft(model, tokenizer, chats, output_dir, peft_config=None, **config):
    """An SFTTrainer with the settings every test shares: 20 steps on the CPU, nothing saved, no progress bars."""
    args = SFTConfig(
        **{"output_dir": str(output_dir), "max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
           "logging_steps": 5, "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0,
           "disable_tqdm": True, **config}
    )
    return SFTTrainer(model=model, args=args, train_dataset=chats, processing_class=tokenizer, peft_config=peft_config)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_assistant_only_loss_labels_exactly_the_replies(chats, tokenizer, tmp_path):
    assert has_generation_markers(tokenizer.chat_template) and is_chat_template_stop_token_trained(tokenizer)
    trainer = sft(tiny_model(tokenizer), tokenizer, chats, tmp_path, assistant_only_loss=True)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    for row, messages, input_ids, labels in zip(rows, chats["messages"], batch["input_ids"], batch["labels"]):
        # the reply begins after the generation prompt and runs to its <|im_end|>: that, and nothing else, is learned
        prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = row["input_ids"]
        assert ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
        expected = [-100] * len(prompt) + ids[len(prompt) :] + [-100] * (len(input_ids) - len(ids))  # padded on the right
        assert labels.tolist() == expected

    trainer.train()
    assert trainer.state.global_step == STEPS and losses(trainer)[-1] < losses(trainer)[0]


def per_token_losses(model, input_ids, labels, position_ids):
    """Cross-entropy of each next-token prediction (T - 1,), -100 labels giving 0."""
    logits = model(input_ids=input_ids[None], position_ids=position_ids[None]).logits[0]
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")


def test_packing_trains_and_each_packed_conversation_has_its_unpacked_loss(chats, tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    trainer = sft(model, tokenizer, chats, tmp_path, packing=True, max_length=160, assistant_only_loss=True)
    batch = trainer.data_collator([trainer.train_dataset[0]])  # padding-free: one row, positions restart per conversation
    input_ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert "attention_mask" not in batch and len(starts) >= 3
    assert len(input_ids) > model.config.max_position_embeddings  # a row longer than the context: positions decide

    with torch.no_grad():  # the tiny preset has no dropout: training mode is deterministic
        packed = per_token_losses(model, input_ids, labels, positions)
        for start, end in zip(starts, [*starts[1:], len(input_ids)]):
            alone = per_token_losses(model, input_ids[start:end], labels[start:end], positions[start:end])
            assert (packed[start : end - 1] - alone).abs().max().item() <= 1e-4
        # and the loss the trainer optimizes is the mean over every labelled token of the segments run alone
        assert abs(model(**batch).loss.item() - packed.sum().item() / (labels[1:] != -100).sum().item()) <= 1e-4

    trainer.train()
    assert trainer.state.global_step == STEPS and losses(trainer)[-1] < losses(trainer)[0]


def test_lora_trains_merges_saves_and_chats_after_reloading(chats, tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="target_modules"):  # PEFT knows no module names for an unknown model_type
        get_peft_model(tiny_model(tokenizer), LoraConfig(task_type="CAUSAL_LM"))
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=8, lora_alpha=16, lora_dropout=0.0)
    trainer = sft(model, tokenizer, chats, tmp_path / "trainer", peft_config=lora, assistant_only_loss=True, learning_rate=1e-2)
    adapted = {name.split(".lora_A")[0].removeprefix("base_model.model.") for name, _ in trainer.model.named_parameters() if "lora_A" in name}
    assert adapted == {f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.fc_in", "mlp.fc_out")}
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]

    merged = trainer.model.merge_and_unload().eval()
    assert type(merged) is GuppyForCausalLM
    changed = [name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, before[name])]
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed and "model.embed_tokens.weight" not in changed
    merged.save_pretrained(tmp_path / "merged")
    save_tokenizer(tokenizer, tmp_path / "merged")

    reloaded, reloaded_tokenizer = load_model(tmp_path / "merged")  # refuses missing or misshapen tensors
    prompt = prompt_for(reloaded, reloaded_tokenizer, "are you hungry?", max_new_tokens=12)
    with torch.no_grad():
        expected = generate(merged, prompt, **generation_kwargs(greedy=True))
        assert torch.equal(generate(reloaded, prompt, **generation_kwargs(greedy=True)), expected)
    assert expected.shape[1] > prompt.input_ids.shape[1]


def test_peft_finds_the_gpt2_twins_modules_by_itself(tokenizer):
    """The twin's model_type is one PEFT knows: LoraConfig(task_type="CAUSAL_LM") needs no module names."""
    twin = get_peft_model(to_gpt2(tiny_model(tokenizer)), LoraConfig(task_type="CAUSAL_LM"))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in twin.named_parameters() if "lora_A" in name}
    assert adapted == {"c_attn"}
