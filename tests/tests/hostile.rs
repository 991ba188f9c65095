//! A hostile but fair client against the real server: half-sent and idle
//! connections, more connections than allowed, a huge prompt, and a caller
//! that hangs up on a non-streamed generation. Each check fails without the
//! mechanism it names.

use std::time::Duration;

use slinfer_e2e::{Server, client, error_of, metric, package, package_variant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server's address (`host:port`).
fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// Whether the server closed `c` (a read returns end of file, or the
/// connection was reset) within `within`.
async fn closed(c: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(within, c.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

#[tokio::test]
async fn half_sent_and_idle_connections_are_closed_after_the_header_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &tmp.path().join("data"),
        &[],
        &["--header-timeout-ms", "500"],
    );
    s.deploy(&package("hello"));
    let mut half = Vec::new();
    for _ in 0..200 {
        let mut c = TcpStream::connect(addr(&s)).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        half.push(c);
    }
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr(&s)).await.unwrap());
    }
    // Meanwhile others are served.
    assert_eq!(
        client()
            .get(format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.get("hello", "/").await.status(), 200);
    // Every one of them is closed once the timeout has passed.
    for c in half.iter_mut().chain(idle.iter_mut()) {
        assert!(
            closed(c, Duration::from_secs(5)).await,
            "a connection was kept open"
        );
    }
    // A keep-alive connection idle after its request is closed too.
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed(&mut c, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_at_once_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("data"), &[], &["--max-connections", "20"]);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr(&s)).await.unwrap());
    }
    // The accept loop counts them as they come in.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(addr(&s)).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_string(&mut answer))
        .await
        .expect("the refused connection hangs")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    drop(held);
    // Room again once they are gone.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(r) = client().get(format!("{}/healthz", s.url)).send().await {
            ok = r.status() == 200;
            if ok {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the server did not take connections again");
    let m = s.metrics().await;
    assert!(
        metric(&m, "slinfer_connections_refused_total", &[]) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_huge_prompt_is_refused_without_tokenizing_it() {
    let s = Server::with_models();
    s.deploy(&package("chat"));
    // 7 MB: more than the model's context could hold whatever it tokenizes
    // to, under chat's 8 MiB body limit.
    let huge = "lorem ipsum dolor sit amet ".repeat(7 << 20 >> 5);
    let resp = client()
        .post(format!("{}/fn/chat/?stream=false", s.url))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: serde_json::Value = resp.json().await.unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("the model's context is 8192"), "{e}");
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "slinfer_llm_requests_total", &["finished"]),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_caller_hanging_up_on_a_whole_answer_frees_its_generation() {
    let s = Server::with_models();
    s.deploy(&package("chat"));
    let url = format!("{}/fn/chat/?stream=false&max_tokens=4000", s.url);
    let call = client()
        .post(url)
        .body("Write a very long story about the sea.")
        .send();
    // Hang up while it generates.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .is_err(),
        "4000 tokens in 3 s?"
    );
    let mut live = 1;
    for _ in 0..100 {
        let r = client()
            .get(format!("{}/v1/status", s.url))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        live = v["inference"]["live_requests"].as_u64().unwrap();
        if live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(live, 0, "the generation goes on after its caller left");
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "slinfer_llm_requests_total", &["cancelled"]),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_function_saturating_the_instance_pool_leaves_room_for_another() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("data"), &[], &["--max-instances", "16"]);
    // Both may use the whole pool on their own.
    let greedy = package_variant("misbehaving", |m| {
        m.replace("timeout_ms = 1000", "timeout_ms = 10000")
            .replace("max_concurrency = 8", "max_concurrency = 16")
    });
    let hello = package_variant("hello", |m| {
        m.replace("max_concurrency = 256", "max_concurrency = 16")
    });
    s.deploy(greedy.path());
    s.deploy(hello.path());
    // 40 requests that each hold an instance for 3 s: more than the pool.
    let slow: Vec<_> = (0..40)
        .map(|_| {
            let url = format!("{}/fn/misbehaving/sleep?ms=3000", s.url);
            tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another function is served while they hold the pool, not after.
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_millis(2000), s.get("hello", "/"))
            .await
            .expect("hello waited for the slow function's instances");
        assert_eq!(r.status(), 200);
    }
    for h in slow {
        assert_eq!(h.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test]
async fn a_caller_that_waits_out_its_ttft_before_generating_is_refused_not_served_late() {
    let s = Server::with_models();
    // One instance at a time and a 1 s TTFT target: the second caller waits
    // for the first to finish before its guest even asks for a generation.
    let chat = package_variant("chat", |m| {
        m.replace("max_concurrency = 64", "max_concurrency = 1")
            .replace("ttft_ms = 5000", "ttft_ms = 1000")
    });
    s.deploy(chat.path());
    let first = {
        let url = format!("{}/fn/chat/?stream=false&max_tokens=300", s.url);
        tokio::spawn(async move {
            client()
                .post(url)
                .body("Tell me a long story.")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = client()
        .post(format!("{}/fn/chat/?stream=false&max_tokens=5", s.url))
        .body("Hi")
        .send()
        .await
        .unwrap();
    // The first is the model's cold start: served, though its load alone
    // takes longer than the target.
    assert_eq!(first.await.unwrap(), 200);
    // The second waited most of its TTFT for the one slot: refused then,
    // before its target passed, not served late.
    assert!(second.headers().contains_key("retry-after"));
    let (status, kind, msg) = error_of(second).await;
    assert_eq!((status, kind.as_str()), (503, "queue_timeout"), "{msg}");
}

/// An archive's entries: path and contents.
type Entries = Vec<(String, Vec<u8>)>;

/// Deploys `archive` as `name`; returns (status, error kind, message).
async fn deploy_archive(s: &Server, name: &str, archive: Vec<u8>) -> (u16, String, String) {
    let resp = client()
        .put(format!("{}/v1/functions/{name}", s.url))
        .bearer_auth(&s.token)
        .body(archive)
        .send()
        .await
        .unwrap();
    slinfer_e2e::error_of(resp).await
}

#[tokio::test]
async fn client_mistakes_in_packages_are_400s_that_say_what_is_wrong() {
    let s = Server::start();
    let wasm = std::fs::read(package("hello").join("hello.wasm")).unwrap();
    let manifest = b"name = \"h\"\ncomponent = \"h.wasm\"\n".to_vec();
    let long = format!("{}.txt", "x".repeat(300));
    let many: Vec<(String, Vec<u8>)> = (0..5000).map(|i| (format!("f/{i}"), Vec::new())).collect();
    let cases: Vec<(&str, Entries, &str, &str)> = vec![
        (
            "a manifest that is not UTF-8",
            vec![
                ("slinfer.toml".into(), vec![0xff, 0xfe, 0x00]),
                ("h.wasm".into(), wasm.clone()),
            ],
            "invalid_package",
            "not UTF-8",
        ),
        (
            "an entry below a file",
            vec![("a".into(), b"x".to_vec()), ("a/b".into(), b"y".to_vec())],
            "invalid_package",
            "\"a/b\" cannot be unpacked",
        ),
        (
            "a name over 255 bytes",
            vec![(long.clone(), b"x".to_vec())],
            "invalid_package",
            "cannot be unpacked",
        ),
        (
            "too many entries",
            many,
            "invalid_package",
            "more than 4096 entries",
        ),
        (
            "the package root granted to the guest",
            vec![
                (
                    "slinfer.toml".into(),
                    [&manifest[..], b"[files]\ndir = \".\"\n"].concat(),
                ),
                ("h.wasm".into(), wasm.clone()),
            ],
            "invalid_manifest",
            "files.dir",
        ),
    ];
    for (what, entries, kind, says) in cases {
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
        let (status, k, msg) = deploy_archive(&s, "h", slinfer_e2e::archive(&refs)).await;
        assert_eq!((status, k.as_str()), (400, kind), "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg}");
    }
    // Nothing was deployed, and the server goes on.
    let (ok, out, _) = s.cli(&["functions", "ls"]);
    assert!(ok && !out.contains("h "), "{out}");
    s.deploy(&package("hello"));
}

#[tokio::test]
async fn small_holes_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("data"), &[], &["--metrics", "admin"]);
    s.deploy(&package("hello"));
    let keyed = package_variant("hello", |m| {
        m.replace("name = \"hello\"", "name = \"keyed\"\ninvoke_key = \"k3y\"")
    });
    s.deploy(keyed.path());
    // The bearer scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = client()
            .get(format!("{}/v1/functions", s.url))
            .header("authorization", format!("{scheme} {}", s.token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
        let r = client()
            .get(format!("{}/fn/keyed/", s.url))
            .header("authorization", format!("{scheme} k3y"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    // /metrics, which names every function, wants the token when asked to.
    let r = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(format!("{}/metrics", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("function=\"keyed\""));
    // hello's /echo holds its largest body, escaped, within its memory.
    let body = vec![1u8; 1 << 20];
    let r = client()
        .post(format!("{}/fn/hello/echo/", s.url))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_trap_tells_the_caller_its_reason_and_the_log_its_backtrace() {
    let s = Server::start();
    s.deploy(&package("misbehaving"));
    let (status, kind, msg) = slinfer_e2e::error_of(s.get("misbehaving", "/trap").await).await;
    assert_eq!((status, kind.as_str()), (500, "trap"));
    assert!(!msg.contains("backtrace"), "{msg}");
    assert!(s.log().contains("wasm backtrace"), "{}", s.log());
}

#[tokio::test]
async fn functions_draw_on_one_host_memory_budget_and_are_told_when_it_is_full() {
    const MIB: f64 = (1 << 20) as f64;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &tmp.path().join("data"),
        &[],
        &["--memory-budget", "512MiB"],
    );
    s.deploy(&package("hello"));
    // One call may hold 300 MiB (its own limit is 400 MiB); two may not.
    let big = package_variant("misbehaving", |m| {
        m.replace("memory_bytes = 16777216", "memory_bytes = 419430400")
            .replace("timeout_ms = 1000", "timeout_ms = 20000")
    });
    s.deploy(big.path());
    let url = format!("{}/fn/misbehaving/hold?mib=300&ms=3000", s.url);
    let first = tokio::spawn(async move {
        let r = client().get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    let mut held = 0.0;
    for _ in 0..100 {
        held = metric(
            &s.metrics().await,
            "slinfer_memory_bytes",
            &["part=\"functions\""],
        );
        if held >= 300.0 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held >= 300.0 * MIB, "the first call holds {held} bytes");
    let second = s.get("misbehaving", "/hold?mib=300&ms=10").await;
    assert!(second.headers().contains_key("retry-after"));
    let (status, kind, msg) = error_of(second).await;
    assert_eq!((status, kind.as_str()), (503, "host_memory_full"), "{msg}");
    assert!(msg.contains("memory budget of 536870912 bytes"), "{msg}");
    // Small calls still fit beside it.
    assert_eq!(s.get("hello", "/").await.status(), 200);
    assert_eq!(
        first.await.unwrap(),
        (200, format!("held {} bytes\n", 300 << 20))
    );
    // Its memory went back with its instance: the same call now succeeds.
    let again = s.get("misbehaving", "/hold?mib=300&ms=10").await;
    assert_eq!(again.status(), 200);
    // The instance ends just after its response is handed back.
    let mut m = s.metrics().await;
    for _ in 0..100 {
        if metric(&m, "slinfer_memory_bytes", &["part=\"functions\""]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = s.metrics().await;
    }
    assert_eq!(
        metric(&m, "slinfer_memory_bytes", &["part=\"functions\""]),
        0.0
    );
    assert_eq!(
        metric(&m, "slinfer_memory_bytes", &["part=\"budget\""]),
        512.0 * MIB
    );
}
