// One embeddings request with the official openai Node SDK; prints what the SDK returned as JSON.
//
//   node embeddings.mjs --base-url http://127.0.0.1:8080/v1 --model M --input "some text"
//        [--sdk openai|openai-v6] [--encoding-format base64|float]
//
// Without --encoding-format the SDK picks its default (base64, decoded to numbers for the caller).
// Prints {"sdk": <version>, "embeddings": [<number array, or the string the server sent>, ...]}.
// Used by tests/gateway/test_embeddings_base64.py; install with `npm ci --prefix tests/node`.
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    "base-url": { type: "string" },
    model: { type: "string" },
    input: { type: "string", multiple: true },
    sdk: { type: "string", default: "openai" },
    "encoding-format": { type: "string" },
  },
});
if (!values["base-url"] || !values.model || !values.input) {
  console.error("usage: node embeddings.mjs --base-url URL --model M --input TEXT [--sdk openai|openai-v6] [--encoding-format base64|float]");
  process.exit(2);
}

const { default: OpenAI } = await import(values.sdk);
// The package does not export its package.json: read it from the folder next to this script.
const manifest = new URL(`./node_modules/${values.sdk}/package.json`, import.meta.url);
const { version } = JSON.parse(await readFile(manifest, "utf8"));

const client = new OpenAI({ baseURL: values["base-url"], apiKey: "lm-studio", maxRetries: 0, timeout: 10_000 });
const body = { model: values.model, input: values.input };
if (values["encoding-format"]) body.encoding_format = values["encoding-format"];
const result = await client.embeddings.create(body);
process.stdout.write(JSON.stringify({ sdk: version, embeddings: result.data.map((item) => item.embedding) }) + "\n");
