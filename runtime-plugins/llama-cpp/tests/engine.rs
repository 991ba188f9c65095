//! The llama.cpp engine against the real imported default model, with
//! llama.cpp itself as the reference: node-llama-cpp's own greedy
//! generation on the same library (`scripts/llama-cpp/reference.mjs`, run at
//! test time, never pasted in).
//!
//! Needs what `./dev test` installs: the model package (`$SLINFER_MODELS_DIR`,
//! default `<repo>/.data/models`) and the npm install of node-llama-cpp in
//! `scripts/llama-cpp` (or `$SLINFER_LLAMA_CPP_DIR`), and `node`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use slinfer_engine::sampler::argmax;
use slinfer_engine::{
    Backend, EngineError, LlmInstance, LoadOptions, ModelSource, RetiredCost, StepEntry,
};
use slinfer_llama_cpp::{BackendOptions, DIR_ENV, LlamaCppBackend, LlamaCppInstance, NPM_BINS};
use slinfer_test_support::{default_model_dir as model_dir, repo_root};

const NEW_TOKENS: usize = 24;
/// Token ids of "The capital of France is", "def fibonacci(n):" and a chat
/// turn, as the package's tokenizer encodes them (checked below).
const PROMPTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
];

fn library_dir() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("scripts/llama-cpp").join(NPM_BINS))
}

fn backend() -> &'static LlamaCppBackend {
    static B: OnceLock<LlamaCppBackend> = OnceLock::new();
    B.get_or_init(|| {
        LlamaCppBackend::new(&BackendOptions {
            dir: Some(library_dir()),
            threads: None,
        })
        .unwrap_or_else(|e| panic!("{e}: run `./dev test` (it installs node-llama-cpp)"))
    })
}

/// One test at a time: ggml's threads wait for each other by spinning, so
/// two instances computing at once on these few cores take ten times as long.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn load(blocks: usize) -> LlamaCppInstance {
    backend()
        .load_package(
            &model_dir(),
            &LoadOptions {
                initial_kv_blocks: blocks,
                ..Default::default()
            },
        )
        .expect("load")
}

fn prompt_ids() -> &'static [Vec<u32>] {
    static P: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    P.get_or_init(|| {
        let tok = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
        PROMPTS
            .iter()
            .map(|p| tok.encode(*p, true).unwrap().get_ids().to_vec())
            .collect()
    })
}

/// llama.cpp's own greedy continuation of each prompt.
fn reference() -> &'static [Vec<u32>] {
    static R: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    R.get_or_init(|| {
        prompt_ids()
            .iter()
            .map(|ids| {
                let out = Command::new("node")
                    .arg(repo_root().join("scripts/llama-cpp/reference.mjs"))
                    .arg(model_dir().join("model.gguf"))
                    .arg(NEW_TOKENS.to_string())
                    .args(ids.iter().map(u32::to_string))
                    .output()
                    .expect("node scripts/llama-cpp/reference.mjs");
                assert!(
                    out.status.success(),
                    "reference.mjs: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let answer: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("reference.mjs prints JSON");
                answer["tokens"]
                    .as_array()
                    .expect("tokens")
                    .iter()
                    .map(|t| t.as_u64().expect("a token id") as u32)
                    .collect()
            })
            .collect()
    })
}

/// A token whose logit is within this of the best one is a near-tie: a
/// different batch shape or KV layout may round either way (llama.cpp's
/// kernels differ by batch size, and a resize moves KV cells).
const NEAR_TIE: f32 = 0.1;

/// What a sequence produced: its tokens, and at each the gap between the
/// best logit and the reference token's.
struct Decoded {
    tokens: Vec<u32>,
    gaps: Vec<f32>,
}

/// The tokens are llama.cpp's own up to a near-tie: equal to the reference
/// until the first difference, and there the reference's token was within
/// [`NEAR_TIE`] of the best (after which the texts part ways).
fn assert_greedy(what: &str, p: usize, got: &Decoded) {
    let want = &reference()[p];
    let Some(i) = (0..want.len()).find(|&i| got.tokens[i] != want[i]) else {
        return;
    };
    assert!(
        got.gaps[i] <= NEAR_TIE,
        "{what}: token {i} for {:?} is {} where llama.cpp chose {} ({} below the best logit)\n got {:?}\nwant {want:?}",
        PROMPTS[p],
        got.tokens[i],
        want[i],
        got.gaps[i],
        got.tokens
    );
}

/// Greedy-decode every prompt, sequence `i` starting at step `start[i]`
/// (so prefills and decodes share steps), up to its reference's length;
/// `before` runs before each step (to resize the pool).
fn generate(
    inst: &mut LlamaCppInstance,
    which: &[usize],
    start: &[usize],
    mut before: impl FnMut(usize, &mut LlamaCppInstance),
) -> Vec<Decoded> {
    let want: Vec<usize> = which.iter().map(|&p| reference()[p].len()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); which.len()];
    let mut gaps: Vec<Vec<f32>> = vec![Vec::new(); which.len()];
    let mut step = 0;
    while out.iter().zip(&want).any(|(o, &w)| o.len() < w) {
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for (i, &p) in which.iter().enumerate() {
            if step < start[i] || out[i].len() >= want[i] {
                continue;
            }
            let seq = 100 + i as u64;
            let tokens = if step == start[i] {
                inst.add_sequence(seq).unwrap();
                prompt_ids()[p].clone()
            } else {
                vec![*out[i].last().unwrap()]
            };
            batch.push(StepEntry { seq, tokens });
            who.push(i);
        }
        if !batch.is_empty() {
            before(step, inst);
            let logits = inst.step(&batch).expect("step");
            assert_eq!(logits.len(), batch.len());
            for (l, &i) in logits.iter().zip(&who) {
                assert_eq!(l.len(), inst.config().vocab_size);
                let best = l.iter().copied().fold(f32::MIN, f32::max);
                gaps[i].push(best - l[reference()[which[i]][out[i].len()] as usize]);
                out[i].push(argmax(l));
                if out[i].len() == want[i] {
                    inst.free_sequence(100 + i as u64).unwrap();
                }
            }
        }
        step += 1;
    }
    out.into_iter()
        .zip(gaps)
        .map(|(tokens, gaps)| Decoded { tokens, gaps })
        .collect()
}

#[test]
fn greedy_matches_llama_cpp_alone_and_batched() {
    let _serial = serial();
    let mut inst = load(64);
    let all: Vec<usize> = (0..PROMPTS.len()).collect();
    for &p in &all {
        let got = generate(&mut inst, &[p], &[0], |_, _| {});
        assert_greedy("one sequence", p, &got[0]);
    }
    assert_eq!(inst.kv_blocks_in_use(), 0, "every sequence freed");
    // Ragged steps: prefills beside decodes, sequences joining late.
    let got = generate(&mut inst, &all, &[0, 3, 5], |_, _| {});
    for &p in &all {
        assert_greedy("batched", p, &got[p]);
    }
}

#[test]
fn kv_grow_and_shrink_move_every_sequence() {
    let _serial = serial();
    let mut inst = load(8);
    let all: Vec<usize> = (0..PROMPTS.len()).collect();
    let mut sizes = Vec::new();
    let got = generate(&mut inst, &all, &[0, 1, 2], |step, inst| {
        // Grow past the need, then shrink to just above what is in use.
        let blocks = if step % 4 == 1 {
            inst.kv_blocks_in_use() + 40
        } else {
            inst.kv_blocks_in_use() + 6
        };
        inst.resize_kv(blocks).unwrap();
        assert_eq!(inst.kv_capacity_blocks(), blocks);
        sizes.push(inst.memory().kv_bytes);
    });
    for &p in &all {
        assert_greedy("after resizes", p, &got[p]);
    }
    assert!(
        sizes.iter().max() > sizes.iter().min(),
        "the context's KV bytes follow the pool: {sizes:?}"
    );
    inst.resize_kv(0).unwrap();
    assert_eq!(inst.kv_capacity_blocks(), 0);
}

#[test]
fn more_sequences_than_a_context_has_room_for_make_room_and_move_every_sequence() {
    let _serial = serial();
    let mut inst = load(64);
    let row = 4 * inst.config().vocab_size as u64;
    let rows = |inst: &LlamaCppInstance| inst.memory().workspace_bytes / row;
    assert_eq!(rows(&inst), 16, "a new context has room for 16 sequences");
    let all: Vec<usize> = (0..PROMPTS.len()).collect();
    let mut seen = Vec::new();
    let got = generate(&mut inst, &all, &[0, 1, 2], |step, inst| {
        if step == 2 {
            // A fork sharing its cells, then more sequences than the room:
            // the context is made again with room for 64, every sequence's
            // KV moved into it (the fork's on its own cells).
            inst.fork_sequence(100, 999, inst.sequence_len(100).unwrap())
                .unwrap();
            for s in 0..40 {
                inst.add_sequence(1000 + s).unwrap();
            }
            inst.step(&[StepEntry {
                seq: 1039,
                tokens: prompt_ids()[0].clone(),
            }])
            .unwrap();
        }
        if step == 6 {
            for s in 0..40 {
                inst.free_sequence(1000 + s).unwrap();
            }
            inst.free_sequence(999).unwrap();
            // A resize fits the room to the sequences held (ids 0-2).
            inst.resize_kv(inst.kv_blocks_in_use() + 8).unwrap();
        }
        seen.push(rows(inst));
    });
    for &p in &all {
        assert_greedy("with the room grown and shrunk", p, &got[p]);
    }
    assert_eq!(seen.iter().max(), Some(&64), "{seen:?}");
    assert_eq!(seen.last(), Some(&16), "{seen:?}");

    // llama.cpp's most: 256 sequences; one more is refused, nothing kept.
    for s in 0..256 {
        inst.add_sequence(2000 + s).unwrap();
    }
    assert_eq!(rows(&inst), 256);
    let e = inst.add_sequence(5000).unwrap_err();
    assert!(
        matches!(&e, EngineError::Unsupported(m) if m.contains("more than 256 sequences")),
        "{e}"
    );
    assert_eq!(inst.sequence_len(5000), None);
    inst.free_sequence(2000).unwrap();
    inst.add_sequence(5000).unwrap();
    assert_eq!(inst.sequence_len(5000), Some(0));
}

#[test]
fn forks_continue_like_the_original() {
    // Sequence 2 is a copy of the whole prompt, sequence 3 of its first
    // tokens only (it computes the rest itself): each decodes llama.cpp's
    // own answer.
    let _serial = serial();
    let mut inst = load(64);
    let ids = &prompt_ids()[0];
    inst.add_sequence(1).unwrap();
    let prefill = inst
        .step(&[StepEntry {
            seq: 1,
            tokens: ids.clone(),
        }])
        .unwrap();
    let first = argmax(&prefill[0]);
    let gap = |l: &[f32], k: usize| {
        l.iter().copied().fold(f32::MIN, f32::max) - l[reference()[0][k] as usize]
    };
    let before = inst.kv_blocks_in_use();
    inst.fork_sequence(1, 2, ids.len()).unwrap();
    assert_eq!(inst.sequence_len(2), Some(ids.len()));
    assert!(
        inst.kv_blocks_in_use() <= before + 1,
        "a fork shares the full blocks"
    );
    let k = ids.len() - 3;
    inst.fork_sequence(1, 3, k).unwrap();
    assert_eq!(inst.sequence_len(3), Some(k));
    let rest = inst
        .step(&[StepEntry {
            seq: 3,
            tokens: ids[k..].to_vec(),
        }])
        .unwrap();
    let mut last = [first, first, argmax(&rest[0])];
    let mut out = last.map(|t| vec![t]);
    let mut gaps = [gap(&prefill[0], 0), gap(&prefill[0], 0), gap(&rest[0], 0)].map(|g| vec![g]);
    for k in 1..reference()[0].len() {
        let batch: Vec<StepEntry> = (1..=3)
            .zip(last)
            .map(|(seq, t)| StepEntry {
                seq,
                tokens: vec![t],
            })
            .collect();
        let logits = inst.step(&batch).unwrap();
        for s in 0..3 {
            gaps[s].push(gap(&logits[s], k));
            last[s] = argmax(&logits[s]);
            out[s].push(last[s]);
        }
    }
    assert_eq!(out[1], out[0], "the fork decodes like the original");
    for ((what, tokens), gaps) in ["forked", "forked", "forked by its first tokens"]
        .into_iter()
        .zip(out)
        .zip(gaps)
    {
        assert_greedy(what, 0, &Decoded { tokens, gaps });
    }
    assert!(matches!(
        inst.fork_sequence(99, 4, 1),
        Err(EngineError::UnknownSequence(99))
    ));
    assert!(matches!(
        inst.fork_sequence(1, 2, 1),
        Err(EngineError::SequenceExists(2))
    ));
    assert!(matches!(
        inst.fork_sequence(1, 4, inst.sequence_len(1).unwrap() + 1),
        Err(EngineError::ForkBeyondSequence { seq: 1, .. })
    ));
    assert_eq!(inst.sequence_len(4), None, "a refused fork holds nothing");
    // A retired sequence stays, but the unified cache's steps read over it.
    assert_eq!(inst.retire_sequence(1).unwrap(), RetiredCost::EveryStep);
    assert!(inst.sequence_len(1).is_some());
    assert!(matches!(
        inst.retire_sequence(99),
        Err(EngineError::UnknownSequence(99))
    ));
}

#[test]
fn bad_steps_are_refused_and_change_nothing() {
    let _serial = serial();
    let mut inst = load(2);
    let ids = prompt_ids()[0].clone();
    inst.add_sequence(7).unwrap();
    let vocab = inst.config().vocab_size as u32;
    assert!(matches!(
        inst.step(&[StepEntry {
            seq: 7,
            tokens: vec![vocab],
        }]),
        Err(EngineError::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        inst.step(&[StepEntry {
            seq: 8,
            tokens: vec![1],
        }]),
        Err(EngineError::UnknownSequence(8))
    ));
    // Two blocks of 16 tokens: 40 tokens do not fit.
    let long: Vec<u32> = ids.iter().copied().cycle().take(40).collect();
    assert!(matches!(
        inst.step(&[StepEntry {
            seq: 7,
            tokens: long,
        }]),
        Err(EngineError::KvExhausted { .. })
    ));
    assert_eq!(inst.sequence_len(7), Some(0), "nothing was appended");
    assert!(matches!(inst.resize_kv(0).map(|_| ()), Ok(())));
    inst.resize_kv(64).unwrap();
    let logits = inst
        .step(&[StepEntry {
            seq: 7,
            tokens: ids.clone(),
        }])
        .unwrap();
    assert_eq!(argmax(&logits[0]), reference()[0][0]);
    assert!(matches!(
        inst.resize_kv(0),
        Err(EngineError::ShrinkBelowUsage { .. })
    ));
    assert!(matches!(
        inst.add_sequence(7),
        Err(EngineError::SequenceExists(7))
    ));
    inst.free_sequence(7).unwrap();
    assert!(matches!(
        inst.free_sequence(7),
        Err(EngineError::UnknownSequence(7))
    ));
}

#[test]
fn backend_loads_packages_and_refuses_what_it_cannot_read() {
    let _serial = serial();
    let b = backend();
    assert_eq!(b.name(), "llama.cpp");
    let pkg = slinfer_engine::ModelPackage::open(&model_dir()).unwrap();
    let fp = b.footprint(&pkg).unwrap();
    let inst = b
        .load(
            &ModelSource::Package(model_dir()),
            0,
            &LoadOptions::default(),
        )
        .unwrap();
    assert_eq!(inst.memory().weight_bytes, inst.weight_bytes());
    assert!(inst.weight_bytes() > 50 << 20 && inst.weight_bytes() <= fp.weights_bytes);
    assert_eq!(
        inst.kv_bytes_per_block(),
        fp.kv_bytes_per_token * inst.block_size_tokens() as u64
    );
    assert!(matches!(
        b.load(
            &ModelSource::Package(model_dir()),
            1,
            &LoadOptions::default()
        ),
        Err(EngineError::NoDevice(1))
    ));
    assert!(matches!(
        b.load(
            &ModelSource::Gguf(model_dir().join("model.gguf")),
            0,
            &LoadOptions::default()
        ),
        Err(EngineError::Model(_))
    ));
    // A package whose GGUF is gone.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("llama-cpp-no-gguf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(model_dir().join("model.toml"), dir.join("model.toml")).unwrap();
    let e = b
        .load(
            &ModelSource::Package(dir.clone()),
            0,
            &LoadOptions::default(),
        )
        .err()
        .expect("refused");
    assert!(
        matches!(&e, EngineError::Model(m) if m.contains("missing") || m.contains("no GGUF")),
        "{e}"
    );
    // A GGUF that is not one.
    std::fs::write(dir.join("model.gguf"), b"not a gguf").unwrap();
    let e = b
        .load(&ModelSource::Package(dir), 0, &LoadOptions::default())
        .err()
        .expect("refused");
    assert!(
        matches!(&e, EngineError::Model(m) if m.contains("could not load")),
        "{e}"
    );
}

#[test]
fn a_folder_without_the_library_is_unavailable() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let e = LlamaCppBackend::new(&BackendOptions {
        dir: Some(dir.clone()),
        threads: None,
    })
    .err()
    .expect("no library there");
    assert!(
        matches!(&e, EngineError::Unavailable(m) if m.contains("libllama.v0.5.0.so")),
        "{e}"
    );
}
