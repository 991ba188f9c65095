//! Text generation from a Wasm function (`slinfer:llm`) on the real default
//! model, over real HTTP: the `chat` example streams Server-Sent Events.

use slinfer_e2e::{Server, client, metric, package, package_variant, parse_sse};

/// Status and `error` of a chat request that the function refuses.
async fn chat_error(s: &Server) -> (u16, String) {
    let resp = client()
        .post(format!("{}/fn/chat/", s.url))
        .body("hi")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap();
    (status, v["error"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn chat_streams_the_same_reply_it_returns_whole() {
    let s = Server::with_models();
    s.deploy(&package("chat"));
    let url = format!("{}/fn/chat/?max_tokens=24&temperature=0", s.url);
    let resp = client()
        .post(&url)
        .body("What is the capital of France?")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (texts, usage) = parse_sse(&resp.text().await.unwrap());
    let usage = usage.expect("no usage event");
    assert!(texts.len() > 1, "the reply came in one piece: {texts:?}");
    let streamed: String = texts.concat();
    assert!(!streamed.trim().is_empty());
    let generated = usage["generated_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&generated), "{usage}");
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() > 10,
        "chat template not applied: {usage}"
    );
    if generated == 24 {
        assert_eq!(usage["finish_reason"], "length");
    }

    // Greedy, each request alone on the server: the same steps and the same
    // arithmetic, so the whole answer equals the streamed one.
    let whole: serde_json::Value = client()
        .post(format!("{url}&stream=false"))
        .body("What is the capital of France?")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whole["text"], streamed);
    assert_eq!(whole["generated_tokens"], generated);

    let models = s.get("chat", "/models").await.text().await.unwrap();
    assert_eq!(models, "smollm2-135m-instruct\n");
}

#[tokio::test]
async fn a_function_not_allowed_the_model_gets_a_clear_error() {
    let s = Server::with_models();
    let pkg = package_variant("chat", |m| {
        m.replace("allowed = [\"smollm2-135m-instruct\"]", "allowed = []")
    });
    s.deploy(pkg.path());
    assert_eq!(
        chat_error(&s).await,
        (
            403,
            "this function may not use model \"smollm2-135m-instruct\"".into()
        )
    );
    assert_eq!(s.get("chat", "/models").await.text().await.unwrap(), "\n");
}

#[tokio::test]
async fn without_models_generation_reports_model_not_found() {
    let s = Server::start();
    s.deploy(&package("chat"));
    assert_eq!(
        chat_error(&s).await,
        (
            404,
            "no model named \"smollm2-135m-instruct\" on this host".into()
        )
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let s = Server::with_models();
    s.deploy(&package("chat"));
    let mut resp = client()
        .post(format!("{}/fn/chat/?max_tokens=400&temperature=0", s.url))
        .body("Write a long story about a lighthouse keeper.")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A few events in, hang up.
    let mut seen = 0;
    while seen < 3 {
        let chunk = resp.chunk().await.unwrap().expect("the stream ended early");
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    let status = |s: &Server| {
        let (ok, out, err) = s.cli(&["status"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    assert_eq!(status(&s)["inference"]["live_requests"], 1);
    drop(resp);
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        last = status(&s);
        let model = &last["inference"]["models"][0];
        if last["inference"]["live_requests"] == 0
            && model["instances"][0]["kv_blocks_in_use"] == 0
            && model["instances"][0]["batch"] == 0
        {
            let m = s.metrics().await;
            assert_eq!(
                metric(&m, "slinfer_llm_requests_total", &["cancelled"]),
                1.0,
                "{m}"
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the sequence was not freed: {last}");
}

/// `serve --devices`: a device this host lacks or a name that is no device
/// stops the server at start with the reason; `none` serves functions and
/// no models.
#[tokio::test]
async fn devices_that_are_not_there_stop_the_server_and_none_serves_no_models() {
    let tmp = tempfile::tempdir().unwrap();
    let serve = |devices: &str| {
        std::process::Command::new(slinfer_e2e::slinfer_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--devices", devices])
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .env("SLINFER_VENV", slinfer_e2e::venv())
            .output()
            .unwrap()
    };
    // No test machine without a GPU has cuda:7; with GPUs, few have eight.
    let out = serve("cpu,cuda:7");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("error: --devices cuda:7: "), "{err}");
    let out = serve("tpu:0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown device \"tpu:0\""), "{err}");

    let s = Server::start_with(
        &tmp.path().join("none"),
        &[("SLINFER_VENV", slinfer_e2e::venv().to_str().unwrap())],
        &["--devices", "none"],
    );
    assert!(
        s.log().contains("inference is off: no devices"),
        "{}",
        s.log()
    );
    s.deploy(&package("chat"));
    let (status, error) = chat_error(&s).await;
    assert_eq!(status, 404, "{error}");
}

/// `serve --cpu-precision` takes f32 or bf16; anything else stops the server
/// at start, naming the choices.
#[test]
fn an_unknown_cpu_precision_stops_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(slinfer_e2e::slinfer_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--cpu-precision", "f16"])
        .arg("--data-dir")
        .arg(tmp.path())
        .env("SLINFER_VENV", slinfer_e2e::venv())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("invalid value 'f16' for '--cpu-precision")
            && err.contains("unknown precision \"f16\" (f32 or bf16)"),
        "{err}"
    );
}

#[tokio::test]
async fn chat_refuses_what_is_not_a_message_or_a_number() {
    let s = Server::start();
    s.deploy(&package("chat"));
    let post = |query: &str, body: Vec<u8>| {
        client()
            .post(format!("{}/fn/chat/{query}", s.url))
            .body(body)
            .send()
    };
    for (query, body, want) in [
        (
            "?max_tokens=abc",
            b"hi".to_vec(),
            "max_tokens=\"abc\" is not a number",
        ),
        (
            "?temperature=warm",
            b"hi".to_vec(),
            "temperature=\"warm\" is not a number",
        ),
        ("?seed=-1", b"hi".to_vec(), "seed=\"-1\" is not a number"),
        ("", Vec::new(), "send the message as the request body"),
        ("", vec![0xff, 0xfe], "the message is not UTF-8 text"),
    ] {
        let r = post(query, body).await.unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let text = r.text().await.unwrap();
        assert!(text.contains(want), "{query}: {text}");
    }
}
