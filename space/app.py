"""GuppyLM Space: chat with Guppy, then look inside any of its replies.

    GUPPYLM_MODEL=runs/guppy GRADIO_SERVER_PORT=7861 python space/app.py

GUPPYLM_MODEL names a model folder or Hub repo id (default: runs/guppy, the model `make demo` trains);
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by Gradio itself. On huggingface.co, `guppylm space push`
uploads this folder together with the guppylm package and sets GUPPYLM_MODEL as a Space variable.
Everything the page needs is served by this process (analytics off, system fonts), so it works offline.
The title, example prompts and wording come from web/demo.json, which the browser page reads too.
"""

import html
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported, so set it first

try:
    import gradio as gr
except ImportError as error:
    sys.exit(f"the Space needs gradio ({error}): pip install 'guppylm[space]'")
from guppylm.explain import architecture, explain_trace, trace_reply
from guppylm.folders import default_model
from guppylm.inference import LIMITS, generation_kwargs, load_model, stream_generation

DEMO = json.loads((Path(__file__).parent / "web" / "demo.json").read_text())  # shared with the browser page
MAX_MESSAGE_CHARS = 1000  # more than any context holds; prompt_for then keeps the end that fits
CONCURRENCY = 4  # generations running at once; the queue holds the rest
KEPT_TRACES = 20  # replies per visitor that can still be looked inside (a few KB each)
HEATMAP_TOKENS = 160  # attention is drawn over at most this many tokens (a context of 128 always fits)
SESSION_SECONDS = 3600  # a visitor's traces are dropped an hour after their last use
MAX_UPLOAD = "1kb"  # the Space has no file input: uploads are refused
CACHE_CLEANUP = (3600, 3600)  # every hour, delete cached files older than an hour (there should be none)
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = (Path(__file__).parent / "style.css").read_text()


# --- "What is Guppy?": from the model's config, card and training_summary.json -------------------------------


def model_file(name_or_path, filename):
    """Path of `filename` in the model folder or Hub repo, or None when it has none (or the Hub is out of reach)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename))
    except (OSError, EntryNotFoundError):  # not in the repo, no network, offline mode: the panel goes without
        return None


def card_evaluation(name_or_path):
    """The model card's evaluation results as {metric name: value, "dataset": name}, or {} without a card or results."""
    from huggingface_hub import ModelCard

    readme = model_file(name_or_path, "README.md")
    results = (ModelCard.load(readme).data.eval_results or []) if readme else []
    return {**{r.metric_name: r.metric_value for r in results}, "dataset": results[0].dataset_name} if results else {}


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def about_markdown(model, name_or_path):
    """The "What is Guppy?" panel: what it is, how it was made and in how long, how well it does, what to ask."""
    arch = architecture(model)
    lines = [
        f"### What is {DEMO['title']}?",
        f"{DEMO['tagline']} It is a transformer, the kind of neural network behind the big chatbots, only tiny: "
        f"**{arch['parameters']:,} numbers** learned in training, {arch['layers']} layers, and a vocabulary of "
        f"{arch['vocabulary']:,} words and marks.",
    ]
    summary_file = model_file(name_or_path, "training_summary.json")
    if summary_file:
        s = json.loads(summary_file.read_text())
        hardware = "a CPU" if s["device"] == "cpu" else f"{s['processes']} GPU{'s' * (s['processes'] > 1)}"
        lines.append(
            f"**How it was made**: from scratch, by [GuppyLM](https://github.com/guppylm/guppylm). "
            f"{s['train_samples']:,} short chats were generated from templates, then Guppy learned from them for "
            f"{s['steps']:,} steps: **{duration(s['train_seconds'])} on {hardware}** "
            f"({duration(s['total_seconds'])} with making the data and testing)."
        )
    evaluation = card_evaluation(name_or_path)
    if "on-topic rate" in evaluation:
        lines.append(
            f"**How well it works**: asked questions it had never seen ({evaluation['dataset']}), it answered on "
            f"the question's topic **{evaluation['on-topic rate']:.0%}** of the time."
        )
    lines += [
        f"**Single-turn**: {DEMO['single_turn']}",
        f"**What to ask**: {DEMO['ask_about']}",
        f"**Look inside**: tap “{DEMO['inside']['link']}” under a reply to see how Guppy made it, token by token.",
        f"<small>Model: <code>{html.escape(name_or_path)}</code></small>",
    ]
    return "\n\n".join(lines)


# --- the chat: a history of messages, and one Trace per turn for "Inside Guppy" -------------------------------


def text_of(message):
    """A chat message's text: Gradio hands messages back with their content as a list of parts."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def turns(history):
    """How many messages the person sent: one Guppy reply (and one Trace) belongs to each."""
    return sum(message["role"] == "user" for message in history)


def keep_recent(traces):
    """One entry per turn, but only the last KEPT_TRACES keep their Trace: a visitor's state stays small."""
    old = max(len(traces) - KEPT_TRACES, 0)
    return [None] * old + traces[old:]


def notice(title, text):
    """A note under a reply (message cut, reply at its limit, an error): a collapsed box in the chat."""
    return {"role": "assistant", "content": text, "metadata": {"title": title, "status": "done"}}


def notices(trace):
    lines = []
    if trace.dropped:
        lines.append(notice("✂️ Your message was cut", DEMO["notices"]["message_cut"].format(dropped=trace.dropped)))
    if trace.cut:
        lines.append(notice("⏹️ The reply hit its limit", DEMO["notices"]["reply_cut"].format(room=trace.room)))
    return lines


def idle_input():
    """The message box between replies: editable, with its Send button."""
    return gr.Textbox(interactive=True, submit_btn=DEMO["buttons"]["send"], stop_btn=False)


def busy_input(**update):
    """The message box while Guppy replies: locked, its button turned into Stop."""
    return gr.Textbox(interactive=False, submit_btn=False, stop_btn=DEMO["buttons"]["stop"], **update)


def settings_kwargs(temperature, top_k, top_p, max_new_tokens):
    """generate() arguments from the Advanced sliders; a ValueError names a setting out of its range."""
    return generation_kwargs(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)


def stream_trace(model, tokenizer, message, **kwargs):
    """Yield (reply so far, None) as it is drawn, then (reply, its Trace)."""
    run = lambda streamer: trace_reply(model, tokenizer, message, streamer=streamer, **kwargs)
    yield from stream_generation(tokenizer, run)


# --- "Inside Guppy": HTML that follows the light/dark theme and fits a phone -------------------------------------


def percent(p):
    return f"{p:.0%}" if p >= 0.01 or p == 0 else "<1%"


def token_html(token):
    text = html.escape(token.text)  # "<unk>" would otherwise be read as an HTML tag and vanish
    typed = f'<span class="typed">you typed “{html.escape(token.typed)}”</span>' if token.kind == "unknown" else ""
    return f'<span class="tok {token.kind}"><b>{text}</b>{typed}<small>{token.id}</small></span>'


def tokens_html(tokens):
    legend = '<p class="legend"><span class="tok word">word</span> <span class="tok unknown">unknown</span> ' \
             '<span class="tok special">chat marker</span> <small>the small number is the token\'s id</small></p>'
    return f'<div class="tokens">{"".join(map(token_html, tokens))}</div>{legend}'


def steps_html(explanation):
    """Every step of the reply: the token drawn, its chance before and after the settings, the runners-up."""
    rows = []
    for number, step in enumerate(explanation.steps, 1):
        others = ", ".join(
            f"{html.escape(c.token.text)} {percent(c.model_probability)}→{percent(c.probability)}"
            for c in step.candidates if c.token.id != step.chosen.id and c.model_probability >= 0.01
        )
        rows.append(
            f"<tr><td>{number}</td><td><b>{html.escape(step.chosen.text)}</b>"
            f"{f'<small>or: {others}</small>' if others else ''}</td>"
            f'<td><span class="bar" style="--p:{step.model_probability:.3f}"></span>{percent(step.model_probability)}</td>'
            f'<td><span class="bar" style="--p:{step.probability:.3f}"></span>{percent(step.probability)}</td></tr>'
        )
    head = "<tr><th>#</th><th>wrote</th><th>Guppy's guess</th><th>after settings</th></tr>"
    return f'<div class="scroll"><table class="steps"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def heatmap_html(explanation, layer, head):
    """One head's attention as a grid: row i is where token i looked (rows sum to 1; the future is blank)."""
    tokens = (explanation.prompt + explanation.completion)[:HEATMAP_TOKENS]
    weights = explanation.attentions[layer, head, : len(tokens), : len(tokens)].tolist()  # (T, T)
    reply_start = len(explanation.prompt)
    label = lambda i, kind: f'<span class="{kind}{" reply" if i >= reply_start else ""}">{html.escape(tokens[i].text)}</span>'
    cells = ['<span class="corner"></span>', *(label(i, "col") for i in range(len(tokens)))]
    for i, row in enumerate(weights):
        cells.append(label(i, "row"))
        # alpha = sqrt(weight): small weights stay visible; the readout squares it back
        cells += [f'<i style="--a:{w ** 0.5:.2f}"></i>' if j <= i else "<i></i>" for j, w in enumerate(row)]
    names = html.escape(json.dumps([token.text for token in tokens]))
    more = len(explanation.prompt) + len(explanation.completion) - len(tokens)
    note = f'<p class="legend">The first {len(tokens)} tokens; {more} more are not drawn.</p>' if more > 0 else ""
    return (
        f'<p class="readout">Layer {layer + 1}, head {head + 1}. Tap or hover a square: which token looked at which, how much. '
        f'<span class="reply">Orange</span> labels are Guppy\'s reply.</p>'
        f'<div class="scroll"><div class="heat" data-tokens="{names}" style="--n:{len(tokens)}">{"".join(cells)}</div></div>{note}'
    )


# Tap/hover readout for the heatmap: one listener on the component, so it survives every re-render.
HEATMAP_JS = """
const show = (event) => {
  const cell = event.target.closest('.heat i');
  if (!cell || !cell.style.getPropertyValue('--a')) return;
  const grid = cell.parentElement, names = JSON.parse(grid.dataset.tokens), n = names.length;
  const index = [...grid.querySelectorAll('i')].indexOf(cell), row = Math.floor(index / n), col = index % n;
  const weight = Math.round(100 * cell.style.getPropertyValue('--a') ** 2);
  element.querySelector('.readout').textContent = `“${names[row]}” looked at “${names[col]}”: ${weight}% of its attention`;
};
element.addEventListener('pointerover', show);
element.addEventListener('click', show);
"""


def inside_caption(trace, turn, total, explanation):
    settings = trace.settings
    drawn = (
        f"temperature {settings['temperature'] or 1:g}, top-k {settings['top_k'] or 'off'}, top-p {settings['top_p'] or 1:g}"
        if settings["do_sample"] else "greedy: always the most likely token"
    )
    return (
        f"**Reply {turn + 1} of {total}.** You said “{html.escape(trace.message[:200])}”; Guppy answered "
        f"“{html.escape(trace.reply)}”. It read {len(explanation.prompt)} tokens and wrote {len(explanation.completion)} "
        f"({drawn})."
    )


EMPTY_INSIDE = f"Send Guppy a message, then tap **{DEMO['inside']['link']}** under its reply."
GONE_INSIDE = "This reply was stopped, failed or is too old to look inside; pick another."


# --- what the events do: answering (a generator, streamed) and looking inside -----------------------------------


def start(message, history):
    """Show the message at once and lock the input (its button becomes Stop) until the reply is done."""
    return busy_input(value=""), [*history, {"role": "user", "content": message[:MAX_MESSAGE_CHARS]}]


def start_example(event: gr.SelectData, history):
    return start(event.value["text"], history)


def start_retry(history):
    """Drop the last reply and its notes; the message before them is answered again."""
    last_user = max(i for i, message in enumerate(history) if message["role"] == "user")
    return busy_input(), history[: last_user + 1]


def stopped(history, traces):
    """After Stop: the partial reply stays, marked as stopped; it cannot be looked inside."""
    history = [*history, notice("⏹️ " + DEMO["notices"]["stopped"], "You stopped this reply.")]
    return idle_input(), history, traces[: turns(history) - 1] + [None]


def cleared():
    """After Clear: no traces, and Inside Guppy as on arrival."""
    return [], gr.Dropdown(choices=[], value=None), EMPTY_INSIDE, "", "", ""


def reply_choices(history, traces):
    """The Inside tab's menu: one entry per reply that can be looked inside."""
    users = [text_of(m) for m in history if m["role"] == "user"]
    choices = [(f"{i + 1}. {users[i][:40]}", i) for i, trace in enumerate(traces) if trace is not None and i < len(users)]
    return gr.Dropdown(choices=choices, value=choices[-1][1] if choices else None)


class Space:
    """What the Space does with one model: answer a visitor, and show how an answer was made."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        config, defaults = model.config, model.generation_config
        self.max_reply = min(LIMITS["max_new_tokens"][1], config.max_position_embeddings)  # prompt_for fits it
        self.top_k_max = min(LIMITS["top_k"][1], config.vocab_size)
        self.defaults = dict(
            temperature=defaults.temperature or 1.0, top_k=defaults.top_k or 50, top_p=defaults.top_p or 1.0,
            max_new_tokens=min(defaults.max_new_tokens or self.max_reply, self.max_reply),
        )

    def reply(self, history, traces, temperature, top_k, top_p, max_new_tokens):
        """Stream Guppy's answer to the last message; the last yield also gives the input back."""
        done = idle_input()
        message = text_of(history[-1])
        traces = traces[: turns(history) - 1]  # a retry replaces the last turn's trace
        if not message.strip():
            yield [*history, {"role": "assistant", "content": DEMO["empty_message"]}], [*traces, None], done
            return
        try:
            kwargs = settings_kwargs(temperature, top_k, top_p, max_new_tokens)
            for text, trace in stream_trace(self.model, self.tokenizer, message, **kwargs):
                answer = {"role": "assistant", "content": text if trace is None else trace.reply or "…"}
                if trace is None:
                    yield [*history, answer], gr.skip(), gr.skip()
        except Exception as error:  # noqa: BLE001 - a visitor gets an answer and a usable chat, the log gets the error
            print(f"space: generation failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            detail = str(error).splitlines()[0] if isinstance(error, ValueError) else "The log has the details."
            failed = [{"role": "assistant", "content": DEMO["error_reply"]}, notice("⚠️ Something went wrong", detail)]
            yield [*history, *failed], [*traces, None], done
            return
        yield [*history, answer, *notices(trace)], keep_recent([*traces, trace]), done

    def api(self):
        """The `/chat` endpoint: typed arguments (gradio_client reads them) with the model's defaults."""
        d = self.defaults

        def chat(message: str, temperature: float = d["temperature"], top_k: int = d["top_k"],
                 max_new_tokens: int = d["max_new_tokens"], top_p: float = d["top_p"]) -> Iterator[str]:  # fmt: skip
            """Guppy's reply to one message (single-turn), streamed; sampling settings default to the model's own."""
            message = message[:MAX_MESSAGE_CHARS]
            if not message.strip():
                yield DEMO["empty_message"]
                return
            try:
                kwargs = settings_kwargs(temperature, top_k, top_p, max_new_tokens)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            for text, trace in stream_trace(self.model, self.tokenizer, message, **kwargs):
                yield text if trace is None else trace.reply or "…"

        return chat

    def inside(self, traces, turn, layer, head):
        """Caption, tokens, steps and heatmap for reply `turn`, recomputed from its trace."""
        trace = traces[turn] if turn is not None and turn < len(traces) else None
        if trace is None:
            return EMPTY_INSIDE if not traces else GONE_INSIDE, "", "", ""
        explanation = explain_trace(self.model, self.tokenizer, trace)
        caption = inside_caption(trace, turn, len(traces), explanation)
        return caption, tokens_html(explanation.prompt), steps_html(explanation), heatmap_html(explanation, layer, head)

    def open_inside(self, event: gr.SelectData, history, traces, layer, head):
        """A tap on a message (its "how was this made?" line) opens Inside Guppy on that turn's reply."""
        turn = turns(history[: event.index + 1]) - 1
        shown = gr.Dropdown(value=turn) if turn < len(traces) and traces[turn] is not None else gr.skip()
        return gr.Tabs(selected="inside"), shown, *self.inside(traces, turn, layer, head)


# --- the page ----------------------------------------------------------------------------------------------------


def slider(name, value, step, top=None):
    low, high = LIMITS[name]
    words = DEMO["settings"][name]
    return gr.Slider(low, top or high, value=value, step=step, label=words["label"], info=words["info"])


def chat_tab(space, about):
    """The chat, its message box, the Advanced settings and "What is Guppy?". Returns (chatbot, textbox, sliders)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            chatbot = gr.Chatbot(
                elem_id="chat", show_label=False, height="62vh", min_height=320, layout="bubble",
                placeholder=f"**{DEMO['single_turn']}** Tap an example or type below.",
                examples=[{"text": text} for text in DEMO["examples"]], buttons=["copy"],
            )  # fmt: skip
            textbox = gr.Textbox(
                placeholder=DEMO["placeholder"], label="Your message", show_label=False, max_length=MAX_MESSAGE_CHARS,
                submit_btn=DEMO["buttons"]["send"], stop_btn=False, elem_id="message", lines=1,
            )  # fmt: skip
            with gr.Accordion(DEMO["buttons"]["settings"], open=False):
                d = space.defaults
                sliders = [
                    slider("temperature", d["temperature"], 0.05),
                    slider("top_k", d["top_k"], 1, top=space.top_k_max),
                    slider("top_p", d["top_p"], 0.01),
                    slider("max_new_tokens", d["max_new_tokens"], 1, top=space.max_reply),
                ]
        with gr.Column(scale=1, min_width=260, elem_id="about"):
            gr.Markdown(about)
    return chatbot, textbox, sliders


def inside_tab(model):
    """Inside Guppy, one plain sentence per section. Returns (reply menu, [caption, tokens, steps, heatmap], layer, head)."""
    config, arch = model.config, architecture(model)
    which = gr.Dropdown([], label="Which reply", interactive=True, elem_id="which-reply")
    caption = gr.Markdown(EMPTY_INSIDE, elem_id="inside-caption")
    gr.Markdown(f"#### 1 · What Guppy read\n{html.escape(DEMO['inside']['read'])}")
    read = gr.HTML(elem_id="read", js_on_load=None)
    gr.Markdown(f"#### 2 · How Guppy chose each token\n{DEMO['inside']['steps']}")
    steps = gr.HTML(elem_id="steps", js_on_load=None)
    gr.Markdown(f"#### 3 · Where Guppy looked\n{DEMO['inside']['attention']}")
    with gr.Row():
        layer = gr.Radio([(f"layer {i + 1}", i) for i in range(config.num_hidden_layers)], value=0, label="Layer")
        head = gr.Radio([(f"head {i + 1}", i) for i in range(config.num_attention_heads)], value=0, label="Head")
    heatmap = gr.HTML(elem_id="heatmap", js_on_load=HEATMAP_JS)
    gr.Markdown(f"#### 4 · The network\n{DEMO['inside']['network']}")
    shape = ("layers", "heads", "hidden size", "feed-forward size", "context", "vocabulary")
    parts = [[name, f"{count:,}"] for name, count in arch["parameters by component"].items()]
    with gr.Row():
        gr.Dataframe([[name, arch[name]] for name in shape], headers=["part", "size"], interactive=False)
        gr.Dataframe([*parts, ["total", f"{arch['parameters']:,}"]], headers=["part", "numbers"], interactive=False)
    return which, [caption, read, steps, heatmap], layer, head


def build_demo(model, tokenizer, name_or_path):
    space = Space(model, tokenizer)
    with gr.Blocks(title=DEMO["title"], analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"# 🐟 {DEMO['title']}\n{DEMO['tagline']}", elem_id="header")
        traces = gr.State([], time_to_live=SESSION_SECONDS)  # one small Trace (or None) per turn of this visitor's chat
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat-tab"):
                chatbot, textbox, sliders = chat_tab(space, about_markdown(model, name_or_path))
            with gr.Tab("Inside Guppy", id="inside") as inside:
                which, view, layer, head = inside_tab(model)

        # Sending: the message shows at once (no queue), then the reply streams; its last update unlocks the input.
        private = dict(api_visibility="private")
        instant = dict(queue=False, show_progress="hidden", **private)
        answer = dict(fn=space.reply, inputs=[chatbot, traces, *sliders], outputs=[chatbot, traces, textbox],
                      show_progress="hidden", **private)  # fmt: skip
        menu = dict(fn=reply_choices, inputs=[chatbot, traces], outputs=which, queue=False, **private)
        submitted = textbox.submit(start, [textbox, chatbot], [textbox, chatbot], **instant).then(**answer)
        example = chatbot.example_select(start_example, chatbot, [textbox, chatbot], **instant).then(**answer)
        retried = chatbot.retry(start_retry, chatbot, [textbox, chatbot], **instant).then(**answer)
        for event in (submitted, example, retried):
            event.then(**menu)
        textbox.stop(stopped, [chatbot, traces], [textbox, chatbot, traces], cancels=[submitted, example, retried], **instant).then(**menu)
        chatbot.clear(cleared, None, [traces, which, *view], **instant)
        # Looking inside: from a reply's link, the tab, the menu, or another layer or head
        chatbot.select(space.open_inside, [chatbot, traces, layer, head], [tabs, which, *view], **private)
        gr.on([inside.select, which.input, layer.input, head.input], space.inside, [traces, which, layer, head], view, **private)
        gr.api(space.api(), api_name="chat", concurrency_limit=CONCURRENCY)
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
    demo.queue(default_concurrency_limit=CONCURRENCY).launch(
        theme=THEME, css=CSS, footer_links=["api"], max_file_size=MAX_UPLOAD
    )


if __name__ == "__main__":
    main()
