//! The host side of `slinfer:llm`: a guest's generation requests, checked
//! against its manifest (allowed models, SLO), handed to the inference room,
//! and streamed back through a `generation-stream` resource.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, Resource};

use super::state::GuestState;
use crate::inference::{self, Inference};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/deps/slinfer-llm",
        world: "slinfer:llm/host",
        imports: {
            "slinfer:llm/generation.generate": async | trappable,
            "slinfer:llm/generation.[method]generation-stream.next": async | trappable,
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

/// What a function's instances may do with `slinfer:llm`.
#[derive(Clone)]
pub struct LlmGrant {
    pub inference: Option<Arc<Inference>>,
    pub function: Arc<str>,
    pub allowed_models: Arc<[String]>,
    /// 0 = the inference room's default.
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
}

/// A guest's running generation (the `generation-stream` resource).
pub struct LlmStream {
    stream: inference::GenerationStream,
    usage: Option<t::Usage>,
}

/// Link `slinfer:llm` into `linker`.
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    t::add_to_linker::<GuestState, HasSelf<GuestState>>(linker, |s| s)?;
    wit::add_to_linker::<GuestState, HasSelf<GuestState>>(linker, |s| s)
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
        // Not an answer of generate/tokenize (only of model registration).
        e @ E::ModelExists(_) => Error::EngineError(e.to_string()),
        E::Engine(m) => Error::EngineError(m),
        E::InvalidParams(m) => Error::InvalidParams(m),
    }
}

impl GuestState {
    /// The inference room, if `model` is one this function may use.
    fn llm_for(&self, model: &str) -> Result<Arc<Inference>, Error> {
        let grant = &self.llm;
        if !grant.allowed_models.iter().any(|m| m == model) {
            return Err(Error::ModelNotAllowed(model.to_owned()));
        }
        grant
            .inference
            .clone()
            .ok_or_else(|| Error::ModelNotFound(model.to_owned()))
    }
}

impl t::Host for GuestState {}

impl wit::Host for GuestState {
    async fn generate(
        &mut self,
        model: String,
        prompt: t::Prompt,
        params: t::Params,
    ) -> wasmtime::Result<Result<Resource<LlmStream>, Error>> {
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
            function: self.llm.function.to_string(),
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
            },
            ttft_slo_s: self.llm.ttft_slo_s,
            tpot_slo_s: self.llm.tpot_slo_s,
        };
        match inference.generate(request).await {
            Ok(stream) => Ok(Ok(self.table.push(LlmStream {
                stream,
                usage: None,
            })?)),
            Err(e) => Ok(Err(convert_error(e))),
        }
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
            .llm
            .inference
            .as_ref()
            .map(|i| i.models())
            .unwrap_or_default();
        Ok(self
            .llm
            .allowed_models
            .iter()
            .filter(|m| installed.contains(m))
            .cloned()
            .collect())
    }
}

impl HostGenerationStream for GuestState {
    async fn next(
        &mut self,
        this: Resource<LlmStream>,
    ) -> wasmtime::Result<Result<Option<String>, Error>> {
        let s = self.table.get_mut(&this)?;
        if s.usage.is_some() {
            return Ok(Ok(None));
        }
        Ok(match s.stream.next().await {
            Some(Ok(text)) => Ok(Some(text)),
            Some(Err(e)) => Err(convert_error(e)),
            None => {
                let u = s.stream.usage();
                s.usage = Some(t::Usage {
                    prompt_tokens: u.prompt_tokens,
                    generated_tokens: u.generated_tokens,
                    finish_reason: match u.finish_reason {
                        inference::FinishReason::Stop => t::FinishReason::Stop,
                        inference::FinishReason::Length => t::FinishReason::Length,
                    },
                    ttft_ms: (u.ttft_s * 1000.0).round() as u32,
                });
                Ok(None)
            }
        })
    }

    fn usage(&mut self, this: Resource<LlmStream>) -> wasmtime::Result<Option<t::Usage>> {
        Ok(self.table.get(&this)?.usage)
    }

    fn drop(&mut self, this: Resource<LlmStream>) -> wasmtime::Result<()> {
        // Dropping the stream cancels the request in the inference room.
        self.table.delete(this)?;
        Ok(())
    }
}
