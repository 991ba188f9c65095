//! Deploying, replacing, listing, showing and removing functions, the admin
//! token, and every kind of bad package — against the real server.

use slinfer_e2e::{Server, archive, client, error_of, package, package_variant};

const MANIFEST: &[u8] = b"name = \"bad\"\ncomponent = \"f.wasm\"\n";

#[tokio::test]
async fn deploy_list_show_replace_and_remove() {
    let s = Server::start();
    s.deploy(&package("hello"));

    let resp = s.get("hello", "/").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "Hello from slinfer\n");

    let (ok, out, _) = s.cli(&["functions", "ls"]);
    assert!(ok);
    assert!(out.contains("hello"), "{out}");

    let (ok, out, _) = s.cli(&["functions", "show", "hello"]);
    assert!(ok);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["name"], "hello");
    assert_eq!(info["digest"].as_str().unwrap().len(), 64);
    assert!(info["deployed_at_unix_s"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(info["limits"]["memory_bytes"], 33554432);
    assert_eq!(info["manifest"]["env"]["GREETING"], "Hello from slinfer");

    // Replace: same name, new manifest (new greeting) — the new version serves.
    let v2 = package_variant("hello", |m| m.replace("Hello from slinfer", "Version two"));
    s.deploy(v2.path());
    assert_eq!(
        s.get("hello", "/").await.text().await.unwrap(),
        "Version two\n"
    );

    let (ok, _, _) = s.cli(&["functions", "rm", "hello"]);
    assert!(ok);
    let (status, kind, msg) = error_of(s.get("hello", "/").await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found"), "{msg}");
    let (ok, _, err) = s.cli(&["functions", "rm", "hello"]);
    assert!(!ok);
    assert!(err.contains("no function named"), "{err}");
    let (_, out, _) = s.cli(&["functions", "ls"]);
    assert!(!out.contains("hello"), "{out}");
}

#[tokio::test]
async fn admin_routes_refuse_missing_or_wrong_token() {
    let s = Server::start();
    let http = client();
    let body = archive(&[("slinfer.toml", MANIFEST)]);
    for (method, path) in [
        ("PUT", "/v1/functions/x"),
        ("DELETE", "/v1/functions/x"),
        ("GET", "/v1/functions"),
        ("GET", "/v1/functions/x"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for (token, want) in [
            (None, (401, "unauthorized")),
            (Some("not-the-token"), (403, "forbidden")),
        ] {
            let mut req = http
                .request(m.clone(), format!("{}{path}", s.url))
                .body(body.clone());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let (status, kind, _) = error_of(req.send().await.unwrap()).await;
            assert_eq!(
                (status, kind.as_str()),
                want,
                "{method} {path} with {token:?}"
            );
        }
    }
    // Nothing was deployed by the refused requests.
    let resp = http
        .get(format!("{}/v1/functions", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!([])
    );
    // The token file is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.data_dir.join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "admin token readable by others: {mode:o}");
}

/// Each bad package is refused with a message naming the problem, and the
/// function deployed before keeps serving.
#[tokio::test]
async fn bad_packages_are_refused_and_lose_nothing() {
    let s = Server::start();
    let good = package_variant("hello", |m| m.replace("name = \"hello\"", "name = \"bad\""));
    s.deploy(good.path());

    let core_module: &[u8] = b"\0asm\x01\0\0\0";
    let empty_component: &[u8] = b"\0asm\x0d\0\x01\0";
    let hello_wasm = std::fs::read(package("hello").join("hello.wasm")).unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "bad",
            archive(&[("slinfer.toml", MANIFEST), ("f.wasm", b"hello world")]),
            400,
            "invalid_component",
            "not WebAssembly",
        ),
        (
            "bad",
            archive(&[("slinfer.toml", MANIFEST), ("f.wasm", core_module)]),
            400,
            "invalid_component",
            "core WebAssembly module, not a component",
        ),
        (
            "bad",
            archive(&[("slinfer.toml", MANIFEST), ("f.wasm", empty_component)]),
            400,
            "invalid_component",
            "does not export wasi:http/incoming-handler",
        ),
        (
            "bad",
            archive(&[
                (
                    "slinfer.toml",
                    b"name = \"bad\"\ncomponent = \"f.wasm\"\n[limits]\nmemory_bytes = \"lots\"\n",
                ),
                ("f.wasm", &hello_wasm),
            ]),
            400,
            "invalid_manifest",
            "memory_bytes",
        ),
        (
            "bad",
            archive(&[
                ("slinfer.toml", b"name = \"bad\"\n"),
                ("f.wasm", &hello_wasm),
            ]),
            400,
            "invalid_manifest",
            "component",
        ),
        (
            "bad",
            archive(&[("f.wasm", &hello_wasm)]),
            400,
            "invalid_package",
            "no slinfer.toml",
        ),
        (
            "bad",
            archive(&[("slinfer.toml", MANIFEST)]),
            400,
            "invalid_package",
            "not in the package",
        ),
        (
            "bad",
            b"not an archive at all".to_vec(),
            400,
            "invalid_package",
            "not a gzip'd tar archive",
        ),
        (
            "other",
            archive(&[("slinfer.toml", MANIFEST), ("f.wasm", &hello_wasm)]),
            400,
            "invalid_name",
            "uploaded as \"other\"",
        ),
        (
            "Bad..Name",
            archive(&[("slinfer.toml", MANIFEST), ("f.wasm", &hello_wasm)]),
            400,
            "invalid_name",
            "invalid function name",
        ),
        (
            "bad",
            vec![0u8; (64 << 20) + 1],
            413,
            "package_too_large",
            "larger than the limit",
        ),
    ];
    for (name, body, want_status, want_kind, want_msg) in cases {
        let (status, kind, msg) = error_of(s.upload(name, body).await).await;
        assert_eq!(
            (status, kind.as_str()),
            (want_status, want_kind),
            "{want_msg}: {msg}"
        );
        assert!(msg.contains(want_msg), "expected {want_msg:?} in {msg:?}");
        let resp = s.get("bad", "/").await;
        assert_eq!(
            resp.status(),
            200,
            "the old version stopped serving after: {want_msg}"
        );
    }
    // Path tricks in the URL never reach the store.
    let resp = client()
        .put(format!("{}/v1/functions/..%2Fescape", s.url))
        .bearer_auth(&s.token)
        .body(archive(&[("slinfer.toml", MANIFEST)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(!s.data_dir.join("escape").exists());
    assert!(!s.data_dir.join("functions/../escape").exists());
}

/// The CLI checks the package before it uploads.
#[tokio::test]
async fn cli_reports_a_bad_package_directory() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = s.cli(&["deploy", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("no slinfer.toml"), "{err}");
    std::fs::write(
        dir.path().join("slinfer.toml"),
        "name = \"x\"\ncomponent = \"missing.wasm\"\n",
    )
    .unwrap();
    let (ok, _, err) = s.cli(&["deploy", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("missing.wasm"), "{err}");
}

#[tokio::test]
async fn admin_token_file_replaces_the_generated_token() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "my-own-token\n").unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_with(
        &data,
        &[],
        &["--admin-token-file", token_file.to_str().unwrap()],
    );
    assert_eq!(s.token, "my-own-token");
    assert!(
        !data.join("admin-token").exists(),
        "a token was generated anyway"
    );
    s.deploy(&package("hello"));
    let resp = client()
        .delete(format!("{}/v1/functions/hello", s.url))
        .bearer_auth("some-other-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn a_generated_token_is_printed_once_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = std::process::Command::new(slinfer_e2e::slinfer_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-token-file",
            "/nonexistent/token",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("reading admin token file /nonexistent/token")
    );
    let first = Server::start_in(&data, &[]);
    assert_eq!(first.printed_token.as_deref(), Some(first.token.as_str()));
    let token = first.token.clone();
    drop(first);
    let second = Server::start_in(&data, &[]);
    assert_eq!(second.token, token, "the token changed across restarts");
    assert_eq!(second.printed_token, None, "the token was printed again");
}
