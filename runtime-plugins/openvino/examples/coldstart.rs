//! Cold-start benchmark (BENCHMARKS.md, "Cold starts"): how long a load
//! takes, and a prompt's prefill right after it against a prefill one token
//! longer after that (both lengths new to the instance, so both pay the CPU
//! plugin's per-shape preparation; the engine warms each instance up at
//! load, so the two should match; before it did, the first took ~250 ms
//! more).
//!
//!     cargo run -p slinfer-openvino --example coldstart -- [LOADS] [PROMPT_TOKENS] [POOL_BLOCKS]
//!
//! POOL_BLOCKS: the first KV pool each load writes (default: room for the
//! two prompts). A large one shows what writing memory the process never
//! wrote costs: each load's time is printed in order, the first in a fresh
//! process apart from the rest (BENCHMARKS.md, the paper's experiment).
//!
//! Env: SLINFER_VENV (default <repo>/.venv), SLINFER_MODELS_DIR (default
//! <repo>/.data/models).

mod common;

use std::time::Instant;

use slinfer_engine::{LlmInstance, LoadOptions, StepEntry};
use slinfer_openvino::{BackendOptions, OpenVinoBackend};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("LOADS, PROMPT_TOKENS and POOL_BLOCKS are counts")
        })
        .collect();
    let loads = *args.first().unwrap_or(&4);
    let prompt = *args.get(1).unwrap_or(&400);
    let (venv, dir) = (common::venv(), common::default_model());
    let backend = OpenVinoBackend::new(&BackendOptions {
        venv: Some(venv),
        ..Default::default()
    })
    .expect("OpenVINO");
    let blocks = args
        .get(2)
        .copied()
        .unwrap_or(2 * (prompt + 1).div_ceil(16) + 2);
    let mut seq = 0;
    let mut prefill_ms = |inst: &mut dyn LlmInstance, tokens: usize| {
        seq += 1;
        inst.add_sequence(seq).expect("a sequence");
        let t = Instant::now();
        inst.step(&[StepEntry {
            seq,
            tokens: vec![504; tokens],
        }])
        .expect("a prefill");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        inst.free_sequence(seq).expect("freed");
        ms
    };
    let (mut load, mut first, mut second) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..loads {
        let t = Instant::now();
        let mut inst = backend
            .load_package(
                &dir,
                &LoadOptions {
                    initial_kv_blocks: blocks,
                    ..Default::default()
                },
            )
            .expect("a load");
        load.push(t.elapsed().as_secs_f64() * 1e3);
        first.push(prefill_ms(&mut inst, prompt));
        second.push(prefill_ms(&mut inst, prompt + 1));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("each load in order (ms): {load:.0?}");
    let (l, a, b) = (median(&mut load), median(&mut first), median(&mut second));
    println!(
        "{loads} loads: load {l:.0} ms; {prompt}-token prefill right after it {a:.0} ms, \
         one token longer after that {b:.0} ms ({:.2}x) (medians)",
        a / b
    );
}
