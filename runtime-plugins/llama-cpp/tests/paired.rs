//! The two CPU engines paired (`slinfer_engine::paired`) on the real default
//! model: one sequence decodes on llama.cpp with llama.cpp's own tokens;
//! when a second comes (the threshold here is two), both run on OpenVINO,
//! the first carried over with its tokens so far, and what OpenVINO
//! computes for it is what OpenVINO alone computes after the same tokens.
//!
//! Needs what `./dev test` installs: the model package, the npm install of
//! node-llama-cpp and the project virtualenv (OpenVINO).

use std::sync::Arc;

use slinfer_engine::paired::PairedBackend;
use slinfer_engine::sampler::argmax;
use slinfer_engine::{Backend, LlmInstance, LoadOptions, ModelSource, StepEntry};
use slinfer_llama_cpp::{BackendOptions, DIR_ENV, LlamaCppBackend, NPM_BINS};
use slinfer_test_support::{default_model_dir as model_dir, repo_root};

/// "The capital of France is" and "def fibonacci(n):" as the package's
/// tokenizer encodes them.
fn prompts() -> Vec<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    ["The capital of France is", "def fibonacci(n):"]
        .iter()
        .map(|p| tok.encode(*p, true).unwrap().get_ids().to_vec())
        .collect()
}

fn engines() -> (Arc<dyn Backend>, Arc<dyn Backend>) {
    let dir = std::env::var_os(DIR_ENV)
        .map(Into::into)
        .unwrap_or_else(|| repo_root().join("scripts/llama-cpp").join(NPM_BINS));
    let llama = LlamaCppBackend::new(&BackendOptions {
        dir: Some(dir),
        threads: None,
    })
    .unwrap_or_else(|e| panic!("{e}: run `./dev test` (it installs node-llama-cpp)"));
    let openvino = slinfer_openvino::OpenVinoBackend::new(&slinfer_openvino::BackendOptions {
        venv: Some(repo_root().join(".venv")),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}: run `./dev test` (it sets up the virtualenv)"));
    (Arc::new(llama), Arc::new(openvino))
}

fn load(backend: &dyn Backend) -> Box<dyn LlmInstance> {
    backend
        .load(
            &ModelSource::Package(model_dir()),
            0,
            &LoadOptions {
                initial_kv_blocks: 16,
                ..Default::default()
            },
        )
        .expect("load")
}

/// Greedy logits of one sequence fed `tokens` in one step on a fresh instance.
fn alone(inst: &mut dyn LlmInstance, seq: u64, tokens: &[u32]) -> Vec<f32> {
    inst.add_sequence(seq).unwrap();
    let out = inst
        .step(&[StepEntry {
            seq,
            tokens: tokens.to_vec(),
        }])
        .unwrap()
        .remove(0);
    inst.free_sequence(seq).unwrap();
    out
}

/// `got`'s greedy token is `want`'s, or within a near-tie of it (the two
/// computations batch the tokens differently).
fn same_choice(what: &str, got: &[f32], want: &[f32]) {
    let (g, w) = (argmax(got), argmax(want));
    assert!(
        g == w || (want[w as usize] - want[g as usize]) < 0.05,
        "{what}: token {g}, alone {w} (logits {} vs {})",
        want[g as usize],
        want[w as usize]
    );
}

#[test]
fn one_sequence_decodes_on_llama_cpp_and_two_move_to_openvino() {
    let (llama, openvino) = engines();
    let pair_backend = PairedBackend::new(llama.clone(), openvino.clone(), 2).unwrap();
    assert_eq!(pair_backend.name(), "llama.cpp+openvino");
    let mut pair = load(&pair_backend);
    let (mut ll, mut ov) = (load(llama.as_ref()), load(openvino.as_ref()));
    let p = prompts();

    // One sequence: llama.cpp, step by step as llama.cpp alone decodes it.
    pair.add_sequence(1).unwrap();
    ll.add_sequence(1).unwrap();
    let mut held = p[0].clone();
    let mut next = p[0].clone();
    for _ in 0..4 {
        let step = [StepEntry {
            seq: 1,
            tokens: next.clone(),
        }];
        let (got, want) = (pair.step(&step).unwrap(), ll.step(&step).unwrap());
        assert_eq!(got, want, "one sequence runs on llama.cpp");
        next = vec![argmax(&got[0])];
        held.extend_from_slice(&next);
    }
    held.pop();

    // A second sequence: the step runs on OpenVINO, the first sequence
    // carried over with the tokens it holds.
    pair.add_sequence(2).unwrap();
    let got = pair
        .step(&[
            StepEntry {
                seq: 1,
                tokens: next.clone(),
            },
            StepEntry {
                seq: 2,
                tokens: p[1].clone(),
            },
        ])
        .unwrap();
    let mut first = held.clone();
    first.extend_from_slice(&next);
    same_choice("moved", &got[0], &alone(ov.as_mut(), 10, &first));
    same_choice("new", &got[1], &alone(ov.as_mut(), 11, &p[1]));
    assert_eq!(pair.sequence_len(1), Some(first.len()));
    assert_eq!(
        pair.memory().kv_blocks_in_use,
        first.len().div_ceil(pair.block_size_tokens())
            + p[1].len().div_ceil(pair.block_size_tokens()),
        "the blocks on llama.cpp are freed"
    );
}
