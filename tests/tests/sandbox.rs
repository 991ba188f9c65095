//! The sandbox: every limit and every misbehaving guest gets a clear error,
//! and the host — and every other function — keeps serving.

use std::time::Duration;

use slinfer_e2e::{
    Server, client, error_of, hello_with_1k_body_limit, metric, package, package_variant,
};

/// The misbehaving fixture deployed next to `hello`.
async fn server_with_fixture(edit: impl FnOnce(String) -> String) -> (Server, tempfile::TempDir) {
    let s = Server::start();
    s.deploy(&package("hello"));
    let pkg = package_variant("misbehaving", edit);
    s.deploy(pkg.path());
    (s, pkg)
}

async fn hello_still_serves(s: &Server) {
    let resp = s.get("hello", "/").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "Hello from slinfer\n");
}

#[tokio::test]
async fn each_misbehaving_guest_is_stopped_with_a_clear_error() {
    let (s, _pkg) = server_with_fixture(|m| m).await;
    let cases = [
        ("/trap", 500, "trap", "trapped"),
        ("/panic", 500, "trap", "trapped"),
        ("/loop", 504, "timeout", "timeout of 1000 ms"),
        (
            "/stack-overflow",
            500,
            "stack_overflow",
            "overflowed its stack",
        ),
        (
            "/shadow-stack-overflow",
            500,
            "trap",
            "out of bounds memory access",
        ),
        (
            "/memory-bomb",
            500,
            "memory_limit",
            "memory limit of 16777216 bytes",
        ),
    ];
    for (path, want_status, want_kind, want_msg) in cases {
        let (status, kind, msg) = error_of(s.get("misbehaving", path).await).await;
        assert_eq!(
            (status, kind.as_str()),
            (want_status, want_kind),
            "{path}: {msg}"
        );
        assert!(msg.contains(want_msg), "{path}: {msg}");
        hello_still_serves(&s).await;
    }
    // The guest's stderr (its panic message) is in the host log, tagged
    // with the function.
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("the fixture panics on purpose")
                && l.contains("function=misbehaving")
                && l.contains("stream=\"stderr\"")),
        "guest stderr not in the host log:\n{log}"
    );
    let m = s.metrics().await;
    for kind in ["trap", "timeout", "stack_overflow", "memory_limit"] {
        assert!(
            metric(
                &m,
                "slinfer_invocation_errors_total",
                &["function=\"misbehaving\"", &format!("kind=\"{kind}\"")]
            ) >= 1.0,
            "no {kind} in metrics:\n{m}"
        );
    }
}

#[tokio::test]
async fn a_spinning_guest_does_not_starve_others() {
    let (s, _pkg) =
        server_with_fixture(|m| m.replace("timeout_ms = 1000", "timeout_ms = 8000")).await;
    // Occupy both cores' worth of workers with spinning guests...
    let spinners: Vec<_> = (0..4).map(|_| s.get("misbehaving", "/loop")).collect();
    let spinning = futures::future::join_all(spinners);
    // ...while hello keeps answering promptly.
    let check = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = std::time::Instant::now();
        hello_still_serves(&s).await;
        t.elapsed()
    };
    let (results, hello_latency) = tokio::join!(spinning, check);
    // Starved, hello would wait for the spinners' 8 s timeout; the bound is
    // loose so a loaded CI machine cannot fail it by accident.
    assert!(
        hello_latency < Duration::from_millis(4000),
        "hello took {hello_latency:?}"
    );
    for r in results {
        assert_eq!(r.status(), 504);
    }
}

#[tokio::test]
async fn concurrency_limit_answers_429_with_retry_after() {
    let (s, _pkg) = server_with_fixture(|m| {
        m.replace("max_concurrency = 8", "max_concurrency = 1\nmax_queue = 0")
            .replace("timeout_ms = 1000", "timeout_ms = 10000")
    })
    .await;
    let slow = s.get("misbehaving", "/sleep?ms=2000");
    let rejected = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.get("misbehaving", "/sleep?ms=1").await
    };
    let (slow, rejected) = tokio::join!(slow, rejected);
    assert_eq!(slow.status(), 200);
    assert_eq!(rejected.headers()["retry-after"], "1");
    let (status, kind, msg) = error_of(rejected).await;
    assert_eq!((status, kind.as_str()), (429, "busy"), "{msg}");
    // Once the slot is free (its instance ends just after its response is
    // handed back), requests run again.
    let mut status = 0;
    for _ in 0..50 {
        status = s.get("misbehaving", "/sleep?ms=1").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_request_queued_past_most_of_its_ttft_slo_is_refused_with_retry_after() {
    // A TTFT SLO of 500 ms: a request waits at most 450 ms for a slot.
    let (s, _pkg) = server_with_fixture(|m| {
        format!(
            "{}\n[slo]\nttft_ms = 500\n",
            m.replace("max_concurrency = 8", "max_concurrency = 1")
                .replace("timeout_ms = 1000", "timeout_ms = 10000")
        )
    })
    .await;
    let slow = s.get("misbehaving", "/sleep?ms=2000");
    let refused = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = std::time::Instant::now();
        (s.get("misbehaving", "/sleep?ms=1").await, t.elapsed())
    };
    let (slow, (refused, waited)) = tokio::join!(slow, refused);
    assert_eq!(slow.status(), 200, "the running request is untouched");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    assert_eq!(refused.headers()["retry-after"], "1");
    let (status, kind, msg) = error_of(refused).await;
    assert_eq!((status, kind.as_str()), (503, "queue_timeout"), "{msg}");
    assert!(msg.contains("within 450 ms"), "{msg}");
    // Once the slot is free, requests run again.
    assert_eq!(s.get("misbehaving", "/sleep?ms=1").await.status(), 200);
}

#[tokio::test]
async fn queued_requests_wait_for_a_slot() {
    let (s, _pkg) =
        server_with_fixture(|m| m.replace("max_concurrency = 8", "max_concurrency = 1")).await;
    let all: Vec<_> = (0..4)
        .map(|_| s.get("misbehaving", "/sleep?ms=100"))
        .collect();
    for r in futures::future::join_all(all).await {
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn request_body_over_the_limit_is_413() {
    let s = Server::start();
    let pkg = hello_with_1k_body_limit();
    s.deploy(pkg.path());
    let big = vec![b'a'; 4096];
    // Declared too large up front.
    let resp = client()
        .post(format!("{}/fn/hello/echo/", s.url))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let (status, kind, msg) = error_of(resp).await;
    assert_eq!((status, kind.as_str()), (413, "request_too_large"), "{msg}");
    assert!(msg.contains("1024"), "{msg}");
    // Streamed without a length: cut while the guest reads it.
    let stream = futures::stream::iter(
        big.chunks(512)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = client()
        .post(format!("{}/fn/hello/echo/", s.url))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let (status, kind, _) = error_of(resp).await;
    assert_eq!((status, kind.as_str()), (413, "request_too_large"));
    // Within the limit is fine.
    let resp = client()
        .post(format!("{}/fn/hello/echo/", s.url))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn response_body_is_cut_at_the_limit() {
    let (s, _pkg) = server_with_fixture(|m| m).await;
    // The fixture's limit is 1 MiB; ask for 8 MiB.
    let resp = s.get("misbehaving", "/large-output?bytes=8388608").await;
    assert_eq!(resp.status(), 200);
    let mut received = 0usize;
    let mut stream = resp.bytes_stream();
    let mut failed = false;
    use futures::StreamExt;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => received += c.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body ended cleanly after {received} bytes");
    assert!(
        received <= 1 << 20,
        "received {received} bytes past the limit"
    );
    // Under the limit the whole body arrives.
    let resp = s.get("misbehaving", "/large-output?bytes=100000").await;
    assert_eq!(resp.bytes().await.unwrap().len(), 100000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "slinfer_invocation_errors_total",
            &["kind=\"response_too_large\""]
        ) >= 1.0,
        "{m}"
    );
    hello_still_serves(&s).await;
}

#[tokio::test]
async fn guests_see_only_what_the_manifest_grants() {
    let (s, _pkg) = server_with_fixture(|m| m).await;
    // Environment: exactly the manifest's variables, no arguments.
    // (The host's own environment has PATH, HOME, ... — none may leak.)
    let env = s.get("misbehaving", "/env").await.text().await.unwrap();
    assert_eq!(env, "VISIBLE=granted by the manifest\nargs=0\n");

    // Filesystem: nothing at all without a grant.
    for path in ["/etc/passwd", "/", "slinfer.toml", "../../admin-token"] {
        let resp = s.get("misbehaving", &format!("/fs-read?path={path}")).await;
        assert_eq!(resp.status(), 403, "{path} was readable");
    }

    // Outbound HTTP: off unless listed — even to the host itself.
    let target = format!("{}/healthz", s.url);
    let resp = s
        .get("misbehaving", &format!("/outbound?url={target}"))
        .await;
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("HttpRequestDenied"));
}

#[tokio::test]
async fn granted_directory_is_read_only_and_confined() {
    let s = Server::start();
    let pkg = package_variant("misbehaving", |m| {
        m.replacen("[limits]", "[files]\ndir = \"assets\"\n\n[limits]", 1)
    });
    std::fs::create_dir(pkg.path().join("assets")).unwrap();
    std::fs::write(pkg.path().join("assets/note.txt"), "inside the grant").unwrap();
    s.deploy(pkg.path());
    let resp = s.get("misbehaving", "/fs-read?path=/assets/note.txt").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "inside the grant");
    for escape in [
        "/assets/../slinfer.toml",
        "/assets/../../current",
        "/etc/passwd",
    ] {
        let resp = s
            .get("misbehaving", &format!("/fs-read?path={escape}"))
            .await;
        assert_eq!(resp.status(), 403, "{escape} escaped the grant");
    }
}

#[tokio::test]
async fn outbound_to_a_listed_host_works() {
    let s = Server::start();
    s.deploy(&package("hello"));
    let authority = s.url.trim_start_matches("http://").to_owned();
    let pkg = package_variant("misbehaving", |m| {
        m.replacen(
            "[limits]",
            &format!("[outbound]\nallowed_hosts = [\"{authority}\"]\n\n[limits]"),
            1,
        )
    });
    s.deploy(pkg.path());
    let resp = s
        .get(
            "misbehaving",
            &format!("/outbound?url=http://{authority}/fn/hello/"),
        )
        .await;
    assert_eq!(resp.text().await.unwrap(), "outbound status 200\n");
}
