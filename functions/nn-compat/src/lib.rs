//! TEST FIXTURE: a component written the way one writes for
//! `wasmtime serve -S nn -S nn-graph=openvino::<dir>` — the `wasip2` crate
//! for HTTP and wit-bindgen over the standard `wasi:nn` WIT, no slinfer SDK.
//! The end-to-end tests run the same `.wasm` on slinfer and under wasmtime.
//!
//! `POST /<graph>?input=<name>` with little-endian f32s as the body: loads
//! the graph by name, computes it on a `[1, n]` fp32 tensor and answers the
//! first output's values, space-separated (`500` and `<code>: <message>` on
//! a wasi:nn error).

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

mod nn {
    wit_bindgen::generate!({
        path: "../../wit/deps/wasi-nn",
        world: "wasi:nn/ml",
    });
}

use nn::wasi::nn::{graph, tensor};

wasip2::http::proxy::export!(Plain);

struct Plain;

impl wasip2::exports::http::incoming_handler::Guest for Plain {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let (path, query) = path.split_once('?').unwrap_or((&path, ""));
        let graph_name = path.trim_start_matches('/').to_string();
        let input = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("input="))
            .unwrap_or("features")
            .to_string();
        let body = read_body(&request);
        let (status, text) = match run(&graph_name, &input, &body) {
            Ok(values) => (
                200,
                values
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Err(e) => (500, e),
        };
        let resp = OutgoingResponse::new(Fields::new());
        resp.set_status_code(status).expect("status");
        let out_body = resp.body().expect("new response has a body");
        ResponseOutparam::set(response_out, Ok(resp));
        let mut out = out_body.write().expect("new body has a stream");
        writeln!(out, "{text}").expect("write");
        out.flush().expect("flush");
        drop(out);
        OutgoingBody::finish(out_body, None).expect("finish");
    }
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("body");
    let stream = body.stream().expect("stream");
    let mut bytes = Vec::new();
    while let Ok(chunk) = stream.blocking_read(64 * 1024) {
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

fn run(graph_name: &str, input: &str, body: &[u8]) -> Result<Vec<f32>, String> {
    let err = |e: nn::wasi::nn::errors::Error| format!("{:?}: {}", e.code(), e.data());
    let g = graph::load_by_name(graph_name).map_err(err)?;
    let ctx = g.init_execution_context().map_err(err)?;
    let t = tensor::Tensor::new(
        &[1, (body.len() / 4) as u32],
        tensor::TensorType::Fp32,
        body,
    );
    let outputs = ctx.compute(vec![(input.to_string(), t)]).map_err(err)?;
    let (_, first) = outputs.first().ok_or("no outputs")?;
    Ok(first
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
