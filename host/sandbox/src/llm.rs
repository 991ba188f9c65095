//! The host side of `slinfer:llm`: a guest's generation requests, checked
//! against its function's configuration (allowed models, SLO), handed to
//! the inference service, and streamed back through a `generation-stream`
//! resource.
//!
//! Self-contained in the manner of wasmtime-wasi-http: [`LlmConfig`] is
//! what the manifest grants, [`LlmCtx`] an instance's context, and a store
//! whose data implements [`LlmView`] gets the interface from
//! [`add_to_linker`].

use std::sync::Arc;
use std::time::Instant;

use slinfer_inference::{self as inference, Inference};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/slinfer-llm",
        world: "slinfer:llm/host",
        imports: {
            "slinfer:llm/generation.generate": async | trappable,
            "slinfer:llm/generation.generate-with": async | trappable,
            "slinfer:llm/generation.embed": async | trappable,
            "slinfer:llm/generation.generate-choices": async | trappable,
            "slinfer:llm/generation.[method]generation-stream.next": async | trappable,
            "slinfer:llm/generation.[method]generation-stream.next-chunk": async | trappable,
            default: trappable,
        },
        with: {
            "slinfer:llm/generation.generation-stream": super::LlmStream,
        },
        require_store_data_send: true,
    });
}

use bindings::slinfer::llm::generation::{self as wit, HostGenerationStream};
use bindings::slinfer::llm::types::{self as t, Error};

/// The most inputs one `embed` call may take.
const MAX_EMBED_INPUTS: usize = 256;

/// What a function may do with `slinfer:llm` (from its manifest).
#[derive(Clone, Debug, Default)]
pub struct LlmConfig {
    /// Models it may generate with (`models.allowed`).
    pub allowed_models: Arc<[String]>,
    /// Latency targets of its requests; 0 = the inference service's default.
    pub ttft_slo_s: f64,
    /// The TTFT SLO grows with the prompt at this rate (0: fixed).
    pub ttft_prompt_tokens_per_s: f64,
    pub tpot_slo_s: f64,
}

/// One instance's `slinfer:llm` context.
pub struct LlmCtx {
    inference: Option<Arc<Inference>>,
    function: Arc<str>,
    config: LlmConfig,
    /// When the instance's request reached the host: its first generation's
    /// TTFT deadline counts from there (later ones from their own start).
    arrived: Option<Instant>,
}

impl LlmCtx {
    /// `inference` is `None` on a host without models: `generate` then
    /// answers `model-not-found`.
    pub fn new(
        inference: Option<Arc<Inference>>,
        function: Arc<str>,
        config: LlmConfig,
        arrived: Instant,
    ) -> Self {
        LlmCtx {
            inference,
            function,
            config,
            arrived: Some(arrived),
        }
    }
}

/// An instance's context and resource table, borrowed for one call.
pub struct LlmCtxView<'a> {
    pub ctx: &'a mut LlmCtx,
    pub table: &'a mut ResourceTable,
}

/// Store data that carries `slinfer:llm`.
pub trait LlmView: Send {
    fn llm(&mut self) -> LlmCtxView<'_>;
}

struct HasLlm;

impl HasData for HasLlm {
    type Data<'a> = LlmCtxView<'a>;
}

/// A guest's running generation (the `generation-stream` resource).
pub struct LlmStream {
    stream: inference::GenerationStream,
    /// Once it has ended: its usage and its prompt tokens copied from
    /// another prompt's KV.
    usage: Option<(t::Usage, u32)>,
}

/// Link `slinfer:llm` into `linker`.
pub fn add_to_linker<T: LlmView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    t::add_to_linker::<T, HasLlm>(linker, T::llm)?;
    wit::add_to_linker::<T, HasLlm>(linker, T::llm)
}

fn token_logprobs(t: inference::TokenLogprobs) -> t::TokenLogprobs {
    let one = |l: inference::TokenLogprob| t::TokenLogprob {
        token: l.token,
        bytes: l.bytes,
        text: l.text,
        logprob: l.logprob,
    };
    t::TokenLogprobs {
        chosen: one(t.chosen),
        top: t.top.into_iter().map(one).collect(),
    }
}

fn convert_error(e: inference::InferenceError) -> Error {
    use inference::InferenceError as E;
    match e {
        E::ModelNotFound(m) => Error::ModelNotFound(m),
        E::PromptTooLong {
            prompt_tokens,
            context_tokens,
        } => Error::PromptTooLong(t::PromptTooLong {
            prompt_tokens,
            context_tokens,
        }),
        E::Overloaded { retry_after_s } => {
            Error::Overloaded((retry_after_s * 1000.0).ceil() as u32)
        }
        E::DeadlineMissed => Error::DeadlineMissed,
        E::Unavailable {
            message,
            retry_after_s,
        } => Error::Unavailable(t::Unavailable {
            message,
            retry_after_ms: (retry_after_s * 1000.0).ceil() as u32,
        }),
        // Not an answer of generate/tokenize (only of model registration).
        e @ E::ModelExists(_) => Error::EngineError(e.to_string()),
        E::Engine(m) => Error::EngineError(m),
        E::InvalidParams(m) => Error::InvalidParams(m),
    }
}

impl LlmCtxView<'_> {
    /// The inference service, if `model` is one this function may use.
    fn llm_for(&self, model: &str) -> Result<Arc<Inference>, Error> {
        let ctx = &self.ctx;
        if !ctx.config.allowed_models.iter().any(|m| m == model) {
            return Err(Error::ModelNotAllowed(model.to_owned()));
        }
        ctx.inference
            .clone()
            .ok_or_else(|| Error::ModelNotFound(model.to_owned()))
    }
}

impl t::Host for LlmCtxView<'_> {}

impl wit::Host for LlmCtxView<'_> {
    async fn generate(
        &mut self,
        model: String,
        prompt: t::Prompt,
        params: t::Params,
    ) -> wasmtime::Result<Result<Resource<LlmStream>, Error>> {
        let none = t::Options {
            presence_penalty: None,
            frequency_penalty: None,
            logit_bias: Vec::new(),
            min_tokens: None,
            ignore_eos: false,
            logprobs: None,
            constraint: None,
            tools: None,
        };
        self.generate_with(model, prompt, params, none).await
    }

    async fn generate_with(
        &mut self,
        model: String,
        prompt: t::Prompt,
        params: t::Params,
        options: t::Options,
    ) -> wasmtime::Result<Result<Resource<LlmStream>, Error>> {
        let streams = self
            .generate_choices(model, prompt, params, options, 1)
            .await?;
        Ok(streams.map(|mut s| s.pop().expect("one choice")))
    }

    async fn generate_choices(
        &mut self,
        model: String,
        prompt: t::Prompt,
        params: t::Params,
        options: t::Options,
        n: u32,
    ) -> wasmtime::Result<Result<Vec<Resource<LlmStream>>, Error>> {
        let inference = match self.llm_for(&model) {
            Ok(i) => i,
            Err(e) => return Ok(Err(e)),
        };
        let prompt = match prompt {
            t::Prompt::Text(s) => inference::Prompt::Text(s),
            t::Prompt::Chat(messages) => inference::Prompt::Chat(
                messages
                    .into_iter()
                    .map(|m| inference::ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            ),
        };
        let request = inference::GenerateRequest {
            function: self.ctx.function.to_string(),
            model,
            prompt,
            params: inference::GenerationParams {
                max_tokens: params.max_tokens,
                temperature: params.temperature,
                top_k: params.top_k,
                top_p: params.top_p,
                repetition_penalty: params.repetition_penalty,
                seed: params.seed,
                stop: params.stop,
                presence_penalty: options.presence_penalty,
                frequency_penalty: options.frequency_penalty,
                logit_bias: options.logit_bias,
                min_tokens: options.min_tokens,
                ignore_eos: options.ignore_eos,
                logprobs: options.logprobs,
                constraint: options.constraint.map(|c| match c {
                    t::Constraint::JsonSchema(s) => inference::Constraint::JsonSchema(s),
                    t::Constraint::Regex(r) => inference::Constraint::Regex(r),
                    t::Constraint::Lark(g) => inference::Constraint::Lark(g),
                }),
                tools: options.tools,
                embed: false,
            },
            ttft_slo_s: self.ctx.config.ttft_slo_s,
            ttft_prompt_tokens_per_s: self.ctx.config.ttft_prompt_tokens_per_s,
            tpot_slo_s: self.ctx.config.tpot_slo_s,
            arrived: self.ctx.arrived.take(),
        };
        match inference.generate_choices(request, n).await {
            Ok(streams) => Ok(Ok(streams
                .into_iter()
                .map(|stream| {
                    self.table.push(LlmStream {
                        stream,
                        usage: None,
                    })
                })
                .collect::<Result<_, _>>()?)),
            Err(e) => Ok(Err(convert_error(e))),
        }
    }

    async fn embed(
        &mut self,
        model: String,
        inputs: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<t::Embedding>, Error>> {
        let inference = match self.llm_for(&model) {
            Ok(i) => i,
            Err(e) => return Ok(Err(e)),
        };
        if inputs.len() > MAX_EMBED_INPUTS {
            return Ok(Err(Error::InvalidParams(format!(
                "at most {MAX_EMBED_INPUTS} inputs per call, got {}",
                inputs.len()
            ))));
        }
        let arrived = self.ctx.arrived.take().unwrap_or_else(Instant::now);
        // All at once: the scheduler batches their prompts.
        let mut tasks = tokio::task::JoinSet::new();
        for (i, input) in inputs.into_iter().enumerate() {
            let request = inference::GenerateRequest {
                function: self.ctx.function.to_string(),
                model: model.clone(),
                prompt: inference::Prompt::Text(input),
                params: inference::GenerationParams {
                    embed: true,
                    ..Default::default()
                },
                ttft_slo_s: self.ctx.config.ttft_slo_s,
                ttft_prompt_tokens_per_s: self.ctx.config.ttft_prompt_tokens_per_s,
                tpot_slo_s: self.ctx.config.tpot_slo_s,
                arrived: Some(arrived),
            };
            let inference = inference.clone();
            tasks.spawn(async move {
                let mut stream = inference.generate(request).await?;
                let mut values = Vec::new();
                while let Some(chunk) = stream.next_chunk().await {
                    values.extend(chunk?.embedding);
                }
                let tokens = stream.usage().prompt_tokens;
                Ok::<_, inference::InferenceError>((i, t::Embedding { values, tokens }))
            });
        }
        let mut out = Vec::with_capacity(tasks.len());
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(e)) => out.push(e),
                // Dropping the set cancels the others.
                Ok(Err(e)) => return Ok(Err(convert_error(e))),
                Err(e) => return Ok(Err(Error::EngineError(format!("embedding: {e}")))),
            }
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(Ok(out.into_iter().map(|(_, e)| e).collect()))
    }

    fn tokenize(
        &mut self,
        model: String,
        text: String,
    ) -> wasmtime::Result<Result<Vec<u32>, Error>> {
        Ok(self
            .llm_for(&model)
            .and_then(|i| i.tokenize(&model, &text).map_err(convert_error)))
    }

    fn detokenize(
        &mut self,
        model: String,
        tokens: Vec<u32>,
    ) -> wasmtime::Result<Result<String, Error>> {
        Ok(self
            .llm_for(&model)
            .and_then(|i| i.detokenize(&model, &tokens).map_err(convert_error)))
    }

    fn models(&mut self) -> wasmtime::Result<Vec<String>> {
        let installed = self
            .ctx
            .inference
            .as_ref()
            .map(|i| i.models())
            .unwrap_or_default();
        Ok(self
            .ctx
            .config
            .allowed_models
            .iter()
            .filter(|m| installed.contains(m))
            .cloned()
            .collect())
    }
}

impl HostGenerationStream for LlmCtxView<'_> {
    async fn next(
        &mut self,
        this: Resource<LlmStream>,
    ) -> wasmtime::Result<Result<Option<String>, Error>> {
        // The text of the chunks, skipping those with none.
        loop {
            match self.next_chunk(Resource::new_borrow(this.rep())).await? {
                Ok(Some(c)) if c.text.is_empty() => continue,
                r => return Ok(r.map(|c| c.map(|c| c.text))),
            }
        }
    }

    async fn next_chunk(
        &mut self,
        this: Resource<LlmStream>,
    ) -> wasmtime::Result<Result<Option<t::Chunk>, Error>> {
        let s = self.table.get_mut(&this)?;
        if s.usage.is_some() {
            return Ok(Ok(None));
        }
        Ok(match s.stream.next_chunk().await {
            Some(Ok(c)) => Ok(Some(t::Chunk {
                text: c.text,
                tokens: c.tokens.into_iter().map(token_logprobs).collect(),
            })),
            Some(Err(e)) => Err(convert_error(e)),
            None => {
                let u = s.stream.usage();
                let usage = t::Usage {
                    prompt_tokens: u.prompt_tokens,
                    generated_tokens: u.generated_tokens,
                    finish_reason: match u.finish_reason {
                        inference::FinishReason::Stop => t::FinishReason::Stop,
                        inference::FinishReason::Length => t::FinishReason::Length,
                    },
                    ttft_ms: (u.ttft_s * 1000.0).round() as u32,
                };
                s.usage = Some((usage, u.cached_tokens));
                Ok(None)
            }
        })
    }

    fn usage(&mut self, this: Resource<LlmStream>) -> wasmtime::Result<Option<t::Usage>> {
        Ok(self.table.get(&this)?.usage.map(|(u, _)| u))
    }

    fn cached_tokens(&mut self, this: Resource<LlmStream>) -> wasmtime::Result<Option<u32>> {
        Ok(self.table.get(&this)?.usage.map(|(_, cached)| cached))
    }

    fn drop(&mut self, this: Resource<LlmStream>) -> wasmtime::Result<()> {
        // Dropping the stream cancels the request in the inference service.
        self.table.delete(this)?;
        Ok(())
    }
}
