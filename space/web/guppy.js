// Guppy in the browser: Python's generate() loop with the KV cache, on ONNX Runtime Web.
//
// Everything loads from the page's own server: the folder `guppylm export onnx` wrote (model/) and the
// runtime guppylm/web.py copied out of node_modules (vendor/). Tokenizing and the chat template use the
// libraries transformers.js 4 is built on, reading the same tokenizer.json and tokenizer_config.json as
// Python, so a message becomes the same token ids here as in `guppylm chat`.

import * as ort from "./vendor/ort.wasm.min.mjs";
import { Template } from "./vendor/jinja.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

// One thread: a step is a few small matrix products, for which thread hand-offs cost more than they save;
// and threads would need cross-origin isolation headers, which plain static hosts do not send.
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;

const MODEL_URL = new URL("./model/", import.meta.url);

async function fetchJSON(name) {
  const response = await fetch(new URL(name, MODEL_URL));
  if (!response.ok) throw new Error(`model/${name}: HTTP ${response.status} (start the page with \`guppylm serve-web\`)`);
  return response.json();
}

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i; // first of equals, like torch
  return best;
}

// transformers' sampling order: temperature, then top-k, then top-p (the smallest set of most likely
// tokens whose probability reaches top_p), then a draw from what is left.
function sample(logits, temperature, topK, topP) {
  let order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
  if (topK > 0) order = order.slice(0, topK);
  let weights = order.map((i) => Math.exp((logits[i] - logits[order[0]]) / temperature)); // unnormalized softmax
  let total = weights.reduce((a, b) => a + b);
  if (topP < 1) {
    let kept = 0, mass = 0;
    while (kept < order.length && mass < topP * total) mass += weights[kept++];
    [order, weights, total] = [order.slice(0, kept), weights.slice(0, kept), mass];
  }
  let r = Math.random() * total;
  for (let i = 0; i < order.length; i++) if ((r -= weights[i]) <= 0) return order[i];
  return order[order.length - 1];
}

export class Guppy {
  /** Configs, tokenizer and export report from model/; then `useModel(file)` loads a graph. */
  static async load() {
    const files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "export_report.json"];
    const [config, generation, tokenizerJSON, tokenizerConfig, report] = await Promise.all(files.map(fetchJSON));
    return new Guppy(config, generation, new Tokenizer(tokenizerJSON, tokenizerConfig), tokenizerConfig, report);
  }

  constructor(config, generation, tokenizer, tokenizerConfig, report) {
    Object.assign(this, { config, generation, tokenizer, report });
    this.template = new Template(tokenizerConfig.chat_template); // the one chat format, defined in guppylm/tokenizer.py
    this.eos = new Set([generation.eos_token_id ?? config.eos_token_id].flat());
    this.session = null;
  }

  async useModel(file) {
    this.session = await ort.InferenceSession.create(new URL(file, MODEL_URL).href, { executionProviders: ["wasm"] });
    this.file = file;
  }

  /** The prompt's ids, the message tokens cut from its start, and the reply's room: guppylm.inference.build_prompt.
   * The reply keeps room for maxNewTokens but never more than half the context; a longer message gives way
   * from its start; then the reply gets what the context has left, up to maxNewTokens. */
  prompt(message, maxNewTokens) {
    const context = this.config.n_positions; // config.json is the GPT-2 twin's
    const text = this.template.render({ messages: [{ role: "user", content: message }], add_generation_prompt: true });
    const all = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    const dropped = Math.max(all.length - (context - Math.min(maxNewTokens, Math.floor(context / 2))), 0);
    const head = 2; // <|im_start|> user: kept; the start of the message goes
    const ids = [...all.slice(0, head), ...all.slice(head + dropped)];
    return { ids, dropped, maxNewTokens: Math.min(maxNewTokens, context - ids.length) };
  }

  decode(ids) {
    return this.tokenizer.decode(ids, { skip_special_tokens: true });
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
    const { n_head: heads, n_embd: hidden } = this.config;
    const past = {};
    for (const name of this.session.inputNames.filter((n) => n.startsWith("past_key_values."))) {
      past[name] = new ort.Tensor("float32", new Float32Array(0), [1, heads, 0, hidden / heads]);
    }
    return past;
  }

  /** Reply token ids as they come (EOS included): greedy at temperature 0, sampled otherwise. */
  async *generate(message, { temperature, topK, topP, maxNewTokens }) {
    const prompt = this.prompt(message, maxNewTokens);
    let [ids, past] = [prompt.ids, this.emptyCache()];
    for (let n = 0; n < prompt.maxNewTokens; n++) {
      const [logits, present] = await this.step(ids, past);
      const token = temperature > 0 ? sample(logits, temperature, topK, topP) : argmax(logits);
      yield token;
      if (this.eos.has(token)) return;
      [ids, past] = [[token], present];
    }
  }
}
