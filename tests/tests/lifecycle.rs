//! What survives: restarts, crashes in the middle of a deploy, and load.

use std::time::Duration;

use slinfer_e2e::{Server, client, metric, package, package_variant};

#[tokio::test]
async fn restart_keeps_deployments_without_recompiling() {
    let s = Server::start();
    s.deploy(&package("hello"));
    s.deploy(&package("misbehaving"));
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "slinfer_component_compiles_total", &[]),
        2.0,
        "{m}"
    );

    let s = s.restart();
    assert_eq!(
        s.get("hello", "/").await.text().await.unwrap(),
        "Hello from slinfer\n"
    );
    assert_eq!(s.get("misbehaving", "/sleep?ms=1").await.status(), 200);
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "slinfer_component_compiles_total", &[]),
        0.0,
        "recompiled:\n{m}"
    );
    assert_eq!(
        metric(&m, "slinfer_component_cache_hits_total", &[]),
        2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "slinfer_functions_deployed", &[]), 2.0, "{m}");
}

#[tokio::test]
async fn crash_during_deploy_keeps_the_old_version() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_in(&data, &[]);
    s.deploy(&package("hello"));
    drop(s);

    // This server aborts after the new version is written but before it is
    // made current: the worst moment for a crash.
    let mut s = Server::start_in(&data, &[("SLINFER_CRASH_AT", "deploy-before-commit")]);
    let v2 = package_variant("hello", |m| m.replace("Hello from slinfer", "Version two"));
    let (ok, _, _) = s.cli(&["deploy", v2.path().to_str().unwrap()]);
    assert!(!ok, "the deploy should have died with the server");
    assert!(
        s.wait_exit(Duration::from_secs(10)).is_some(),
        "the server did not crash"
    );

    let s = Server::start_in(&data, &[]);
    assert_eq!(
        s.get("hello", "/").await.text().await.unwrap(),
        "Hello from slinfer\n"
    );
    // The half-deployed version was swept.
    let versions = std::fs::read_dir(data.join("functions/hello/versions"))
        .unwrap()
        .count();
    assert_eq!(versions, 1);
    // And a normal deploy afterwards works.
    s.deploy(v2.path());
    assert_eq!(
        s.get("hello", "/").await.text().await.unwrap(),
        "Version two\n"
    );
}

#[tokio::test]
async fn a_killed_upload_keeps_the_old_version() {
    let s = Server::start();
    s.deploy(&package("hello"));
    // Start an upload that never finishes, then kill the server mid-body.
    let url = format!("{}/v1/functions/hello", s.url);
    let token = s.token.clone();
    let upload = tokio::spawn(async move {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
        tx.unbounded_send(Ok(vec![0x1f, 0x8b, 0x08, 0x00])).unwrap();
        let _keep_open = tx;
        let _ = client()
            .put(url)
            .bearer_auth(token)
            .body(reqwest::Body::wrap_stream(rx))
            .send()
            .await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = s.restart();
    upload.abort();
    assert_eq!(
        s.get("hello", "/").await.text().await.unwrap(),
        "Hello from slinfer\n"
    );
}

#[tokio::test]
async fn a_thousand_concurrent_invocations_lose_nothing() {
    let s = Server::start();
    s.deploy(&package("hello"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let calls = (0..1000).map(|i| {
        let http = http.clone();
        let url = format!("{}/fn/hello/echo/{i}", s.url);
        async move {
            let resp = http.post(url).body(format!("body-{i}")).send().await?;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await?;
            Ok::<_, reqwest::Error>((i, status, v))
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut ok = 0;
    for r in results {
        let (i, status, v) = r.expect("request failed");
        assert_eq!(status, 200, "request {i}: {v}");
        assert_eq!(v["rest"], i.to_string());
        assert_eq!(v["body"], format!("body-{i}"));
        ok += 1;
    }
    assert_eq!(ok, 1000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "slinfer_invocations_total", &["function=\"hello\""]),
        1000.0
    );
    assert_eq!(metric(&m, "slinfer_invocation_errors_total", &[]), 0.0);
}

/// Files below `dir`, relative, sorted (hidden ones included).
fn tree(dir: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn a_crash_during_a_first_deploy_leaves_nothing_and_no_artifact_outlives_its_function() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = Server::start_in(&data, &[("SLINFER_CRASH_AT", "deploy-before-commit")]);
    let (ok, _, _) = s.cli(&["deploy", package("hello").to_str().unwrap()]);
    assert!(!ok, "the deploy should have died with the server");
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
    let s = Server::start_in(&data, &[]);
    let (ok, out, _) = s.cli(&["functions", "ls"]);
    assert!(ok && !out.contains("hello"), "{out}");
    // Neither the version folder nor the compiled artifact survived.
    let left: Vec<String> = tree(&data.join("functions"))
        .into_iter()
        .chain(tree(&data.join("cache")))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A replaced function's artifact goes with its version; a removed
    // function takes its own along.
    s.deploy(&package("hello"));
    let other = package_variant("proxy-compat", |m| {
        m.replace("name = \"proxy-compat\"", "name = \"hello\"")
    });
    s.deploy(other.path());
    assert_eq!(
        tree(&data.join("cache")).len(),
        1,
        "{:?}",
        tree(&data.join("cache"))
    );
    s.deploy(&package("misbehaving"));
    assert_eq!(tree(&data.join("cache")).len(), 2);
    let (ok, _, err) = s.cli(&["functions", "rm", "misbehaving"]);
    assert!(ok, "{err}");
    assert_eq!(tree(&data.join("cache")).len(), 1);
}
