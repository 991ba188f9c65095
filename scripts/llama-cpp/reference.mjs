// llama.cpp's own greedy answer, the reference the llama.cpp engine's tests
// compare with: node-llama-cpp's high-level API on the same prebuilt
// library, one sequence, temperature 0 (its greedy sampler, not ours).
//
//     node scripts/llama-cpp/reference.mjs MODEL.gguf N TOKEN_ID...
//     node scripts/llama-cpp/reference.mjs MODEL.gguf N --text TEXT
//
// Prints {"tokens": [...], "text": "..."}: the N tokens that follow the
// prompt (fewer if an end-of-generation token comes first; that token is
// not included) and their text. A TEXT prompt is tokenized by llama.cpp,
// special tokens such as <|im_start|> included.
import {availableParallelism} from "node:os";
import {getLlama} from "node-llama-cpp";

const [modelPath, n, ...rest] = process.argv.slice(2);
const threads = availableParallelism();
const llama = await getLlama({gpu: false, build: "never", maxThreads: threads, logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({sequences: 1, contextSize: 2048, threads});
const prompt = rest[0] === "--text" ? model.tokenize(rest[1], true) : rest.map(Number);
const tokens = [];
for await (const tok of context.getSequence().evaluate(prompt, {temperature: 0})) {
    if (model.isEogToken(tok) || tokens.length >= Number(n)) break;
    tokens.push(tok);
}
console.log(JSON.stringify({tokens, text: model.detokenize(tokens)}));
await context.dispose();
await model.dispose();
