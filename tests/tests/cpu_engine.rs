//! `serve --cpu-engine`: the llama.cpp engine serving the default model end
//! to end (its greedy answer is llama.cpp's own), the two engines paired,
//! `auto` measuring both engines at start and serving with the faster (or
//! the pair), and clear refusals.
//!
//! Needs what `./dev test` installs: the imported model, the project
//! virtualenv, node and the npm install of node-llama-cpp
//! (`scripts/llama-cpp`).

use std::path::PathBuf;
use std::process::Command;

use slinfer_e2e::{
    Server, assert_picks_a_colour, client, models_dir, openai_post, package, parse_sse, repo_root,
    venv,
};

const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

fn llama_cpp_dir() -> PathBuf {
    std::env::var_os("SLINFER_LLAMA_CPP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo_root()
                .join("scripts/llama-cpp/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64")
        })
}

/// A server with the imported models, the CPU engine `engine` and `args`
/// (and the folder its data lives in while the test runs).
fn serve(engine: &str, args: &[&str]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = llama_cpp_dir();
    let s = Server::start_with(
        &tmp.path().join("data"),
        &[
            ("SLINFER_VENV", venv().to_str().unwrap()),
            ("SLINFER_CPU_ENGINE", engine),
            ("SLINFER_LLAMA_CPP_DIR", dir.to_str().unwrap()),
        ],
        &[&["--models-dir", models_dir().to_str().unwrap()], args].concat(),
    );
    (s, tmp)
}

async fn status(s: &Server) -> serde_json::Value {
    slinfer_e2e::cluster::get_json(s, "/v1/status").await
}

/// The CPU device's engine, once the scheduler's first snapshot is out.
async fn backend(s: &Server) -> String {
    for _ in 0..100 {
        let v = status(s).await;
        if let Some(b) = v["inference"]["devices"][0]["backend"].as_str() {
            return b.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no CPU device: {}", status(s).await)
}

/// The text of the `data:` events of a `chat` reply.
fn sse_text(body: &str) -> String {
    parse_sse(body).0.concat()
}

/// The text `chat` gives the model for `question` (the chat template).
fn chat_prompt(question: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
}

/// OpenVINO GenAI's greedy continuation of `text` (scripts/models/reference.py).
fn openvino_reference(text: &str, tokens: usize) -> String {
    let mut child = Command::new(venv().join("bin/python"))
        .arg(repo_root().join("scripts/models/reference.py"))
        .arg("generate")
        .arg(models_dir().join(DEFAULT_MODEL))
        .arg(tokens.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/models/reference.py");
    let prompts = serde_json::to_vec(&[text]).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &prompts).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["text"].as_str().unwrap().to_owned()
}

/// llama.cpp's own greedy continuation of `text` (tokenized by llama.cpp).
fn llama_cpp_reference(text: &str, tokens: usize) -> String {
    let out = Command::new("node")
        .arg(repo_root().join("scripts/llama-cpp/reference.mjs"))
        .arg(models_dir().join(DEFAULT_MODEL).join("model.gguf"))
        .arg(tokens.to_string())
        .args(["--text", text])
        .output()
        .expect("node scripts/llama-cpp/reference.mjs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn llama_cpp_serves_chat_as_llama_cpp_answers_and_every_openai_feature() {
    // One thread per step: the answer is the same, and these tests share
    // the cores with others.
    let (s, _tmp) = serve("llama-cpp", &["--llama-cpp-threads", "1"]);
    assert_eq!(backend(&s).await, "llama.cpp");
    assert!(
        s.log().contains("llama.cpp engine loaded") && s.log().contains("threads=1"),
        "{}",
        s.log()
    );
    s.deploy(&package("chat"));
    s.deploy(&package("openai-api"));

    // Greedy through HTTP, `chat`, the scheduler and the engine: the text
    // llama.cpp itself writes after the same chat prompt (the model's
    // template with its default system message).
    let question = "What is the capital of France?";
    let resp = client()
        .post(format!("{}/fn/chat/?max_tokens=24&temperature=0", s.url))
        .body(question)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = sse_text(&resp.text().await.unwrap());
    assert_eq!(got, llama_cpp_reference(&chat_prompt(question), 24));

    // Several choices (their prompt's KV forked), a constraint, and
    // embeddings: every path of the engine contract.
    let (status, v) = openai_post(
        &s.url,
        "chat/completions",
        serde_json::json!({
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Name a fruit."}],
            "max_tokens": 8,
            "n": 3,
            "temperature": 1.0,
            "seed": 7,
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(3), "{v}");
    assert_picks_a_colour(&s.url, DEFAULT_MODEL).await;
    let (status, v) = openai_post(
        &s.url,
        "embeddings",
        serde_json::json!({"model": DEFAULT_MODEL, "input": ["one", "two", "one"]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let vecs: Vec<Vec<f64>> = (0..3)
        .map(|i| {
            v["data"][i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vecs[0].len(), 576);
    assert!(vecs[0].iter().all(|x| x.is_finite()));
    let cos = |a: &[f64], b: &[f64]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    assert!(cos(&vecs[0], &vecs[2]) > 0.999, "the same input twice");
    assert!(cos(&vecs[0], &vecs[1]) < 0.999, "different inputs");
}

/// `--cpu-engine paired --paired-from 2`: one request decodes on llama.cpp,
/// so its greedy answer is llama.cpp's; several at once move the instance
/// to OpenVINO and every one of them is answered; alone again, llama.cpp.
#[tokio::test]
async fn paired_serves_one_stream_on_llama_cpp_and_several_on_openvino() {
    let (s, _tmp) = serve(
        "paired",
        &["--llama-cpp-threads", "1", "--paired-from", "2"],
    );
    assert_eq!(backend(&s).await, "llama.cpp+openvino");
    s.deploy(&package("chat"));
    let ask = |question: String, tokens: usize| {
        let url = format!("{}/fn/chat/?max_tokens={tokens}&temperature=0", s.url);
        async move {
            let resp = client().post(url).body(question).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            sse_text(&resp.text().await.unwrap())
        }
    };
    let question = "What is the capital of France?";
    let got = ask(question.into(), 24).await;
    let reference = llama_cpp_reference(&chat_prompt(question), 24);
    assert_eq!(got, reference);

    let answers =
        futures::future::join_all((0..4).map(|i| ask(format!("Name a city ({i})."), 32))).await;
    for (i, a) in answers.iter().enumerate() {
        assert!(!a.trim().is_empty(), "answer {i} is empty");
    }
    assert!(
        s.log().contains("paired instance: steps move to openvino"),
        "{}",
        s.log()
    );
    // Every live sequence's KV is given back, on whichever engine it ended
    // (the ended requests' sequences kept as sources of copies are counted
    // apart, in `kv_blocks_kept`).
    let mut freed = serde_json::Value::Null;
    for _ in 0..200 {
        freed = status(&s).await;
        let instance = &freed["inference"]["models"][0]["instances"][0];
        if instance["kv_blocks_in_use"] == 0 && instance["batch"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let instance = &freed["inference"]["models"][0]["instances"][0];
    assert_eq!(instance["kv_blocks_in_use"], 0, "KV still held: {freed}");

    // Alone again: back on llama.cpp, with llama.cpp's answer.
    assert_eq!(ask(question.into(), 24).await, reference);
    assert!(
        s.log().contains("paired instance: steps move to llama.cpp"),
        "{}",
        s.log()
    );
}

/// The value of `key` in a log line of `key=value` fields (quotes dropped).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len()
        + 2;
    let rest = &line[at..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap(),
        None => rest.split(' ').next().unwrap(),
    }
}

/// The served tok/s at one to eight sequences a start-up line gives for
/// `engine`.
fn served(line: &str, engine: &str) -> Vec<f64> {
    let v: Vec<f64> = field(line, &format!("{engine}_served"))
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 8, "{line}");
    assert!(v.iter().all(|&x| x > 0.0), "{line}");
    v
}

/// `paired_from` of a start-up line is where the engine of `many` serves
/// every larger batch at least as fast as that of `few` and the batch
/// before it slower (to the 0.1 tok/s the log rounds to), or 8.
fn check_switch(line: &str, few: &str, many: &str) {
    let from: usize = field(line, "paired_from").parse().unwrap();
    assert!((2..=8).contains(&from), "{line}");
    let (f, m) = (served(line, few), served(line, many));
    let faster = |k: usize| m[k - 1] >= f[k - 1] - 0.1;
    if from < 8 {
        assert!((from..=8).all(faster), "{line}");
    }
    assert!(
        from == 2 || m[from - 2] < f[from - 2] + 0.1 || from == 8,
        "{line}"
    );
}

#[tokio::test]
async fn auto_measures_both_engines_and_serves_with_the_faster() {
    let (s, _tmp) = serve("auto", &[]);
    let found = backend(&s).await;
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("CPU engine chosen by measured tok/s"))
        .unwrap_or_else(|| panic!("no measurement in the log:\n{log}"));
    let figure = |key: &str| -> f64 { field(line, key).parse().unwrap() };
    let (o1, o8) = (figure("openvino_one"), figure("openvino_batched"));
    let (l1, l8) = (figure("llama_cpp_one"), figure("llama_cpp_batched"));
    assert!(o1 > 0.0 && o8 > 0.0 && l1 > 0.0 && l8 > 0.0, "{line}");
    // The batched figure is the served one at eight.
    assert_eq!(served(line, "openvino")[7], o8, "{line}");
    assert_eq!(served(line, "llama_cpp")[7], l8, "{line}");
    // Faster at both: that one; each faster at one: the two paired, the
    // one faster at one sequence first, switching where measured.
    let faster = match (l1 > o1, l8 > o8) {
        (true, false) => "llama.cpp+openvino",
        (false, true) => "openvino+llama.cpp",
        _ if (l1 * l8).sqrt() > (o1 * o8).sqrt() => "llama.cpp",
        _ => "openvino",
    };
    assert_eq!(found, faster, "{line}");
    assert!(line.contains(&format!("chosen=\"{faster}\"")), "{line}");
    match faster {
        "llama.cpp+openvino" => check_switch(line, "llama_cpp", "openvino"),
        "openvino+llama.cpp" => check_switch(line, "openvino", "llama_cpp"),
        _ => assert_eq!(field(line, "paired_from"), "-", "{line}"),
    }
}

/// `--cpu-engine paired` without `--paired-from` measures both engines at
/// start and switches where OpenVINO serves faster; a lone request with a
/// long prompt is answered by the engine on which its prefill and a chat
/// answer (128 steps) cost least by those figures.
#[tokio::test]
async fn paired_switches_where_the_engines_measure() {
    let (s, _tmp) = serve("paired", &[]);
    assert_eq!(backend(&s).await, "llama.cpp+openvino");
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("paired CPU engines switch where measured"))
        .unwrap_or_else(|| panic!("no measurement in the log:\n{log}"))
        .to_owned();
    check_switch(&line, "llama_cpp", "openvino");

    s.deploy(&package("chat"));
    let question = format!(
        "Summarise this in one line: {}",
        "The river runs past the old mill and under the stone bridge. ".repeat(30)
    );
    let url = format!("{}/fn/chat/?max_tokens=16&temperature=0", s.url);
    let resp = client()
        .post(url)
        .body(question.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (texts, usage) = parse_sse(&resp.text().await.unwrap());
    let usage = usage.expect("no usage event");
    let prompt_tokens = usage["prompt_tokens"].as_f64().unwrap();
    assert!(prompt_tokens > 400.0, "{usage}");
    let figure = |key: &str| -> f64 { field(&line, key).parse().unwrap() };
    let cost = |engine: &str| {
        prompt_tokens / figure(&format!("{engine}_prefill"))
            + 128.0 / figure(&format!("{engine}_one"))
    };
    let (on_openvino, on_llama_cpp) = (cost("openvino"), cost("llama_cpp"));
    let prompt = chat_prompt(&question);
    let got = texts.concat();
    let (openvino, llama_cpp) = (
        openvino_reference(&prompt, 16),
        llama_cpp_reference(&prompt, 16),
    );
    // The log rounds the figures: a near tie may go either way.
    if (on_openvino / on_llama_cpp - 1.0).abs() < 0.02 {
        assert!(got == openvino || got == llama_cpp, "{got:?} {line}");
    } else if on_openvino < on_llama_cpp {
        assert_eq!(got, openvino, "{line}");
    } else {
        assert_eq!(got, llama_cpp, "{line}");
    }
}

#[tokio::test]
async fn auto_without_llama_cpp_serves_with_openvino() {
    let empty = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &tmp.path().join("data"),
        &[
            ("SLINFER_VENV", venv().to_str().unwrap()),
            ("SLINFER_CPU_ENGINE", "auto"),
            ("SLINFER_LLAMA_CPP_DIR", empty.path().to_str().unwrap()),
        ],
        &["--models-dir", models_dir().to_str().unwrap()],
    );
    assert_eq!(backend(&s).await, "openvino");
    assert!(
        s.log().contains("CPU engine: OpenVINO (no llama.cpp:"),
        "{}",
        s.log()
    );
}

/// A forced engine that cannot load, or an engine that does not exist,
/// stops the server at start with the reason.
#[test]
fn an_engine_that_cannot_serve_stops_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(slinfer_e2e::slinfer_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .arg("--data-dir")
            .arg(tmp.path())
            .env("SLINFER_VENV", venv())
            .env_remove("SLINFER_CPU_ENGINE")
            .env_remove("SLINFER_LLAMA_CPP_DIR")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[
        "--cpu-engine",
        "llama-cpp",
        "--llama-cpp-dir",
        "/nonexistent",
    ]);
    assert!(
        err.contains(
            "--cpu-engine llama-cpp: backend unavailable: /nonexistent has no libllama.v0.5.0.so"
        ),
        "{err}"
    );
    let err = run(&["--cpu-engine", "llama-cpp"]);
    assert!(
        err.contains("--cpu-engine llama-cpp") && err.contains("set SLINFER_LLAMA_CPP_DIR"),
        "{err}"
    );
    let err = run(&["--llama-cpp-threads", "0"]);
    assert!(
        err.contains("invalid value '0' for '--llama-cpp-threads"),
        "{err}"
    );
    let err = run(&["--cpu-engine", "ggml"]);
    assert!(
        err.contains("invalid value 'ggml' for '--cpu-engine"),
        "{err}"
    );
    // A pair needs both engines, and at least two sequences to move at.
    let err = run(&["--cpu-engine", "paired", "--llama-cpp-dir", "/nonexistent"]);
    assert!(
        err.contains("--cpu-engine paired: backend unavailable: /nonexistent has no libllama"),
        "{err}"
    );
    let err = run(&["--cpu-engine", "paired", "--paired-from", "1"]);
    assert!(
        err.contains("invalid value '1' for '--paired-from"),
        "{err}"
    );
}
