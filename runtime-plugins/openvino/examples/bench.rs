//! Engine benchmark (BENCHMARKS.md, "OpenVINO CPU engine"): greedy decode
//! tok/s from the engine directly, single stream and N sequences batched, with
//! `openvino_genai` measured in the same run (scripts/models/bench_genai.py,
//! before and after).
//!
//!     cargo run --release -p slinfer-openvino --example bench -- [NEW_TOKENS] [BATCH]
//!
//! Env: SLINFER_VENV (default <repo>/.venv), SLINFER_MODELS_DIR (default
//! <repo>/.data/models), SLINFER_CPU_PRECISION (f32 or bf16; default
//! f32; GenAI is given the same `INFERENCE_PRECISION_HINT`).

mod common;

use std::process::Command;
use std::time::Instant;

use slinfer_engine::{LlmInstance, LoadOptions, StepEntry, sampler::argmax};
use slinfer_openvino::{BackendOptions, OpenVinoBackend, Precision};

const PROMPT_IDS: &[u32] = &[504, 1463, 282, 260, 2240, 282, 7042, 5634]; // "The history of the city of Paris begins"

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let n = *args.first().unwrap_or(&128);
    let batch = *args.get(1).unwrap_or(&8);
    let (repo, venv, dir) = (common::repo(), common::venv(), common::default_model());
    let precision: Precision = std::env::var("SLINFER_CPU_PRECISION")
        .map(|p| p.parse().unwrap())
        .unwrap_or_default();

    let genai = || {
        let out = Command::new(venv.join("bin/python"))
            .arg(repo.join("scripts/models/bench_genai.py"))
            .arg(&dir)
            .arg(n.to_string())
            .arg(batch.to_string())
            .arg(format!(r#"{{"INFERENCE_PRECISION_HINT": "{precision}"}}"#))
            .output()
            .expect("bench_genai.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    println!("genai (before): {}", genai());

    let backend = OpenVinoBackend::new(&BackendOptions {
        venv: Some(venv.clone()),
        precision,
        ..Default::default()
    })
    .unwrap();
    let t = Instant::now();
    let mut inst = backend
        .load_package(
            &dir,
            &LoadOptions {
                initial_kv_blocks: 256,
                ..Default::default()
            },
        )
        .unwrap();
    println!(
        "load (read + paged-attention transform + compile): {:.2} s; KV block {} tokens, {} bytes",
        t.elapsed().as_secs_f64(),
        inst.block_size_tokens(),
        inst.kv_bytes_per_block()
    );

    // Returns aggregate decode tok/s (prefill excluded).
    let mut run = |seqs: usize, id0: u64| -> f64 {
        for s in 0..seqs {
            inst.add_sequence(id0 + s as u64).unwrap();
        }
        let prefill: Vec<StepEntry> = (0..seqs)
            .map(|s| StepEntry {
                seq: id0 + s as u64,
                tokens: PROMPT_IDS.to_vec(),
            })
            .collect();
        let mut last: Vec<u32> = inst
            .step(&prefill)
            .unwrap()
            .iter()
            .map(|l| argmax(l))
            .collect();
        let t = Instant::now();
        for _ in 1..n {
            let b: Vec<StepEntry> = (0..seqs)
                .map(|s| StepEntry {
                    seq: id0 + s as u64,
                    tokens: vec![last[s]],
                })
                .collect();
            last = inst.step(&b).unwrap().iter().map(|l| argmax(l)).collect();
        }
        let dt = t.elapsed().as_secs_f64();
        for s in 0..seqs {
            inst.free_sequence(id0 + s as u64).unwrap();
        }
        (seqs * (n - 1)) as f64 / dt
    };
    run(1, 0); // warm-up
    let mut singles: Vec<f64> = (0..3).map(|i| run(1, 10 + i)).collect();
    singles.sort_by(f64::total_cmp);
    let batched = run(batch, 100);
    println!(
        "engine: single-stream decode {:.1} tok/s (median of 3); {batch} sequences batched {:.1} tok/s aggregate ({:.2}x single)",
        singles[1],
        batched,
        batched / singles[1]
    );
    drop(inst);
    println!("genai (after): {}", genai());
}
