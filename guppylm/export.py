"""Export a trained Guppy to ONNX as transformers.js loads it, and prove it: ONNX Runtime == PyTorch.

`guppylm export onnx --model DIR --output-dir OUT` writes a folder in transformers.js' layout, which
`pipeline("text-generation", OUT)` of @huggingface/transformers and the page in space/web/ both load as is:

    onnx/model.onnx             fp32 graph with the KV cache as inputs and outputs (transformers.js dtype "fp32")
    onnx/model_quantized.onnx   the same graph with dynamically quantized int8 weights (--quantize; dtype "q8")
    config.json                 the GPT-2 twin's config (guppylm.export_gpt2): a model_type transformers.js knows
    tokenizer.json              the word-level tokenizer, unchanged
    tokenizer_config.json       with the chat template and unk_token inside, where the JS tokenizer looks for them
    generation_config.json
    export_report.json          what the verification measured (the page shows it)

The graph's interface uses the names Optimum writes for GPT-2, and the axis names transformers.js resolves (it
builds the first step's empty cache from the graph's metadata: `batch_size` is the batch, any other name 0):

    input_ids (batch_size, sequence_length) int64, attention_mask (batch_size, total_sequence_length) int64,
    position_ids (batch_size, sequence_length) int64,
    past_key_values.N.key / .value (batch_size, nh, past_sequence_length, hs) float32     0 long on the first call
    -> logits (batch_size, sequence_length, vocab), present.N.key / .value (batch_size, nh, total_sequence_length, hs)

The graph is Guppy's own, so at the last learned position it predicts <|im_end|> (see modeling_guppylm.py): a
runtime that does not cut prompts, like transformers.js, still ends a reply inside the context.

The export checks itself before the folder is swapped in: logits along whole replies, fed one token at a time
through the cache, match PyTorch's; greedy replies decoded with ONNX Runtime are token-for-token those of
`model.generate`. tests/test_export_js.py checks transformers.js against PyTorch.
"""

import importlib.util
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, SuppressTokensAtBeginLogitsProcessor
from transformers.cache_utils import DynamicCache

from guppylm.export_gpt2 import REPORT_FILE, VERIFY_PROMPTS, gpt2_config, save_report
from guppylm.folders import FolderKind, check_output_folder, writing_folder
from guppylm.inference import generate, generation_kwargs, load_model, prompt_for
from guppylm.tokenizer import save_tokenizer

FP32_FILE = "onnx/model.onnx"
INT8_FILE = "onnx/model_quantized.onnx"
ONNX_KIND = FolderKind(
    "transformers.js (ONNX) export",
    signature=REPORT_FILE,
    files=(REPORT_FILE, "onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja", "special_tokens_map.json", "model.onnx", "model_int8.onnx"),  # the last two: the old layout
)
# fp32 ONNX Runtime and PyTorch run the same arithmetic in a different order; measured differences are 1e-6 to 1e-5.
FP32_ATOL = 1e-4


@contextmanager
def quiet_logger(name):
    """Drop what logger `name` (None: the root logger) says below ERROR while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class FlatCacheGuppy(nn.Module):
    """GuppyForCausalLM with the KV cache as flat tensors, the only form an ONNX graph can take and return."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):  # past: key, value per layer
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))  # grows in place by this step's keys and values
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        ).logits
        present = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return logits, *present


def io_names(num_layers):
    """(input names, output names) of the exported graph."""
    kv = [f"{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]
    return (
        ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{name}" for name in kv)],
        ["logits", *(f"present.{name}" for name in kv)],
    )


def export_graph(model, path):
    """Trace `model` with torch.export (dynamo) into an ONNX file whose batch and lengths are all dynamic."""
    config = model.config
    num_heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    # Example sizes are distinct and above 1 so torch.export does not specialize any of them to a constant.
    batch, seq, past = 2, 3, 5
    past_kv = tuple(torch.zeros(batch, num_heads, past, head_dim) for _ in range(2 * config.num_hidden_layers))
    example = (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq),
        *past_kv,
    )
    B, T = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    T_past, T_total = torch.export.Dim("past_sequence_length"), torch.export.Dim("total_sequence_length")
    dynamic_shapes = ({0: B, 1: T}, {0: B, 1: T_total}, {0: B, 1: T}, tuple({0: B, 2: T_past} for _ in past_kv))
    input_names, output_names = io_names(config.num_hidden_layers)
    # the exporter warns about its own internals (one Dim shared by several inputs, deprecated pytree classes) and
    # logs that torchvision's operators are unavailable; nothing to act on, and verify() is what proves the graph right
    with warnings.catch_warnings(), quiet_logger("torch.onnx._internal.exporter._registration"):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FlatCacheGuppy(model).eval(),
            example,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,  # one self-contained file: the page fetches it in one request
            verbose=False,
        )


def quantize(fp32_path, int8_path):
    """Dynamic int8: weights stored as int8, activations quantized on the fly. No calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime's quantizer advises "pre-processing" (shape inference for image models) on the root logger;
    # verify() measures what int8 changes instead
    with quiet_logger(None):
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)


class OnnxGuppy:
    """An ONNX Runtime session driven like `generate` drives the PyTorch model: prefill, then one token per step.

    space/web/guppy.js runs the same loop in the browser.
    """

    def __init__(self, path, config):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # the matrices are tiny; threads cost more than they save
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names, _ = io_names(config.num_hidden_layers)
        self.kv_shape = (1, config.num_attention_heads, 0, config.hidden_size // config.num_attention_heads)

    def empty_cache(self):
        return [np.zeros(self.kv_shape, dtype=np.float32) for _ in self.input_names[3:]]

    def step(self, new_ids, past):
        """Logits (T, vocab) for `new_ids` after `past` (as returned by the previous step), and the grown cache."""
        past_length, length = past[0].shape[2], len(new_ids)
        feed = {
            "input_ids": np.array([new_ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_length + length), dtype=np.int64),
            "position_ids": np.arange(past_length, past_length + length, dtype=np.int64)[None],
            **dict(zip(self.input_names[3:], past)),
        }
        logits, *present = self.session.run(None, feed)
        return logits[0], present

    def teacher_forced_logits(self, prompt_ids, reply_ids):
        """Logits at every position of prompt + reply: the prompt in one call, then the reply token by token."""
        logits, past = self.step(prompt_ids, self.empty_cache())
        rows = [logits]
        for token in reply_ids[:-1]:
            logits, past = self.step([token], past)
            rows.append(logits)
        return np.concatenate(rows)

    def greedy(self, prompt_ids, max_new_tokens, generation_config):
        """Greedy reply ids (ending with EOS if one came), and seconds spent per generated token, under the rules
        generate() applies for `generation_config` (transformers' own processors: no repeated n-gram, no non-word
        first token)."""
        rules = reply_rules(generation_config, len(prompt_ids))
        eos = generation_config.eos_token_id
        eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        started = time.perf_counter()
        logits, past = self.step(prompt_ids, self.empty_cache())
        sequence = torch.tensor([prompt_ids])
        while True:
            token = int(rules(sequence, torch.from_numpy(logits[-1:])).argmax())
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            if token in eos_token_ids or sequence.shape[1] - len(prompt_ids) == max_new_tokens:
                reply = sequence[0, len(prompt_ids) :].tolist()
                return reply, (time.perf_counter() - started) / len(reply)
            logits, past = self.step([token], past)


def reply_rules(generation_config, prompt_length):
    """The logits processors generate() applies to a greedy reply for the settings guppylm writes."""
    rules = LogitsProcessorList()
    if generation_config.no_repeat_ngram_size:
        rules.append(NoRepeatNGramLogitsProcessor(generation_config.no_repeat_ngram_size))
    if generation_config.begin_suppress_tokens:
        rules.append(SuppressTokensAtBeginLogitsProcessor(generation_config.begin_suppress_tokens, prompt_length))
    return rules


@dataclass
class Verification:
    """How closely one ONNX file reproduces PyTorch."""

    file: str  # relative to the export folder
    bytes: int
    max_abs_logit_diff: float  # over every position of every prompt + reply
    greedy_identical: int  # prompts whose whole greedy reply is token-for-token PyTorch's
    prompts: int
    ms_per_token: float  # ONNX Runtime, 1 thread, prefill included

    @property
    def exact(self):
        return self.greedy_identical == self.prompts


def verify(model, tokenizer, folder, file, prompts=VERIFY_PROMPTS, max_new_tokens=None):
    """Compare the ONNX file `folder`/`file` with `model` on `prompts`; whole greedy replies, no sampling."""
    path = Path(folder, file)
    onnx_model = OnnxGuppy(path, model.config)
    worst, identical, seconds_per_token = 0.0, 0, []
    for message in prompts:
        prompt = prompt_for(model, tokenizer, message, max_new_tokens)
        with torch.no_grad():
            full = generate(model, prompt, **generation_kwargs(greedy=True))  # (1, T_prompt + T_reply)
            expected_logits = model(full).logits[0, :-1]  # the last token's prediction is never used
        prompt_ids = prompt.input_ids[0].tolist()
        expected = full[0, len(prompt_ids) :].tolist()

        logits = onnx_model.teacher_forced_logits(prompt_ids, expected)
        worst = max(worst, float(abs(torch.from_numpy(logits) - expected_logits).max()))
        reply, seconds = onnx_model.greedy(prompt_ids, prompt.max_new_tokens, model.generation_config)
        identical += reply == expected
        seconds_per_token.append(seconds)
    return Verification(
        file=file,
        bytes=Path(path).stat().st_size,
        max_abs_logit_diff=worst,
        greedy_identical=identical,
        prompts=len(prompts),
        ms_per_token=1000 * sum(seconds_per_token) / len(seconds_per_token),
    )


def save_tokenizer_and_configs(model, tokenizer, output_dir):
    """The files transformers.js and the page read besides the graph; the chat template goes inside
    tokenizer_config.json; config.json is the GPT-2 twin's."""
    save_tokenizer(tokenizer, output_dir, save_jinja_files=False)
    config = json.loads((output_dir / "tokenizer_config.json").read_text())
    missing = [key for key in ("chat_template", "unk_token") if not config.get(key)]
    if missing:
        raise ValueError(f"tokenizer_config.json lacks {', '.join(missing)}; the browser tokenizer needs them")
    gpt2_config(model.config).to_json_file(output_dir / "config.json")
    model.generation_config.save_pretrained(output_dir)


def export_onnx(model_name, output_dir, quantize_int8=False, overwrite=False, prompts=VERIFY_PROMPTS, max_new_tokens=None):
    """Export, verify, write export_report.json and return it. Raises RuntimeError when fp32 ONNX != PyTorch, and
    then leaves `output_dir` as it was."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting needs {', '.join(missing)}: pip install 'guppylm[export]'")
    check_output_folder(output_dir, ONNX_KIND, overwrite)  # before any loading
    model, tokenizer = load_model(str(model_name))
    with writing_folder(output_dir, ONNX_KIND, overwrite) as staging:
        started = time.perf_counter()
        (staging / FP32_FILE).parent.mkdir()
        export_graph(model, staging / FP32_FILE)
        if quantize_int8:
            quantize(staging / FP32_FILE, staging / INT8_FILE)
        export_seconds = time.perf_counter() - started
        save_tokenizer_and_configs(model, tokenizer, staging)

        files = [FP32_FILE, INT8_FILE] if quantize_int8 else [FP32_FILE]
        checks = [verify(model, tokenizer, staging, name, prompts, max_new_tokens) for name in files]
        # int8 is reported, not enforced: rounding the weights may flip a near-tie between two tokens
        fp32 = checks[0]
        report = {
            "format": "onnx",
            "source": str(model_name),
            "verified": fp32.max_abs_logit_diff <= FP32_ATOL and fp32.exact,
            "export_seconds": round(export_seconds, 2),
            "fp32_atol": FP32_ATOL,
            "prompts": prompts,
            "files": {check.file: asdict(check) for check in checks},
        }
        save_report(staging, report, f"ONNX export does not match PyTorch: max |logit diff| {fp32.max_abs_logit_diff:.2e} "
                    f"(allowed {FP32_ATOL:.0e}), identical greedy replies {fp32.greedy_identical}/{fp32.prompts}")
    return report


def describe(report):
    """One line per file, for the CLI."""
    lines = [f"exported in {report['export_seconds']:.1f} s"]
    for check in report["files"].values():
        lines.append(
            f"{check['file']:26s} {check['bytes'] / 1e6:6.2f} MB | max |logit diff| {check['max_abs_logit_diff']:.1e} | "
            f"greedy identical {check['greedy_identical']}/{check['prompts']} | "
            f"{check['ms_per_token']:.2f} ms/token (ORT, 1 thread)"
        )
    return "\n".join(lines)
