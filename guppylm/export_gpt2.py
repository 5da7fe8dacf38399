"""Guppy's GPT-2 twin: the same weights in a stock `GPT2LMHeadModel` folder, loadable with no remote code.

Guppy is GPT-2 with a ReLU feed-forward: learned positions, pre-LayerNorm blocks, fused QKV split q|k|v, 1/sqrt(hs)
scaling, LM head tied to the embedding. So every tool that knows GPT-2 - `transformers serve`, pipelines and Hub
widgets without trust_remote_code, transformers.js, inference servers - runs Guppy once the tensors are renamed:

    model.embed_tokens -> transformer.wte       layers.i.input_layernorm -> h.i.ln_1
    model.embed_positions -> transformer.wpe    layers.i.self_attn.qkv_proj / o_proj -> h.i.attn.c_attn / c_proj
    model.norm -> transformer.ln_f              layers.i.post_attention_layernorm -> h.i.ln_2
                                                layers.i.mlp.fc_in / fc_out -> h.i.mlp.c_fc / c_proj

GPT-2's Conv1D stores a linear layer's weight transposed: (in, out), where nn.Linear has (out, in).

`guppylm export gpt2 --model DIR --output-dir OUT` writes the folder and proves it before it is swapped in: loaded
back with the plain Auto classes, the twin's logits are within 1e-5 of Guppy's and its greedy replies are Guppy's.
One difference remains, by design of each: Guppy in eval mode forces <|im_end|> at its last learned position (so a
reply always ends inside the context); GPT-2 does not. Within `guppylm.inference`'s prompt policy a reply never
reaches that position, and the comparison leaves it out.
"""

import json
from pathlib import Path

import torch

from guppylm.folders import FolderKind, writing_folder
from guppylm.inference import generate, generation_kwargs, load_model, prompt_for
from guppylm.tokenizer import save_tokenizer

REPORT_FILE = "export_report.json"  # what the verification measured; its presence marks the folder as ours
GPT2_KIND = FolderKind(
    "GPT-2 export",
    signature=REPORT_FILE,
    files=(REPORT_FILE, "README.md", "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
           "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"),
)
# Prompts every export must answer exactly as the original does: everyday ones, punctuation, an unknown word.
VERIFY_PROMPTS = [
    "hi guppy",
    "are you hungry?",
    "what do you think about the internet?",
    "tell me about your tank.",
    "do you like bubbles? i like bubbles!",
    "what is a smartphone, little fish?",
]
ATOL = 1e-5  # measured: 0.0 (the same arithmetic in the same order)
PROJECT_URL = "https://github.com/guppylm/guppylm"

LINEAR_NAMES = {"self_attn.qkv_proj": "attn.c_attn", "self_attn.o_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
NORM_NAMES = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}


def gpt2_config(config):
    """The GPT2Config of the same network as GuppyConfig `config`."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        activation_function="relu",
        resid_pdrop=config.hidden_dropout,  # Guppy drops out after attention, after the MLP and after the embeddings,
        embd_pdrop=config.hidden_dropout,  # where GPT-2 does: fine-tuning the twin regularizes as Guppy would
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=True,
        use_cache=True,
        architectures=["GPT2LMHeadModel"],
    )


def gpt2_state_dict(model):
    """GuppyForCausalLM's tensors under GPT2LMHeadModel's names (Conv1D weights transposed)."""
    guppy = model.state_dict()
    twin = {
        "transformer.wte.weight": guppy["model.embed_tokens.weight"],
        "transformer.wpe.weight": guppy["model.embed_positions.weight"],
        "transformer.ln_f.weight": guppy["model.norm.weight"],
        "transformer.ln_f.bias": guppy["model.norm.bias"],
        "lm_head.weight": guppy["model.embed_tokens.weight"],  # tied
    }
    for i in range(model.config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        for name, gpt2_name in LINEAR_NAMES.items():
            twin[f"{theirs}{gpt2_name}.weight"] = guppy[f"{ours}{name}.weight"].t().contiguous()  # (in, out)
            twin[f"{theirs}{gpt2_name}.bias"] = guppy[f"{ours}{name}.bias"]
        for name, gpt2_name in NORM_NAMES.items():
            twin[f"{theirs}{gpt2_name}.weight"] = guppy[f"{ours}{name}.weight"]
            twin[f"{theirs}{gpt2_name}.bias"] = guppy[f"{ours}{name}.bias"]
    return twin


def to_gpt2(model):
    """A GPT2LMHeadModel (eval mode) computing what GuppyForCausalLM `model` computes."""
    from transformers import GPT2LMHeadModel

    twin = GPT2LMHeadModel(gpt2_config(model.config))
    twin.load_state_dict(gpt2_state_dict(model), strict=True)
    twin.generation_config = model.generation_config
    return twin.eval()


def check_vocabulary(model, tokenizer):
    """Raise ValueError unless every id the tokenizer or the configs can produce has a row in the embedding.

    A damaged tokenizer.json (one id of 10**9, say) would otherwise surface deep inside an export as an index
    error - or first as gigabytes of memory."""
    vocab_size = model.config.vocab_size
    ids = {"tokenizer vocabulary": max(tokenizer.get_vocab().values(), default=0)}
    for owner in (model.config, model.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(owner, key, None)
            ids |= {f"{key} {v}": v for v in (value if isinstance(value, list) else [value]) if v is not None}
    bad = {name: value for name, value in ids.items() if not 0 <= value < vocab_size}
    if bad:
        name, value = next(iter(bad.items()))
        raise ValueError(f"the tokenizer or config uses id {value} ({name}), but the model has only {vocab_size} token embeddings")


def compare(model, twin, tokenizer, prompts=VERIFY_PROMPTS):
    """(max |logit difference|, prompts whose greedy reply the twin repeats token for token) over `prompts`.

    Logits are compared at every position of prompt + Guppy's greedy reply except the last, which is never used
    (and, at the context's end, is the one place Guppy forces <|im_end|>)."""
    worst, identical = 0.0, 0
    with torch.no_grad():
        for message in prompts:
            prompt = prompt_for(model, tokenizer, message)
            expected = generate(model, prompt, **generation_kwargs(greedy=True))  # (1, T_prompt + T_reply)
            got = generate(twin, prompt, **generation_kwargs(greedy=True))
            identical += got.tolist() == expected.tolist()
            worst = max(worst, float((twin(expected).logits - model(expected).logits)[0, :-1].abs().max()))
    return worst, identical


def write_card(folder, source, config, name):
    """README.md: what the folder is, how to load it (as `name`: a repo id or the final folder), where it came from."""
    from huggingface_hub import ModelCard, ModelCardData

    from guppylm.folders import is_local

    original = f"[{source}](https://huggingface.co/{source})" if not is_local(source) else f"`{Path(source).name}`"
    data = ModelCardData(
        language="en", license="mit", library_name="transformers", pipeline_tag="text-generation",
        tags=["guppylm", "gpt2", "tiny", "word-level"],
    )
    card = ModelCard(f"""---
{data.to_yaml()}
---

# GuppyLM, GPT-2 twin

A tiny language model that talks like a small fish, in the standard `GPT2LMHeadModel` format: it loads with
`AutoModelForCausalLM` and **no `trust_remote_code`**, so any tool that knows GPT-2 runs it.

It is the GPT-2 twin of the GuppyLM model {original}, made by [GuppyLM]({PROJECT_URL})'s `guppylm export gpt2`:
Guppy's architecture is GPT-2 with a ReLU feed-forward, so the weights are the same, renamed. The export checked
that this folder's logits are within {ATOL:g} of the original's and that its greedy replies are identical.
The original, with GuppyLM's own readable model classes, is the one to study; this twin is the one to deploy.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
messages = [{{"role": "user", "content": "are you hungry?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, do_sample=False, max_new_tokens=40)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

| | |
|---|---|
| layers | {config.n_layer} |
| hidden size | {config.n_embd} |
| attention heads | {config.n_head} |
| feed-forward size | {config.n_inner} (ReLU) |
| context | {config.n_positions} tokens: keep prompt + reply within it |
| vocabulary | {config.vocab_size} words and symbols (lowercase; `<unk>` for anything unknown) |

Differences from the original: the original ends a reply with `<|im_end|>` when it reaches the last position of
its context, where GPT-2 would go on (and then fail past the context); for a plain `forward` on a left-padded batch
pass `position_ids` (`generate` computes them itself); attention weights come back only with
`attn_implementation="eager"`.
""")
    card.save(Path(folder) / "README.md")


def write_twin(model, tokenizer, folder, source, name):
    """The twin's files in `folder`; returns the twin."""
    twin = to_gpt2(model)
    twin.save_pretrained(folder)  # config.json, model.safetensors, generation_config.json
    save_tokenizer(tokenizer, folder)
    write_card(folder, source, twin.config, name)
    return twin


def export_gpt2(model_name, output_dir, overwrite=False, prompts=VERIFY_PROMPTS, repo_id=None):
    """Write the verified GPT-2 twin of `model_name` (a folder or repo id) to `output_dir`; returns the report.
    The model card's snippet loads `repo_id` (the twin's repo, when it is exported for a push), else `output_dir`.

    Raises RuntimeError (and leaves `output_dir` as it was) when the twin, loaded back without remote code, does
    not reproduce the original."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guppylm.folders import check_output_folder

    check_output_folder(output_dir, GPT2_KIND, overwrite)  # before any loading
    model, tokenizer = load_model(model_name)
    check_vocabulary(model, tokenizer)
    with writing_folder(output_dir, GPT2_KIND, overwrite) as staging:
        write_twin(model, tokenizer, staging, str(model_name), repo_id or str(output_dir))
        twin = AutoModelForCausalLM.from_pretrained(staging, trust_remote_code=False).eval()
        if type(twin).__name__ != "GPT2LMHeadModel":
            raise RuntimeError(f"the GPT-2 export loads as {type(twin).__name__}, not GPT2LMHeadModel")
        worst, identical = compare(model, twin, AutoTokenizer.from_pretrained(staging), prompts)
        report = {
            "format": "gpt2",
            "source": str(model_name),
            "verified": worst <= ATOL and identical == len(prompts),
            "atol": ATOL,
            "max_abs_logit_diff": worst,
            "greedy_identical": identical,
            "prompts": prompts,
        }
        save_report(staging, report, f"the GPT-2 export does not match the original: max |logit diff| {worst:.2e} "
                    f"(allowed {ATOL:.0e}), identical greedy replies {identical}/{len(prompts)}")
    return report


def save_report(folder, report, mismatch):
    """Write export_report.json if the export reproduced its source; else raise RuntimeError(`mismatch`), and the
    export's staging folder is dropped."""
    if not report["verified"]:
        raise RuntimeError(mismatch)
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def describe(report):
    """One line for the CLI."""
    return (
        f"GPT-2 twin: max |logit diff| {report['max_abs_logit_diff']:.1e} | "
        f"greedy identical {report['greedy_identical']}/{len(report['prompts'])} | loads with no remote code"
    )


def push_gpt2(model_name, repo_id, private=False, token=None, revision=None):
    """`guppylm push --format gpt2`: export the verified twin into a temporary folder and publish it."""
    import tempfile

    from guppylm.hub import push_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        export_gpt2(model_name, folder, repo_id=repo_id)
        return push_model(folder, repo_id, private=private, token=token, revision=revision)
