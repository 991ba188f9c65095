//! TEST FIXTURE: a component for the standard `wasi:http/proxy` world, written
//! the way one writes for `wasmtime serve` (the `wasip2` crate, no slinfer
//! SDK). The end-to-end tests deploy it unchanged.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Plain);

struct Plain;

impl wasip2::exports::http::incoming_handler::Guest for Plain {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let resp = OutgoingResponse::new(Fields::new());
        let body = resp.body().expect("new response has a body");
        ResponseOutparam::set(response_out, Ok(resp));
        let mut out = body.write().expect("new body has a stream");
        write!(out, "plain proxy component saw {path}").expect("write");
        out.flush().expect("flush");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish");
    }
}
