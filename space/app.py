"""GuppyLM Space: chat with Guppy, then look inside the last reply.

    GUPPYLM_MODEL=runs/guppy GRADIO_SERVER_PORT=7861 python space/app.py

GUPPYLM_MODEL names a model folder or Hub repo id (default: runs/guppy, the model `make demo` trains);
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by Gradio itself. On huggingface.co, `guppylm space push`
uploads this folder together with the guppylm package and sets GUPPYLM_MODEL as a Space variable.
Everything the page needs is served by this process (analytics off, system fonts), so it works offline.
"""

import html
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported, so set it first

try:
    import gradio as gr
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
except ImportError as error:
    sys.exit(f"the Space needs gradio and matplotlib ({error}): pip install 'guppylm[space]'")
from guppylm.folders import default_model
from guppylm.inference import generation_kwargs, load_model, stream_generation
from guppylm.explain import TOP_CANDIDATES, architecture, explain

MAX_MESSAGE_CHARS = 1000  # more than any context holds; prompt_for then keeps the end that fits
CONCURRENCY = 4  # generations running at once; the queue holds the rest
EXAMPLES = [
    "hi guppy!",
    "are you hungry?",
    "is the water too warm?",
    "what do you think of the glass?",
    "do you like bubbles?",
    "are you scared of the cat?",
    "what is the meaning of life?",
    "goodbye, little fish",
]
KIND_COLORS = {"word": "#2563eb", "unknown": "#dc2626", "special": "#6b7280"}  # dark enough for the white id tags
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def card_evaluation(name_or_path):
    """The model card's evaluation results as one line, or None when there is no card or it has none."""
    from huggingface_hub import ModelCard

    readme = Path(name_or_path) / "README.md"
    if Path(name_or_path).is_dir() and not readme.is_file():
        return None
    try:
        card = ModelCard.load(readme if readme.is_file() else name_or_path)
    except OSError:  # no card on the Hub, or no network: the panel goes without
        return None
    results = card.data.eval_results or []
    if not results:
        return None
    scores = ", ".join(f"{result.metric_name} {result.metric_value:.0%}" for result in results)
    return f"{scores} ({results[0].dataset_name})"


def about_markdown(model, name_or_path):
    arch = architecture(model)
    lines = [
        "### About Guppy",
        f"A tiny language model that talks like a small fish: **{arch['parameters']:,} parameters**, "
        f"**{arch['layers']} layers**, a vocabulary of **{arch['vocabulary']:,}** words and symbols.",
        f"Model: `{name_or_path}`",
    ]
    evaluation = card_evaluation(name_or_path)
    if evaluation:
        lines.append(f"Evaluation: {evaluation}")
    lines.append(
        "**Single-turn by design**: Guppy answers each message on its own and does not remember earlier ones. "
        "Words it never learned become `<unk>`."
    )
    return "\n\n".join(lines)


# --- rendering the "Inside Guppy" view --------------------------------------------------------------


def highlighted(tokens):
    """HighlightedText value and colours: each token tagged with its id, coloured by kind."""
    value = [(token.text, str(token.id)) for token in tokens]
    return gr.HighlightedText(value=value, color_map={str(token.id): KIND_COLORS[token.kind] for token in tokens})


def steps_rows(explanation):
    """One row per generated token; the drawn token is bold wherever it appears among the candidates."""

    def cell(token, bold=False):
        text = html.escape(token.text)  # "<pad>" would otherwise be read as an HTML tag and vanish
        return f"**{text}**" if bold else text

    rows = []
    for number, step in enumerate(explanation.steps, 1):
        cells = [f"{cell(t, t.id == step.chosen.id)} {p:.1%}" for t, p in step.candidates]
        rows.append([number, cell(step.chosen, True), f"{step.probability:.1%}", *cells, *[""] * (TOP_CANDIDATES - len(cells))])
    return rows


def attention_figure(explanation, layer, head):
    """Heatmap of one head: row i is where token i looked (rows sum to 1; the future is masked)."""
    tokens = [token.text for token in explanation.prompt + explanation.completion]
    weights = explanation.attentions[layer, head].numpy()  # (T, T)
    fig = Figure(figsize=(7.5, 6.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1))  # sqrt scale: small weights stay visible
    fontsize = max(4, min(9, 420 // len(tokens)))
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=fontsize)
    boundary = len(explanation.prompt) - 0.5  # prompt above/left of the lines, reply below/right
    ax.axhline(boundary, color="darkorange", lw=1)
    ax.axvline(boundary, color="darkorange", lw=1)
    ax.set(xlabel="looks at", ylabel="token", title=f"layer {layer + 1}, head {head + 1}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return fig


def show_inside(last):
    explanation, settings = last
    caption = (
        f"**The last reply, token by token** ({len(explanation.prompt)} prompt tokens, {len(explanation.completion)} "
        f"generated; {settings}). Each step shows the {TOP_CANDIDATES} most likely next tokens and the one drawn, in bold."
    )
    return caption, highlighted(explanation.prompt), highlighted(explanation.completion), steps_rows(explanation)


def draw_attention(last, layer, head):
    return attention_figure(last[0], layer, head) if last else None


# --- the app ---------------------------------------------------------------------------------------------


def build_demo(model, tokenizer, name_or_path):
    config, defaults = model.config, model.generation_config
    max_reply = config.max_position_embeddings // 2  # the other half is left for the prompt

    def respond(message, history, temperature, top_k, max_new_tokens):
        # history is ignored on purpose: Guppy is single-turn
        message = message[:MAX_MESSAGE_CHARS]
        if not message.strip():
            yield "blub? type a few words and i'll answer.", gr.skip()
            return
        kwargs = generation_kwargs(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens)
        settings = f"temperature {kwargs['temperature']:g}, top-k {kwargs['top_k']}, top-p {defaults.top_p or 1:g}"
        # The reply streams from the same generate call that records its scores, so "Inside Guppy" shows
        # exactly the tokens the user saw being drawn.
        run = lambda streamer: explain(model, tokenizer, message, streamer=streamer, **kwargs)
        for reply, explanation in stream_generation(tokenizer, run):
            if explanation is None:
                yield reply, gr.skip()
        if explanation.dropped:
            gr.Info(f"Your message was {explanation.dropped} tokens too long for Guppy's memory; it read only the end.")
        yield explanation.reply or "…", (explanation, settings)

    with gr.Blocks(title="Guppy", analytics_enabled=False) as demo:
        gr.Markdown("# Guppy\nA tiny language model that talks like a small fish. Say something; it answers in one turn.")
        last = gr.State(None, time_to_live=3600)  # (Explanation, settings) of this browser's last reply
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    gr.ChatInterface(
                        respond,
                        chatbot=gr.Chatbot(
                            label="Guppy", height=420, placeholder="Single-turn: each message is answered on its own."
                        ),
                        textbox=gr.Textbox(placeholder="say something to guppy…", max_length=MAX_MESSAGE_CHARS),
                        additional_inputs=[
                            # render=False: ChatInterface places them in its accordion
                            gr.Slider(0.1, 2.0, value=defaults.temperature or 1.0, step=0.05, label="temperature", render=False),
                            gr.Slider(1, 100, value=defaults.top_k or 50, step=1, label="top-k", render=False),
                            gr.Slider(
                                1, max_reply, value=min(defaults.max_new_tokens or max_reply, max_reply), step=1,
                                label="max new tokens", render=False,
                            ),
                        ],
                        additional_inputs_accordion=gr.Accordion("Sampling", open=True, render=False),
                        additional_outputs=[last],
                        examples=[[example] for example in EXAMPLES],  # one list per example: there are additional inputs
                        api_name="chat",
                        api_description="Guppy's reply to one message (single-turn).",
                        flagging_mode="never",
                        fill_height=False,
                    )
                with gr.Column(scale=1):
                    gr.Markdown(about_markdown(model, name_or_path))
        with gr.Tab("Inside Guppy"):
            caption = gr.Markdown("Send Guppy a message in the **Chat** tab, then come back here to see how it answered.")
            legend = "tagged with their ids; unknown words red, special tokens grey"
            with gr.Row():
                prompt_tokens = gr.HighlightedText(label=f"Your message, as Guppy read it ({legend})")
                reply_tokens = gr.HighlightedText(label="Guppy's reply, every generated token")
            steps = gr.Dataframe(
                headers=["step", "drew", "p", *(f"#{rank}" for rank in range(1, TOP_CANDIDATES + 1))],
                datatype=["number", "markdown", "str", *["markdown"] * TOP_CANDIDATES],
                label="Sampling, step by step (probabilities under the settings used)",
                interactive=False,
                max_height=360,
            )
            with gr.Row():
                with gr.Column(scale=1, min_width=200):
                    gr.Markdown(
                        "**Attention**: for each token (row), how much each earlier token (column) mattered. "
                        "The orange lines separate your message from the reply."
                    )
                    layer = gr.Radio([(f"layer {i + 1}", i) for i in range(config.num_hidden_layers)], value=0, label="layer")
                    head = gr.Radio([(f"head {i + 1}", i) for i in range(config.num_attention_heads)], value=0, label="head")
                with gr.Column(scale=3):
                    attention = gr.Plot(label="attention weights", format="png")
            arch = architecture(model)
            with gr.Row():
                shape = ("layers", "heads", "hidden size", "feed-forward size", "context", "vocabulary")
                gr.Dataframe(
                    [[name, arch[name]] for name in shape], headers=["architecture", ""],
                    label="Architecture (from the model's config)", interactive=False,
                )
                components = [[name, f"{count:,}"] for name, count in arch["parameters by component"].items()]
                gr.Dataframe(
                    [*components, ["total", f"{arch['parameters']:,}"]], headers=["component", "parameters"],
                    label="Parameters", interactive=False,
                )

        # the view is drawn from the stored Explanation: no generation, so no need to wait in the queue
        last.change(show_inside, last, [caption, prompt_tokens, reply_tokens, steps], queue=False, api_visibility="private")
        gr.on(
            [last.change, layer.change, head.change], draw_attention, [last, layer, head], attention,
            queue=False, api_visibility="private",
        )
    return demo


def main():
    from transformers.utils import logging

    logging.set_verbosity_error()  # the Space reports truncation itself, in words
    name_or_path = default_model()
    try:
        model, tokenizer = load_model(name_or_path)
    except OSError as error:  # load_model says in one line what is missing or broken
        sys.exit(f"space/app.py: {error}")
    demo = build_demo(model, tokenizer, name_or_path)
    demo.queue(default_concurrency_limit=CONCURRENCY).launch(theme=THEME, footer_links=["api"])


if __name__ == "__main__":
    main()
