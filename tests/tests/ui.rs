//! The dashboard (`/ui`), end to end: the real server over HTTP, and what a
//! user sees in a real browser (Debian's Chromium, driven by
//! `scripts/browser.py` with Playwright). Screenshots are saved under
//! `target/test-artifacts/`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use slinfer_e2e::cluster::get_json;
use slinfer_e2e::{
    Server, client, error_of, free_port, hello_with_1k_body_limit, package, simulate,
};
use slinfer_test_support::{DEFAULT_MODEL, models_dir, repo_root, venv};

/// Where the browser tests leave their screenshots.
fn artifacts() -> PathBuf {
    let dir = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// `scripts/browser.py ARGS`, its stdin and stdout piped.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Browser {
    fn start(args: &[&str]) -> Browser {
        let mut child = Command::new(venv().join("bin/python"))
            .arg(repo_root().join("scripts/browser.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running scripts/browser.py");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Browser {
            child,
            stdin,
            lines,
        }
    }

    /// The next line it prints (it prints nothing else).
    fn line(&mut self) -> String {
        match self.lines.next() {
            Some(line) => line.expect("reading browser.py"),
            None => panic!("browser.py ended early: {:?}", self.child.wait()),
        }
    }

    /// The next line, a JSON report that must say `ok` with no console
    /// errors and no request leaving the page's origin.
    fn report(&mut self) -> Value {
        let line = self.line();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert_eq!(v["ok"], true, "browser check failed: {v}");
        assert_eq!(v["console_errors"], serde_json::json!([]), "{v}");
        assert_eq!(v["foreign"], serde_json::json!([]), "{v}");
        v
    }

    fn finish(mut self) {
        let status = self.child.wait().expect("browser.py exit");
        assert!(status.success(), "browser.py exited with {status}");
    }
}

/// Generations of the default model, back to back on `streams` streams,
/// until `stop` (so an instance is serving while the browser looks).
fn keep_generating(url: &str, streams: usize, stop: Arc<AtomicBool>) {
    for _ in 0..streams {
        let (url, stop) = (url.to_owned(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = client()
                    .post(format!("{url}/fn/chat/?max_tokens=200&temperature=0"))
                    .body("Count from 1 to 200, one number per line.")
                    .send()
                    .await;
                if let Ok(r) = sent {
                    let _ = r.bytes().await;
                } else {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_devices_instances_and_slo_figures_live_and_comes_back_after_a_restart()
{
    let tmp = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let (models, venv) = (models_dir(), venv());
    let mut s = Server::start_with(
        &tmp.path().join("data"),
        &[("SLINFER_VENV", venv.to_str().expect("utf-8"))],
        &[
            "--models-dir",
            models.to_str().expect("utf-8"),
            "--listen",
            &listen,
        ],
    );
    s.deploy(&package("chat"));
    // One generation ends first, so the model has SLO figures.
    let done = client()
        .post(format!("{}/fn/chat/?max_tokens=8&temperature=0", s.url))
        .body("Hello")
        .send()
        .await
        .expect("chat");
    assert_eq!(done.status(), 200);
    done.bytes().await.expect("chat body");
    let stop = Arc::new(AtomicBool::new(false));
    keep_generating(&s.url, 2, stop.clone());

    let shot = artifacts().join("dashboard.png");
    let url = s.url.clone();
    let (mut browser, live) = tokio::task::spawn_blocking(move || {
        let mut b = Browser::start(&[
            "dashboard",
            &url,
            "--model",
            DEFAULT_MODEL,
            "--screenshot",
            shot.to_str().expect("utf-8"),
            "--reconnect",
        ]);
        let live = b.report();
        (b, live)
    })
    .await
    .expect("browser");
    assert_eq!(live["device"], "cpu:0", "{live}");
    assert!(live["batch"].as_u64().unwrap() >= 1, "{live}");
    assert!(live["slo_1m"].as_str().unwrap().ends_with('%'), "{live}");
    assert_ne!(live["ttft_p50"], "–", "{live}");
    assert!(live["updated_to"].as_u64() > live["updated_from"].as_u64());
    assert!(live["charts"].as_u64().unwrap() >= 4, "{live}");

    // The server goes away under the open page, and comes back on the
    // same address with one more function.
    stop.store(true, Ordering::Relaxed);
    let browser = tokio::task::spawn_blocking(move || {
        assert_eq!(browser.line(), "OFFLINE-WAIT");
        s.kill();
        assert_eq!(browser.line(), "OFFLINE");
        let s = s.restart();
        s.deploy(&package("hello"));
        writeln!(browser.stdin, "restarted").expect("telling browser.py");
        let back = browser.report();
        assert_eq!(back["phase"], "reconnected");
        browser
    })
    .await
    .expect("browser");
    browser.finish();
}

#[tokio::test]
async fn the_dashboard_pages_are_built_in_and_unknown_pages_are_404() {
    let s = Server::start();
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = client()
            .get(format!("{}{path}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        assert!(headers["content-type"].to_str().unwrap().starts_with(kind));
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        let body = r.text().await.unwrap();
        for external in ["src=\"http", "href=\"http", "url(http", "@import"] {
            assert!(!body.contains(external), "{path} loads {external}");
        }
    }
    for path in ["/ui/nope", "/ui/api/nope", "/ui/app.js/x"] {
        let r = client()
            .get(format!("{}{path}", s.url))
            .send()
            .await
            .unwrap();
        let (status, kind, msg) = error_of(r).await;
        assert_eq!((status, kind.as_str()), (404, "not_found"), "{path}: {msg}");
        assert!(msg.contains("/ui"), "{msg}");
    }
}

#[tokio::test]
async fn the_dashboard_state_counts_invocations_and_errors_and_follows_metrics_access() {
    let s = Server::start();
    // A function with a 1 KiB body limit: three calls, one refused.
    let pkg = hello_with_1k_body_limit();
    s.deploy(pkg.path());
    for body in [&b"hi"[..], b"there", &[b'a'; 4096]] {
        client()
            .post(format!("{}/fn/hello/echo/", s.url))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
    }
    // An invocation is counted once its instance has finished, which may
    // come just after the caller has the whole response.
    let mut state = get_json(&s, "/ui/api/state").await;
    for _ in 0..50 {
        if state["functions"][0]["invocations"] == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        state = get_json(&s, "/ui/api/state").await;
    }
    // This server's own node comes first (with whatever devices it found).
    assert_eq!(state["nodes"][0]["here"], true, "{state}");
    assert!(state["nodes"][0]["status"]["devices"].is_array(), "{state}");
    let hello = &state["functions"][0];
    assert_eq!(hello["name"], "hello");
    assert_eq!(hello["invocations"], 3, "{hello}");
    assert_eq!(hello["errors"]["request_too_large"], 1, "{hello}");
    assert!(hello["latency_s"][1].as_f64().is_some(), "{hello}");
    let timeline = &state["timeline"];
    let points = timeline["invocations_per_s"].as_array().unwrap();
    assert_eq!(points.len(), 180);
    let sum: f64 = points.iter().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum * 5.0 - 3.0).abs() < 1e-9, "{timeline}");

    // With `--metrics admin`, the state needs the token; the page does not.
    let tmp = tempfile::tempdir().unwrap();
    let locked = Server::start_with(&tmp.path().join("data"), &[], &["--metrics", "admin"]);
    let get = |path: &str, token: Option<&str>| {
        let mut r = client().get(format!("{}{path}", locked.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get("/ui", None).await.unwrap().status(), 200);
    let (status, kind, _) = error_of(get("/ui/api/state", None).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "unauthorized"));
    let (status, kind, _) = error_of(get("/ui/api/state", Some("wrong")).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (403, "forbidden"));
    let r = get("/ui/api/state", Some(&locked.token)).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn the_simulator_report_renders_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    let out = simulate(&[
        "--sweep",
        "--policies",
        "sllm,slinfer",
        "--ks",
        "1,2",
        "--duration-s",
        "120",
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shot = artifacts().join("simulate-report.png");
    let mut b = Browser::start(&[
        "report",
        page.to_str().unwrap(),
        "--screenshot",
        shot.to_str().unwrap(),
    ]);
    let seen = b.report();
    b.finish();
    assert_eq!(seen["title"], "slinfer simulate report");
    assert_eq!(seen["rows"], 4, "{seen}");
    assert_eq!(seen["figures"], 3, "{seen}");
    let captions = seen["captions"].to_string();
    assert!(
        captions.contains("TTFT") || captions.contains("first token"),
        "{captions}"
    );
}
