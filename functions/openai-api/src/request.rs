//! The request bodies of `/v1/chat/completions` and `/v1/completions`,
//! checked parameter by parameter so that every refusal names its `param`.

use serde_json::{Map, Value};
use slinfer_sdk::llm::{ChatMessage, Constraint, Options, Params, Prompt};

use crate::error::ApiError;
use crate::tools::{Tools, calls_text};

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    /// The member of a streamed choice that holds its text.
    pub fn stream_member(self) -> &'static str {
        match self {
            Kind::Chat => "delta",
            Kind::Completion => "text",
        }
    }

    /// A streamed choice's `text` as that member's value.
    pub fn stream_content(self, text: &str) -> Value {
        match self {
            Kind::Chat => serde_json::json!({"content": text}),
            Kind::Completion => Value::from(text),
        }
    }

    /// The parameter that holds the prompt.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }
}

/// A parsed generation request.
pub struct Job {
    pub model: String,
    pub prompt: Prompt,
    pub params: Params,
    /// Penalties, logit bias, vLLM's `min_tokens` and `ignore_eos`,
    /// log-probabilities (`logprobs.is_some()` when the answer carries them),
    /// the constraint and the tools for the host.
    pub options: Options,
    /// The parameter that set the constraint (where its errors point).
    pub constraint_param: Option<&'static str>,
    /// The tools the model may call (chat).
    pub tools: Option<Tools>,
    /// Choices to generate (`n`).
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
}

/// Most alternatives per token: chat's `top_logprobs`, completions'
/// `logprobs` (OpenAI's limits).
const MAX_TOP_LOGPROBS_CHAT: i64 = 20;
const MAX_LOGPROBS_COMPLETION: i64 = 5;

/// Whether a parameter's value leaves it off.
type Neutral = fn(&Value) -> bool;

/// Parameters slinfer does not implement, each accepted only at the value
/// that turns it off.
const UNSUPPORTED: &[(&str, Neutral)] = &[
    ("best_of", |v| v.as_u64() == Some(1)),
    ("echo", |v| v.as_bool() == Some(false)),
    ("suffix", |v| v.as_str() == Some("")),
    // The deprecated forerunners of `tools` and `tool_choice`.
    ("functions", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("function_call", |v| v.as_str() == Some("none")),
    ("modalities", |v| *v == Value::from(vec!["text"])),
    ("audio", |_| false),
    ("prediction", |_| false),
    ("reasoning_effort", |_| false),
    ("web_search_options", |_| false),
    ("store", |v| v.as_bool() == Some(false)),
];

/// Most choices per request (the host's limit; OpenAI's is 128).
const MAX_CHOICES: i64 = 16;

/// Most stop sequences a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;

/// OpenAI's default `max_tokens` for `/v1/completions`; chat has none
/// (the host's default applies).
const COMPLETION_MAX_TOKENS: u32 = 16;

impl Job {
    /// Parse and check a request body for `kind`.
    pub fn parse(kind: Kind, body: &[u8]) -> Result<Job, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_body(format!(
                "We could not parse the JSON body of your request ({e})."
            ))
        })?;
        let Value::Object(map) = value else {
            return Err(ApiError::bad_body(
                "The request body must be a JSON object.",
            ));
        };
        let mut f = Fields::new(map, "");
        let model = f
            .string("model")?
            .ok_or_else(|| ApiError::missing("model"))?;
        let prompt = match kind {
            Kind::Chat => Prompt::Chat(messages(
                f.take("messages")
                    .ok_or_else(|| ApiError::missing("messages"))?,
            )?),
            Kind::Completion => Prompt::Text(prompt(
                f.take("prompt")
                    .ok_or_else(|| ApiError::missing("prompt"))?,
            )?),
        };
        let max_completion_tokens = match kind {
            Kind::Chat => f.int("max_completion_tokens", 1, u32::MAX.into())?,
            Kind::Completion => None,
        };
        let max_tokens = max_completion_tokens
            .or(f.int("max_tokens", 1, u32::MAX.into())?)
            .map(|n| n as u32)
            .or((kind == Kind::Completion).then_some(COMPLETION_MAX_TOKENS));
        let params = Params {
            max_tokens,
            temperature: f.float(
                "temperature",
                |t| (0.0..=2.0).contains(&t),
                "between 0 and 2",
            )?,
            top_p: f.float("top_p", |p| p > 0.0 && p <= 1.0, "in (0, 1]")?,
            // vLLM's convention: -1 (or 0) turns top-k off.
            top_k: f
                .int("top_k", -1, u32::MAX.into())?
                .filter(|&k| k > 0)
                .map(|k| k as u32),
            repetition_penalty: f.float(
                "repetition_penalty",
                |r| r > 0.0 && r.is_finite(),
                "greater than 0",
            )?,
            seed: f.int("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
            stop: stop(f.take("stop"))?,
        };
        let penalty = |x: f64| (-2.0..=2.0).contains(&x);
        let options = Options {
            presence_penalty: f.float("presence_penalty", penalty, "from -2 to 2")?,
            frequency_penalty: f.float("frequency_penalty", penalty, "from -2 to 2")?,
            logit_bias: logit_bias(f.take("logit_bias"))?,
            min_tokens: f.int("min_tokens", 0, u32::MAX.into())?.map(|n| n as u32),
            ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
            logprobs: logprobs(kind, &mut f)?,
            constraint: None,
            tools: None,
        };
        let mut options = options;
        let tools = match kind {
            Kind::Chat => {
                let (list, choice) = (f.take("tools"), f.take("tool_choice"));
                Tools::parse(list, choice, f.bool("parallel_tool_calls")?)?
            }
            Kind::Completion => None,
        };
        let (constraint_param, constraint) = constraint(&mut f)?;
        let constraint_param = match (&tools, constraint) {
            (Some(t), Some(_)) if t.grammar().is_some() => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "a required tool call cannot be combined with {}",
                        constraint_param.unwrap_or_default()
                    ),
                ));
            }
            (_, Some(c)) => {
                options.constraint = Some(c);
                constraint_param
            }
            (Some(t), None) => {
                options.constraint = t.grammar().map(Constraint::Lark);
                options.constraint.as_ref().map(|_| "tools")
            }
            (None, None) => None,
        };
        if let Some(t) = &tools {
            options.tools = Some(t.json());
        }
        if let (Some(min), Some(max)) = (options.min_tokens, params.max_tokens)
            && min > max
        {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens ({min}) must not exceed max_tokens ({max})"),
            ));
        }
        let n = f.int("n", 1, MAX_CHOICES)?.unwrap_or(1) as u32;
        let stream = f.bool("stream")?.unwrap_or(false);
        let include_usage = match f.take("stream_options") {
            None => false,
            Some(_) if !stream => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                ));
            }
            Some(Value::Object(o)) => {
                let mut o = Fields::new(o, "stream_options.");
                let include = o.bool("include_usage")?.unwrap_or(false);
                o.finish()?;
                include
            }
            Some(_) => return Err(ApiError::invalid("stream_options", "expected an object")),
        };
        f.take("user"); // an end-user id for abuse monitoring: nothing to do with it here
        for (name, neutral) in UNSUPPORTED {
            if f.take(name).is_some_and(|v| !neutral(&v)) {
                return Err(ApiError::unsupported(*name));
            }
        }
        f.finish()?;
        Ok(Job {
            model,
            prompt,
            params,
            options,
            constraint_param,
            tools,
            n,
            stream,
            include_usage,
        })
    }
}

/// The members of a JSON object, taken one by one; `null` counts as absent.
struct Fields {
    map: Map<String, Value>,
    /// Prepended to a member's name in errors (`messages[2].`).
    prefix: String,
}

impl Fields {
    fn new(map: Map<String, Value>, prefix: impl Into<String>) -> Self {
        Fields {
            map,
            prefix: prefix.into(),
        }
    }

    fn param(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(self.param(key), "expected a string")),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(ApiError::invalid(self.param(key), "expected a boolean")),
        }
    }

    fn int(&mut self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::invalid(
                    self.param(key),
                    format!("expected an integer from {min} to {max}, got {v}"),
                )),
            },
        }
    }

    fn float(
        &mut self,
        key: &str,
        ok: impl Fn(f64) -> bool,
        range: &str,
    ) -> Result<Option<f32>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if ok(x) => Ok(Some(x as f32)),
                _ => Err(ApiError::invalid(
                    self.param(key),
                    format!("expected a number {range}, got {v}"),
                )),
            },
        }
    }

    /// Refuse whatever is left: members the API does not know.
    fn finish(self) -> Result<(), ApiError> {
        match self.map.into_iter().find(|(_, v)| !v.is_null()) {
            Some((key, _)) => Err(ApiError::unknown(format!("{}{key}", self.prefix))),
            None => Ok(()),
        }
    }
}

fn messages(v: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::invalid(
            "messages",
            "expected an array of messages",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "expected at least one message",
        ));
    }
    items.into_iter().enumerate().map(message).collect()
}

fn message((i, v): (usize, Value)) -> Result<ChatMessage, ApiError> {
    let Value::Object(map) = v else {
        return Err(ApiError::invalid(
            format!("messages[{i}]"),
            "expected an object",
        ));
    };
    let mut f = Fields::new(map, format!("messages[{i}]."));
    let role = match f.string("role")?.as_deref() {
        // `developer` is the newer name of `system`.
        Some("system" | "developer") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some("tool") => "tool",
        Some(_) => return Err(ApiError::unsupported(f.param("role"))),
        None => return Err(ApiError::missing(f.param("role"))),
    };
    let mut content = match f.take("content") {
        // An assistant turn may come without content (it had tool calls).
        None if role == "assistant" => String::new(),
        None => return Err(ApiError::missing(f.param("content"))),
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(&f.param("content"), parts)?,
        Some(_) => {
            return Err(ApiError::invalid(
                f.param("content"),
                "expected a string or an array of text parts",
            ));
        }
    };
    match (role, f.take("tool_calls")) {
        (_, None) => {}
        ("assistant", Some(Value::Array(calls))) => {
            let calls = calls_text(&f.param("tool_calls"), calls)?;
            content = [content.as_str(), calls.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n");
        }
        ("assistant", Some(_)) => {
            return Err(ApiError::invalid(
                f.param("tool_calls"),
                "expected an array of tool calls",
            ));
        }
        (_, Some(_)) => return Err(ApiError::unknown(f.param("tool_calls"))),
    }
    if role == "tool" {
        // The template has no place for the id: results go in call order.
        f.string("tool_call_id")?
            .ok_or_else(|| ApiError::missing(f.param("tool_call_id")))?;
    }
    f.take("name"); // a participant's name: the chat template has no place for it
    f.finish()?;
    Ok(ChatMessage {
        role: role.into(),
        content,
    })
}

/// `[{"type": "text", "text": ...}, ...]`, joined by newlines.
fn text_parts(param: &str, parts: Vec<Value>) -> Result<String, ApiError> {
    let texts = parts
        .into_iter()
        .enumerate()
        .map(|(j, part)| {
            let param = format!("{param}[{j}]");
            if part.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::unsupported(format!("{param}.type")));
            }
            match part.get("text") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(ApiError::invalid(
                    format!("{param}.text"),
                    "expected a string",
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join("\n"))
}

/// A string, or an array holding one string.
fn prompt(v: Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Array(items) => match <[Value; 1]>::try_from(items) {
            Ok([Value::String(s)]) => Ok(s),
            _ => Err(ApiError::invalid(
                "prompt",
                "only one prompt per request, given as text (not token ids)",
            )),
        },
        _ => Err(ApiError::invalid("prompt", "expected a string")),
    }
}

/// `{"token id": bias}`, each bias from -100 to 100.
fn logit_bias(v: Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let Value::Object(map) = v else {
        return Err(ApiError::invalid(
            "logit_bias",
            "expected an object mapping token ids to biases",
        ));
    };
    map.into_iter()
        .map(|(key, bias)| {
            let token = key.parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("keys must be token ids (integers), got {key:?}"),
                )
            })?;
            match bias.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((token, b as f32)),
                _ => Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "the bias of token {token} must be a number from -100 to 100, got {bias}"
                    ),
                )),
            }
        })
        .collect()
}

/// How many alternatives to report per token, if log-probabilities are
/// asked for: chat's `logprobs` (a boolean) and `top_logprobs`, or
/// completions' `logprobs` (the count).
fn logprobs(kind: Kind, f: &mut Fields) -> Result<Option<u8>, ApiError> {
    match kind {
        Kind::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.int("top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)?;
            match (on, top) {
                (false, Some(n)) if n > 0 => Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true",
                )),
                (false, _) => Ok(None),
                (true, top) => Ok(Some(top.unwrap_or(0) as u8)),
            }
        }
        Kind::Completion => Ok(f
            .int("logprobs", 0, MAX_LOGPROBS_COMPLETION)?
            .map(|n| n as u8)),
    }
}

/// The constraint of `response_format` (`json_object`, `json_schema`) or
/// of vLLM's `guided_json`, `guided_regex`, `guided_grammar` (llguidance's
/// Lark) and `guided_choice`, at most one, with the parameter that set it.
fn constraint(f: &mut Fields) -> Result<(Option<&'static str>, Option<Constraint>), ApiError> {
    let mut found = Vec::new();
    if let Some(v) = f.take("response_format") {
        let Value::Object(o) = v else {
            return Err(ApiError::invalid("response_format", "expected an object"));
        };
        let mut o = Fields::new(o, "response_format.");
        let c = match o.string("type")?.as_deref() {
            Some("text") => None,
            Some("json_object") => Some(Constraint::JsonSchema(r#"{"type": "object"}"#.into())),
            Some("json_schema") => {
                let Some(Value::Object(js)) = o.take("json_schema") else {
                    return Err(ApiError::missing("response_format.json_schema"));
                };
                let mut js = Fields::new(js, "response_format.json_schema.");
                js.string("name")?
                    .ok_or_else(|| ApiError::missing("response_format.json_schema.name"))?;
                js.string("description")?;
                js.bool("strict")?;
                let schema = match js.take("schema") {
                    None => r#"{"type": "object"}"#.to_owned(),
                    Some(s @ Value::Object(_)) => s.to_string(),
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "response_format.json_schema.schema",
                            "expected a JSON Schema object",
                        ));
                    }
                };
                js.finish()?;
                Some(Constraint::JsonSchema(schema))
            }
            Some(t) => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!("expected text, json_object or json_schema, got {t:?}"),
                ));
            }
            None => return Err(ApiError::missing("response_format.type")),
        };
        o.finish()?;
        found.extend(c.map(|c| ("response_format", c)));
    }
    if let Some(v) = f.take("guided_json") {
        let schema = match v {
            Value::String(s) => s,
            v @ Value::Object(_) => v.to_string(),
            _ => return Err(ApiError::invalid("guided_json", "expected a JSON Schema")),
        };
        found.push(("guided_json", Constraint::JsonSchema(schema)));
    }
    if let Some(r) = f.string("guided_regex")? {
        found.push(("guided_regex", Constraint::Regex(r)));
    }
    if let Some(g) = f.string("guided_grammar")? {
        found.push(("guided_grammar", Constraint::Lark(g)));
    }
    if let Some(v) = f.take("guided_choice") {
        let choices: Vec<String> = match v {
            Value::Array(items) if !items.is_empty() => items
                .into_iter()
                .map(|c| match c {
                    Value::String(s) => Ok(Value::from(s).to_string()),
                    _ => Err(ApiError::invalid("guided_choice", "expected strings")),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(ApiError::invalid(
                    "guided_choice",
                    "expected a non-empty array of strings",
                ));
            }
        };
        found.push((
            "guided_choice",
            Constraint::Lark(format!("start: {}", choices.join(" | "))),
        ));
    }
    match found.len() {
        0 | 1 => Ok(found
            .pop()
            .map_or((None, None), |(p, c)| (Some(p), Some(c)))),
        _ => Err(ApiError::invalid(
            found[1].0,
            format!("{} and {} cannot be combined", found[0].0, found[1].0),
        )),
    }
}

/// A string or an array of up to four non-empty strings.
fn stop(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let stops = match v {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) if items.len() <= MAX_STOP => items
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid("stop", "expected strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                format!("expected a string or an array of at most {MAX_STOP} strings"),
            ));
        }
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stops)
}
