"""`guppylm` command line: parses arguments and calls one library function per subcommand.

Each handler imports its stage lazily so `guppylm --help` stays fast.
Every failure is one line on stderr, `guppylm: error: ...`: exit code 2 for a bad argument, 1 for anything that
goes wrong after (set GUPPYLM_DEBUG=1 for the traceback), 130 for Ctrl-C.
"""

import argparse
import functools
import json
import os
import re
import signal
import sys
import threading

from guppylm import recipe
from guppylm.folders import FolderKind, writing_folder
from guppylm.validate import LIMITS, describe_range, number

# --- numeric arguments: checked while parsing, their ranges shown in --help ------------------------------------


class Number:
    """An argparse type: a number of `kind` (int or float) in a range, which Parser adds to the option's help."""

    def __init__(self, kind, low, high=None, low_open=False, high_open=False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open

    def __call__(self, text):
        try:
            return number("", text, self.low, self.high, self.kind is int, low_open=self.low_open, high_open=self.high_open)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    def __str__(self):
        return describe_range(self.low, self.high, self.low_open, self.high_open)


def setting(name):
    """The type of a sampling setting: the range generation_kwargs() accepts (guppylm.validate.LIMITS)."""
    low, high = LIMITS[name]
    return Number(type(low), low, high)


COUNT = Number(int, 1)  # steps, batch sizes, samples: at least one
SEED = Number(int, 0, 2**32 - 1)  # what numpy's seeding (inside accelerate's set_seed) accepts
PORT = Number(int, 1, 65_535)


# --- dataset and persona (dataset_builder) -----------------------------------------------------


# what `dataset build` writes; the settings file says "guppylm built this", so --overwrite may replace it
DATASET_FOLDER = FolderKind("dataset", signature="guppylm_dataset.json", files=("README.md", "data", "guppylm_dataset.json"))


def _dataset_build(args):
    settings = dict(persona=args.persona, num_samples=args.num_samples, test_size=args.test_size, seed=args.seed)
    # refused before any work if the folder is not ours; built aside and swapped in whole (no parquet without its card)
    with writing_folder(args.output_dir, DATASET_FOLDER, overwrite=args.overwrite) as staging:
        from dataset_builder import build_and_save

        build_and_save(staging, **settings)
        (staging / DATASET_FOLDER.signature).write_text(json.dumps(settings, indent=2) + "\n")
    print(f"saved to {args.output_dir}")


def _dataset_push(args):
    from guppylm.hub import push_dataset

    push_dataset(args.dataset, args.repo_id, private=args.private, token=args.token, revision=args.revision)


def _persona_list(args):
    from dataset_builder import list_personas

    for name, description in list_personas().items():
        print(f"{name:12s} {description}")


def _persona_new(args):
    from dataset_builder import scaffold_persona

    path = scaffold_persona(args.name, args.output)
    print(f"wrote {path}; edit it, then run: guppylm persona check {path}")


def _persona_check(args):
    from dataset_builder import check_persona

    print(check_persona(args.pack))


def add_dataset_commands(sub):
    dataset = sub.add_parser("dataset", help="build or publish the synthetic conversation dataset").add_subparsers(
        dest="action", required=True
    )
    build = dataset.add_parser("build", help="generate the dataset (parquet + dataset card)")
    build.add_argument("--output-dir", required=True)
    build.add_argument("--persona", default="guppy", help="a shipped pack name or a path to a pack file")
    build.add_argument("--num-samples", type=COUNT, default=None, help="total conversations (default: the pack's)")
    build.add_argument("--test-size", type=Number(int, 0), default=None, help="held-out conversations (default: the pack's)")
    build.add_argument("--seed", type=SEED, default=42)
    build.add_argument("--overwrite", action="store_true", help="replace a dataset that `guppylm dataset build` wrote there")
    build.set_defaults(func=_dataset_build)

    push = dataset.add_parser("push", help="publish a built dataset to the Hub")
    push.add_argument("--dataset", required=True, help="folder written by `guppylm dataset build`")
    add_hub_arguments(push)
    push.set_defaults(func=_dataset_push)

    persona = sub.add_parser("persona", help="list, scaffold and check persona packs").add_subparsers(
        dest="action", required=True
    )
    persona.add_parser("list", help="the packs shipped with guppylm").set_defaults(func=_persona_list)
    new = persona.add_parser("new", help="write a pack file to edit")
    new.add_argument("name")
    new.add_argument("--output", default=None, help="file to write (default: NAME.yaml)")
    new.set_defaults(func=_persona_new)
    check = persona.add_parser("check", help="validate a pack and print its statistics")
    check.add_argument("pack", help="a shipped pack name or a path to a pack file")
    check.set_defaults(func=_persona_check)


# --- train, chat, eval ---------------------------------------------------------------------------


def _train(args):
    from guppylm.train import train

    # an option left unset keeps train()'s default: the recipe's numbers live there, once
    train(**{key: value for key, value in vars(args).items() if key not in ("func", "command") and value is not None})


def _chat(args):
    from guppylm.folders import local_model

    local_model(args.model)  # a missing folder is one line at once, before torch is imported
    from guppylm.chat import chat

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # invalid UTF-8 from a pipe becomes U+FFFD, not a crash
    chat(
        model_name=args.model,
        prompt=args.prompt,
        seed=args.seed,
        explain=args.explain,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
    )


def _eval(args):
    from guppylm.folders import local_model

    local_model(args.model)  # a missing folder is one line at once, before torch is imported
    from guppylm.evaluate import run_eval

    run_eval(args.model, persona=args.persona, max_new_tokens=args.max_new_tokens, split=args.split)


def add_train_command(sub):
    train = sub.add_parser("train", help="train a model from scratch (dataset and tokenizer included)")
    train.add_argument("--preset", default=None, help="model size: cpu, 9m or tiny (default: cpu, or 9m with a GPU)")
    train.add_argument("--output-dir", default="runs/guppy")
    train.add_argument("--dataset", default=None, help="dataset folder or Hub repo id (default: build the persona's)")
    train.add_argument("--persona", default="guppy", help="persona pack for the built-in dataset and evaluation")
    train.add_argument("--max-steps", type=COUNT, default=None)
    train.add_argument("--batch-size", type=COUNT, default=None, help="per process")
    train.add_argument("--learning-rate", type=Number(float, 0, 1, low_open=True), default=None)
    train.add_argument("--warmup-steps", type=Number(int, 0), default=None)
    train.add_argument("--gradient-accumulation-steps", type=COUNT, default=None)
    train.add_argument("--unk-rate", type=Number(float, 0, 1, high_open=True), default=None, help=f"fraction of user tokens hidden as <unk> (default {recipe.UNK_RATE:g})")
    train.add_argument("--min-user-word-count", type=COUNT, default=None, help=f"a word users say fewer times in the training data is read as <unk> (default {recipe.MIN_USER_WORD_COUNT})")
    train.add_argument("--reply-start-weight", type=Number(float, 0, 100), default=None, help=f"loss weight of the reply's first token, which names the topic (default {recipe.REPLY_START_WEIGHT:g})")
    train.add_argument("--eval-every", type=COUNT, default=None, help=f"steps between held-out losses (default {recipe.EVAL_EVERY})")
    train.add_argument("--checkpoint-every", type=COUNT, default=None, help=f"steps between checkpoints (default {recipe.CHECKPOINT_EVERY})")
    train.add_argument("--seed", type=SEED, default=None, help=f"(default {recipe.SEED})")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint (in OUTPUT_DIR.checkpoints)")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run's model folder or checkpoints")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    train.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    train.add_argument("--no-eval", dest="run_eval", action="store_false", help="skip the held-out prompt evaluation")
    train.set_defaults(func=_train)


def add_model_commands(sub):
    add_train_command(sub)

    chat = sub.add_parser("chat", help="talk to a trained Guppy")
    chat.add_argument("--model", default=None, help="model folder or Hub repo id (default: $GUPPYLM_MODEL or runs/guppy)")
    chat.add_argument("--prompt", default=None, help="answer this one message and exit")
    chat.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    chat.add_argument("--temperature", type=setting("temperature"), default=None)
    chat.add_argument("--top-k", type=setting("top_k"), default=None)
    chat.add_argument("--top-p", type=setting("top_p"), default=None)
    chat.add_argument("--max-new-tokens", type=setting("max_new_tokens"), default=None)
    chat.add_argument("--seed", type=SEED, default=None)
    chat.add_argument("--explain", action="store_true", help="after each reply, show the top candidates per step")
    chat.set_defaults(func=_chat)

    evaluate = sub.add_parser("eval", help="score a model on its persona's held-out prompts")
    evaluate.add_argument("--model", default=None, help="model folder or Hub repo id (default: $GUPPYLM_MODEL or runs/guppy)")
    evaluate.add_argument("--persona", default=None, help="pack whose prompts to use (default: the model's)")
    evaluate.add_argument("--split", choices=("eval", "dev", "natural"), default="eval",  # dataset_builder.persona.SPLITS
                          help="eval: the held-out test prompts (default); dev: the prompts to tune data and recipes against; "
                               "natural: the blind test of what people type first, scored once at the end")
    evaluate.add_argument("--max-new-tokens", type=setting("max_new_tokens"), default=48)
    evaluate.set_defaults(func=_eval)


# --- hub ------------------------------------------------------------------------------------------


def add_hub_arguments(parser):
    parser.add_argument("--repo-id", required=True, help="NAMESPACE/NAME on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")


def _push(args):
    if args.format == "gpt2":
        from guppylm.export_gpt2 import push_gpt2 as push
    else:
        from guppylm.hub import push_model as push

    push(args.model, args.repo_id, private=args.private, token=args.token, revision=args.revision)


def _space_push(args):
    from guppylm.hub import push_space

    push_space(args.model, args.repo_id, private=args.private, token=args.token, revision=args.revision)


def add_hub_commands(sub):
    push = sub.add_parser("push", help="publish a trained model folder to the Hub")
    push.add_argument("--model", required=True, help="folder written by `guppylm train` (with --format gpt2: or a repo id)")
    push.add_argument("--format", choices=("guppylm", "gpt2"), default="guppylm",
                      help="guppylm: the folder as is, with its model code (default); "
                           "gpt2: its verified GPT-2 twin, which loads without remote code")
    add_hub_arguments(push)
    push.set_defaults(func=_push)

    space = sub.add_parser("space", help="publish the Gradio Space").add_subparsers(dest="action", required=True)
    space_push = space.add_parser("push", help="upload space/ as a Gradio Space that loads MODEL")
    space_push.add_argument("--model", required=True, help="model repo id the Space loads")
    add_hub_arguments(space_push)
    space_push.set_defaults(func=_space_push)


# --- export and the browser page ------------------------------------------------------------------


def _export_onnx(args):
    from guppylm.export import describe, export_onnx

    print(describe(export_onnx(args.model, args.output_dir, quantize_int8=args.quantize, overwrite=args.overwrite)))


def _export_gpt2(args):
    from guppylm.export_gpt2 import describe, export_gpt2

    print(describe(export_gpt2(args.model, args.output_dir, overwrite=args.overwrite)))


def _serve_web(args):
    from guppylm.web import serve_web

    serve_web(args.model, port=args.port, bundle_dir=args.output_dir, force=args.force)


def add_export_commands(sub):
    export = sub.add_parser("export", help="export a trained model for other runtimes")
    export = export.add_subparsers(dest="action", required=True)
    onnx = export.add_parser("onnx", help="ONNX with the KV cache for transformers.js and the browser page, verified against PyTorch")
    onnx.add_argument("--model", required=True, help="folder written by `guppylm train`, or a Hub repo id")
    onnx.add_argument("--output-dir", required=True)
    onnx.add_argument("--quantize", action="store_true", help="also write onnx/model_quantized.onnx (dynamic int8 weights)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an export guppylm wrote there before")
    onnx.set_defaults(func=_export_onnx)

    gpt2 = export.add_parser("gpt2", help="a standard GPT-2 folder that loads without remote code, verified against the original")
    gpt2.add_argument("--model", required=True, help="folder written by `guppylm train`, or a Hub repo id")
    gpt2.add_argument("--output-dir", required=True)
    gpt2.add_argument("--overwrite", action="store_true", help="replace an export guppylm wrote there before")
    gpt2.set_defaults(func=_export_gpt2)

    web = sub.add_parser("serve-web", help="export a model and serve the in-browser chat page on 127.0.0.1")
    web.add_argument("--model", default=None, help="model folder (default: $GUPPYLM_MODEL or runs/guppy)")
    web.add_argument("--port", type=PORT, default=8000)
    web.add_argument("--output-dir", default=None, help="where the exported model goes (default: space/web/model)")
    web.add_argument("--force", action="store_true", help="export again even if the last export is up to date")
    web.set_defaults(func=_serve_web)


# --- entry point ----------------------------------------------------------------------------------

SECRET = re.compile(r"(?<=--token[ =])\S+|\bhf_\w{20,}")  # a --token value, or anything shaped like a Hub token
# terminal escape sequences (torch's exporter colours its messages) and other control characters but tab and newline
CONTROL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_])|[\x00-\x08\x0b-\x1f\x7f]")


def mask_secrets(text):
    return SECRET.sub("***", text)


def one_line(text):
    """The first non-blank line of `text`, without escape sequences, control characters or secrets."""
    lines = [line.strip() for line in CONTROL.sub("", str(text)).splitlines() if line.strip()]
    return mask_secrets(lines[0]) if lines else ""


def describe(error):
    """One line for an exception: our errors' messages say it all; for anything else (a KeyError, tokenizers'
    PanicException) the type name says what kind of failure it was."""
    message = one_line(error)
    if isinstance(error, (ValueError, OSError, RuntimeError)) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class Parser(argparse.ArgumentParser):
    """A bad argument is one line too (argparse prints its usage first), and a token in it is masked: argparse echoes
    what it rejects ("unrecognized arguments: --token hf_...")."""

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if isinstance(action.type, Number):  # --help shows the range: "--top-p TOP_P  (between 0.01 and 1.0)"
            help = action.help or ""
            action.help = f"{help[:-1]}; {action.type})" if help.endswith(")") else f"{help} ({action.type})".strip()
        return action

    def error(self, message):
        self.exit(2, f"guppylm: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser():
    parser = Parser(prog="guppylm", description="GuppyLM: a tiny language model that talks like a fish.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_dataset_commands(sub)
    add_model_commands(sub)
    add_hub_commands(sub)
    add_export_commands(sub)
    return parser


_interrupts = []  # the Ctrl-Cs received while run() runs its action


def remember_interrupt(signum, frame):
    """SIGINT: remembered, then raised as KeyboardInterrupt as usual. A library may swallow it and fail later with
    another error (a half-imported numpy recursing, then transformers 5.0's "Could not import module
    'AutoModelForCausalLM'"); run() still reports the interrupt. Inside an import it is sent again 50 ms later,
    until it lands outside: there a library's bare `except` can swallow it for good, and raised under torch's C++
    import hooks it aborts the process (pybind11: "terminate called after throwing ... KeyboardInterrupt")."""
    _interrupts.append(signum)
    if importing(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    signal.default_int_handler(signum, frame)


def importing(frame):
    """Whether `frame` runs inside an import statement (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def redeliver_swallowed_interrupt(unraisable, previous_hook):
    """sys.unraisablehook: a Ctrl-C that lands in a finalizer (`__del__`, a weakref callback) is printed as
    "Exception ignored" and dropped by Python, and `guppylm chat` would go on to wait at its prompt. Send it again
    from a moment later - not from here, where it would land in the same finalizer."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
    else:
        previous_hook(unraisable)


def run(action):
    """Call `action()`. Whatever it raises - tokenizers' PanicException and KeyboardInterrupt are BaseExceptions -
    becomes one line on stderr: exit code 1, or 130 for Ctrl-C (GUPPYLM_DEBUG=1: the traceback)."""
    _interrupts.clear()
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    if main_thread:
        previous_handler, previous_hook = signal.signal(signal.SIGINT, remember_interrupt), sys.unraisablehook
        sys.unraisablehook = functools.partial(redeliver_swallowed_interrupt, previous_hook=previous_hook)
    try:
        return action()
    except SystemExit:  # argparse's --help and usage errors, sys.exit() in a handler
        raise
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt) or _interrupts:
            print("guppylm: interrupted", file=sys.stderr)
            sys.exit(130)
        if os.environ.get("GUPPYLM_DEBUG"):
            raise
        print(f"guppylm: error: {describe(error)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if main_thread:  # a program that calls main() gets its own Ctrl-C handling back
            signal.signal(signal.SIGINT, previous_handler)
            sys.unraisablehook = previous_hook


def main(argv=None):
    def parse_and_call():  # parsing too: Ctrl-C at any moment after the interpreter has started is one line
        args = build_parser().parse_args(argv)
        return args.func(args)

    run(parse_and_call)


if __name__ == "__main__":
    main()
