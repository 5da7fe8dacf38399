// Guppy in the browser: Python's generate() loop with the KV cache, on ONNX Runtime Web.
//
// Everything loads from the page's own server: the folder `guppylm export onnx` wrote (model/), with the
// page.json guppylm/web.py adds to it, and the runtime copied out of node_modules (vendor/). Tokenizing and
// the chat template use the libraries transformers.js 4 is built on, reading the same tokenizer.json and
// tokenizer_config.json as Python, so a message becomes the same token ids here as in `guppylm chat`.

import * as ort from "./vendor/ort.wasm.min.mjs";
import { Template } from "./vendor/jinja.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

// One thread: a step is a few small matrix products, for which thread hand-offs cost more than they save;
// and threads would need cross-origin isolation headers, which plain static hosts do not send.
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;

const MODEL_URL = new URL("./model/", import.meta.url);
const WASM_URL = new URL("./vendor/ort-wasm-simd-threaded.wasm", import.meta.url);
const TOP_CANDIDATES = 5; // the model's most likely tokens kept per step, as in guppylm/explain.py
const PROMPT_HEAD = 2; // <|im_start|> user: guppylm.inference.PROMPT_HEAD

async function fetchJSON(name) {
  const response = await fetch(new URL(name, MODEL_URL));
  if (!response.ok) throw new Error(`model/${name}: HTTP ${response.status} (start the page with \`guppylm serve-web\`)`);
  return response.json();
}

/** The bytes at `url`, reporting each chunk's size to `onBytes` as it arrives. */
async function download(url, onBytes) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url.pathname}: HTTP ${response.status}`);
  const reader = response.body.getReader();
  const chunks = [];
  for (let part = await reader.read(); !part.done; part = await reader.read()) {
    chunks.push(part.value);
    onBytes(part.value.length);
  }
  const bytes = new Uint8Array(chunks.reduce((total, chunk) => total + chunk.length, 0));
  chunks.reduce((offset, chunk) => (bytes.set(chunk, offset), offset + chunk.length), 0);
  return bytes;
}

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

/** softmax(logits / temperature) as a Float64Array. */
function softmax(logits, temperature = 1) {
  let max = -Infinity;
  for (const x of logits) max = Math.max(max, x);
  const out = Float64Array.from(logits, (x) => Math.exp((x - max) / temperature));
  const total = out.reduce((a, b) => a + b);
  return out.map((x) => x / total);
}

/** The ids of the `k` most likely tokens, most likely first; equal ones in id order, as torch's topk.
 * A native numeric sort finds the k-th largest value, so only those k ids are sorted with a comparator. */
function top(probabilities, k) {
  k = Math.min(k, probabilities.length);
  const threshold = Float64Array.from(probabilities).sort()[probabilities.length - k];
  const ids = [];
  for (let i = 0; i < probabilities.length; i++) if (probabilities[i] >= threshold) ids.push(i);
  return ids.sort((a, b) => probabilities[b] - probabilities[a] || a - b).slice(0, k);
}

/** The distribution a token is drawn from under the settings, in transformers' order: temperature, then top-k,
 * then top-p (the smallest set of most likely tokens whose probability reaches top_p). Greedy: the model's own. */
function settled(logits, { greedy, temperature, topK, topP }) {
  if (greedy) return softmax(logits);
  const probabilities = softmax(logits, temperature);
  let kept = top(probabilities, topK);
  let total = kept.reduce((sum, i) => sum + probabilities[i], 0); // top-p reads the chances renormalized over top-k
  if (topP < 1) {
    let mass = 0, inside = 0;
    while (inside < kept.length && mass < topP * total) mass += probabilities[kept[inside++]];
    [kept, total] = [kept.slice(0, inside), mass];
  }
  const out = new Float64Array(probabilities.length);
  for (const i of kept) out[i] = probabilities[i] / total;
  return out;
}

/** The tokens that would repeat an n-gram of `sequence` (prompt and reply so far): transformers'
 * no_repeat_ngram_size, which generation_config.json may set. */
function repeating(sequence, n) {
  if (!n || sequence.length + 1 < n) return [];
  const last = sequence.slice(sequence.length - n + 1).join();
  const banned = [];
  for (let i = 0; i + n <= sequence.length; i++) {
    if (sequence.slice(i, i + n - 1).join() === last) banned.push(sequence[i + n - 1]);
  }
  return banned;
}

function draw(probabilities) {
  let r = Math.random();
  for (let i = 0; i < probabilities.length; i++) if (probabilities[i] > 0 && (r -= probabilities[i]) <= 0) return i;
  return top(probabilities, 1)[0];
}

export class Guppy {
  /** Configs, tokenizer, export report and page.json from model/; then `useModel(file)` loads a graph. */
  static async load() {
    const files = ["page.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "export_report.json"];
    const [page, generation, tokenizerJSON, tokenizerConfig, report] = await Promise.all(files.map(fetchJSON));
    return new Guppy(page, generation, new Tokenizer(tokenizerJSON, tokenizerConfig), tokenizerConfig, report);
  }

  constructor(page, generation, tokenizer, tokenizerConfig, report) {
    Object.assign(this, { page, generation, tokenizer, report });
    this.template = new Template(tokenizerConfig.chat_template); // the one chat format, defined in guppylm/tokenizer.py
    this.eos = new Set([generation.eos_token_id].flat());
    this.unk = tokenizer.token_to_id(tokenizerConfig.unk_token);
    this.session = null;
  }

  /** Bytes `useModel(file)` downloads (the wasm runtime only the first time). */
  downloadSize(file) {
    return this.report.files[file].bytes + (ort.env.wasm.wasmBinary ? 0 : this.page.wasm_bytes);
  }

  /** Download the runtime (once) and graph `file`, calling `onBytes(n)` as bytes arrive; then start a session. */
  async useModel(file, onBytes = () => {}) {
    if (!ort.env.wasm.wasmBinary) ort.env.wasm.wasmBinary = await download(WASM_URL, onBytes);
    const graph = await download(new URL(file, MODEL_URL), onBytes);
    this.session = await ort.InferenceSession.create(graph, { executionProviders: ["wasm"] });
    this.file = file;
  }

  /** The prompt's ids, the message tokens cut from its start, and the reply's room: guppylm.inference.build_prompt.
   * The reply keeps room for maxNewTokens but never more than half the context; a longer message gives way
   * from its start; then the reply gets what the context has left, up to maxNewTokens. */
  prompt(message, maxNewTokens) {
    const context = this.page.context;
    const text = this.template.render({ messages: [{ role: "user", content: message }], add_generation_prompt: true });
    const all = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    const dropped = Math.max(all.length - (context - Math.min(maxNewTokens, Math.floor(context / 2))), 0);
    const ids = [...all.slice(0, PROMPT_HEAD), ...all.slice(PROMPT_HEAD + dropped)];
    return { ids, dropped, maxNewTokens: Math.min(maxNewTokens, context - ids.length) };
  }

  decode(ids) {
    return this.tokenizer.decode(ids, { skip_special_tokens: true });
  }

  /** The prompt's tokens for "Inside Guppy": [text, id, kind, typed], typed being the word an unknown token
   * stands for. This word-level tokenizer makes one token of each piece its pre-tokenizer splits the
   * normalized message into, so the message's pieces line up with its tokens after the prompt's head. */
  tokens(message, prompt) {
    const { normalizer, pre_tokenizer } = this.tokenizer;
    const pieces = pre_tokenizer.pre_tokenize(normalizer ? normalizer.normalize(message) : message).slice(prompt.dropped);
    return prompt.ids.map((id, i) => {
      const text = this.tokenizer.decode([id]).trim() || this.tokenizer.id_to_token(id);
      const kind = id === this.unk ? "unknown" : this.tokenizer.id_to_token(id).startsWith("<|") ? "special" : "word";
      const typed = kind === "unknown" ? (pieces[i - PROMPT_HEAD] ?? "").replace(/^\u2581/, "") : "";
      return { text, id, kind, typed };
    });
  }

  /** One forward pass over `ids` after the cached `past`: the last position's logits and the grown cache. */
  async step(ids, past) {
    const pastLength = Object.values(past)[0].dims[2];
    const total = pastLength + ids.length;
    const feeds = {
      input_ids: int64(ids, [1, ids.length]),
      attention_mask: int64(new Array(total).fill(1), [1, total]),
      position_ids: int64(ids.map((_, i) => pastLength + i), [1, ids.length]),
      ...past,
    };
    const out = await this.session.run(feeds);
    const vocab = out.logits.dims[2]; // logits: (1, T, vocab)
    const present = {};
    for (const name of Object.keys(past)) present[name] = out[name.replace("past_key_values", "present")];
    return [out.logits.data.subarray((ids.length - 1) * vocab), present];
  }

  /** The empty cache of the first step: (1, heads, 0, head_dim) per layer for keys and values. */
  emptyCache() {
    const { heads, head_dim: headDim } = this.page;
    const past = {};
    for (const name of this.session.inputNames.filter((n) => n.startsWith("past_key_values."))) {
      past[name] = new ort.Tensor("float32", new Float32Array(0), [1, heads, 0, headDim]);
    }
    return past;
  }

  /** Reply steps as they come (EOS included): {id, probability, modelProbability, candidates}, where the
   * probabilities are the drawn token's after the settings and the model's own, and candidates are the
   * model's most likely tokens as [id, probability after the settings, model's own]. `signal` stops it. */
  async *generate(prompt, settings, signal) {
    let [ids, past] = [prompt.ids, this.emptyCache()];
    const sequence = [...prompt.ids];
    for (let n = 0; n < prompt.maxNewTokens && !signal?.aborted; n++) {
      const [logits, present] = await this.step(ids, past);
      const own = softmax(logits);
      const likeliest = top(own, TOP_CANDIDATES);
      const allowed = Float32Array.from(logits);
      for (const banned of repeating(sequence, this.generation.no_repeat_ngram_size)) allowed[banned] = -Infinity;
      if (n === 0) for (const banned of this.generation.begin_suppress_tokens ?? []) allowed[banned] = -Infinity;
      const drawnFrom = settled(allowed, settings);
      const id = settings.greedy ? top(drawnFrom, 1)[0] : draw(drawnFrom);
      const candidates = likeliest.map((i) => [i, drawnFrom[i], own[i]]);
      yield { id, probability: drawnFrom[id], modelProbability: own[id], candidates };
      if (this.eos.has(id)) return;
      sequence.push(id);
      [ids, past] = [[id], present];
    }
  }
}
