//! Model packages on a live server: `slinfer models import|ls|show|rm` and
//! `/v1/models`, two models served at once, many functions sharing one
//! loaded model, and the scheduler's state on `/v1/status`, `slinfer status`
//! and `/metrics`. Real server, real importer (openvino-genai), real engine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use slinfer_e2e::{Server, client, error_of, metric, models_dir, package, package_variant, venv};
use slinfer_test_support::reference::{self, Answer, Finish};

const DEFAULT: &str = "smollm2-135m-instruct";
const COPY: &str = "smollm2-copy";
/// What [`reply`] asks.
const QUESTION: &str = "Name a colour.";
/// The wasi:nn classifier `./dev` builds (a tensor package).
const GRAPH: &str = "nn-classifier-v1";

/// A server whose models dir holds the default model and the wasi:nn
/// classifier (linked from the shared one) and nothing else.
fn server() -> (Server, tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for m in [DEFAULT, GRAPH] {
        std::os::unix::fs::symlink(models_dir().join(m), models.join(m)).unwrap();
    }
    let s = Server::start_with(
        &tmp.path().join("data"),
        &[("SLINFER_VENV", venv().to_str().unwrap())],
        &["--models-dir", models.to_str().unwrap()],
    );
    (s, tmp, models)
}

/// Folder names in `dir`, hidden ones included, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A `chat` package named `name` using `model`.
fn chat_on(name: &str, model: &str) -> tempfile::TempDir {
    let (name, model) = (name.to_owned(), model.to_owned());
    package_variant("chat", move |m| {
        m.replace("name = \"chat\"", &format!("name = \"{name}\""))
            .replace(&format!("\"{DEFAULT}\""), &format!("\"{model}\""))
    })
}

/// The greedy reply of function `f` (non-streamed JSON).
async fn reply(s: &Server, f: &str) -> (u16, serde_json::Value) {
    let resp = client()
        .post(format!(
            "{}/fn/{f}/?max_tokens=12&temperature=0&stream=false",
            s.url
        ))
        .body(QUESTION)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn admin_json(s: &Server, path: &str) -> serde_json::Value {
    let resp = client()
        .get(format!("{}{path}", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

fn model_status<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["inference"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
}

#[tokio::test]
async fn import_serve_share_and_remove_models_while_running() {
    let (s, _tmp, models) = server();
    let gguf = models_dir().join(DEFAULT).join("model.gguf");
    let (ok, out, err) = s.cli(&["models", "import", gguf.to_str().unwrap(), "--name", COPY]);
    assert!(ok, "import failed: {out}{err}");
    assert!(
        err.contains("converting with openvino_genai"),
        "no progress: {err}"
    );
    assert_eq!(out.trim(), format!("imported {COPY}"));
    let (ok, ls, _) = s.cli(&["models", "ls"]);
    assert!(ok && ls.contains(DEFAULT) && ls.contains(COPY), "{ls}");
    let graph_row = ls
        .lines()
        .find(|l| l.starts_with(GRAPH))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(graph_row.contains("tensor"), "{graph_row}");
    let listed = admin_json(&s, "/v1/models").await;
    let kinds: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [(DEFAULT, "llm"), (COPY, "llm"), (GRAPH, "tensor")]);
    let (ok, show, _) = s.cli(&["models", "show", COPY]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert!(ok);
    assert_eq!(
        (show["family"].as_str(), show["num_layers"].as_u64()),
        (Some("llama"), Some(30))
    );

    // Two functions on the default model, one on the copy, all at once.
    s.deploy(&package("chat"));
    let b = chat_on("chat-b", DEFAULT);
    s.deploy(b.path());
    let c = chat_on("chat-copy", COPY);
    s.deploy(c.path());
    // Cold starts one at a time (two loads at once would exceed the 5 s
    // TTFT SLO on this CPU: the scheduler would rightly answer overloaded).
    let mut alone = Vec::new();
    for f in ["chat", "chat-copy"] {
        let (code, r) = reply(&s, f).await;
        assert_eq!(code, 200, "{f}: {r}");
        alone.push(r);
    }
    // Same weights, each request alone: the same arithmetic, the same reply.
    assert!(!alone[0]["text"].as_str().unwrap().is_empty());
    assert_eq!(alone[0]["text"], alone[1]["text"]);
    let (ra, rb, rc) = tokio::join!(
        reply(&s, "chat"),
        reply(&s, "chat-b"),
        reply(&s, "chat-copy")
    );
    for (status, r) in [&ra, &rb, &rc] {
        assert_eq!(*status, 200, "{r}");
    }
    // All at once, batched as they arrive: greedy replies up to a near-tie
    // (see slinfer_test_support::reference).
    let answers: Vec<Answer> = [&ra.1, &rb.1, &rc.1]
        .into_iter()
        .map(|r| {
            let finish = match r["finish_reason"].as_str() {
                Some("stop") => Finish::Stop,
                _ => Finish::Length,
            };
            Answer::chat(&[("user", QUESTION)], r["text"].as_str().unwrap())
                .ended(finish, r["generated_tokens"].as_u64().unwrap())
        })
        .collect();
    reference::assert_greedy(&models_dir().join(DEFAULT), "three at once", &answers);

    // The replies are out; the scheduler hears of the ends just after, and
    // no live sequence holds KV then (the ended requests' sequences kept as
    // sources of copies are counted apart, in `kv_blocks_kept`).
    let mut status = admin_json(&s, "/v1/status").await;
    for _ in 0..200 {
        let idle = |name| {
            model_status(&status, name).is_some_and(|m| {
                m["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|i| i["kv_blocks_in_use"] == 0)
            })
        };
        if status["inference"]["live_requests"] == 0 && idle(DEFAULT) && idle(COPY) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        status = admin_json(&s, "/v1/status").await;
    }
    for name in [DEFAULT, COPY] {
        let m = model_status(&status, name).unwrap_or_else(|| panic!("{name}: {status}"));
        let inst = m["instances"].as_array().unwrap();
        // One shared instance per model (kept alive), idle now.
        assert_eq!(inst.len(), 1, "{name}: {m}");
        assert_eq!(inst[0]["device"], "cpu:0");
        assert_eq!(inst[0]["state"], "loaded");
        assert_eq!(inst[0]["batch"], 0);
        assert_eq!(inst[0]["kv_blocks_in_use"], 0);
        assert!(inst[0]["kv_blocks_kept"].is_u64(), "{name}: {m}");
    }
    assert_eq!(status["inference"]["live_requests"], 0);
    let devices = status["inference"]["devices"].as_array().unwrap();
    assert_eq!(devices[0]["name"], "cpu:0", "{status}");
    assert_eq!(devices[0]["backend"], "openvino");
    assert_eq!(devices[0]["kind"], "cpu");
    assert_eq!(devices[0]["failed"], serde_json::Value::Null);
    assert!(devices[0]["committed_bytes"].as_u64().unwrap() > 0);
    let def_status = model_status(&status, DEFAULT).unwrap();
    assert!(
        def_status["footprints"]["cpu"]["weights_bytes"]
            .as_u64()
            .unwrap()
            > 50_000_000
    );
    let (ok, cli_status, err) = s.cli(&["status"]);
    assert!(ok, "{err}");
    let cli_status: serde_json::Value = serde_json::from_str(&cli_status).unwrap();
    assert_eq!(cli_status["functions"], 3);

    let m = s.metrics().await;
    let def = format!("model=\"{DEFAULT}\"");
    let copy = format!("model=\"{COPY}\"");
    assert_eq!(
        metric(&m, "slinfer_llm_instances", &[&def, "cpu:0"]),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "slinfer_llm_cold_starts_total", &[&copy]), 1.0);
    assert_eq!(
        metric(&m, "slinfer_llm_requests_total", &[&def, "finished"]),
        3.0
    );
    assert_eq!(metric(&m, "slinfer_llm_ttft_seconds_count", &[&copy]), 2.0);
    assert_eq!(metric(&m, "slinfer_llm_tpot_seconds_count", &[&copy]), 2.0);
    assert_eq!(metric(&m, "slinfer_llm_slo_total", &[&def]), 3.0);
    assert_eq!(metric(&m, "slinfer_llm_preemptions_total", &[&def]), 0.0);
    // Each model's instance ran on the CPU for its requests' iterations.
    for model in [&def, &copy] {
        let busy = metric(&m, "slinfer_llm_busy_seconds_total", &[model, "cpu:0"]);
        assert!(busy > 0.0 && busy < 600.0, "{model}: {busy}\n{m}");
    }
    assert!(m.contains("slinfer_llm_kv_blocks_committed{"), "{m}");
    assert!(m.contains("slinfer_llm_kv_blocks_planned{"), "{m}");
    assert!(m.contains("slinfer_llm_kv_blocks_kept{"), "{m}");
    assert!(m.contains("slinfer_llm_batch_size{"), "{m}");
    assert!(m.contains("slinfer_llm_queued_requests"), "{m}");
    assert!(metric(&m, "slinfer_llm_device_capacity_bytes", &["cpu:0"]) > 0.0);
    assert!(metric(&m, "slinfer_llm_device_committed_bytes", &["cpu:0"]) > 0.0);
    assert_eq!(metric(&m, "slinfer_llm_device_failed", &["cpu:0"]), 0.0);

    // Removal: the copy stops being served and its package goes; the
    // default model is untouched.
    let (ok, out, err) = s.cli(&["models", "rm", COPY]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        entries(&models),
        vec![GRAPH.to_string(), DEFAULT.to_string()]
    );
    let (code, r) = reply(&s, "chat-copy").await;
    assert_eq!(code, 404, "{r}");
    assert_eq!(
        r["error"],
        format!("no model named \"{COPY}\" on this host")
    );
    assert_eq!(reply(&s, "chat").await.0, 200);
    let (ok, ls, _) = s.cli(&["models", "ls"]);
    assert!(ok && !ls.contains(COPY), "{ls}");
    let status = admin_json(&s, "/v1/status").await;
    assert!(model_status(&status, COPY).is_none(), "{status}");
}

#[tokio::test]
async fn bad_imports_get_clear_errors_and_leave_nothing() {
    let (s, tmp, models) = server();
    let put = |name: &str| {
        client()
            .put(format!("{}/v1/models/{name}", s.url))
            .bearer_auth(&s.token)
    };
    let json = |name: &str, source: &str| put(name).json(&serde_json::json!({ "source": source }));

    let (code, kind, msg) = error_of(json("Bad", "default").send().await.unwrap()).await;
    assert_eq!((code, kind.as_str()), (400, "bad_model_name"), "{msg}");
    let (code, kind, msg) = error_of(json(DEFAULT, "default").send().await.unwrap()).await;
    assert_eq!((code, kind.as_str()), (409, "model_exists"), "{msg}");
    let (code, kind, msg) =
        error_of(json("x", "/nonexistent/model.gguf").send().await.unwrap()).await;
    assert_eq!((code, kind.as_str()), (400, "source_missing"), "{msg}");
    assert!(msg.contains("/nonexistent/model.gguf"), "{msg}");
    let (code, _, msg) = error_of(json("x", "model.gguf").send().await.unwrap()).await;
    assert_eq!(code, 400);
    assert!(msg.contains("absolute"), "{msg}");
    // Sources that are not models are refused before an import starts.
    let (code, kind, msg) = error_of(json("x", "/etc/hostname").send().await.unwrap()).await;
    assert_eq!((code, kind.as_str()), (400, "invalid_source"), "{msg}");
    assert!(msg.contains("not a GGUF file"), "{msg}");
    let (code, kind, msg) = error_of(json("x", "/etc").send().await.unwrap()).await;
    assert_eq!((code, kind.as_str()), (400, "invalid_source"), "{msg}");
    assert!(msg.contains("openvino_model.xml"), "{msg}");
    let (code, kind, msg) = error_of(
        put("x")
            .header("content-type", "application/octet-stream")
            .body(b"PK\x03\x04 a zip, not a model".to_vec())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, kind.as_str()), (400, "invalid_source"), "{msg}");
    let (code, _, msg) = error_of(put("x").body(Vec::new()).send().await.unwrap()).await;
    assert_eq!(code, 400);
    assert!(msg.contains("empty body"), "{msg}");
    let (code, kind, _) = error_of(
        client()
            .put(format!("{}/v1/models/x", s.url))
            .json(&serde_json::json!({"source": "default"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, kind.as_str()), (401, "unauthorized"));

    // A corrupt GGUF: accepted for import, then the importer's error ends
    // the stream; no package, no temporary folder, no upload is left.
    let resp = put("junk")
        .header("content-type", "application/octet-stream")
        .body(b"GGUF but not really a model file".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let last: serde_json::Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(last["error"]["kind"], "import_failed", "{body}");
    assert!(
        last["error"]["message"].as_str().unwrap().len() > 10,
        "{body}"
    );
    assert_eq!(
        entries(&models),
        vec![GRAPH.to_string(), DEFAULT.to_string()]
    );
    assert_eq!(
        entries(&tmp.path().join("data/cache/models")),
        Vec::<String>::new()
    );

    let (code, kind, _) = error_of(
        client()
            .delete(format!("{}/v1/models/nope", s.url))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, kind.as_str()), (404, "model_not_found"));

    let (ok, _, err) = s.cli(&["models", "import", "/nonexistent/file.gguf"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/file.gguf"), "{err}");
    let (ok, _, err) = s.cli(&["models", "rm", "nope"]);
    assert!(!ok && err.contains("not found"), "{err}");
    // A wasi:nn tensor package is not this command's to delete.
    std::fs::create_dir_all(models.join("tiny-graph")).unwrap();
    std::fs::write(
        models.join("tiny-graph/model.toml"),
        "kind = \"tensor\"\nname = \"tiny-graph\"\nformat = \"openvino\"\n[files]\nxml = \"model.xml\"\nweights = \"model.bin\"\n",
    )
    .unwrap();
    for graph in ["tiny-graph", GRAPH] {
        let (ok, _, err) = s.cli(&["models", "rm", graph]);
        assert!(!ok && err.contains("tensor model"), "{graph}: {err}");
        assert!(models.join(graph).join("model.toml").is_file());
    }
    // Nothing was lost: the default model still serves.
    s.deploy(&package("chat"));
    assert_eq!(reply(&s, "chat").await.0, 200);
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[tokio::test]
async fn a_server_killed_during_an_import_leaves_no_importer_and_nothing_half_written() {
    let (mut s, tmp, models) = server();
    let data = tmp.path().join("data");
    let gguf = models_dir().join(DEFAULT).join("model.gguf");
    let import = {
        let url = format!("{}/v1/models/killed", s.url);
        let token = s.token.clone();
        let body = serde_json::json!({ "source": gguf });
        tokio::spawn(async move {
            let _ = client()
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await;
        })
    };
    // Until the importer is converting: its folder is in the models dir.
    let mut converting = false;
    for _ in 0..300 {
        converting = entries(&models)
            .iter()
            .any(|e| e.starts_with(".killed.importing-"));
        if converting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(converting, "the import never started: {}", s.log());
    s.kill();
    import.abort();
    // The importer dies with the server.
    let script = data.join("cache/models/import-killed.py");
    let mut left = processes_with(script.to_str().unwrap());
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = processes_with(script.to_str().unwrap());
    }
    assert!(left.is_empty(), "orphan importer: {left:?}");
    // A restart sweeps what it had written.
    let s = Server::start_with(
        &data,
        &[("SLINFER_VENV", venv().to_str().unwrap())],
        &["--models-dir", models.to_str().unwrap()],
    );
    assert_eq!(entries(&models), [GRAPH, DEFAULT], "{}", s.log());
    assert!(entries(&data.join("cache/models")).is_empty());
}
