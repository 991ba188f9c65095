//! `chat`: send a message, get the model's reply as it is generated.
//!
//! - `POST /` with the message as the body → `text/event-stream`: one
//!   `data: {"text": ...}` event per chunk, then `event: usage`.
//!   Query: `max_tokens`, `temperature`, `seed`, `system` (a system prompt),
//!   `stream=false` for one JSON answer instead.
//! - `GET /models` → the models this function may use, one per line.

use slinfer_sdk::llm::{self, ChatMessage, Params, Prompt};
use slinfer_sdk::{Handler, Params as RouteParams, Request, Response, Router, json};

struct Chat;

impl Handler for Chat {
    fn handle(req: Request) -> Response {
        Router::new()
            .post("/", reply)
            .get("/models", models)
            .handle(req)
    }
}

slinfer_sdk::export_handler!(Chat);

/// The query parameter `k` as a number, if given; a 400 that names it when
/// it is not one.
fn number<T: std::str::FromStr>(req: &Request, k: &str) -> Result<Option<T>, Response> {
    match req.query_param(k) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| Response::text(400, format!("{k}={v:?} is not a number\n"))),
    }
}

fn models(_req: Request, _p: RouteParams) -> Response {
    Response::text(200, llm::models().join("\n") + "\n")
}

fn reply(mut req: Request, _p: RouteParams) -> Response {
    let model = std::env::var("MODEL").unwrap_or_else(|_| "smollm2-135m-instruct".into());
    let query = |k: &str| req.query_param(k).map(str::to_owned);
    let (max_tokens, temperature, seed) = match (
        number(&req, "max_tokens"),
        number(&req, "temperature"),
        number(&req, "seed"),
    ) {
        (Ok(m), Ok(t), Ok(s)) => (m, t, s),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let (system, stream) = (
        query("system"),
        query("stream").is_none_or(|v| v != "false"),
    );
    let message = match req.body() {
        Ok([]) => {
            return Response::text(400, "send the message as the request body\n");
        }
        Ok(b) => match String::from_utf8(b.to_vec()) {
            Ok(m) => m,
            Err(_) => return Response::text(400, "the message is not UTF-8 text\n"),
        },
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system,
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: message,
    });
    let params = Params {
        max_tokens,
        temperature,
        seed,
        ..Params::default()
    };
    let prompt = Prompt::Chat(messages);
    if stream {
        return match llm::generate(&model, &prompt, &params) {
            Ok(generation) => llm::sse(generation),
            Err(e) => error(&e),
        };
    }
    match llm::complete(&model, &prompt, &params) {
        Ok((text, u)) => Response::json(
            200,
            format!(
                "{{\"text\":{},\"prompt_tokens\":{},\"generated_tokens\":{},\"finish_reason\":\"{}\"}}",
                json::string(&text),
                u.prompt_tokens,
                u.generated_tokens,
                llm::finish_reason_name(u.finish_reason)
            ),
        ),
        Err(e) => error(&e),
    }
}

fn error(e: &llm::LlmError) -> Response {
    let mut resp = Response::json(
        e.http_status(),
        format!("{{\"error\":{}}}", json::string(&e.message())),
    );
    if let Some(ms) = e.retry_after_ms() {
        resp = resp.header("retry-after", ms.div_ceil(1000).max(1).to_string());
    }
    resp
}
