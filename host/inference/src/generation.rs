//! One request's generation: its tokens, sampler and detokenizer, and the
//! one place that decides and records how it ended ([`Generation::end`]).
//! The instance runner that holds its KV samples and streams through it;
//! the driver ends it when the scheduler drops it or its caller hangs up.
//! [`GenerationStream`] is the caller's side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use slinfer_engine::{Sampler, Seen};
use slinfer_scheduler::{InstanceId, RequestId};
use tokio::sync::mpsc;

use crate::api::{Chunk, FinishReason, GenerationParams, InferenceError, TokenLogprobs, Usage};
use crate::catalog::ModelEntry;
use crate::constraint::Constrained;
use crate::driver::Msg;
use crate::metrics::LlmMetrics;
use crate::text::{Detokenizer, Step};

/// A generation shared by the driver and the runner of the instance it is on
/// (the scheduler runs it on one instance at a time).
pub(crate) type Shared = Arc<Mutex<Generation>>;

pub(crate) fn lock(g: &Shared) -> std::sync::MutexGuard<'_, Generation> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a request's stream receives.
#[derive(Debug)]
pub(crate) enum Event {
    /// The first token was produced (generate returns).
    Started,
    Text(Chunk),
    Done(Usage),
    Error(InferenceError),
}

/// How a generation ended.
#[derive(Debug)]
pub(crate) enum End {
    Finished(FinishReason),
    Failed(InferenceError),
    /// Its caller hung up.
    Cancelled,
}

pub(crate) struct Generation {
    pub id: RequestId,
    pub model: Arc<ModelEntry>,
    pub prompt: Vec<u32>,
    /// Tokens sampled so far (EOS excluded).
    generated: Vec<u32>,
    sampler: Sampler,
    max_tokens: u32,
    /// An end of sequence is banned while fewer tokens than this were
    /// generated (`u32::MAX`: always, `ignore_eos`).
    min_tokens: u32,
    /// Alternatives to report with each token's log-probability, if asked.
    logprobs: Option<u8>,
    /// An embedding: its prompt's final hidden state is the answer.
    embed: bool,
    /// Another choice of the same prompt, submitted with this one: an
    /// instance that prefills both forks that one's KV instead of
    /// computing the prompt again.
    fork_of: Option<RequestId>,
    /// The function that asked (its index in the service): a prompt shares
    /// KV only with prompts of the same function, so that how soon one
    /// function's first token comes tells it nothing of another's prompts.
    owner: u32,
    /// Prompt tokens its last prefill copied from another prompt's KV.
    cached_tokens: u32,
    /// Log-probabilities of tokens whose text is not handed out yet.
    unsent: Vec<TokenLogprobs>,
    detok: Detokenizer,
    /// The schema, expression or grammar the output must match.
    constraint: Option<Constrained>,
    tx: mpsc::UnboundedSender<Event>,
    cancelled: Arc<AtomicBool>,
    /// When the caller's request arrived (TTFT counts from here).
    submitted: Instant,
    ttft_s: Option<f64>,
    /// Tokens sampled (EOS included).
    sampled: u32,
    ended: bool,
    /// The instance whose KV holds its sequence (set and cleared by that
    /// instance's runner).
    pub kv_on: Option<InstanceId>,
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    metrics: Arc<LlmMetrics>,
    /// The model's sampled-tokens counter.
    tokens: prometheus_client::metrics::counter::Counter,
}

impl Generation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: RequestId,
        model: Arc<ModelEntry>,
        prompt: Vec<u32>,
        params: &GenerationParams,
        (arrived, slo_s): (Instant, (f64, f64)),
        tx: mpsc::UnboundedSender<Event>,
        cancelled: Arc<AtomicBool>,
        metrics: Arc<LlmMetrics>,
    ) -> Generation {
        Generation {
            id,
            tokens: metrics.tokens_of(&model.name),
            model,
            prompt,
            generated: Vec::new(),
            sampler: Sampler::new(params.sampling()).with_logit_bias(params.logit_bias.clone()),
            max_tokens: params.max_tokens(),
            min_tokens: if params.ignore_eos {
                u32::MAX
            } else {
                params.min_tokens.unwrap_or(0)
            },
            logprobs: params.logprobs,
            embed: params.embed,
            fork_of: None,
            owner: 0,
            cached_tokens: 0,
            unsent: Vec::new(),
            detok: Detokenizer::new(params.stop.clone()),
            constraint: None,
            tx,
            cancelled,
            submitted: arrived,
            ttft_s: None,
            sampled: 0,
            ended: false,
            kv_on: None,
            ttft_slo_s: slo_s.0,
            tpot_slo_s: slo_s.1,
            metrics,
        }
    }

    /// Another choice of the prompt of request `leader` (see `fork_of`).
    pub fn with_fork_of(mut self, leader: Option<RequestId>) -> Self {
        self.fork_of = leader;
        self
    }

    /// The most tokens it may generate: its `max_tokens`, within the
    /// model's context.
    pub fn max_output_tokens(&self) -> u64 {
        let room = self
            .model
            .context_tokens()
            .saturating_sub(self.prompt.len() as u32);
        self.max_tokens.min(room).into()
    }

    /// Asked by function `owner` (see the field).
    pub fn with_owner(mut self, owner: u32) -> Self {
        self.owner = owner;
        self
    }

    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Its prefill starts with `tokens` of its context copied from another
    /// sequence's KV (at most its prompt's count as cached in its usage).
    pub fn copied_start(&mut self, tokens: usize) {
        self.cached_tokens = tokens.min(self.prompt.len()) as u32;
    }

    /// The request whose prompt KV this one may share, while it has
    /// generated nothing.
    pub fn forks(&self) -> Option<RequestId> {
        self.fork_of.filter(|_| self.generated.is_empty())
    }

    /// Keeps its output inside `constraint`.
    pub fn with_constraint(mut self, constraint: Option<Constrained>) -> Self {
        self.constraint = constraint;
        self
    }

    /// Seconds since the caller's request arrived.
    pub fn age_s(&self) -> f64 {
        self.submitted.elapsed().as_secs_f64()
    }

    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Ended, or its caller hung up: its sequence is to be freed.
    pub fn gone(&self) -> bool {
        self.ended || self.cancelled()
    }

    /// How many tokens [`Self::context`] holds.
    pub fn context_len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    /// The tokens its KV must hold to continue: the prompt and what it has
    /// generated (a preempted request recomputes them).
    pub fn context(&self) -> Vec<u32> {
        let mut t = Vec::with_capacity(self.context_len());
        t.extend_from_slice(&self.prompt);
        t.extend_from_slice(&self.generated);
        t
    }

    /// The token to feed the next decode step.
    pub fn last_token(&self) -> Option<u32> {
        self.generated.last().copied()
    }

    /// Samples the next token from `logits` and streams its text; ends the
    /// generation at EOS, a stop sequence, `max_tokens` or the context
    /// length. Returns whether it ended.
    pub fn accept(&mut self, logits: &[f32]) -> bool {
        let banned = if (self.generated.len() as u32) < self.min_tokens {
            self.model.eos_token_ids()
        } else {
            &[]
        };
        let allowed = match self.constraint.as_mut().map(Constrained::allowed) {
            Some(Err(e)) => {
                self.end(End::Failed(e));
                return true;
            }
            mask => mask.and_then(Result::ok),
        };
        let seen = Seen {
            prompt: &self.prompt,
            output: &self.generated,
            banned,
            allowed: allowed.as_deref(),
        };
        let token = self.sampler.sample(logits, seen);
        self.sampled += 1;
        self.metrics.token(&self.tokens, &self.model.name);
        if self.ttft_s.is_none() {
            self.ttft_s = Some(self.submitted.elapsed().as_secs_f64());
            let _ = self.tx.send(Event::Started);
        }
        if self.model.eos_token_ids().contains(&token) {
            let tail = self.detok.flush(&self.model.tokenizer);
            self.text(tail);
            self.end(End::Finished(FinishReason::Stop));
            return true;
        }
        if let Some(top) = self.logprobs {
            let lp = slinfer_engine::logprobs(logits, token, top as usize);
            self.unsent.push(self.model.token_logprobs(token, lp));
        }
        self.generated.push(token);
        let complete = match self.constraint.as_mut().map(|c| c.take(token)) {
            Some(Err(e)) => {
                self.end(End::Failed(e));
                return true;
            }
            done => done == Some(Ok(true)),
        };
        match self.detok.push(&self.model.tokenizer, token) {
            Step::Stopped(t) => {
                self.text(t);
                self.end(End::Finished(FinishReason::Stop));
                true
            }
            Step::Text(t) if complete => {
                self.text(t);
                let tail = self.detok.flush(&self.model.tokenizer);
                self.text(tail);
                self.end(End::Finished(FinishReason::Stop));
                true
            }
            Step::Text(t) => {
                self.text(t);
                let len = self.context_len() as u32;
                if self.generated.len() as u32 >= self.max_tokens
                    || len >= self.model.context_tokens()
                {
                    self.end(End::Finished(FinishReason::Length));
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Whether the request wants its prompt's final hidden state rather
    /// than a continuation.
    pub fn embeds(&self) -> bool {
        self.embed
    }

    /// Ends an embedding request with its prompt's last hidden state
    /// (L2-normalised), or the engine's refusal to give it.
    pub fn embedded(&mut self, hidden: Result<Vec<f32>, InferenceError>) {
        match hidden {
            Ok(mut v) => {
                let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                if norm > 0.0 {
                    v.iter_mut()
                        .for_each(|x| *x = (f64::from(*x) / norm) as f32);
                }
                self.ttft_s = Some(self.submitted.elapsed().as_secs_f64());
                let _ = self.tx.send(Event::Started);
                let _ = self.tx.send(Event::Text(Chunk {
                    embedding: v,
                    ..Chunk::default()
                }));
                self.end(End::Finished(FinishReason::Stop));
            }
            Err(e) => self.end(End::Failed(e)),
        }
    }

    /// Hands out `t` with the log-probabilities of the tokens not yet
    /// handed out.
    fn text(&mut self, t: String) {
        if !t.is_empty() || !self.unsent.is_empty() {
            let tokens = std::mem::take(&mut self.unsent);
            let _ = self.tx.send(Event::Text(Chunk {
                text: t,
                tokens,
                ..Chunk::default()
            }));
        }
    }

    /// Ends the generation, once: records its outcome and tells the caller.
    pub fn end(&mut self, end: End) {
        if self.ended {
            return;
        }
        self.ended = true;
        let entry = self.model.clone();
        let model = entry.name.as_str();
        match end {
            End::Finished(reason) => {
                // Cut at a length: what the detokenizer still holds back (a
                // possible start of a stop sequence) belongs to the answer.
                if reason == FinishReason::Length {
                    let tail = self.detok.flush(&self.model.tokenizer);
                    self.text(tail);
                }
                let ttft_s = self.ttft_s.unwrap_or(0.0);
                let tpot_s = (self.sampled > 1).then(|| {
                    (self.submitted.elapsed().as_secs_f64() - ttft_s) / f64::from(self.sampled - 1)
                });
                self.metrics.latency(model, ttft_s, tpot_s);
                let met = ttft_s <= self.ttft_slo_s && tpot_s.is_none_or(|t| t <= self.tpot_slo_s);
                self.metrics.ended(model, "finished", Some(met));
                let _ = self.tx.send(Event::Done(Usage {
                    prompt_tokens: self.prompt.len() as u32,
                    generated_tokens: self.generated.len() as u32,
                    finish_reason: reason,
                    ttft_s,
                    cached_tokens: self.cached_tokens,
                }));
            }
            End::Failed(e) => {
                let (outcome, slo) = match &e {
                    InferenceError::Overloaded { .. } => ("overloaded", Some(false)),
                    InferenceError::DeadlineMissed => ("deadline_missed", Some(false)),
                    InferenceError::Unavailable { .. } => ("unavailable", None),
                    _ => ("failed", None),
                };
                self.metrics.ended(model, outcome, slo);
                let _ = self.tx.send(Event::Error(e));
            }
            End::Cancelled => self.metrics.ended(model, "cancelled", None),
        }
    }
}

/// The caller's side of one generation.
pub struct GenerationStream {
    pub(crate) id: RequestId,
    pub(crate) rx: mpsc::UnboundedReceiver<Event>,
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) to_driver: Option<std::sync::mpsc::Sender<Msg>>,
    pub(crate) usage: Option<Usage>,
    pub(crate) pending: Option<Event>,
    pub(crate) done: bool,
}

impl GenerationStream {
    /// Next chunk of text (one or more tokens, UTF-8 safe), or None when
    /// finished.
    pub async fn next(&mut self) -> Option<Result<String, InferenceError>> {
        loop {
            match self.next_chunk().await? {
                Ok(c) if c.text.is_empty() => continue,
                r => return Some(r.map(|c| c.text)),
            }
        }
    }

    /// Next chunk with its tokens' log-probabilities (when the request
    /// asked for them; its text may then be empty), or None when finished.
    pub async fn next_chunk(&mut self) -> Option<Result<Chunk, InferenceError>> {
        loop {
            if self.done {
                return None;
            }
            let ev = match self.pending.take() {
                Some(ev) => Some(ev),
                None => self.rx.recv().await,
            };
            match ev {
                Some(Event::Started) => continue,
                Some(Event::Text(c)) => return Some(Ok(c)),
                Some(Event::Done(u)) => {
                    self.usage = Some(u);
                    self.done = true;
                    self.to_driver = None;
                    return None;
                }
                Some(Event::Error(e)) => {
                    self.done = true;
                    self.to_driver = None;
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    return Some(Err(InferenceError::Engine(
                        "the inference driver has stopped".into(),
                    )));
                }
            }
        }
    }

    /// Valid after `next` returned None.
    pub fn usage(&self) -> Usage {
        self.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            generated_tokens: 0,
            finish_reason: FinishReason::Stop,
            ttft_s: 0.0,
            cached_tokens: 0,
        })
    }
}

/// The feeding side of a [`GenerationStream`] whose tokens are made
/// elsewhere (by another member of a cluster): what it sends, the stream's
/// holder reads as if the tokens were made here.
pub struct Relay {
    tx: mpsc::UnboundedSender<Event>,
}

impl Relay {
    /// Send a chunk; false once the stream's holder has gone.
    pub fn chunk(&self, chunk: Chunk) -> bool {
        self.tx.send(Event::Text(chunk)).is_ok()
    }

    /// The generation ended well.
    pub fn done(self, usage: Usage) {
        let _ = self.tx.send(Event::Done(usage));
    }

    /// The generation failed.
    pub fn error(self, e: InferenceError) {
        let _ = self.tx.send(Event::Error(e));
    }

    /// Resolves when the stream's holder has dropped it (hung up).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl GenerationStream {
    /// A stream fed through the returned [`Relay`] rather than by this
    /// host's engines. Dropping the stream closes the relay.
    pub fn relayed() -> (Relay, GenerationStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = GenerationStream {
            id: 0,
            rx,
            cancelled: Arc::new(AtomicBool::new(false)),
            to_driver: None,
            usage: None,
            pending: None,
            done: false,
        };
        (Relay { tx }, stream)
    }
}

impl Drop for GenerationStream {
    /// Dropping an unfinished stream cancels its request: the driver ends it
    /// and frees its sequence.
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
        if let Some(tx) = self.to_driver.take() {
            let _ = tx.send(Msg::Cancel(self.id));
        }
    }
}
