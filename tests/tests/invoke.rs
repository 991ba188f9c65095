//! Invocation over real HTTP: path, query, headers, body, methods, streaming,
//! invoke keys, and the CLI's `invoke`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use slinfer_e2e::{Server, client, error_of, package, package_variant};

#[tokio::test]
async fn echo_sees_method_path_query_headers_and_body() {
    let s = Server::start();
    s.deploy(&package("hello"));
    let resp = client()
        .post(format!("{}/fn/hello/echo/a/b%20c?x=1&y=two", s.url))
        .header("x-custom", "value-1")
        .body("the body")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echo"], "1");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/echo/a/b%20c");
    assert_eq!(v["rest"], "a/b%20c");
    assert_eq!(v["query"], "x=1&y=two");
    assert_eq!(v["body"], "the body");
    let headers = v["headers"].as_array().unwrap();
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "x-custom" && h[1] == "value-1"),
        "{headers:?}"
    );

    // Other methods reach the guest too; unknown routes are the guest's 404.
    let resp = client()
        .put(format!("{}/fn/hello/echo/", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["method"],
        "PUT"
    );
    assert_eq!(s.get("hello", "/nowhere").await.status(), 404);
    // Without a trailing path the guest sees `/`.
    assert_eq!(
        s.get("hello", "").await.text().await.unwrap(),
        "Hello from slinfer\n"
    );
}

#[tokio::test]
async fn unknown_function_is_404() {
    let s = Server::start();
    let (status, kind, msg) = error_of(s.get("nope", "/").await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found"));
    assert!(msg.contains("nope"), "{msg}");
}

#[tokio::test]
async fn streamed_chunks_arrive_as_they_are_written() {
    let s = Server::start();
    s.deploy(&package("hello"));
    let started = Instant::now();
    let resp = s.get("hello", "/stream?chunks=4&delay_ms=300").await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
        arrivals.push(started.elapsed());
    }
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    );
    // The first chunk came long before the last one was written (900 ms in).
    assert!(arrivals.len() >= 2, "{arrivals:?}");
    assert!(
        *arrivals.last().unwrap() - arrivals[0] >= Duration::from_millis(600),
        "body was buffered, not streamed: {arrivals:?}"
    );
}

#[tokio::test]
async fn invoke_key_guards_a_function() {
    let s = Server::start();
    // `invoke_key` is a top-level key: it goes before the first table.
    let pkg = package_variant("hello", |m| {
        m.replacen("[limits]", "invoke_key = \"sesame\"\n\n[limits]", 1)
    });
    s.deploy(pkg.path());

    let (status, kind, _) = error_of(s.get("hello", "/").await).await;
    assert_eq!((status, kind.as_str()), (401, "unauthorized"));
    let resp = client()
        .get(format!("{}/fn/hello/", s.url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .get(format!("{}/fn/hello/", s.url))
        .bearer_auth("sesame")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The key is never shown back.
    let (_, out, _) = s.cli(&["functions", "show", "hello"]);
    assert!(!out.contains("sesame"), "{out}");
}

#[tokio::test]
async fn cli_invoke_sends_path_data_and_headers() {
    let s = Server::start();
    s.deploy(&package("hello"));
    let (ok, out, err) = s.cli(&[
        "invoke",
        "hello",
        "/echo/x?q=1",
        "--data",
        "payload",
        "-H",
        "X-Test: yes",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["query"], "q=1");
    assert_eq!(v["body"], "payload");
    assert!(out.contains("x-test"), "{out}");
    let (ok, _, err) = s.cli(&["invoke", "hello", "/nowhere"]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
}

/// A component written for `wasmtime serve` — the standard `wasi:http/proxy`
/// world through the `wasip2` crate, no slinfer SDK — runs unchanged.
#[tokio::test]
async fn a_plain_wasi_http_proxy_component_runs_unchanged() {
    let s = Server::start();
    s.deploy(&package("proxy-compat"));
    let resp = s.get("proxy-compat", "/some/path?x=1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap(),
        "plain proxy component saw /some/path?x=1"
    );
}

#[tokio::test]
async fn one_io_thread_still_serves_concurrent_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("data"), &[], &["--io-threads", "1"]);
    s.deploy(&package("hello"));
    // Two slow streams at once on one thread: both finish, whole.
    let (a, b) = tokio::join!(
        s.get("hello", "/stream?chunks=4&delay_ms=100"),
        s.get("hello", "/stream?chunks=4&delay_ms=100")
    );
    let (a, b) = tokio::join!(a.text(), b.text());
    let a = a.unwrap();
    assert_eq!(a.matches("chunk").count(), 4, "{a}");
    assert_eq!(a, b.unwrap());
}
