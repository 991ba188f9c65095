//! The OpenVINO engine against the real imported default model, with
//! OpenVINO GenAI as the reference (computed at test time by
//! `scripts/models/reference.py`, never pasted in). Which property each
//! comparison rests on, on any x86-64 CPU, is said where it is made; see
//! `slinfer_test_support::reference`.
//!
//! Needs the model package that `./dev test` imports (into
//! `$SLINFER_MODELS_DIR`, default `<repo>/.data/models`) and the project
//! virtualenv (`$SLINFER_VENV`, default `<repo>/.venv`).

use std::path::PathBuf;
use std::sync::OnceLock;

use slinfer_engine::{EngineError, LlmInstance, LoadOptions, StepEntry, sampler::argmax};
use slinfer_openvino::{BackendOptions, OpenVinoBackend, OpenVinoInstance, Precision};
use slinfer_test_support::reference::{self, Answer, Reference};
use slinfer_test_support::{default_model_dir as model_dir, venv};

const NEW_TOKENS: usize = 40;
const PROMPTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, 123 + 4567 =",
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
];

fn backend() -> &'static OpenVinoBackend {
    static B: OnceLock<OpenVinoBackend> = OnceLock::new();
    B.get_or_init(|| {
        OpenVinoBackend::new(&BackendOptions {
            venv: Some(venv()),
            cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slinfer-ov-cache")),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}: run `./dev test` (it installs the openvino wheel)"))
    })
}

fn load(blocks: usize) -> OpenVinoInstance {
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

/// GenAI's greedy tokens for every prompt, computed once per test binary.
fn reference() -> &'static [Reference] {
    static R: OnceLock<Vec<Reference>> = OnceLock::new();
    R.get_or_init(|| reference::generate(&model_dir(), PROMPTS, NEW_TOKENS))
}

/// Greedy-decode several sequences together, starting sequence `i` at step
/// `start[i]` (so prefills and decodes share steps); `before` runs before each
/// step with its batch (to grow or shrink the pool).
fn generate(
    inst: &mut OpenVinoInstance,
    refs: &[&Reference],
    start: &[usize],
    mut before: impl FnMut(usize, &mut OpenVinoInstance, &[StepEntry]),
) -> Vec<Vec<u32>> {
    let n = refs.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut step = 0;
    while out.iter().any(|o| o.len() < NEW_TOKENS) {
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for i in 0..n {
            if step < start[i] || out[i].len() >= NEW_TOKENS {
                continue;
            }
            let seq = 100 + i as u64;
            let tokens = if step == start[i] {
                inst.add_sequence(seq).unwrap();
                refs[i].prompt_ids.clone()
            } else {
                vec![*out[i].last().unwrap()]
            };
            batch.push(StepEntry { seq, tokens });
            who.push(i);
        }
        if !batch.is_empty() {
            before(step, inst, &batch);
            let logits = inst.step(&batch).expect("step");
            assert_eq!(logits.len(), batch.len());
            for (l, &i) in logits.iter().zip(&who) {
                out[i].push(argmax(l));
                if out[i].len() == NEW_TOKENS {
                    inst.free_sequence(100 + i as u64).unwrap();
                }
            }
        }
        step += 1;
    }
    out
}

/// Batches composed unlike any of GenAI's: each token must be a greedy
/// choice of the model up to a near-tie (see `slinfer_test_support::reference`).
fn assert_greedy(what: &str, refs: &[&Reference], got: &[Vec<u32>]) {
    let answers: Vec<Answer> = refs
        .iter()
        .zip(got)
        .map(|(r, g)| Answer::tokens(&r.prompt, g))
        .collect();
    reference::assert_greedy(&model_dir(), what, &answers);
}

#[test]
fn tokenizer_json_matches_genai_ids() {
    let tok = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    for r in reference() {
        let enc = tok.encode(r.prompt.as_str(), true).unwrap();
        assert_eq!(enc.get_ids(), r.prompt_ids, "prompt {:?}", r.prompt);
        let text = tok.decode(&r.prompt_ids, false).unwrap();
        assert_eq!(text, r.prompt);
    }
}

#[test]
fn greedy_matches_genai_one_at_a_time_and_batched() {
    let refs = reference();
    let mut inst = load(64);
    assert_eq!(inst.block_size_tokens(), 32);
    assert!(inst.kv_bytes_per_block() > 0);
    // Like for like: one sequence per step, its prompt in one step, is what
    // LLMPipeline's paged-attention backend does with the same graph and
    // kernels. The same arithmetic, so the same tokens on any CPU.
    for r in refs {
        let got = generate(&mut inst, &[r], &[0], |_, _, _| {});
        assert_eq!(
            got[0], r.tokens,
            "one sequence: engine tokens differ from LLMPipeline's for prompt {:?}",
            r.prompt
        );
    }
    assert_eq!(inst.kv_blocks_in_use(), 0);

    // A second instance of the same model, loaded alongside the first. Like
    // for like again: the four prompts prefilled in one step and decoded
    // together is how ContinuousBatchingPipeline composes its steps for
    // prompts submitted at once; the same batches, so the same tokens.
    let mut second = load(64);
    let all: Vec<&Reference> = refs.iter().collect();
    let got = generate(&mut second, &all, &[0, 0, 0, 0], |_, _, _| {});
    for (r, g) in refs.iter().zip(&got) {
        assert_eq!(
            g, &r.batched_tokens,
            "4 sequences batched vs ContinuousBatchingPipeline, prompt {:?}",
            r.prompt
        );
    }
    // Staggered: later prompts prefill in the same step as earlier ones
    // decode, batches GenAI never forms.
    let got = generate(&mut inst, &all, &[0, 3, 5, 11], |_, _, _| {});
    assert_greedy("4 sequences, staggered prefill", &all, &got);
    assert_eq!(inst.kv_blocks_in_use(), 0);
    assert_eq!(second.kv_blocks_in_use(), 0);
}

#[test]
fn prompts_prefilled_in_chunks_decode_greedily() {
    // The host prefills long prompts in chunks (a step appends part of a
    // prompt to a sequence that already holds the rest): four prompts in
    // steps of at most 5 tokens over all of them, then decoded together.
    let refs: Vec<&Reference> = reference().iter().collect();
    let mut inst = load(64);
    let seqs: Vec<u64> = (0..refs.len() as u64).map(|i| 200 + i).collect();
    for &s in &seqs {
        inst.add_sequence(s).unwrap();
    }
    let mut done = vec![0; refs.len()];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); refs.len()];
    while out.iter().any(|o| o.is_empty()) {
        let (mut batch, mut who, mut room) = (Vec::new(), Vec::new(), 5);
        for (i, r) in refs.iter().enumerate() {
            let take = (r.prompt_ids.len() - done[i]).min(room);
            if take == 0 {
                continue;
            }
            batch.push(StepEntry {
                seq: seqs[i],
                tokens: r.prompt_ids[done[i]..done[i] + take].to_vec(),
            });
            who.push(i);
            done[i] += take;
            room -= take;
        }
        for (l, i) in inst.step(&batch).unwrap().iter().zip(who) {
            if done[i] == refs[i].prompt_ids.len() {
                out[i].push(argmax(l));
            }
        }
    }
    while out[0].len() < NEW_TOKENS {
        let batch: Vec<StepEntry> = seqs
            .iter()
            .zip(&out)
            .map(|(&seq, o)| StepEntry {
                seq,
                tokens: vec![*o.last().unwrap()],
            })
            .collect();
        for (l, o) in inst.step(&batch).unwrap().iter().zip(&mut out) {
            o.push(argmax(l));
        }
    }
    assert_greedy("4 sequences, prompts prefilled in chunks", &refs, &out);
}

#[test]
fn kv_grow_and_shrink_keep_results_identical() {
    let refs = reference();
    let all: Vec<&Reference> = refs.iter().collect();
    // Start small, grow, then from step 8 on keep the pool exactly as large as
    // the blocks in use plus what the next step needs: every finished sequence
    // leaves holes, and the shrink moves blocks in use above the cut into them.
    let mut inst = load(4);
    let mut shrinks = 0;
    let got = generate(&mut inst, &all, &[0, 0, 2, 4], |step, inst, batch| {
        let need = inst.blocks_needed(batch).unwrap();
        let used = inst.kv_blocks_in_use();
        if step == 3 {
            inst.resize_kv(40).unwrap();
        } else if step >= 8 || inst.kv_capacity_blocks() < used + need {
            if used + need < inst.kv_capacity_blocks() {
                shrinks += 1;
            }
            inst.resize_kv(used + need).unwrap();
        }
        let m = inst.memory();
        assert_eq!(m.kv_blocks_capacity, inst.kv_capacity_blocks());
        assert_eq!(m.kv_blocks_in_use, used);
        assert_eq!(
            m.kv_bytes,
            inst.kv_bytes_per_block() * m.kv_blocks_capacity.max(1) as u64
        );
    });
    assert!(shrinks > 0);
    // Like for like: the same batches in an instance whose pool never moves.
    // Resizing moves KV blocks, never their contents, so the same tokens.
    let fixed = generate(&mut load(64), &all, &[0, 0, 2, 4], |_, _, _| {});
    assert_eq!(got, fixed, "KV grow/shrink changed the answers");
    assert_greedy("with KV grow/shrink", &all, &got);
    assert_eq!(inst.kv_blocks_in_use(), 0);
    inst.resize_kv(0).unwrap();
    assert_eq!(inst.kv_capacity_blocks(), 0);
}

#[test]
fn exhaustion_is_an_error_and_freeing_returns_blocks() {
    let mut inst = load(2);
    let long: Vec<u32> = (0..70).map(|i| 100 + i).collect(); // 3 blocks
    inst.add_sequence(1).unwrap();
    let e = inst
        .step(&[StepEntry {
            seq: 1,
            tokens: long.clone(),
        }])
        .unwrap_err();
    assert!(
        matches!(e, EngineError::KvExhausted { needed: 3, free: 2 }),
        "{e}"
    );
    assert_eq!(inst.sequence_len(1), Some(0));
    assert_eq!(inst.kv_blocks_in_use(), 0);

    inst.add_sequence(2).unwrap();
    inst.step(&[
        StepEntry {
            seq: 1,
            tokens: long[..40].to_vec(),
        },
        StepEntry {
            seq: 2,
            tokens: vec![1],
        },
    ])
    .unwrap_err(); // 2 + 1 blocks > 2
    assert_eq!(inst.kv_blocks_in_use(), 0);
    inst.step(&[StepEntry {
        seq: 1,
        tokens: long[..40].to_vec(),
    }])
    .unwrap();
    assert_eq!(inst.kv_blocks_in_use(), 2);
    // Logits only for the sampled row, not one per prefill token.
    assert_eq!(
        inst.memory().workspace_bytes,
        4 * inst.config().vocab_size as u64
    );
    assert!(matches!(
        inst.resize_kv(1),
        Err(EngineError::ShrinkBelowUsage {
            requested: 1,
            in_use: 2
        })
    ));
    assert!(matches!(
        inst.step(&[StepEntry {
            seq: 2,
            tokens: vec![u32::MAX]
        }]),
        Err(EngineError::TokenOutOfRange { .. })
    ));
    inst.free_sequence(1).unwrap();
    inst.free_sequence(2).unwrap();
    assert_eq!(inst.kv_blocks_in_use(), 0);
    assert!(matches!(
        inst.free_sequence(2),
        Err(EngineError::UnknownSequence(2))
    ));
}

/// The load runs the compiled model once (its first inference sets the CPU
/// plugin up) and leaves nothing of it: no sequence, no block in use, the
/// pool as asked; the instance's footprint already has its workspace.
#[test]
fn a_load_warms_the_instance_up_and_leaves_nothing_of_it() {
    for blocks in [0, 3] {
        let mut inst = load(blocks);
        assert_eq!(inst.kv_capacity_blocks(), blocks);
        assert_eq!(inst.kv_blocks_in_use(), 0);
        assert_eq!(inst.sequence_len(u64::MAX), None);
        let m = inst.memory();
        assert_eq!(m.workspace_bytes, 4 * inst.config().vocab_size as u64);
        assert_eq!(m.kv_blocks_capacity, blocks);
        if blocks > 0 {
            // Every block is free for callers' sequences.
            inst.add_sequence(1).unwrap();
            inst.step(&[StepEntry {
                seq: 1,
                tokens: vec![1; blocks * inst.block_size_tokens()],
            }])
            .unwrap();
            assert_eq!(inst.kv_blocks_in_use(), blocks);
        }
    }
}

#[test]
fn backend_trait_loads_packages_on_the_cpu() {
    use slinfer_engine::{Backend, DeviceKind, ModelSource};
    let b: &dyn Backend = backend();
    assert_eq!((b.name(), b.kind()), ("openvino", DeviceKind::Cpu));
    let devs = b.devices().unwrap();
    assert_eq!(devs.len(), 1);
    assert!(devs[0].total_bytes > 0 && devs[0].free_bytes <= devs[0].total_bytes);
    let opts = LoadOptions {
        initial_kv_blocks: 3,
        ..Default::default()
    };
    let src = ModelSource::Package(model_dir());
    assert!(matches!(
        b.load(&src, 1, &opts),
        Err(EngineError::NoDevice(1))
    ));
    assert!(matches!(
        b.load(&ModelSource::Gguf(model_dir().join("model.gguf")), 0, &opts),
        Err(EngineError::Model(_))
    ));
    let bad_block = LoadOptions {
        block_size_tokens: Some(7),
        ..opts.clone()
    };
    assert!(matches!(
        b.load(&src, 0, &bad_block),
        Err(EngineError::Model(_))
    ));
    let mut inst = b.load(&src, 0, &opts).unwrap();
    assert_eq!(inst.kv_capacity_blocks(), 3);
    let m = inst.memory();
    assert!(m.weight_bytes > 50_000_000, "{m:?}");
    assert_eq!(m.kv_bytes, 3 * inst.kv_bytes_per_block());
    inst.add_sequence(7).unwrap();
    let r = &reference()[0];
    let logits = inst
        .step(&[StepEntry {
            seq: 7,
            tokens: r.prompt_ids.clone(),
        }])
        .unwrap();
    assert_eq!(logits.len(), 1);
    assert_eq!(logits[0].len(), inst.config().vocab_size);
    assert_eq!(argmax(&logits[0]), r.tokens[0]);
    assert_eq!(inst.sequence_len(7), Some(r.prompt_ids.len()));
}

#[test]
fn each_layers_q_k_v_projections_are_merged() {
    // The shim merges the three projections of every layer into one matrix
    // product; the bit-for-bit comparisons with GenAI (which does not merge
    // them) show the arithmetic of each output is unchanged.
    let inst = load(4);
    assert_eq!(inst.merged_projections(), inst.config().num_layers);
}

#[test]
fn bf16_precision_decodes_greedily() {
    // `--cpu-precision bf16` (OpenVINO's own default on CPUs with bf16
    // instructions): other arithmetic than GenAI's f32 reference, so greedy
    // up to a near-tie, one prompt at a time.
    let backend = OpenVinoBackend::new(&BackendOptions {
        venv: Some(venv()),
        precision: Precision::Bf16,
        ..Default::default()
    })
    .expect("backend");
    let mut inst = backend
        .load_package(
            &model_dir(),
            &LoadOptions {
                initial_kv_blocks: 16,
                ..Default::default()
            },
        )
        .expect("load");
    let refs: Vec<&Reference> = reference().iter().collect();
    let got: Vec<Vec<u32>> = refs
        .iter()
        .map(|r| generate(&mut inst, &[*r], &[0], |_, _, _| {}).remove(0))
        .collect();
    assert_greedy("bf16, one sequence at a time", &refs, &got);
}

#[test]
fn forks_share_the_prompts_kv_and_decode_greedily() {
    // One prompt prefilled once, forked twice (its full blocks shared, the
    // partly filled last block copied), the three decoded together: each is
    // GenAI's greedy answer up to a near-tie (a batch of three rows), all
    // three the same, and the shared blocks are held once. A fourth takes
    // only the prompt's first tokens and computes the rest itself: GenAI's
    // answer too.
    let r = &reference()[3];
    let n = r.prompt_ids.len();
    let mut inst = load(64);
    inst.add_sequence(1).unwrap();
    let first = argmax(
        &inst
            .step(&[StepEntry {
                seq: 1,
                tokens: r.prompt_ids.clone(),
            }])
            .unwrap()[0],
    );
    let prompt_blocks = inst.kv_blocks_in_use();
    inst.fork_sequence(1, 2, n).unwrap();
    inst.fork_sequence(1, 3, n).unwrap();
    let partial = !n.is_multiple_of(inst.block_size_tokens());
    assert_eq!(
        inst.kv_blocks_in_use(),
        prompt_blocks + 2 * usize::from(partial),
        "only a partly filled last block is copied"
    );
    assert!(matches!(
        inst.fork_sequence(9, 4, 1),
        Err(EngineError::UnknownSequence(9))
    ));
    let before = inst.kv_blocks_in_use();
    assert!(matches!(
        inst.fork_sequence(1, 4, n + 1),
        Err(EngineError::ForkBeyondSequence { seq: 1, .. })
    ));
    assert_eq!(
        inst.kv_blocks_in_use(),
        before,
        "a refused fork takes nothing"
    );
    let k = n - 3;
    inst.fork_sequence(1, 4, k).unwrap();
    assert_eq!(inst.sequence_len(4), Some(k));
    let rest = inst
        .step(&[StepEntry {
            seq: 4,
            tokens: r.prompt_ids[k..].to_vec(),
        }])
        .unwrap();
    let mut out = vec![vec![first]; 3];
    out.push(vec![argmax(&rest[0])]);
    while out[0].len() < NEW_TOKENS {
        let batch: Vec<StepEntry> = (1..=4)
            .zip(&out)
            .map(|(seq, o)| StepEntry {
                seq,
                tokens: vec![*o.last().unwrap()],
            })
            .collect();
        for (l, o) in inst.step(&batch).unwrap().iter().zip(&mut out) {
            o.push(argmax(l));
        }
    }
    assert!(out[..3].iter().all(|o| *o == out[0]), "{out:?}");
    assert_greedy(
        "a prompt forked twice and once by its first tokens, decoded as four",
        &[r, r],
        &[out[0].clone(), out[3].clone()],
    );
    // Freed in any order, every block goes back.
    for seq in [1, 3, 2, 4] {
        inst.free_sequence(seq).unwrap();
    }
    assert_eq!(inst.kv_blocks_in_use(), 0);
}
