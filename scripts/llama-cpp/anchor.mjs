// llama.cpp's side of scripts/bench-inference.py: the prebuilt llama.cpp
// that node-llama-cpp ships (CPU only, the ggml CPU library chosen for this
// machine's microarchitecture), held loaded and driven by JSON lines.
//
//     node scripts/llama-cpp/anchor.mjs MODEL.gguf THREADS
//
// Prints {"ready": true, ...} once loaded, then answers each command line
//     {"prompts": [TEXT...], "tokens": N}
// with one line
//     {"wall_s": s, "streams": [{"n", "first", "last"}...]}
// where every prompt runs as its own sequence of one context (llama.cpp
// batches the sequences' steps together), greedy, stopping at EOS or after N
// tokens; "first"/"last" are the seconds from submission to the first and
// last generated token.
import {getLlama} from "node-llama-cpp";
import readline from "node:readline";

const [modelPath, threadsArg] = process.argv.slice(2);
const threads = Number(threadsArg || 2);
const MAX_STREAMS = 16;
const llama = await getLlama({gpu: false, build: "never", maxThreads: threads, logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({
    sequences: MAX_STREAMS, contextSize: MAX_STREAMS * 1024, batchSize: 2048, threads,
});

async function generate(text, tokens, t0) {
    const seq = context.getSequence();
    try {
        const times = [];
        for await (const tok of seq.evaluate(model.tokenize(text, true), {temperature: 0})) {
            if (model.isEogToken(tok)) break;
            times.push(performance.now());
            if (times.length >= tokens) break;
        }
        return {n: times.length, first: (times[0] - t0) / 1000, last: (times.at(-1) - t0) / 1000};
    } finally {
        seq.dispose();
    }
}

console.log(JSON.stringify({ready: true, threads, gpu: llama.gpu, version: llama.llamaCppRelease}));
for await (const line of readline.createInterface({input: process.stdin})) {
    const cmd = JSON.parse(line);
    if (cmd.prompts.length > MAX_STREAMS) {
        console.log(JSON.stringify({error: `at most ${MAX_STREAMS} prompts`}));
        continue;
    }
    const t0 = performance.now();
    const streams = await Promise.all(cmd.prompts.map((p) => generate(p, cmd.tokens, t0)));
    console.log(JSON.stringify({wall_s: (performance.now() - t0) / 1000, streams}));
}
