//! The `openai-api` example on the real default model: the official `openai`
//! Python client (`tests/openai/test_client.py`, from the project
//! virtualenv) against a real server, and the raw wire format without it.

use std::path::PathBuf;
use std::process::Command;

use slinfer_e2e::{Server, client, package, package_variant, repo_root, venv};
use slinfer_test_support::reference::{self, Answer, Finish};

const MODEL: &str = "smollm2-135m-instruct";

/// The project virtualenv's Python, checked to have the `openai` client.
fn python() -> PathBuf {
    let python = venv().join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import openai: run `./dev test` (it installs requirements.txt)",
        python.display()
    );
    python
}

#[test]
fn the_official_openai_client_works_against_the_function() {
    let python = python();
    let s = Server::with_models();
    s.deploy(&package("openai-api"));
    // The same API, deployed without the model in its manifest.
    let forbidden = package_variant("openai-api", |m| {
        m.replace("name = \"openai-api\"", "name = \"openai-forbidden\"")
            .replace(&format!("allowed = [\"{MODEL}\"]"), "allowed = []")
    });
    s.deploy(forbidden.path());
    let out = Command::new(python)
        .arg(repo_root().join("tests/openai/test_client.py"))
        .arg(format!("{}/fn/openai-api/v1", s.url))
        .arg("--forbidden-url")
        .arg(format!("{}/fn/openai-forbidden/v1", s.url))
        .output()
        .expect("running the openai client script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client checks failed ({}):\n{stdout}{stderr}\n--- server log ---\n{}",
        out.status,
        s.log()
    );
    assert!(stdout.contains("17 checks, 0 failed"), "{stdout}");
}

/// The `data:` payloads of an SSE body, checked to be nothing but
/// `data: ...` events each ended by a blank line.
fn sse_data(body: &str) -> Vec<&str> {
    assert!(body.ends_with("\n\n"), "unterminated event: {body:?}");
    body.split_terminator("\n\n")
        .map(|event| {
            event
                .strip_prefix("data: ")
                .filter(|d| !d.contains('\n'))
                .unwrap_or_else(|| panic!("not a single data line: {event:?}"))
        })
        .collect()
}

#[tokio::test]
async fn streams_are_server_sent_events_ending_with_done() {
    let s = Server::with_models();
    s.deploy(&package("openai-api"));
    let resp = client()
        .post(format!("{}/fn/openai-api/v1/chat/completions", s.url))
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], MODEL);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], serde_json::json!([]));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

/// Status and `error` object of a request's answer.
async fn error_of(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: serde_json::Value = resp.json().await.unwrap();
    let e = v["error"].clone();
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "no error.{key} in {v}");
    }
    (status, e)
}

#[tokio::test]
async fn errors_come_back_in_openai_format() {
    // No models: nothing is generated, so the errors come without inference.
    let s = Server::start();
    s.deploy(&package("openai-api"));
    let base = format!("{}/fn/openai-api/v1", s.url);
    let post = |path: &str, body: &'static str| {
        client()
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let (status, e) = error_of(post("/chat/completions", "{\"model\": ").await.unwrap()).await;
    assert_eq!(
        (status, e["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("could not parse the JSON body"),
        "{e}"
    );

    let (status, e) = error_of(post("/completions", "[1, 2]").await.unwrap()).await;
    assert_eq!(
        (status, e["type"].as_str()),
        (400, Some("invalid_request_error"))
    );

    let (status, e) = error_of(post("/completions", "{\"prompt\": \"x\"}").await.unwrap()).await;
    assert_eq!(
        (status, &e["param"], &e["code"]),
        (400, &"model".into(), &"missing_required_parameter".into())
    );

    // The model is in the API's catalog but not on this host.
    let body = "{\"model\": \"smollm2-135m-instruct\", \"prompt\": \"x\"}";
    let (status, e) = error_of(post("/completions", body).await.unwrap()).await;
    assert_eq!((status, &e["code"]), (404, &"model_not_found".into()));

    let (status, e) = error_of(
        client()
            .get(format!("{base}/chat/completions"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(e["message"], "Invalid URL (GET /v1/chat/completions)");

    let models: serde_json::Value = client()
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models, serde_json::json!({"object": "list", "data": []}));
}

#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let s = Server::with_models();
    // A 50 ms first-token target that a burst cannot all meet. Half the
    // requests stream: refused before the first token, they get the status too.
    let pkg = package_variant("openai-api", |m| {
        m.replace("ttft_ms = 5000", "ttft_ms = 50")
            .replace("tpot_ms = 500", "tpot_ms = 200")
    });
    s.deploy(pkg.path());
    let url = format!("{}/fn/openai-api/v1/completions", s.url);
    let request = |i: usize, max_tokens: u32| {
        client()
            .post(&url)
            .json(&serde_json::json!({
                "model": MODEL,
                "prompt": format!("Count to ten: {i}"),
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": i % 2 == 1,
            }))
            .send()
    };
    // A loaded instance first, so admission is about the burst.
    assert_eq!(request(0, 2).await.unwrap().status(), 200);
    let answers = futures::future::join_all((0..24).map(|i| request(i, 8))).await;
    let (mut ok, mut overloaded) = (0, 0);
    for resp in answers {
        let resp = resp.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                let retry_after: u32 = resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry_after >= 1);
                let (_, e) = error_of(resp).await;
                assert_eq!(
                    (&e["type"], &e["code"]),
                    (&"rate_limit_error".into(), &"overloaded".into())
                );
                overloaded += 1;
            }
            status => panic!("unexpected {status}: {}", resp.text().await.unwrap()),
        }
    }
    eprintln!("overload: {ok} finished, {overloaded} overloaded");
    assert!(overloaded >= 1, "{ok} finished, none overloaded");
}

/// A greedy `/v1/completions` answer: its text, completion tokens and
/// finish reason.
async fn complete(s: &Server, prompt: &str, tokens: usize) -> (String, u64, Finish) {
    let v: serde_json::Value = client()
        .post(format!("{}/fn/openai-api/v1/completions", s.url))
        .json(&serde_json::json!({
            "model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    let finish = match v["choices"][0]["finish_reason"].as_str() {
        Some("stop") => Finish::Stop,
        Some("length") => Finish::Length,
        other => panic!("finish_reason {other:?}: {v}"),
    };
    (
        text.to_owned(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        finish,
    )
}

#[tokio::test]
async fn greedy_answers_from_a_function_equal_genai_alone_and_stay_greedy_four_at_once() {
    const TOKENS: usize = 32;
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, 123 + 4567 =",
        "The three primary colours are",
    ];
    let model = slinfer_e2e::models_dir().join(MODEL);
    let reference = reference::generate(&model, &prompts, TOKENS);
    let s = Server::with_models();
    s.deploy(&package("openai-api"));
    // One at a time: like for like with LLMPipeline (one sequence per step,
    // the same graph and kernels), so the same text and count on any CPU.
    for r in &reference {
        let (text, n, _) = complete(&s, &r.prompt, TOKENS).await;
        assert_eq!(text, r.text, "{}", r.prompt);
        assert_eq!(n as usize, r.eos_at, "{}", r.prompt);
    }
    // Four at once: the scheduler batches them as they arrive, in batches
    // GenAI never forms, and batched kernels may flip a near-tie. Each
    // answer must be greedy up to a near-tie.
    let outs =
        futures::future::join_all(reference.iter().map(|r| complete(&s, &r.prompt, TOKENS))).await;
    let answers: Vec<Answer> = reference
        .iter()
        .zip(outs)
        .map(|(r, (text, n, finish))| Answer::text(&r.prompt, &text).ended(finish, n))
        .collect();
    reference::assert_greedy(&model, "four at once through the function", &answers);
}

/// KV blocks the server's instances hold now.
async fn kv_blocks_in_use(s: &Server) -> u64 {
    let status = slinfer_e2e::cluster::get_json(s, "/v1/status").await;
    status["inference"]["models"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["kv_blocks_in_use"].as_u64())
        .sum()
}

/// KV blocks in use while a streamed request of `n` choices of a long
/// prompt runs (read after its first chunks).
async fn blocks_while_streaming(s: &Server, n: u32) -> u64 {
    use futures::StreamExt;
    let resp = client()
        .post(format!("{}/fn/openai-api/v1/completions", s.url))
        .json(&serde_json::json!({
            "model": MODEL,
            "prompt": "The lighthouse keeper counted the waves. ".repeat(60),
            "max_tokens": 400,
            "temperature": 1,
            "seed": 5,
            "ignore_eos": true,
            "n": n,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 4 * n as usize {
        let chunk = body.next().await.expect("more chunks").unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    let blocks = kv_blocks_in_use(s).await;
    drop(body);
    blocks
}

#[tokio::test]
async fn four_choices_hold_their_prompts_kv_once() {
    let s = Server::with_models();
    s.deploy(&package("openai-api"));
    let one = blocks_while_streaming(&s, 1).await;
    let ok = slinfer_e2e::wait_for(std::time::Duration::from_secs(20), || async {
        kv_blocks_in_use(&s).await == 0
    })
    .await;
    assert!(ok.is_some(), "the first request's KV was not freed");
    let four = blocks_while_streaming(&s, 4).await;
    println!("KV blocks in use: one choice {one}, four choices {four}");
    // Unshared, four choices would hold four prompts' blocks (about
    // 4 × one); shared, one prompt and each choice's own last block and
    // tokens, which grow while the status is read (30 against 14 on a slow
    // 2-core AMD EPYC).
    assert!(one > 4 && four < 3 * one, "one {one}, four {four}");
}
