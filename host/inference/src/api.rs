//! What callers hand the inference service and get back: requests,
//! parameters, usage, errors, the status picture, and the defaults.

use std::collections::BTreeMap;

use slinfer_engine::{Footprint, PerKind};

/// TTFT SLO when the caller passes 0 (seconds; this CPU, small models).
pub const DEFAULT_TTFT_SLO_S: f64 = 5.0;
/// TPOT SLO when the caller passes 0 (seconds per output token).
pub const DEFAULT_TPOT_SLO_S: f64 = 0.5;
/// `max_tokens` when the caller gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Idle time before an instance is unloaded (the CPU engine recompiles the
/// model on every load, which takes seconds).
pub const KEEP_ALIVE_S: f64 = 300.0;
/// KV a loaded CPU instance keeps while idle, in tokens: room for a
/// conversation's last call (its prompt and answer) to stay until the next
/// one copies it. 2048 tokens of the default model are 94 MB on the paired
/// engines (46 KB a token, both engines' KV).
pub const IDLE_KV_TOKENS: u64 = 2048;
/// The scheduling policy of the live host (`serve --policy`), the idle
/// time before an instance unloads (`serve --keep-alive-s`), the KV an idle
/// CPU instance keeps (`serve --idle-kv-tokens`) and the measured profile
/// it plans with, if any (`serve --profile`).
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduling {
    pub policy: slinfer_scheduler::Policy,
    pub keep_alive_s: f64,
    pub idle_kv_tokens: u64,
    pub profile: Option<crate::cost::PlanProfile>,
}

impl Default for Scheduling {
    fn default() -> Self {
        Scheduling {
            policy: slinfer_scheduler::Policy::Slinfer,
            keep_alive_s: KEEP_ALIVE_S,
            idle_kv_tokens: IDLE_KV_TOKENS,
            profile: None,
        }
    }
}

/// KV block size the scheduler plans with, in tokens (bytes are what matter:
/// each engine converts the granted bytes to its own blocks).
pub const BLOCK_TOKENS: PerKind<u64> = PerKind::new(32, 16);
/// Instances of one model a device may host at once (memory and the
/// time-slice checks decide within this).
pub const INSTANCE_SLOTS: PerKind<u32> = PerKind::new(8, 16);
/// The `sllm` baselines' concurrency cap of an instance that has its
/// device to itself (`serve --policy sllm`); half of it for each of the
/// two instances sharing a device under `sllm+c+s`. The artifact's caps
/// are the requests of full context its KV pool holds (e.g. 15 on a CPU,
/// 32 on an A100 for Llama-2-7B); on the live CPU the pool is sized from
/// the cap instead (`cpu_kv_bytes`), and 8 is about what a 2-core CPU
/// decodes within a TPOT SLO.
pub const SLLM_EXCLUSIVE_CAP: PerKind<u32> = PerKind::new(8, 32);
/// The fixed KV pool of an `sllm` instance on the CPU: its cap of requests,
/// each of the model's whole context.
pub fn sllm_cpu_kv_bytes(context_tokens: u64, kv_bytes_per_token: u64) -> u64 {
    u64::from(SLLM_EXCLUSIVE_CAP[slinfer_engine::DeviceKind::Cpu])
        * context_tokens
        * kv_bytes_per_token
}

/// Smallest KV pool of a loaded instance, in tokens (the scheduler scales
/// it with the live requests' needs plus look-ahead, and back).
pub const MIN_INSTANCE_TOKENS: u64 = 1024;
/// Memory the scheduler reserves per instance beyond its weights (compiled
/// model, workspace).
pub const INSTANCE_OVERHEAD_BYTES: u64 = 256 << 20;
/// Seconds a refused caller is told to wait before retrying.
pub const RETRY_AFTER_S: f64 = 1.0;

/// Errors of the inference API. They cross the network between members of
/// a cluster (serde), as requests do.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum InferenceError {
    #[error("model {0:?} not found")]
    ModelNotFound(String),
    /// `prompt_tokens` is a lower bound when the prompt was refused by its
    /// length in bytes, before tokenizing.
    #[error("prompt of {prompt_tokens} tokens does not fit the context of {context_tokens}")]
    PromptTooLong {
        prompt_tokens: u32,
        context_tokens: u32,
    },
    #[error("overloaded: retry after {retry_after_s} s")]
    Overloaded { retry_after_s: f64 },
    #[error("the request missed its deadline")]
    DeadlineMissed,
    /// The device serving the request failed; it left placement and the
    /// request may be retried (another device takes it).
    #[error("{message}; retry after {retry_after_s} s")]
    Unavailable { message: String, retry_after_s: f64 },
    #[error("engine error: {0}")]
    Engine(String),
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    #[error("model {0:?} is already registered")]
    ModelExists(String),
}

impl InferenceError {
    /// Of two refusals of one request (by this host and another member, or
    /// by two members), the one to answer with: an `Overloaded`, with the
    /// shorter retry hint of two, so that the caller retries and soon;
    /// else the first.
    pub fn first_refusal(self, later: InferenceError) -> InferenceError {
        use InferenceError::Overloaded;
        match (self, later) {
            (Overloaded { retry_after_s: a }, Overloaded { retry_after_s: b }) => Overloaded {
                retry_after_s: a.min(b),
            },
            (first @ Overloaded { .. }, _) => first,
            (_, later @ Overloaded { .. }) => later,
            (first, _) => first,
        }
    }
}

/// A generation request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    /// Caller identity (predictive look-ahead, metrics).
    pub function: String,
    pub model: String,
    pub prompt: Prompt,
    pub params: GenerationParams,
    /// 0: [`DEFAULT_TTFT_SLO_S`]. With `ttft_prompt_tokens_per_s`, the
    /// floor of an SLO that grows with the prompt.
    pub ttft_slo_s: f64,
    /// When > 0, the TTFT SLO is at least the prompt's tokens at this rate
    /// (the paper's `max(input_tokens / 512, 0.5)` s). 0: a fixed SLO.
    #[serde(default)]
    pub ttft_prompt_tokens_per_s: f64,
    /// 0: [`DEFAULT_TPOT_SLO_S`].
    pub tpot_slo_s: f64,
    /// When the caller's own request reached the host (an HTTP request
    /// that waited for an instance first): the TTFT deadline and the
    /// measured TTFT count from it. `None`: now. (Not sent between
    /// members: a routed request carries its age instead.)
    #[serde(skip)]
    pub arrived: Option<std::time::Instant>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Prompt {
    Text(String),
    /// Rendered with the model's own chat template (model.toml).
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Sampling and stopping, as the caller gives them (`None`: the default).
/// The same value travels from the interface to the instance runner.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationParams {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// OpenAI's presence and frequency penalties, in [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Added to these tokens' logits, each in [-100, 100].
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// An end of sequence cannot end the generation before this many tokens.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// An end of sequence never ends it (`max_tokens`, the context length or
    /// a stop sequence do).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many (0..=20) most
    /// likely alternatives ([`Chunk::tokens`]); `None` reports none.
    #[serde(default)]
    pub logprobs: Option<u8>,
    /// Keeps the output inside a schema, expression or grammar; its end
    /// ends the generation.
    #[serde(default)]
    pub constraint: Option<Constraint>,
    /// For a chat prompt: the tools the model may call (a JSON array in
    /// OpenAI's `tools` shape), given to its chat template or, when the
    /// template does not use them, described in a system message.
    #[serde(default)]
    pub tools: Option<String>,
    /// Embed the prompt instead of continuing it: the answer is one chunk
    /// with [`Chunk::embedding`] and no text.
    #[serde(default)]
    pub embed: bool,
}

/// What a constrained generation's output must match.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Constraint {
    /// A JSON Schema (its JSON text): the output is one JSON value that
    /// validates against it.
    JsonSchema(String),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect (which can embed JSON schemas
    /// with `%json { ... }`).
    Lark(String),
}

impl Constraint {
    /// Its name in errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json schema",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
        }
    }
}

/// The most choices one `Inference::generate_choices` call may ask for.
pub const MAX_CHOICES: u32 = 16;

/// The most alternatives [`GenerationParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: u8 = 20;

impl GenerationParams {
    /// Refuses values no sampler can use, naming the parameter.
    pub fn check(&self) -> Result<(), InferenceError> {
        let bad = |m: &str| Err(InferenceError::InvalidParams(m.into()));
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be at least 1");
        }
        let temperature = self.temperature.unwrap_or(0.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return bad("temperature must be >= 0");
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        let penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(penalty.is_finite() && penalty > 0.0) {
            return bad("repetition_penalty must be > 0");
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !value.is_none_or(|v| (-2.0..=2.0).contains(&v)) {
                return bad(&format!("{name} must be in [-2, 2]"));
            }
        }
        if let Some((token, _)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(&format!(
                "logit_bias of token {token} must be in [-100, 100]"
            ));
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return bad(&format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"));
        }
        if self.min_tokens.is_some_and(|m| m > self.max_tokens()) {
            return bad("min_tokens must not exceed max_tokens");
        }
        if self.embed
            && (self.constraint.is_some()
                || self.tools.is_some()
                || self.logprobs.is_some()
                || self.min_tokens.is_some()
                || self.ignore_eos)
        {
            return bad(
                "an embedding takes no constraint, tools, logprobs, min_tokens or ignore_eos",
            );
        }
        if self.constraint.is_some() && (self.ignore_eos || self.min_tokens.is_some()) {
            return bad(
                "min_tokens and ignore_eos cannot be used with a constraint (the constraint decides where the output ends)",
            );
        }
        Ok(())
    }

    /// Refuses a logit bias for a token the model does not have.
    pub fn check_tokens(&self, vocab_size: usize) -> Result<(), InferenceError> {
        match self
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab_size)
        {
            Some((t, _)) => Err(InferenceError::InvalidParams(format!(
                "logit_bias names token {t}, but the model's vocabulary has {vocab_size} tokens"
            ))),
            None => Ok(()),
        }
    }

    /// The parameters of choice `i` of a request for several: the seed, if
    /// any, moved on by `i`.
    pub fn choice(&self, i: u32) -> GenerationParams {
        GenerationParams {
            seed: self.seed.map(|s| s.wrapping_add(u64::from(i))),
            ..self.clone()
        }
    }

    /// The most tokens to generate.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)
    }

    /// The sampler's settings; a missing seed is drawn at random.
    pub fn sampling(&self) -> slinfer_engine::SamplingParams {
        slinfer_engine::SamplingParams {
            temperature: self.temperature.unwrap_or(0.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self
                .seed
                .unwrap_or_else(|| getrandom::u64().unwrap_or(0x5eed)),
        }
    }
}

/// A piece of a generation's output: text (complete UTF-8; possibly empty
/// when a token's text is held back), and when the request asked for
/// log-probabilities, those of the tokens sampled since the last chunk.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    pub text: String,
    pub tokens: Vec<TokenLogprobs>,
    /// An embedding request's vector: the final hidden state of the
    /// prompt's last token, L2-normalised (empty otherwise).
    #[serde(default)]
    pub embedding: Vec<f32>,
}

/// One token and its log-probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    /// Its bytes (part of a character, for some tokens) and their text
    /// (with U+FFFD for such a part).
    pub bytes: Vec<u8>,
    pub text: String,
    pub logprob: f32,
}

/// A sampled token with its log-probability, and the most likely tokens at
/// its position with theirs (most likely first), of the model's own
/// distribution: the log-softmax of its logits before bias, penalties and
/// temperature.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// EOS or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub ttft_s: f64,
    /// Of the prompt tokens, those copied from another prompt's KV (one of
    /// the same function that began alike, prefilled with this one or
    /// still on the instance) rather than computed.
    #[serde(default)]
    pub cached_tokens: u32,
}

/// Live state, for tests and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferenceStats {
    /// Requests submitted and not ended.
    pub live_requests: usize,
    pub instances: Vec<InstanceStats>,
}

/// What an engine instance holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStats {
    pub instance: u64,
    pub model: String,
    pub device: String,
    /// Live sequences' blocks (with those they share with kept ones).
    pub kv_blocks_in_use: usize,
    /// Blocks only ended requests' sequences hold, kept as sources of
    /// copies until the blocks are needed.
    pub kv_blocks_kept: usize,
    pub kv_blocks_capacity: usize,
}

/// A served model, as `slinfer models ls` and the status show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub family: String,
    pub source: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length_tokens: usize,
    /// On the first kind of device that serves it (CPU first).
    pub kv_bytes_per_token: u64,
    pub weights_bytes: u64,
    /// What an instance holds on each kind of device this host has that can
    /// load the package (`cpu`, `gpu`).
    pub footprints: BTreeMap<String, Footprint>,
}

/// The live scheduler's state (`GET /v1/status`, `slinfer status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InferenceStatus {
    /// The scheduling policy (`serve --policy`).
    pub policy: slinfer_scheduler::Policy,
    pub devices: Vec<DeviceStatus>,
    pub models: Vec<ModelStatus>,
    pub live_requests: usize,
}

/// One device: its name and engine, and what the scheduler has placed on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceStatus {
    /// `cpu:0`, `cuda:0`.
    pub name: String,
    /// The engine that serves it (`openvino`, `cuda`, `reference`).
    pub backend: String,
    #[serde(flatten)]
    pub scheduler: slinfer_scheduler::NodeSnapshot,
    /// Why it left placement, if it failed.
    pub failed: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    #[serde(flatten)]
    pub info: ModelInfo,
    pub queued_requests: usize,
    /// Where a new request (a 256-token prompt, the default SLOs) would go
    /// now by the scheduler's own placement: `existing` (an instance has
    /// room), `new` (an instance would start), `new_after_unload` (one
    /// would start once idle instances unload), `no` (it would wait).
    /// Probed every 250 ms; a cluster's routers order members by it.
    pub admission: Option<slinfer_scheduler::Probe>,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceStatus {
    /// The device's name (`cpu:0`, `cuda:0`).
    pub device: String,
    #[serde(flatten)]
    pub scheduler: slinfer_scheduler::InstanceSnapshot,
    /// What the engine holds (absent while loading).
    pub kv_blocks_in_use: Option<usize>,
    /// Blocks only ended requests' sequences hold (kept as sources of
    /// copies until the blocks are needed).
    pub kv_blocks_kept: Option<usize>,
    pub kv_blocks_capacity: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_the_shortest_retry_hint_else_the_first() {
        let over = |s| InferenceError::Overloaded { retry_after_s: s };
        let gone = || InferenceError::Unavailable {
            message: "gone".into(),
            retry_after_s: RETRY_AFTER_S,
        };
        let missing = || InferenceError::ModelNotFound("m".into());
        assert_eq!(over(2.0).first_refusal(over(0.5)), over(0.5));
        // An overload beats an unavailable member, before or after: the
        // caller should retry, and soon.
        assert_eq!(over(2.0).first_refusal(gone()), over(2.0));
        assert_eq!(gone().first_refusal(over(2.0)), over(2.0));
        // Otherwise the first stands (this host's own, when it has one).
        assert_eq!(gone().first_refusal(missing()), gone());
        assert_eq!(missing().first_refusal(gone()), missing());
    }
}
