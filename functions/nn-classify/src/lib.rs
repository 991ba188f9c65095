//! `nn-classify`: class probabilities for a feature vector, from a tensor
//! model on the host's shared OpenVINO engine through `wasi:nn`.
//!
//! - `POST /` with the features as the body — numbers separated by commas or
//!   whitespace, or raw little-endian `f32`s with
//!   `Content-Type: application/octet-stream` — → JSON
//!   `{"graph", "output", "probabilities": [...], "class": argmax}`.
//!   The graph is `load-by-name($GRAPH)` (default `nn-classifier-v1`); its
//!   input is named by `?input=` (default `features`) and shaped `[1, n]`
//!   unless `?shape=1,4` says otherwise; `?type=i32|i64|u8|fp64`
//!   sends the numbers as that type instead of `fp32` (for models that want
//!   it — the classifier refuses it, with the reason).
//! - `POST /load?xml_bytes=N&x=5.1,3.5,1.4,0.2`: the body is an OpenVINO IR
//!   (`N` bytes of xml, then the weights), loaded with `wasi:nn`'s `load`
//!   and run on `x`.
//!
//! Errors are JSON `{"error": "<wasi:nn error code>", "message": ...}` with a
//! matching HTTP status (400 invalid argument or encoding, 403 not allowed,
//! 404 no such graph, 413 too large).

use slinfer_sdk::nn::{self, Graph, Tensor, TensorType};
use slinfer_sdk::{Handler, Params, Request, Response, Router, json};

struct Classify;

impl Handler for Classify {
    fn handle(req: Request) -> Response {
        Router::new()
            .post("/", by_name)
            .post("/load", from_bytes)
            .handle(req)
    }
}

slinfer_sdk::export_handler!(Classify);

fn by_name(mut req: Request, _p: Params) -> Response {
    let graph_name = std::env::var("GRAPH").unwrap_or_else(|_| "nn-classifier-v1".into());
    let binary = req
        .headers()
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/octet-stream"));
    let body = match req.body() {
        Ok(b) => b.to_vec(),
        Err(e) => return bad_request(&e.to_string()),
    };
    let values = if binary {
        if body.len() % 4 != 0 {
            return bad_request(
                "a binary body is little-endian f32s: its length must be a multiple of 4",
            );
        }
        body.chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    } else {
        match numbers(&String::from_utf8_lossy(&body)) {
            Ok(v) => v,
            Err(e) => return bad_request(&e),
        }
    };
    let shape = match req.query_param("shape") {
        Some(s) => match s.split(',').map(|d| d.trim().parse::<u32>()).collect() {
            Ok(d) => d,
            Err(_) => return bad_request("shape is comma-separated dimensions, e.g. 1,4"),
        },
        None => vec![1, values.len() as u32],
    };
    let input = req.query_param("input").unwrap_or("features").to_owned();
    let ty = req.query_param("type").unwrap_or("fp32");
    let Some(tensor) = encode(&shape, ty, &values) else {
        return bad_request(&format!("unknown type {ty:?} (fp32, fp64, i32, i64, u8)"));
    };
    match Graph::load_by_name(&graph_name).and_then(|g| classify(&g, &input, tensor)) {
        Ok((output, probabilities)) => answer(&graph_name, &output, &probabilities),
        Err(e) => error(&e),
    }
}

fn from_bytes(mut req: Request, _p: Params) -> Response {
    let xml_bytes: usize = match req.query_param("xml_bytes").map(str::parse) {
        Some(Ok(n)) => n,
        _ => {
            return bad_request(
                "xml_bytes=<length of the IR's xml at the start of the body> is required",
            );
        }
    };
    let x = match numbers(req.query_param("x").unwrap_or("")) {
        Ok(x) => x,
        Err(e) => return bad_request(&e),
    };
    let body = match req.body() {
        Ok(b) => b.to_vec(),
        Err(e) => return bad_request(&e.to_string()),
    };
    if xml_bytes > body.len() {
        return bad_request("xml_bytes is longer than the body");
    }
    let (xml, weights) = body.split_at(xml_bytes);
    let tensor = Tensor::f32(
        &[1, x.len() as u32],
        &x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    match Graph::load_openvino(xml, weights).and_then(|g| classify(&g, "features", tensor)) {
        Ok((output, probabilities)) => answer("(bytes)", &output, &probabilities),
        Err(e) => error(&e),
    }
}

/// Run `graph` on one input; its first output, as f32s.
fn classify(graph: &Graph, input: &str, tensor: Tensor) -> Result<(String, Vec<f32>), nn::Error> {
    let mut outputs = graph.session()?.compute(&[(input, tensor)])?;
    if outputs.is_empty() {
        return Err(nn::Error {
            code: nn::ErrorCode::RuntimeError,
            message: "the graph has no outputs".into(),
        });
    }
    let (name, t) = outputs.swap_remove(0);
    let values = t.to_f32().ok_or_else(|| nn::Error {
        code: nn::ErrorCode::UnsupportedOperation,
        message: format!("output {name:?} is {:?}, not fp32", t.ty),
    })?;
    Ok((name, values))
}

fn numbers(text: &str) -> Result<Vec<f64>, String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<f64>()
                .map_err(|_| format!("{s:?} is not a number"))
        })
        .collect()
}

/// `values` as a tensor of type `ty` (`None`: a type this example does not encode).
fn encode(shape: &[u32], ty: &str, values: &[f64]) -> Option<Tensor> {
    let (ty, data) = match ty {
        "fp32" => (
            TensorType::Fp32,
            values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect(),
        ),
        "fp64" => (
            TensorType::Fp64,
            values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        ),
        "i32" => (
            TensorType::I32,
            values
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
        ),
        "i64" => (
            TensorType::I64,
            values
                .iter()
                .flat_map(|&v| (v as i64).to_le_bytes())
                .collect(),
        ),
        "u8" => (TensorType::U8, values.iter().map(|&v| v as u8).collect()),
        _ => return None,
    };
    Some(Tensor {
        dims: shape.to_vec(),
        ty,
        data,
    })
}

fn answer(graph: &str, output: &str, p: &[f32]) -> Response {
    let class = p
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map_or(-1, |(i, _)| i as i64);
    let probs: Vec<String> = p.iter().map(|v| v.to_string()).collect();
    Response::json(
        200,
        format!(
            "{{\"graph\":{},\"output\":{},\"probabilities\":[{}],\"class\":{class}}}\n",
            json::string(graph),
            json::string(output),
            probs.join(",")
        ),
    )
}

fn error(e: &nn::Error) -> Response {
    Response::json(
        e.http_status(),
        format!(
            "{{\"error\":{},\"message\":{}}}\n",
            json::string(e.code_name()),
            json::string(&e.message)
        ),
    )
}

fn bad_request(message: &str) -> Response {
    Response::json(
        400,
        format!(
            "{{\"error\":\"bad-request\",\"message\":{}}}\n",
            json::string(message)
        ),
    )
}
