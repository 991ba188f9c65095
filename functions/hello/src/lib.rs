//! `hello`: the example function. It echoes what it was sent, and shows the
//! SDK's router, streaming and environment.
//!
//! - `GET /` — a greeting (from the `GREETING` variable in `slinfer.toml`);
//! - `ANY /echo/*rest` — JSON with method, path, query, headers and body;
//! - `GET /stream?chunks=N&delay_ms=D` — N lines, each sent as it is written.

use slinfer_sdk::json::string as json_str;
use slinfer_sdk::{Handler, Params, Request, Response, Router};

struct Hello;

impl Handler for Hello {
    fn handle(req: Request) -> Response {
        Router::new()
            .get("/", greet)
            .any("/echo/*rest", echo)
            .get("/stream", stream)
            .handle(req)
    }
}

slinfer_sdk::export_handler!(Hello);

fn greet(_req: Request, _p: Params) -> Response {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
    Response::text(200, format!("{greeting}\n"))
}

fn echo(mut req: Request, params: Params) -> Response {
    let body = match req.body() {
        Ok(b) => String::from_utf8_lossy(b).into_owned(),
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let headers: Vec<String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            format!(
                "[{},{}]",
                json_str(k),
                json_str(&String::from_utf8_lossy(v))
            )
        })
        .collect();
    let json = format!(
        "{{\"method\":{},\"path\":{},\"rest\":{},\"query\":{},\"headers\":[{}],\"body\":{}}}",
        json_str(req.method().as_str()),
        json_str(req.path()),
        json_str(params.get("rest").unwrap_or_default()),
        json_str(req.query()),
        headers.join(","),
        json_str(&body),
    );
    Response::json(200, json).header("x-echo", "1")
}

fn stream(req: Request, _p: Params) -> Response {
    let chunks: u32 = req
        .query_param("chunks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let delay_ms: u64 = req
        .query_param("delay_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Response::stream(200, move |w| {
        for i in 0..chunks {
            if i > 0 && delay_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            }
            w.write(format!("chunk {i}\n").as_bytes())?;
        }
        Ok(())
    })
    .header("content-type", "text/plain")
}
