//! `openai-api`: an OpenAI-compatible API over the host's models, so the
//! official clients work against a slinfer function
//! (`base_url = "http://HOST/fn/openai-api/v1"`).
//!
//! - `GET /v1/models`, `GET /v1/models/{id}`: the models this API serves.
//! - `POST /v1/chat/completions`: chat (`messages`), whole or streamed.
//! - `POST /v1/completions`: plain text continuation (`prompt`), whole or streamed.
//! - `POST /v1/embeddings`: `input` embedded (`embeddings.rs`).
//!
//! Streams are Server-Sent Events, `data: {chunk}` per event, ending with
//! `data: [DONE]`; `stream_options.include_usage` adds a usage chunk before
//! it. Usage counts `prompt_tokens_details.cached_tokens`: the prompt
//! tokens the host copied from another prompt's KV. Sampling: `max_tokens`
//! (chat also `max_completion_tokens`), `temperature`, `top_p`, `seed`,
//! `stop`, `presence_penalty`, `frequency_penalty`, `logit_bias`, and
//! vLLM's `top_k`,
//! `repetition_penalty`, `min_tokens` and `ignore_eos`. Log-probabilities:
//! chat's `logprobs` and `top_logprobs` (up to 20), completions' `logprobs`
//! (up to 5), streamed or whole, of the model's own distribution (before
//! penalties and temperature, as vLLM reports them). Structured output:
//! `response_format` (`json_object`, `json_schema`) and vLLM's
//! `guided_json`, `guided_regex`, `guided_grammar`, `guided_choice`,
//! enforced token by token by the host. Tools (chat): `tools`,
//! `tool_choice` (`none`, `auto`, `required`, a named function),
//! `parallel_tool_calls`, assistant `tool_calls` and `tool` messages in
//! the history (see `tools.rs`). `n` choices (up to 16) share one
//! computation of the prompt. What slinfer does not implement (`best_of`,
//! `echo`, ...) is refused with a 400 that names the parameter. Every error is
//! `{"error": {"message", "type", "param", "code"}}`.

mod embeddings;
mod error;
mod request;
mod tools;

use serde_json::{Value, json};
use slinfer_sdk::bindings::wasi::random::random::get_random_bytes;
use slinfer_sdk::llm::{self, Generation, TokenLogprob, TokenLogprobs, Usage, finish_reason_name};
use slinfer_sdk::{BodyWriter, Handler, Params as RouteParams, Request, Response, Router};

use error::ApiError;
use request::{Job, Kind};
use tools::{Piece, Splitter, Tools};

struct OpenAi;

impl Handler for OpenAi {
    fn handle(req: Request) -> Response {
        Router::new()
            .get("/v1/models", list_models)
            .get("/v1/models/*id", get_model)
            .post("/v1/chat/completions", |req, _| create(req, Kind::Chat))
            .post("/v1/completions", |req, _| create(req, Kind::Completion))
            .post("/v1/embeddings", |mut req, _| {
                let resp = match req.body() {
                    Ok(body) => embeddings::create(body),
                    Err(e) => Err(ApiError::bad_body(e.to_string())),
                };
                resp.unwrap_or_else(|e| e.response())
            })
            .any("/*path", |req, _| {
                ApiError::no_route(req.method().as_str(), req.path()).response()
            })
            .handle(req)
    }
}

slinfer_sdk::export_handler!(OpenAi);

/// The models this API names: `$MODELS` (comma-separated), else every model
/// the function may use.
fn catalog() -> Vec<String> {
    match std::env::var("MODELS") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => llm::models(),
    }
}

/// The catalog's models that the host has and the function may use.
fn served_models() -> Vec<String> {
    let usable = llm::models();
    catalog()
        .into_iter()
        .filter(|m| usable.contains(m))
        .collect()
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "slinfer"})
}

fn list_models(_req: Request, _p: RouteParams) -> Response {
    let data: Vec<Value> = served_models().iter().map(|m| model_object(m)).collect();
    Response::json(200, json!({"object": "list", "data": data}).to_string())
}

fn get_model(_req: Request, p: RouteParams) -> Response {
    let id = p.get("id").unwrap_or_default();
    if served_models().iter().any(|m| m == id) {
        Response::json(200, model_object(id).to_string())
    } else {
        ApiError::model_not_found(id).response()
    }
}

fn create(mut req: Request, kind: Kind) -> Response {
    let job = match req.body() {
        Ok(body) => Job::parse(kind, body),
        Err(e) => Err(ApiError::bad_body(e.to_string())),
    };
    match job.and_then(|job| start(kind, job)) {
        Ok(resp) => resp,
        Err(e) => e.response(),
    }
}

fn start(kind: Kind, job: Job) -> Result<Response, ApiError> {
    if !catalog().contains(&job.model) {
        return Err(ApiError::model_not_found(&job.model));
    }
    // Errors that come before the first token (overloaded, prompt too long)
    // are still the HTTP status of the answer, streamed or not.
    let generations = llm::Request::new(&job.model, job.prompt)
        .params(job.params)
        .options(job.options.clone())
        .start_choices(job.n)
        .map_err(|e| {
            // A schema or grammar the host refused: the parameter that gave it.
            let param = match (&e, job.constraint_param) {
                (llm::LlmError::InvalidParams(m), Some(p))
                    if ["json schema", "regex", "grammar"]
                        .iter()
                        .any(|k| m.starts_with(k)) =>
                {
                    Some(p)
                }
                (llm::LlmError::InvalidParams(m), _) if m.starts_with("tools") => Some("tools"),
                _ => None,
            };
            let err = ApiError::from_llm(e, kind.prompt_param());
            match param {
                Some(p) => err.param(p),
                None => err,
            }
        })?;
    let reply = Reply {
        kind,
        id: new_id(kind),
        created: now_s(),
        model: job.model,
        logprobs: job.options.logprobs.is_some(),
        tools: job.tools,
    };
    if job.stream {
        Ok(reply.stream(generations, job.include_usage))
    } else {
        reply.whole(generations)
    }
}

/// `chatcmpl-…` or `cmpl-…` and 24 random hex digits.
fn new_id(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-{}", random_hex())
}

/// 24 random hex digits (ids of answers and tool calls).
fn random_hex() -> String {
    get_random_bytes(12)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A finished choice's usage, and how many of its prompt tokens the host
/// copied from another prompt's KV rather than computed.
#[derive(Clone, Copy)]
struct Tally {
    usage: Usage,
    cached_tokens: u32,
}

fn usage_object(t: &Tally) -> Value {
    let u = &t.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": t.cached_tokens},
    })
}

/// What every object of one answer shares.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// Whether choices carry log-probabilities.
    logprobs: bool,
    /// The tools the model may call: its output is split into text and
    /// calls.
    tools: Option<Tools>,
}

impl Reply {
    fn object(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// The `logprobs` member of a choice for `tokens`; `offset` is where
    /// their text starts in the completion (for completions' `text_offset`).
    fn logprobs_object(&self, tokens: &[TokenLogprobs], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let one = |t: &TokenLogprob| json!({"token": t.text, "logprob": t.logprob, "bytes": t.bytes});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut entry = one(&t.chosen);
                        entry["top_logprobs"] = t.top.iter().map(one).collect();
                        entry
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Kind::Completion => {
                let mut at = offset;
                let offsets: Vec<usize> = tokens
                    .iter()
                    .map(|t| {
                        let here = at;
                        at += t.chosen.text.len();
                        here
                    })
                    .collect();
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let alternatives: serde_json::Map<String, Value> = t
                            .top
                            .iter()
                            .map(|a| (a.text.clone(), Value::from(a.logprob)))
                            .collect();
                        Value::Object(alternatives)
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| t.chosen.text.clone()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.chosen.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The whole answer, once every choice has finished.
    fn whole(self, generations: Vec<Generation>) -> Result<Response, ApiError> {
        let mut choices = Vec::with_capacity(generations.len());
        let mut total: Option<Tally> = None;
        for (index, mut generation) in generations.into_iter().enumerate() {
            let mut text = String::new();
            let mut tokens = Vec::new();
            while let Some(chunk) = generation.next_chunk() {
                let chunk = chunk.map_err(|e| ApiError::from_llm(e, self.kind.prompt_param()))?;
                text.push_str(&chunk.text);
                tokens.extend(chunk.tokens);
            }
            let usage = finished_usage(&generation)?;
            let mut finish = finish_reason_name(usage.usage.finish_reason);
            let mut calls = Vec::new();
            if let Some(tools) = &self.tools {
                let mut split = Splitter::new(tools);
                let mut pieces = split.push(&text);
                pieces.extend(split.finish());
                text.clear();
                for p in pieces {
                    match p {
                        Piece::Text(t) => text.push_str(&t),
                        Piece::Call(c) => calls.push(c.object()),
                    }
                }
                if !calls.is_empty() && finish == "stop" {
                    finish = "tool_calls";
                }
            }
            let (member, content) = match self.kind {
                Kind::Chat => {
                    let mut message =
                        json!({"role": "assistant", "content": text, "refusal": null});
                    if !calls.is_empty() {
                        message["content"] = Value::from((!text.is_empty()).then_some(text));
                        message["tool_calls"] = calls.into();
                    }
                    ("message", message)
                }
                Kind::Completion => ("text", Value::from(text)),
            };
            let mut c = choice(index, member, content, Some(finish));
            c["logprobs"] = self.logprobs_object(&tokens, 0);
            choices.push(c);
            total = Some(add_usage(total, &usage));
        }
        let object = match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        let mut body = self.object(object, choices.into());
        body["usage"] = total.as_ref().map(usage_object).unwrap_or(Value::Null);
        Ok(Response::json(200, body.to_string()))
    }

    /// Server-Sent Events: chunks of every choice as their text is
    /// generated (the choices take turns), a last chunk per choice with its
    /// finish reason, the usage chunk if asked for, `[DONE]`.
    fn stream(self, generations: Vec<Generation>, include_usage: bool) -> Response {
        Response::stream(200, move |w| {
            let object = match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion => "text_completion",
            };
            let chunk = |choices: Value, usage: Option<Value>| {
                let mut c = self.object(object, choices);
                if include_usage {
                    c["usage"] = usage.unwrap_or(Value::Null);
                }
                c
            };
            let mut choices: Vec<Streamed> = generations
                .into_iter()
                .enumerate()
                .map(|(index, generation)| Streamed {
                    index,
                    generation,
                    split: self.tools.as_ref().map(Splitter::new),
                    offset: 0,
                    calls: 0,
                })
                .collect();
            if self.kind == Kind::Chat {
                for c in &choices {
                    let role = json!({"role": "assistant", "content": ""});
                    event(
                        w,
                        &chunk(json!([choice(c.index, "delta", role, None)]), None),
                    )?;
                }
            }
            let mut total: Option<Tally> = None;
            let mut live: Vec<usize> = (0..choices.len()).collect();
            while !live.is_empty() {
                let mut still = Vec::with_capacity(live.len());
                for i in live {
                    let c = &mut choices[i];
                    match c.generation.next_chunk() {
                        Some(Ok(piece)) if piece.text.is_empty() && piece.tokens.is_empty() => {
                            still.push(i)
                        }
                        Some(Ok(piece)) => {
                            let pieces = match &mut c.split {
                                Some(s) => s.push(&piece.text),
                                None => vec![Piece::Text(piece.text)],
                            };
                            for e in c.events(&self, pieces, &piece.tokens) {
                                event(w, &chunk(json!([e]), None))?;
                            }
                            still.push(i);
                        }
                        // The status is sent: tell the client in the
                        // stream, as OpenAI does, and end it without
                        // `[DONE]`.
                        Some(Err(e)) => {
                            return event(
                                w,
                                &ApiError::from_llm(e, self.kind.prompt_param()).body(),
                            );
                        }
                        None => {
                            let usage = match finished_usage(&c.generation) {
                                Ok(u) => u,
                                Err(e) => return event(w, &e.body()),
                            };
                            if let Some(s) = c.split.take() {
                                for e in c.events(&self, s.finish(), &[]) {
                                    event(w, &chunk(json!([e]), None))?;
                                }
                            }
                            let mut finish = finish_reason_name(usage.usage.finish_reason);
                            if c.calls > 0 && finish == "stop" {
                                finish = "tool_calls";
                            }
                            let last = match self.kind {
                                Kind::Chat => json!({}),
                                Kind::Completion => Value::from(""),
                            };
                            let member = self.kind.stream_member();
                            let done = choice(c.index, member, last, Some(finish));
                            event(w, &chunk(json!([done]), None))?;
                            total = Some(add_usage(total, &usage));
                        }
                    }
                }
                live = still;
            }
            if include_usage {
                event(w, &chunk(json!([]), total.as_ref().map(usage_object)))?;
            }
            w.write(b"data: [DONE]\n\n")
        })
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
    }
}

/// One choice of a streamed answer.
struct Streamed {
    index: usize,
    generation: Generation,
    /// Text and tool calls apart, when tools are offered.
    split: Option<Splitter>,
    /// Bytes of text sent (completions' `text_offset`).
    offset: usize,
    /// Tool calls sent.
    calls: usize,
}

impl Streamed {
    /// The choice objects for `pieces` of text and calls, the chunk's
    /// log-probabilities with the first (an empty delta carries them when
    /// nothing else does).
    fn events(
        &mut self,
        reply: &Reply,
        pieces: Vec<Piece>,
        tokens: &[TokenLogprobs],
    ) -> Vec<Value> {
        let mut logprobs = reply.logprobs_object(tokens, self.offset);
        let mut deltas: Vec<Value> = pieces
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => {
                    self.offset += t.len();
                    reply.kind.stream_content(&t)
                }
                Piece::Call(c) => {
                    let mut call = c.object();
                    call["index"] = self.calls.into();
                    self.calls += 1;
                    json!({"tool_calls": [call]})
                }
            })
            .collect();
        if deltas.is_empty() && !tokens.is_empty() {
            deltas.push(reply.kind.stream_content(""));
        }
        deltas
            .into_iter()
            .map(|delta| {
                let mut c = choice(self.index, reply.kind.stream_member(), delta, None);
                c["logprobs"] = std::mem::take(&mut logprobs);
                c
            })
            .collect()
    }
}

/// Usage summed over choices: the prompt once, the completions added.
fn add_usage(total: Option<Tally>, u: &Tally) -> Tally {
    match total {
        None => *u,
        Some(mut t) => {
            t.usage.generated_tokens += u.usage.generated_tokens;
            t
        }
    }
}

/// Choice `index` whose `member` (`message`, `delta` or `text`) is `content`.
fn choice(index: usize, member: &str, content: Value, finish: Option<&str>) -> Value {
    let mut c = json!({
        "index": index,
        "logprobs": null,
        "finish_reason": finish,
    });
    c[member] = content;
    c
}

fn finished_usage(generation: &Generation) -> Result<Tally, ApiError> {
    let usage = generation
        .usage()
        .ok_or_else(|| ApiError::engine("no usage after the end of generation"))?;
    Ok(Tally {
        usage,
        cached_tokens: generation.cached_tokens().unwrap_or(0),
    })
}

fn event(w: &mut BodyWriter, data: &Value) -> Result<(), slinfer_sdk::Error> {
    w.write(format!("data: {data}\n\n").as_bytes())
}
