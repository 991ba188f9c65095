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
//! it. Sampling: `max_tokens` (chat also `max_completion_tokens`),
//! `temperature`, `top_p`, `seed`, `stop`, `presence_penalty`,
//! `frequency_penalty`, `logit_bias`, and vLLM's `top_k`,
//! `repetition_penalty`, `min_tokens` and `ignore_eos`. Log-probabilities:
//! chat's `logprobs` and `top_logprobs` (up to 20), completions' `logprobs`
//! (up to 5), streamed or whole, of the model's own distribution (before
//! penalties and temperature, as vLLM reports them). Structured output:
//! `response_format` (`json_object`, `json_schema`) and vLLM's
//! `guided_json`, `guided_regex`, `guided_grammar`, `guided_choice`,
//! enforced token by token by the host. Tools (chat): `tools`,
//! `tool_choice` (`none`, `auto`, `required`, a named function),
//! `parallel_tool_calls`, assistant `tool_calls` and `tool` messages in
//! the history (see `tools.rs`). What slinfer does not implement (`n` > 1,
//! ...) is refused with a 400 that names the parameter. Every error is
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
    let generation = llm::Request::new(&job.model, job.prompt)
        .params(job.params)
        .options(job.options.clone())
        .start()
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
        Ok(reply.stream(generation, job.include_usage))
    } else {
        reply.whole(generation)
    }
}

/// `chatcmpl-…` or `cmpl-…` and 24 random hex digits.
fn new_id(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let hex: String = get_random_bytes(12)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}-{hex}")
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_object(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
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

    /// The whole answer, once generation has finished.
    fn whole(self, mut generation: Generation) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(chunk) = generation.next_chunk() {
            let chunk = chunk.map_err(|e| ApiError::from_llm(e, self.kind.prompt_param()))?;
            text.push_str(&chunk.text);
            tokens.extend(chunk.tokens);
        }
        let usage = finished_usage(&generation)?;
        let (mut finish, mut calls) = (finish_reason_name(usage.finish_reason), Vec::new());
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
        let (object, member, content) = match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": text, "refusal": null});
                if !calls.is_empty() {
                    message["content"] = Value::from((!text.is_empty()).then_some(text));
                    message["tool_calls"] = calls.into();
                }
                ("chat.completion", "message", message)
            }
            Kind::Completion => ("text_completion", "text", Value::from(text)),
        };
        let mut choice = choice(member, content, Some(finish));
        choice["logprobs"] = self.logprobs_object(&tokens, 0);
        let mut body = self.object(object, json!([choice]));
        body["usage"] = usage_object(&usage);
        Ok(Response::json(200, body.to_string()))
    }

    /// Server-Sent Events: chunks as the text is generated, a last chunk
    /// with the finish reason, the usage chunk if asked for, `[DONE]`.
    fn stream(self, mut generation: Generation, include_usage: bool) -> Response {
        Response::stream(200, move |w| {
            let (object, member) = match self.kind {
                Kind::Chat => ("chat.completion.chunk", "delta"),
                Kind::Completion => ("text_completion", "text"),
            };
            let content = |text: &str| match self.kind {
                Kind::Chat => json!({"content": text}),
                Kind::Completion => Value::from(text),
            };
            let chunk = |choices: Value, usage: Option<Value>| {
                let mut c = self.object(object, choices);
                if include_usage {
                    c["usage"] = usage.unwrap_or(Value::Null);
                }
                c
            };
            if self.kind == Kind::Chat {
                let role = json!({"role": "assistant", "content": ""});
                event(w, &chunk(json!([choice(member, role, None)]), None))?;
            }
            let mut offset = 0;
            let mut split = self.tools.as_ref().map(Splitter::new);
            let mut calls = 0;
            // One event per piece of text or call, the chunk's
            // log-probabilities with the first.
            let mut send = |w: &mut BodyWriter, pieces: Vec<Piece>, tokens: &[TokenLogprobs]| {
                let mut logprobs = self.logprobs_object(tokens, offset);
                let mut deltas: Vec<Value> = pieces
                    .into_iter()
                    .map(|p| match p {
                        Piece::Text(t) => {
                            offset += t.len();
                            content(&t)
                        }
                        Piece::Call(c) => {
                            let mut call = c.object();
                            call["index"] = calls.into();
                            calls += 1;
                            json!({"tool_calls": [call]})
                        }
                    })
                    .collect();
                if deltas.is_empty() && !tokens.is_empty() {
                    deltas.push(content(""));
                }
                for delta in deltas {
                    let mut choice = choice(member, delta, None);
                    choice["logprobs"] = std::mem::take(&mut logprobs);
                    event(w, &chunk(json!([choice]), None))?;
                }
                Ok::<_, slinfer_sdk::Error>(())
            };
            while let Some(piece) = generation.next_chunk() {
                match piece {
                    Ok(piece) if piece.text.is_empty() && piece.tokens.is_empty() => {}
                    Ok(piece) => {
                        let pieces = match &mut split {
                            Some(s) => s.push(&piece.text),
                            None => vec![Piece::Text(piece.text)],
                        };
                        send(w, pieces, &piece.tokens)?;
                    }
                    // The status is sent: tell the client in the stream, as
                    // OpenAI does, and end it without `[DONE]`.
                    Err(e) => {
                        return event(w, &ApiError::from_llm(e, self.kind.prompt_param()).body());
                    }
                }
            }
            let usage = match finished_usage(&generation) {
                Ok(u) => u,
                Err(e) => return event(w, &e.body()),
            };
            if let Some(s) = split {
                send(w, s.finish(), &[])?;
            }
            let mut finish = finish_reason_name(usage.finish_reason);
            if calls > 0 && finish == "stop" {
                finish = "tool_calls";
            }
            let last = match self.kind {
                Kind::Chat => json!({}),
                Kind::Completion => content(""),
            };
            let choice = choice(member, last, Some(finish));
            event(w, &chunk(json!([choice]), None))?;
            if include_usage {
                event(w, &chunk(json!([]), Some(usage_object(&usage))))?;
            }
            w.write(b"data: [DONE]\n\n")
        })
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
    }
}

/// One choice whose `member` (`message`, `delta` or `text`) is `content`.
fn choice(member: &str, content: Value, finish: Option<&str>) -> Value {
    let mut c = json!({
        "index": 0,
        "logprobs": null,
        "finish_reason": finish,
    });
    c[member] = content;
    c
}

fn finished_usage(generation: &Generation) -> Result<Usage, ApiError> {
    generation
        .usage()
        .ok_or_else(|| ApiError::engine("no usage after the end of generation"))
}

fn event(w: &mut BodyWriter, data: &Value) -> Result<(), slinfer_sdk::Error> {
    w.write(format!("data: {data}\n\n").as_bytes())
}
