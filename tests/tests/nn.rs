//! `wasi:nn` from Wasm functions on the real server over real HTTP: the
//! `nn-classify` example (SDK) and the `nn-compat` fixture (plain wasi:nn +
//! wasi:http, written for `wasmtime serve -S nn`) against the numpy reference
//! that `scripts/models/make_classifier.py` stored beside the model.

use std::path::PathBuf;

use slinfer_e2e::{Server, client, models_dir, package, package_variant};

const GRAPH: &str = "nn-classifier-v1";

/// The classifier package (`./dev test` builds it into the models dir).
fn graph_dir() -> PathBuf {
    let dir = models_dir().join(GRAPH);
    assert!(
        dir.join("model.toml").is_file(),
        "{} is missing: run `./dev test` (or scripts/models/make_classifier.py)",
        dir.display()
    );
    dir
}

struct Case {
    input: Vec<f32>,
    probabilities: Vec<f32>,
    class: i64,
}

fn reference() -> Vec<Case> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(graph_dir().join("reference.json")).unwrap())
            .unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            input: serde_json::from_value(c["input"].clone()).unwrap(),
            probabilities: serde_json::from_value(c["probabilities"].clone()).unwrap(),
            class: c["class"].as_i64().unwrap(),
        })
        .collect()
}

/// A server whose models dir holds only the classifier (so the LLM room
/// stays off), with `packages` deployed.
fn server(packages: &[&std::path::Path]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(graph_dir(), models.join(GRAPH)).unwrap();
    let s = Server::start_with(
        &tmp.path().join("data"),
        &[],
        &["--models-dir", models.to_str().unwrap()],
    );
    for p in packages {
        s.deploy(p);
    }
    (s, tmp)
}

async fn post(s: &Server, path: &str, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
    let resp = client()
        .post(format!("{}/fn/{path}", s.url))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "{what}: got {got:?}, numpy {want:?}");
    }
}

fn probabilities(v: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value(v["probabilities"].clone()).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[tokio::test]
async fn classify_matches_the_numpy_reference() {
    let (s, _tmp) = server(&[&package("nn-classify")]);
    for case in reference() {
        let text: Vec<String> = case.input.iter().map(|v| v.to_string()).collect();
        let (status, v) = post(&s, "nn-classify/", text.join(" ")).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["graph"], GRAPH);
        assert_eq!(v["output"], "probabilities");
        assert_close(&probabilities(&v), &case.probabilities, 1e-5, "text body");
        assert_eq!(v["class"].as_i64(), Some(case.class), "{v}");
    }
    // Raw f32s give the same answer.
    let case = &reference()[1];
    let resp = client()
        .post(format!("{}/fn/nn-classify/", s.url))
        .header("content-type", "application/octet-stream")
        .body(f32_bytes(&case.input))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_close(&probabilities(&v), &case.probabilities, 1e-5, "binary body");
}

#[tokio::test]
async fn a_plain_wasi_nn_component_runs_unchanged() {
    let (s, _tmp) = server(&[&package("nn-compat")]);
    for case in reference() {
        let resp = client()
            .post(format!("{}/fn/nn-compat/{GRAPH}?input=features", s.url))
            .body(f32_bytes(&case.input))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let got: Vec<f32> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_close(&got, &case.probabilities, 1e-5, "nn-compat");
    }
    let resp = client()
        .post(format!("{}/fn/nn-compat/no-such-graph", s.url))
        .body(f32_bytes(&[0.0; 4]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let text = resp.text().await.unwrap();
    assert!(text.contains("NotFound: wasi:nn: no graph named"), "{text}");
}

#[tokio::test]
async fn unknown_and_not_allowed_graphs_are_refused_clearly() {
    let unknown = package_variant("nn-classify", |m| {
        m.replace("name = \"nn-classify\"", "name = \"nn-unknown\"")
            .replace("GRAPH = \"nn-classifier-v1\"", "GRAPH = \"no-such-graph\"")
            .replace(
                "allowed = [\"nn-classifier-v1\"]",
                "allowed = [\"nn-classifier-v1\", \"no-such-graph\"]",
            )
    });
    let not_allowed = package_variant("nn-classify", |m| {
        m.replace("name = \"nn-classify\"", "name = \"nn-denied\"")
            .replace("allowed = [\"nn-classifier-v1\"]", "allowed = []")
    });
    let (s, _tmp) = server(&[unknown.path(), not_allowed.path()]);
    let (status, v) = post(&s, "nn-unknown/", "1 2 3 4").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("not-found")),
        "{v}"
    );
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("no graph named \"no-such-graph\""), "{msg}");
    assert!(msg.contains(GRAPH), "lists the graphs it may load: {msg}");

    let (status, v) = post(&s, "nn-denied/", "1 2 3 4").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("security")),
        "{v}"
    );
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("not in this function's models.allowed"),
        "{msg}"
    );
}

#[tokio::test]
async fn wrong_shapes_types_and_garbage_graphs_are_invalid_arguments() {
    let (s, _tmp) = server(&[&package("nn-classify")]);
    let (status, v) = post(&s, "nn-classify/", "1 2 3").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid-argument")),
        "{v}"
    );
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("shape [1, 3]") && msg.contains("[1, 4]"),
        "{msg}"
    );

    let (status, v) = post(&s, "nn-classify/?type=i32", "1 2 3 4").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid-argument")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("is I32"), "{v}");

    let (status, v) = post(&s, "nn-classify/?input=pixels", "1 2 3 4").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid-argument")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no input \"pixels\""),
        "{v}"
    );

    let (status, v) = post(
        &s,
        "nn-classify/load?xml_bytes=7&x=1,2,3,4",
        "garbage and more",
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid-encoding")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("not a valid OpenVINO IR"),
        "{v}"
    );

    // The same IR as bytes through `load` gives the reference answer.
    let xml = std::fs::read(graph_dir().join("model.xml")).unwrap();
    let mut body = xml.clone();
    body.extend(std::fs::read(graph_dir().join("model.bin")).unwrap());
    let case = &reference()[2];
    let x: Vec<String> = case.input.iter().map(|v| v.to_string()).collect();
    let (status, v) = post(
        &s,
        &format!("nn-classify/load?xml_bytes={}&x={}", xml.len(), x.join(",")),
        body,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_close(
        &probabilities(&v),
        &case.probabilities,
        1e-5,
        "load from bytes",
    );
}

#[tokio::test]
async fn many_requests_in_a_row_and_at_once_all_succeed() {
    let (s, _tmp) = server(&[&package("nn-classify")]);
    let case = &reference()[0];
    let body: Vec<String> = case.input.iter().map(|v| v.to_string()).collect();
    let body = body.join(" ");
    for _ in 0..100 {
        let (status, v) = post(&s, "nn-classify/", body.clone()).await;
        assert_eq!(status, 200, "{v}");
        assert_close(&probabilities(&v), &case.probabilities, 1e-5, "sequential");
    }
    let all =
        futures::future::join_all((0..32).map(|_| post(&s, "nn-classify/", body.clone()))).await;
    for (status, v) in all {
        assert_eq!(status, 200, "{v}");
        assert_close(&probabilities(&v), &case.probabilities, 1e-5, "concurrent");
    }
    // The graph was compiled once for all of them.
    let log = s.log();
    assert_eq!(log.matches("wasi:nn graph compiled").count(), 1, "{log}");
}

/// `wasmtime serve` (wasmtime-cli 48.0.8, as `scripts/bench-platform.sh`
/// installs it; or `$SLINFER_WASMTIME`), killed on drop.
struct WasmtimeServe(std::process::Child);

impl Drop for WasmtimeServe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_same_component_answers_alike_under_wasmtime_serve() {
    let wasmtime = std::env::var_os("SLINFER_WASMTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| slinfer_e2e::repo_root().join(".cache/tools/bin/wasmtime"));
    if !wasmtime.is_file() {
        eprintln!(
            "SKIPPED: {} is missing (./dev bench installs wasmtime-cli 48.0.8)",
            wasmtime.display()
        );
        return;
    }
    // wasmtime's OpenVINO backend looks for an unversioned libopenvino_c.so
    // on the library path; the wheel ships libopenvino_c.so.<version>.
    let venv = std::env::var_os("SLINFER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| slinfer_e2e::repo_root().join(".venv"));
    let libs = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .flatten()
        .map(|p| p.path().join("site-packages/openvino/libs"))
        .find(|p| p.is_dir())
        .expect("the openvino wheel in the venv");
    let lib = std::fs::read_dir(&libs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("libopenvino_c.so")
        })
        .expect("libopenvino_c in the wheel");
    let link_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&lib, link_dir.path().join("libopenvino_c.so")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let wasm = package("nn-compat").join("nn-compat.wasm");
    let _wasmtime = WasmtimeServe(
        std::process::Command::new(&wasmtime)
            .args(["serve", "-S", "cli", "-S", "nn", "-S"])
            .arg(format!("nn-graph=openvino::{}", graph_dir().display()))
            .arg("--addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg(&wasm)
            .env(
                "LD_LIBRARY_PATH",
                format!("{}:{}", link_dir.path().display(), libs.display()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let wasmtime_url = format!("http://127.0.0.1:{port}");
    let (s, _tmp) = server(&[&package("nn-compat")]);
    let ask = |url: String, x: Vec<u8>| async move {
        for _ in 0..100 {
            if let Ok(resp) = client().post(&url).body(x.clone()).send().await {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap();
                assert_eq!(status, 200, "{url}: {text}");
                return text
                    .split_whitespace()
                    .map(|v| v.parse::<f32>().unwrap())
                    .collect::<Vec<f32>>();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{url} never answered");
    };
    for case in reference() {
        let x = f32_bytes(&case.input);
        let path = format!("/{GRAPH}?input=features");
        let ours = ask(format!("{}/fn/nn-compat{path}", s.url), x.clone()).await;
        let theirs = ask(format!("{wasmtime_url}{path}"), x).await;
        // wasmtime compiles with the CPU plugin's default precision (bf16 on
        // bf16-capable CPUs); slinfer computes tensor models in f32.
        assert_close(&ours, &theirs, 5e-3, "slinfer vs wasmtime serve");
        assert_close(&ours, &case.probabilities, 1e-5, "slinfer vs numpy");
    }
}

#[tokio::test]
async fn tensors_held_on_the_host_count_against_the_memory_limit() {
    let (s, _tmp) = server(&[&package("misbehaving"), &package("nn-classify")]);
    let (status, kind, message) =
        slinfer_e2e::error_of(s.get("misbehaving", "/nn-tensor-bomb").await).await;
    assert_eq!((status, kind.as_str()), (500, "trap"), "{message}");
    assert!(
        message.contains("exceed this function's memory limit of 16777216 bytes"),
        "{message}"
    );
    // The host and other functions carry on.
    let (status, v) = post(&s, "nn-classify/", "1 2 3 4").await;
    assert_eq!(status, 200, "{v}");
}
