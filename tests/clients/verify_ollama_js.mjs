// The official JavaScript client (npm `ollama`, pinned in package.json) against a running `gptcore serve`.
//
//   (cd tests/clients && npm ci)
//   node tests/clients/verify_ollama_js.mjs URL [MODEL]     # e.g. http://127.0.0.1:11434 tiny
//
// One line per check (`ok name: detail` or `FAIL name: why`); exits 1 if any check failed. The model may
// be anything gptcore serves (random weights are fine): the checks are on the protocol, not the text.
import { readFileSync } from "node:fs";
import { Ollama } from "ollama";

const [url, model = "tiny"] = process.argv.slice(2);
if (!url) {
  console.error("usage: node verify_ollama_js.mjs URL [MODEL]");
  process.exit(2);
}
const pkg = JSON.parse(readFileSync(new URL("./node_modules/ollama/package.json", import.meta.url)));
console.log(`ollama-js ${pkg.version} (node ${process.version}) against ${url}, model ${model}`);

const client = new Ollama({ host: url });
const greedy = { temperature: 0, num_predict: 16, seed: 1 };
let failed = 0;

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

async function check(name, fn) {
  try {
    const detail = await fn();
    console.log(`ok ${name}${detail ? ": " + detail : ""}`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL ${name}: ${err?.message ?? err}`);
  }
}

async function collect(stream, field) {
  const parts = [];
  let last;
  for await (const part of stream) {
    parts.push(field(part));
    last = part;
  }
  return { text: parts.join(""), count: parts.length, last };
}

async function expectError(fn, status) {
  try {
    await fn();
  } catch (err) {
    assert(err.status_code === status, `expected status ${status}, got ${err.status_code} (${err.message})`);
    assert(typeof err.error === "string" && err.error.length > 0, "the error names no reason");
    return err.error;
  }
  throw new Error(`expected an error with status ${status}, got a reply`);
}

let width = 0;
await check("version", async () => {
  const { version } = await client.version();
  assert(typeof version === "string" && version, "no version");
  return version;
});
await check("list", async () => {
  const { models } = await client.list();
  assert(models.length === 1 && models[0].model.startsWith(model), `models: ${JSON.stringify(models.map((m) => m.model))}`);
  assert(models[0].details.family === "gpt2" && models[0].size > 0, "details");
  return models[0].model;
});
await check("show", async () => {
  const shown = await client.show({ model });
  width = shown.model_info["gpt2.embedding_length"];
  assert(Number.isInteger(width) && width > 0, "no gpt2.embedding_length");
  assert(shown.capabilities.includes("completion") && shown.capabilities.includes("embedding"), "capabilities");
  return `context ${shown.model_info["gpt2.context_length"]}, width ${width}`;
});
await check("ps", async () => {
  const { models } = await client.ps();
  assert(models.length === 1 && models[0].model.startsWith(model), "the model is not listed as loaded");
});

const prompt = "Every effort moves you";
let generated = "";
await check("generate", async () => {
  const reply = await client.generate({ model, prompt, options: greedy });
  assert(reply.done && reply.response.length > 0, "empty response");
  assert(["stop", "length"].includes(reply.done_reason), `done_reason ${reply.done_reason}`);
  assert(reply.eval_count >= 1 && reply.eval_count <= 16 && reply.prompt_eval_count === 4, "counts");
  assert(Array.isArray(reply.context) && reply.context.length === 4 + reply.eval_count, "context");
  generated = reply.response;
  return `${reply.eval_count} tokens`;
});
await check("generate stream = generate", async () => {
  const { text, count, last } = await collect(await client.generate({ model, prompt, options: greedy, stream: true }),
    (part) => part.response);
  assert(text === generated, `streamed ${JSON.stringify(text)} != ${JSON.stringify(generated)}`);
  assert(count >= 3 && last.done && last.eval_count >= 1, "stream shape");
  return `${count} chunks`;
});
await check("generate logprobs", async () => {
  const reply = await client.generate({ model, prompt, options: greedy, logprobs: true, top_logprobs: 2 });
  assert(reply.logprobs.map((t) => t.token).join("") === generated, "tokens do not join to the response");
  assert(reply.logprobs.every((t) => t.logprob <= 0 && t.top_logprobs.length === 2 && t.top_logprobs[0].token === t.token),
    "a greedy token is not the best of its alternatives");
  return `${reply.logprobs.length} tokens`;
});
await check("generate seed", async () => {
  const options = { temperature: 1, top_k: 40, seed: 7, num_predict: 12 };
  const a = await client.generate({ model, prompt, options });
  const b = await client.generate({ model, prompt, options });
  assert(a.response === b.response && a.response.length > 0, "the same seed gave different text");
});
await check("generate stop", async () => {
  assert(generated.length >= 8, `the reply is too short to cut: ${JSON.stringify(generated)}`);
  const stop = generated.slice(4, 6);
  const cut = await client.generate({ model, prompt, options: { ...greedy, stop: [stop] } });
  assert(cut.response === generated.slice(0, generated.indexOf(stop)) && cut.done_reason === "stop",
    `cut at ${JSON.stringify(stop)}: ${JSON.stringify(cut.response)}`);
});

const messages = [{ role: "system", content: "Be brief." }, { role: "user", content: "Name a primary color." }];
let chatted = "";
await check("chat", async () => {
  const reply = await client.chat({ model, messages, options: greedy });
  assert(reply.message.role === "assistant" && reply.message.content.length > 0 && reply.done, "reply shape");
  chatted = reply.message.content;
});
await check("chat stream = chat", async () => {
  const { text, count, last } = await collect(await client.chat({ model, messages, options: greedy, stream: true }),
    (part) => part.message.content);
  assert(text === chatted && last.done, `streamed ${JSON.stringify(text)} != ${JSON.stringify(chatted)}`);
  return `${count} chunks`;
});
await check("chat stream abort", async () => {
  const stream = await client.chat({ model, messages, options: { num_predict: 100 }, stream: true });
  let seen = 0;
  try {
    for await (const part of stream) {
      seen += 1;
      if (seen === 2) stream.abort();
    }
  } catch (err) {
    assert(err.name === "AbortError", `unexpected ${err.name}: ${err.message}`);
  }
  const after = await client.chat({ model, messages, options: greedy });
  assert(after.message.content === chatted, "the server answered differently after an aborted stream");
});
await check("chat format json", async () => {
  const reply = await client.chat({ model, messages, format: "json", options: { ...greedy, num_predict: 24 } });
  const value = JSON.parse(reply.message.content);
  assert(value !== null && typeof value === "object" && !Array.isArray(value), "not an object");
  return reply.message.content;
});
await check("generate format schema", async () => {
  const schema = { type: "object", properties: { score: { type: "integer" } }, required: ["score"] };
  const reply = await client.generate({ model, prompt: "Score it:", format: schema, options: { ...greedy, num_predict: 12 } });
  assert(Number.isInteger(JSON.parse(reply.response).score), `no integer score in ${reply.response}`);
  return reply.response;
});

const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
await check("embed", async () => {
  const { embeddings, prompt_eval_count } = await client.embed({ model, input: ["first text", "second, longer text"] });
  assert(embeddings.length === 2 && embeddings.every((v) => v.length === width), "shape");
  assert(embeddings.every((v) => Math.abs(norm(v) - 1) < 1e-4), "not unit vectors");
  const single = (await client.embed({ model, input: "first text" })).embeddings[0];
  assert(single.every((x, i) => Math.abs(x - embeddings[0][i]) < 1e-5), "a single input differs from the batch");
  return `2 x ${width}, ${prompt_eval_count} tokens`;
});
await check("embed dimensions", async () => {
  const { embeddings } = await client.embed({ model, input: "first text", dimensions: 8 });
  assert(embeddings[0].length === 8 && Math.abs(norm(embeddings[0]) - 1) < 1e-4, `length ${embeddings[0].length}`);
});
await check("embeddings (legacy)", async () => {
  const { embedding } = await client.embeddings({ model, prompt: "first text" });
  assert(embedding.length === width, "length");
});

await check("unknown model is a 404", () => expectError(() => client.generate({ model: "llama3.1:8b", prompt }), 404));
await check("tools: a reply (text or a call)", async () => {
  const { message } = await client.chat({ model, messages, options: { num_predict: 8 },
    tools: [{ type: "function", function: { name: "f", parameters: { type: "object", properties: {} } } }] });
  assert(message.content || (message.tool_calls && message.tool_calls[0].function.name === "f"), "no reply");
});

console.log(failed ? `${failed} check(s) failed` : "all checks passed");
process.exit(failed ? 1 : 0);
