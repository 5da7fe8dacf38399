"""The model folder's human side: the loss curve and the model card (huggingface_hub's ModelCard)."""

import platform
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = files("guppylm") / "templates" / "model_card.md"  # package data: a wheel install has it too
# The transformers releases `make compat` loads a saved folder's code under (tests/compat/matrix.py runs these).
TESTED_TRANSFORMERS = ("4.57.6", "5.0.0", "5.24.0", "5.25.0")


def write_loss_curve(history, path, eval_name="held-out loss"):
    """Train loss per step and the test loss (`eval_name`) at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history["step"], history["train_loss"], lw=0.8, alpha=0.7, label="train")
    if history["eval_step"]:
        ax.plot(history["eval_step"], history["eval_loss"], "o-", label=eval_name.removesuffix(" loss"))
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="GuppyLM training loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def hardware_name(device):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def persona_words(summary):
    """(display name, one-line description) of the model's persona: from the summary, or, for a folder trained
    before summaries recorded them, from the shipped pack of that name."""
    if "persona_description" in summary:
        return summary["persona_display_name"], summary["persona_description"]
    from dataset_builder import load_persona

    try:
        pack = load_persona(summary["persona"])
    except ValueError:  # a pack that is not shipped: its name is all there is
        return summary["persona"].capitalize(), f"{summary['persona'].capitalize()}."
    return pack.display_name, pack.description


def write_model_card(output_dir, summary, repo_id=None):
    """README.md for the model folder, from the guppylm/templates/model_card.md template and the training summary.

    The usage snippet loads `repo_id` when the card is rendered for a push, else the folder itself.
    """
    from guppylm.configuration_guppylm import GuppyConfig

    config = GuppyConfig.from_pretrained(output_dir)  # not AutoConfig: under `guppylm push` nothing registered it
    name = f"GuppyLM {summary['preset']} ({summary['persona']})"
    display_name, description = persona_words(summary)
    eval_loss = (
        f"{summary.get('eval_loss_name', 'held-out loss').removesuffix(' loss')} {summary['final_eval_loss']}"
        if summary.get("final_eval_loss") is not None else "no test loss: the dataset has no test split"
    )
    eval_results, eval_summary = None, "Not evaluated (trained with --no-eval)."
    s = summary.get("eval")
    if s:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=f"guppylm/{s['persona']}-held-out-prompts",
                dataset_name=f"{s['persona']} held-out prompts",
                metric_type="accuracy",
                metric_name=name_of,
                metric_value=round(s[key], 4),
            )
            for key, name_of in (("on_topic", "on-topic rate"), ("in_style", "in-style rate"))
        ]
        eval_summary = (
            f"{s['prompts']} held-out prompts over {s['topics']} topics, phrased differently from anything in the "
            f"training data, answered greedily: **{s['on_topic']:.1%} on-topic** (the reply contains a word of the "
            f"prompt's topic) and **{s['in_style']:.1%} in style** (keeps the persona's style rules and ends with `<|im_end|>`). "
            f"Reproduce with `guppylm eval --model <this model>`."
        )
    card_data = ModelCardData(
        language="en",
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["guppylm", "tiny", "from-scratch", "word-level", "custom_code"],
        datasets=[summary["dataset"]] if summary.get("dataset_is_hub_repo") else None,
        model_name=name,
        eval_results=eval_results,
    )
    values = {key: value for key, value in summary.items() if key != "history"}  # the per-step history stays in JSON
    values.update({key: f"{summary[key]:,}" for key in ("parameters", "tokens", "tokens_per_second")})
    values.update({k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings", "vocab_size")})
    values.update(
        tested_transformers=", ".join(TESTED_TRANSFORMERS),
        model_name=name,
        display_name=display_name,
        persona_description=description,
        eval_loss=eval_loss,
        repo_id=repo_id or str(output_dir),
        hardware=hardware_name(summary["device"]),
        eval_summary=eval_summary,
    )
    card = ModelCard.from_template(card_data, template_str=TEMPLATE.read_text(encoding="utf-8"), **values)
    card.save(Path(output_dir) / "README.md")
    return card
