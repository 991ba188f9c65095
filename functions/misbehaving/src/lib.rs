//! TEST FIXTURE — not an example to follow. Every route does something a
//! sandbox must survive; the end-to-end tests call each one and then check
//! that the host and other functions are unaffected.

use slinfer_sdk::{Handler, Params, Request, Response, Router};

struct Misbehaving;

impl Handler for Misbehaving {
    fn handle(req: Request) -> Response {
        Router::new()
            .get("/trap", trap)
            .get("/panic", panic)
            .get("/loop", spin)
            .get("/sleep", sleep)
            .get("/stack-overflow", stack_overflow)
            .get("/shadow-stack-overflow", shadow_stack_overflow)
            .get("/memory-bomb", memory_bomb)
            .get("/hold", hold)
            .get("/large-output", large_output)
            .get("/fs-read", fs_read)
            .get("/env", env)
            .get("/outbound", outbound)
            .get("/nn-tensor-bomb", nn_tensor_bomb)
            .handle(req)
    }
}

slinfer_sdk::export_handler!(Misbehaving);

fn trap(_r: Request, _p: Params) -> Response {
    std::process::abort()
}

fn panic(_r: Request, _p: Params) -> Response {
    panic!("the fixture panics on purpose")
}

fn spin(_r: Request, _p: Params) -> Response {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn sleep(req: Request, _p: Params) -> Response {
    let ms: u64 = req
        .query_param("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    std::thread::sleep(std::time::Duration::from_millis(ms));
    Response::text(200, "slept\n")
}

/// Deep recursion with small frames: exhausts the engine's wasm stack.
fn deep(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    std::hint::black_box(deep(std::hint::black_box(n - 1))) + 1
}

fn stack_overflow(_r: Request, _p: Params) -> Response {
    Response::text(200, format!("{}\n", deep(u64::MAX)))
}

/// Recursion with a large local array: exhausts the guest's own stack in
/// linear memory, which shows as an out-of-bounds access below address 0.
#[allow(unconditional_recursion)]
fn big_frames(pad: [u8; 256]) -> u64 {
    std::hint::black_box(&pad);
    big_frames(std::hint::black_box(pad)) + 1
}

fn shadow_stack_overflow(_r: Request, _p: Params) -> Response {
    Response::text(200, format!("{}\n", big_frames([0; 256])))
}

fn memory_bomb(_r: Request, _p: Params) -> Response {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Holds `?mib=` MiB (written, so resident) for `?ms=` ms: many at once
/// fill the host's memory budget.
fn hold(req: Request, _p: Params) -> Response {
    let param = |k: &str, default: u64| {
        req.query_param(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let held = vec![1u8; (param("mib", 8) << 20) as usize];
    std::thread::sleep(std::time::Duration::from_millis(param("ms", 100)));
    Response::text(
        200,
        format!("held {} bytes\n", std::hint::black_box(&held).len()),
    )
}

fn large_output(req: Request, _p: Params) -> Response {
    let bytes: usize = req
        .query_param("bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    Response::stream(200, move |w| {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    })
}

/// Try to read a path; report what happened. The tests point it at files
/// outside any granted directory.
fn fs_read(req: Request, _p: Params) -> Response {
    let path = req
        .query_param("path")
        .unwrap_or("/etc/passwd")
        .replace("%2F", "/");
    match std::fs::read_to_string(&path) {
        Ok(s) => Response::text(200, s),
        Err(e) => Response::text(403, format!("cannot read {path}: {e}\n")),
    }
}

/// Report the environment and arguments the guest can see.
fn env(_r: Request, _p: Params) -> Response {
    let mut out = String::new();
    for (k, v) in std::env::vars() {
        out.push_str(&format!("{k}={v}\n"));
    }
    out.push_str(&format!("args={}\n", std::env::args().count()));
    Response::text(200, out)
}

/// Try an outbound HTTP request to `?url=http://host:port/path`.
fn outbound(req: Request, _p: Params) -> Response {
    use slinfer_sdk::bindings::wasi::http::outgoing_handler;
    use slinfer_sdk::bindings::wasi::http::types::{Fields, OutgoingRequest, Scheme};
    let url = req
        .query_param("url")
        .unwrap_or("http://127.0.0.1:9/")
        .to_owned();
    let rest = url.strip_prefix("http://").unwrap_or(&url);
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let out = OutgoingRequest::new(Fields::new());
    let _ = out.set_scheme(Some(&Scheme::Http));
    let _ = out.set_authority(Some(authority));
    let _ = out.set_path_with_query(Some(&path));
    match outgoing_handler::handle(out, None) {
        Err(e) => Response::text(502, format!("outbound refused: {e:?}\n")),
        Ok(fut) => {
            fut.subscribe().block();
            match fut.get() {
                Some(Ok(Ok(resp))) => {
                    Response::text(200, format!("outbound status {}\n", resp.status()))
                }
                Some(Ok(Err(e))) => Response::text(502, format!("outbound failed: {e:?}\n")),
                other => Response::text(502, format!("outbound failed: {other:?}\n")),
            }
        }
    }
}

/// Hands the host 1 MiB `wasi:nn` tensors, keeping every handle, from one
/// small buffer: host-side bytes grow while the guest's memory does not.
fn nn_tensor_bomb(_r: Request, _p: Params) -> Response {
    use slinfer_sdk::nn::tensor::{Tensor, TensorType};
    let buffer = vec![0u8; 1 << 20];
    let mut held = Vec::new();
    loop {
        held.push(Tensor::new(&[1 << 18], TensorType::Fp32, &buffer));
        std::hint::black_box(&held);
    }
}
