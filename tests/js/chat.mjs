// Greedy replies from a `guppylm export onnx` folder through @huggingface/transformers, from disk only.
//
//   node chat.mjs FOLDER DTYPE MAX_NEW_TOKENS MESSAGE...      DTYPE: fp32 (onnx/model.onnx) or q8 (onnx/model_quantized.onnx)
//
// Prints one JSON line: per message, the reply's token ids from model.generate and the reply text the
// text-generation pipeline gives for the chat messages. tests/test_export_js.py compares both with PyTorch.

import path from "node:path";
import { AutoModelForCausalLM, AutoTokenizer, env, pipeline } from "@huggingface/transformers";

const [folder, dtype, maxNewTokens, ...messages] = process.argv.slice(2);
env.allowRemoteModels = false; // never the Hub: the model id below names a folder under localModelPath
env.localModelPath = path.dirname(path.resolve(folder)) + path.sep;
const id = path.basename(path.resolve(folder));
const options = { dtype, device: "cpu" };
const settings = { do_sample: false, max_new_tokens: Number(maxNewTokens) };

const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id, options);
const chat = await pipeline("text-generation", id, options);

const results = [];
for (const message of messages) {
  const conversation = [{ role: "user", content: message }];
  const inputs = tokenizer.apply_chat_template(conversation, { add_generation_prompt: true, return_dict: true });
  const output = await model.generate({ ...inputs, ...settings });
  const ids = Array.from(output.tolist()[0].slice(inputs.input_ids.dims[1]), Number);
  const [{ generated_text }] = await chat(conversation, settings);
  results.push({ model_type: model.config.model_type, prompt: Array.from(inputs.input_ids.tolist()[0], Number), ids, text: generated_text.at(-1).content });
}
console.log(JSON.stringify(results));
