//! The two CPU engines side by side (BENCHMARKS.md, "CPU decode speed"):
//! greedy decode tok/s of the OpenVINO engine and the llama.cpp engine on
//! the same package, at 1, 4, 8 and 16 sequences, the engines interleaved
//! round by round, each sequence after a prompt of 440 tokens (by default).
//!
//!     cargo run --release -p slinfer-llama-cpp --example engines -- [ROUNDS] [NEW_TOKENS] [PROMPT_TOKENS]
//!
//! Env: SLINFER_VENV (default <repo>/.venv), SLINFER_MODELS_DIR (default
//! <repo>/.data/models), SLINFER_LLAMA_CPP_DIR (default the npm install in
//! <repo>/scripts/llama-cpp).

use std::path::PathBuf;
use std::time::Instant;

use slinfer_engine::{LlmInstance, LoadOptions, StepEntry, sampler::argmax};

const PROMPT_IDS: &[u32] = &[504, 1463, 282, 260, 2240, 282, 7042, 5634]; // "The history of the city of Paris begins"
const STREAMS: &[usize] = &[1, 4, 8, 16];

/// Aggregate decode tok/s of `seqs` sequences (prefill excluded) and the
/// greedy tokens of the first.
fn run(
    inst: &mut dyn LlmInstance,
    seqs: usize,
    n: usize,
    id0: u64,
    prompt_len: usize,
) -> (f64, Vec<u32>) {
    // A long prompt, as a chat's would be: the sentence repeated.
    let prompt: Vec<u32> = PROMPT_IDS
        .iter()
        .copied()
        .cycle()
        .take(prompt_len)
        .collect();
    for s in 0..seqs {
        inst.add_sequence(id0 + s as u64).unwrap();
        inst.step(&[StepEntry {
            seq: id0 + s as u64,
            tokens: prompt[..prompt.len() - 1].to_vec(),
        }])
        .unwrap();
    }
    let mut last = vec![*prompt.last().unwrap(); seqs];
    let mut first = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        let b: Vec<StepEntry> = (0..seqs)
            .map(|s| StepEntry {
                seq: id0 + s as u64,
                tokens: vec![last[s]],
            })
            .collect();
        last = inst.step(&b).unwrap().iter().map(|l| argmax(l)).collect();
        first.push(last[0]);
    }
    let dt = t.elapsed().as_secs_f64();
    for s in 0..seqs {
        inst.free_sequence(id0 + s as u64).unwrap();
    }
    ((seqs * n) as f64 / dt, first)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let rounds = *args.first().unwrap_or(&3);
    let n = *args.get(1).unwrap_or(&64);
    let prompt_len = *args.get(2).unwrap_or(&440);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let env_or = |k: &str, d: PathBuf| std::env::var_os(k).map(PathBuf::from).unwrap_or(d);
    let venv = env_or("SLINFER_VENV", repo.join(".venv"));
    let models = env_or("SLINFER_MODELS_DIR", repo.join(".data/models"));
    let llama_dir = env_or(
        slinfer_llama_cpp::DIR_ENV,
        repo.join("scripts/llama-cpp")
            .join(slinfer_llama_cpp::NPM_BINS),
    );
    let dir = models.join("smollm2-135m-instruct");
    let opts = LoadOptions {
        initial_kv_blocks: 16 * 512 / 16,
        ..Default::default()
    };
    let ov = slinfer_openvino::OpenVinoBackend::new(&slinfer_openvino::BackendOptions {
        venv: Some(venv),
        ..Default::default()
    })
    .unwrap();
    let ll = slinfer_llama_cpp::LlamaCppBackend::new(&slinfer_llama_cpp::BackendOptions {
        dir: Some(llama_dir),
        threads: None,
    })
    .unwrap();
    let mut engines: Vec<(&str, Box<dyn LlmInstance>)> = vec![
        ("openvino", Box::new(ov.load_package(&dir, &opts).unwrap())),
        ("llama.cpp", Box::new(ll.load_package(&dir, &opts).unwrap())),
    ];
    let mut id = 0;
    for (_, inst) in &mut engines {
        run(inst.as_mut(), 1, 8, id, prompt_len); // warm-up
        id += 1;
    }
    let mut figures = vec![vec![Vec::new(); STREAMS.len()]; engines.len()];
    for round in 0..rounds {
        for (k, &seqs) in STREAMS.iter().enumerate() {
            for e in 0..engines.len() {
                let e = (e + round) % engines.len();
                let (name, inst) = &mut engines[e];
                let (tps, toks) = run(inst.as_mut(), seqs, n, id, prompt_len);
                id += seqs as u64;
                println!(
                    "round {round} {name} {seqs} seq: {tps:.1} tok/s; first tokens {:?}",
                    &toks[..8]
                );
                figures[e][k].push(tps);
            }
        }
    }
    println!("| sequences | openvino tok/s | llama.cpp tok/s | llama.cpp / openvino |");
    println!("|---:|---:|---:|---:|");
    for (k, seqs) in STREAMS.iter().enumerate() {
        let med = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (o, l) = (med(&figures[0][k]), med(&figures[1][k]));
        println!("| {seqs} | {o:.1} | {l:.1} | {:.2}x |", l / o);
    }
}
