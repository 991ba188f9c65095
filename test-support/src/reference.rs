//! OpenVINO's own answers for a model, computed at test time by
//! `scripts/models/reference.py` (never pasted in), and the greedy check.
//!
//! Which property a test may rest on, on any x86-64 CPU:
//!
//! - **Like for like, bit for bit.** [`generate`]'s `tokens` come from
//!   `openvino_genai.LLMPipeline` on its paged-attention backend: the graph,
//!   kernels and precision slinfer's CPU engine runs. One sequence per step,
//!   its prompt in one step, is the same arithmetic in both, so the tokens
//!   are equal. `batched_tokens` come from GenAI's
//!   `ContinuousBatchingPipeline` with all prompts prefilled in one step and
//!   decoded together: equal only to a batch composed the same way.
//! - **Greedy up to a near-tie.** Any other composition (requests arriving
//!   over HTTP, staggered prefills, a second instance alongside) runs other
//!   kernels: a batched matmul blocks and accumulates differently from a
//!   single row, and the bf16 arithmetic the CPU plugin uses where the CPU
//!   has AVX512-BF16 or AMX keeps 8 significant bits. That flips near-ties
//!   and nothing else. [`check`] teacher-forces an answer through the model
//!   in full precision (f32) and accepts each token whose logit is within
//!   [`NEAR_TIE_LOGITS`] of the best.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// How far below the f32 model's best logit a token may be and still count
/// as a greedy choice. bf16 engines chose tokens up to 0.33 below it over
/// 1,280 steps (LLMPipeline and continuous batching, 8 prompts, AMD EPYC);
/// the batched/unbatched divergence seen on an Intel Xeon with AMX (issue
/// 17) was 0.22. A wrong token (a bug) is typically several logits below.
pub const NEAR_TIE_LOGITS: f32 = 1.0;

/// GenAI's greedy answers for one prompt (see the module docs).
#[derive(Deserialize, Debug, Clone)]
pub struct Reference {
    pub prompt: String,
    /// The prompt as GenAI's tokenizer encodes it (no chat template).
    pub prompt_ids: Vec<u32>,
    /// `LLMPipeline`, one prompt at a time (EOS ignored).
    pub tokens: Vec<u32>,
    /// `ContinuousBatchingPipeline`, all prompts at once (EOS ignored).
    pub batched_tokens: Vec<u32>,
    /// GenAI's decoding of `tokens` up to the first EOS.
    pub text: String,
    pub batched_text: String,
    /// Index of the first EOS in `tokens` (its length if none).
    pub eos_at: usize,
}

/// GenAI's greedy answers for `prompts`, `max_new_tokens` each.
pub fn generate(model_dir: &Path, prompts: &[&str], max_new_tokens: usize) -> Vec<Reference> {
    let out: Vec<Reference> = run("generate", model_dir, &max_new_tokens.to_string(), prompts);
    assert_eq!(out.len(), prompts.len());
    for r in &out {
        assert_eq!(r.tokens.len(), max_new_tokens);
        assert_eq!(r.batched_tokens.len(), max_new_tokens);
    }
    out
}

/// A prompt's final hidden state (the LM head's input at its last token)
/// in the stateful IR at full precision: what an embedding is, before
/// normalising.
#[derive(Deserialize, Debug, Clone)]
pub struct Hidden {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub hidden: Vec<f32>,
}

/// [`Hidden`] for each prompt, from `scripts/models/reference.py hidden`.
pub fn hidden(model_dir: &Path, prompts: &[&str]) -> Vec<Hidden> {
    let out: Vec<Hidden> = run("hidden", model_dir, "last", prompts);
    assert_eq!(out.len(), prompts.len());
    out
}

/// How a generation ended, as the server reported it.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// At an end-of-sequence token (which the answer does not include).
    Stop,
    /// At `max_tokens`.
    Length,
}

/// A chat message, rendered with the model's template by the check.
#[derive(Serialize, Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// An answer to check: a prompt (text or chat messages) and what came back
/// (token ids or text), with how it ended when known.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Message>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish: Option<Finish>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generated_tokens: Option<u64>,
}

impl Answer {
    /// Token ids generated after a raw-text prompt.
    pub fn tokens(prompt: &str, tokens: &[u32]) -> Answer {
        Answer {
            prompt: Some(prompt.into()),
            tokens: Some(tokens.to_vec()),
            ..Default::default()
        }
    }

    /// Text generated after a raw-text prompt.
    pub fn text(prompt: &str, text: &str) -> Answer {
        Answer {
            prompt: Some(prompt.into()),
            text: Some(text.into()),
            ..Default::default()
        }
    }

    /// Text generated after chat messages (`(role, content)`).
    pub fn chat(messages: &[(&str, &str)], text: &str) -> Answer {
        Answer {
            messages: Some(
                messages
                    .iter()
                    .map(|(role, content)| Message {
                        role: (*role).into(),
                        content: (*content).into(),
                    })
                    .collect(),
            ),
            text: Some(text.into()),
            ..Default::default()
        }
    }

    /// How it ended and how many tokens the server counted: a `Stop` must be
    /// at a point where end-of-sequence is a greedy choice, and the count
    /// must equal the tokens the answer walks through.
    pub fn ended(mut self, finish: Finish, generated_tokens: u64) -> Answer {
        self.finish = Some(finish);
        self.generated_tokens = Some(generated_tokens);
        self
    }
}

/// A token the answer took that was not the f32 model's best, but close.
#[derive(Deserialize, Debug, Clone)]
pub struct NearTie {
    pub step: usize,
    pub token: u32,
    pub piece: String,
    pub best: u32,
    pub best_piece: String,
    pub gap: f32,
}

/// The check's verdict on one answer.
#[derive(Deserialize, Debug, Clone)]
pub struct Verdict {
    pub ok: bool,
    /// Tokens walked.
    pub steps: usize,
    pub near_ties: Vec<NearTie>,
    /// What is wrong, where, and the f32 model's best tokens there.
    pub error: Option<String>,
}

/// Teacher-forces each answer through the model in f32 (see the module docs).
pub fn check(model_dir: &Path, answers: &[Answer]) -> Vec<Verdict> {
    let out: Vec<Verdict> = run("check", model_dir, &NEAR_TIE_LOGITS.to_string(), answers);
    assert_eq!(out.len(), answers.len());
    out
}

/// Panics, naming every answer that is not a greedy answer of the model up to
/// near-ties; prints the near-ties taken.
pub fn assert_greedy(model_dir: &Path, what: &str, answers: &[Answer]) {
    let verdicts = check(model_dir, answers);
    let mut failures = Vec::new();
    for (a, v) in answers.iter().zip(&verdicts) {
        for t in &v.near_ties {
            eprintln!(
                "{what}: near-tie at step {}: took {:?}, {:.3} below {:?}",
                t.step, t.piece, t.gap, t.best_piece
            );
        }
        if !v.ok {
            failures.push(format!(
                "{:?}: {}",
                a.prompt.as_deref().unwrap_or("(chat)"),
                v.error.as_deref().unwrap_or("?")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: not greedy answers of the model (near-tie {NEAR_TIE_LOGITS} logits):\n{}",
        failures.join("\n")
    );
}

fn run<I: Serialize + ?Sized, O: serde::de::DeserializeOwned>(
    mode: &str,
    model_dir: &Path,
    arg: &str,
    input: &I,
) -> O {
    let script = crate::repo_root().join("scripts/models/reference.py");
    let mut child = Command::new(crate::venv().join("bin/python"))
        .arg(&script)
        .arg(mode)
        .arg(model_dir)
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {} with the venv's python ({e}): run ./dev test",
                script.display()
            )
        });
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(&serde_json::to_vec(input).expect("serialisable"))
        .expect("writing to reference.py");
    drop(stdin);
    let out = child.wait_with_output().expect("reference.py");
    assert!(out.status.success(), "reference.py {mode} failed");
    serde_json::from_slice(&out.stdout).expect("reference.py's JSON")
}
