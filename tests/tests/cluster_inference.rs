//! Generations across a cluster of real `slinfer serve --cluster` members
//! on loopback, with a real NATS server and the real OpenVINO CPU engine:
//! a function on a member without engines generating on another member,
//! hang-ups that free the sequence over there, and members lost mid-stream
//! (SIGSTOP, kill -9) with their work moving to the survivors. Waits are
//! bounded; how fast is in BENCHMARKS.md, not asserted here.

use std::time::{Duration, Instant};

use futures::StreamExt;
use slinfer_e2e::cluster::{DEFAULT_MODEL, Setup, get_json, live_requests, served_by};
use slinfer_e2e::{
    Nats, Server, assert_picks_a_colour, client, metric, openai_post, package, package_variant,
    wait_for,
};

const BOUND: Duration = Duration::from_secs(20);
/// Loading the model the first time (fetch, compile) on a shared 2-core
/// machine.
const LOAD_BOUND: Duration = Duration::from_secs(120);

async fn chat(s: &Server, query: &str, message: &str) -> reqwest::Response {
    client()
        .post(format!("{}/fn/chat/?{query}", s.url))
        .body(message.to_owned())
        .send()
        .await
        .expect("request")
}

/// A greedy, non-streamed chat answer through `s`.
async fn greedy(s: &Server, max_tokens: u32) -> (u16, serde_json::Value) {
    let resp = chat(
        s,
        &format!("max_tokens={max_tokens}&temperature=0&stream=false"),
        "Name three colours.",
    )
    .await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

/// Deploy `chat` through `via` and wait until every one of `on` has it.
async fn deploy_chat(via: &Server, on: &[&Server]) {
    via.deploy(&package("chat"));
    for s in on {
        let ok = wait_for(BOUND, || async {
            s.get("chat", "/models").await.status() == 200
        })
        .await;
        assert!(ok.is_some(), "chat never reached {}: {}", s.url, s.log());
    }
}

/// Start a streamed chat through `s` and read its first chunk; the rest of
/// the body is the returned stream.
async fn start_stream(
    s: &Server,
    max_tokens: u32,
) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<> {
    let resp = chat(
        s,
        &format!("max_tokens={max_tokens}&temperature=0"),
        "Tell me a long story about a lighthouse keeper.",
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    body
}

/// Read the rest of an event stream: what it said, and how long it took.
async fn drain(
    mut body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> (String, Duration) {
    let start = Instant::now();
    let mut text = String::new();
    while let Some(Ok(chunk)) = tokio::time::timeout(BOUND, body.next())
        .await
        .expect("the stream hung")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (text, start.elapsed())
}

#[tokio::test]
async fn a_function_on_a_member_without_engines_generates_on_another() {
    let nats = Nats::start();
    let setup = Setup::new();
    let (mut a, c) = setup.router_and_engine(&nats).await;
    deploy_chat(&a, &[&a, &c]).await;

    // The function on a lists the model c serves, and generates with it:
    // the same greedy answer as on c itself.
    let listed = a.get("chat", "/models").await.text().await.unwrap();
    assert_eq!(listed.trim(), DEFAULT_MODEL);
    let (status, remote) = greedy(&a, 12).await;
    assert_eq!(status, 200, "{remote}\n{}", a.log());
    let (status, local) = greedy(&c, 12).await;
    assert_eq!(status, 200, "{local}");
    assert_eq!(remote["text"], local["text"]);
    assert_eq!(remote["generated_tokens"], 12);
    // a has no engine; c ran both.
    assert!(get_json(&a, "/v1/status").await["inference"].is_null());
    // a's dashboard shows each member's devices: none here, c's CPU.
    let ui = get_json(&a, "/ui/api/state").await;
    let nodes = ui["nodes"].as_array().expect("nodes");
    let devices_of = |node: &str| {
        let n = nodes.iter().find(|n| n["node"] == node).expect(node);
        n["status"]["devices"].as_array().map_or(0, Vec::len)
    };
    assert_eq!((devices_of("a"), devices_of("c")), (0, 1), "{ui}");
    assert_eq!(ui["node"], "a");
    let finished = metric(
        &c.metrics().await,
        "slinfer_llm_requests_total",
        &["outcome=\"finished\""],
    );
    assert_eq!(finished, 2.0);
    // Counted on both sides, per member.
    let sent = metric(
        &a.metrics().await,
        "slinfer_routed_generations_total",
        &["peer=\"c\"", "outcome=\"started\""],
    );
    assert_eq!(sent, 1.0);
    let answered = metric(
        &c.metrics().await,
        "slinfer_answered_generations_total",
        &["peer=\"a\""],
    );
    assert_eq!(answered, 1.0);

    // A caller that hangs up on a frees the sequence on c.
    let body = start_stream(&a, 400).await;
    assert_eq!(live_requests(&c).await, 1);
    drop(body);
    let freed = wait_for(BOUND, || async { live_requests(&c).await == 0 }).await;
    assert!(freed.is_some(), "{}", get_json(&c, "/v1/status").await);
    println!("hang-up on a freed the sequence on c after {freed:?}");

    // The OpenAI-compatible function, deployed through a, answers there.
    a.deploy(&package("openai-api"));
    let ok = wait_for(BOUND, || async {
        a.get("openai-api", "/v1/models").await.status() == 200
    })
    .await;
    assert!(ok.is_some());
    let (status, v) = openai_post(
        &a.url,
        "chat/completions",
        serde_json::json!({
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 5,
            "temperature": 0,
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    // A constrained generation and embeddings cross members too (the
    // constraint compiles on c; the vector comes back as a chunk).
    assert_picks_a_colour(&a.url, DEFAULT_MODEL).await;
    let (status, v) = openai_post(
        &a.url,
        "embeddings",
        serde_json::json!({
            "model": DEFAULT_MODEL,
            "input": ["one", "two"],
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["data"][1]["embedding"].as_array().map(Vec::len),
        Some(576),
        "{v}"
    );

    // A model nobody serves is still "not found", from a.
    let (status, v) = openai_post(
        &a.url,
        "chat/completions",
        serde_json::json!({
            "model": "no-such-model",
            "messages": [{"role": "user", "content": "Say hi."}],
        }),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");

    // The asking member killed mid-stream: c ends the request and frees
    // its sequence once a is silent for 3 s.
    let body = start_stream(&a, 2000).await;
    assert_eq!(live_requests(&c).await, 1);
    a.kill();
    let freed = wait_for(BOUND, || async { live_requests(&c).await == 0 }).await;
    assert!(freed.is_some(), "{}", get_json(&c, "/v1/status").await);
    println!("kill -9 of the asking member: c freed the sequence after {freed:?}");
    drop(body);
}

/// Which of `members` runs a request now (its index).
async fn running_on(members: &[Server]) -> Option<usize> {
    for (i, s) in members.iter().enumerate() {
        if live_requests(s).await > 0 {
            return Some(i);
        }
    }
    None
}

#[tokio::test]
async fn a_member_lost_mid_stream_ends_the_stream_and_the_others_carry_on() {
    let nats = Nats::start();
    let setup = Setup::new();
    let c = setup.engine_member_with_model(&nats, "c");
    let b = setup.engine_member(&nats, "b");
    let a = setup.member(&nats, "a");
    // b fetches the model c published.
    let both = wait_for(LOAD_BOUND, || async {
        served_by(&a, DEFAULT_MODEL).await == ["b", "c"]
    })
    .await;
    assert!(both.is_some(), "{}", b.log());
    deploy_chat(&a, &[&a, &b, &c]).await;
    let mut engines = [b, c];
    // Warm both engines, so that the streams below start at once.
    for s in &engines {
        let (status, v) = greedy(s, 2).await;
        assert_eq!(status, 200, "{v}");
    }

    // SIGSTOP the member serving a stream: a ends the stream with a
    // retryable error once the member is silent for 3 s.
    let body = start_stream(&a, 2000).await;
    let serving = running_on(&engines).await.expect("b or c runs it");
    engines[serving].signal("STOP");
    let (text, took) = drain(body).await;
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("was lost"), "{text}");
    println!("SIGSTOP mid-stream: the stream ended after {took:?}");
    // The next request goes to the other member.
    let (status, v) = greedy(&a, 4).await;
    assert_eq!(status, 200, "{v}");
    engines[serving].signal("CONT");
    let back = wait_for(BOUND, || async {
        served_by(&a, DEFAULT_MODEL).await == ["b", "c"]
    })
    .await;
    assert!(back.is_some(), "the stopped member never came back");
    // The sequence of the abandoned stream is freed there too.
    let freed = wait_for(BOUND, || async {
        live_requests(&engines[serving]).await == 0
    })
    .await;
    assert!(
        freed.is_some(),
        "{}",
        get_json(&engines[serving], "/v1/status").await
    );

    // kill -9 of the member serving a stream.
    let body = start_stream(&a, 2000).await;
    let serving = running_on(&engines).await.expect("b or c runs it");
    engines[serving].kill();
    let (text, took) = drain(body).await;
    assert!(
        text.contains("event: error") && text.contains("was lost"),
        "{text}"
    );
    println!("kill -9 mid-stream: the stream ended after {took:?}");
    // New requests succeed on the survivor, which alone serves the model.
    let start = Instant::now();
    let (status, v) = greedy(&a, 4).await;
    assert_eq!(status, 200, "{v}");
    println!(
        "after kill -9: the next request succeeded {:?} after the stream ended",
        start.elapsed()
    );
    let lost = metric(
        &a.metrics().await,
        "slinfer_routed_generations_total",
        &["outcome=\"lost\""],
    );
    assert_eq!(lost, 2.0, "one SIGSTOP, one kill -9");
    let survivor = ["b", "c"][1 - serving];
    let alone = wait_for(BOUND, || async {
        served_by(&a, DEFAULT_MODEL).await == [survivor]
    })
    .await;
    assert!(
        alone.is_some(),
        "{}",
        get_json(&a, "/v1/cluster").await["models"]
    );
}

#[tokio::test]
async fn overload_across_the_cluster_is_refused_with_a_retry_hint_not_a_hang() {
    let nats = Nats::start();
    let setup = Setup::new();
    let (a, c) = setup.router_and_engine(&nats).await;
    // A first token within 1 ms is more than any device here can promise:
    // every member refuses, so the cluster does.
    let tight = package_variant("chat", |m| {
        m.replace("name = \"chat\"", "name = \"tight\"")
            .replace("ttft_ms = 5000", "ttft_ms = 1")
    });
    a.deploy(tight.path());
    let ok = wait_for(BOUND, || async {
        c.get("tight", "/models").await.status() == 200
    })
    .await;
    assert!(ok.is_some());
    let burst = (0..8).map(|_| async {
        let start = Instant::now();
        let resp = client()
            .post(format!("{}/fn/tight/?max_tokens=8&stream=false", a.url))
            .body("Hello.")
            .send()
            .await
            .expect("request");
        (
            resp.status().as_u16(),
            resp.headers().get("retry-after").cloned(),
            resp.text().await.unwrap(),
            start.elapsed(),
        )
    });
    for (status, retry_after, body, took) in futures::future::join_all(burst).await {
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "no Retry-After: {body}");
        assert!(body.contains("overloaded"), "{body}");
        assert!(took < BOUND, "refused after {took:?}");
    }
    // c made the refusals (a has no engine), and nothing is left running.
    let refused = metric(
        &c.metrics().await,
        "slinfer_llm_requests_total",
        &["outcome=\"overloaded\""],
    );
    assert_eq!(refused, 8.0);
    let refused_there = metric(
        &a.metrics().await,
        "slinfer_routed_generations_total",
        &["peer=\"c\"", "outcome=\"overloaded\""],
    );
    assert_eq!(refused_there, 8.0);
    assert_eq!(live_requests(&c).await, 0);
}

/// The models with instances on member `node`, as `via` sees the cluster.
async fn instances_on(via: &Server, node: &str) -> Vec<String> {
    let v = get_json(via, "/v1/cluster").await;
    let member = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["node"] == node)
        .cloned()
        .unwrap_or_default();
    member["inference"]["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| !m["instances"].as_array().is_none_or(|i| i.is_empty()))
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect()
}

/// The members the controller's books say it placed a new instance of
/// `model` on, for `reason`.
async fn placed_by_controller(via: &Server, model: &str, reason: &str) -> Vec<String> {
    let v = get_json(via, "/v1/cluster").await;
    v["books"]["placements"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["model"] == model && p["reason"] == reason)
        .filter_map(|p| p["node"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn two_models_through_a_router_pack_onto_one_member() {
    const TWIN: &str = "smollm2-twin";
    let nats = Nats::start();
    let setup = Setup::new();
    let mut b = setup.engine_member_with(&nats, "b", &[DEFAULT_MODEL, TWIN]);
    let c = setup.engine_member(&nats, "c");
    let a = setup.member(&nats, "a");
    for model in [DEFAULT_MODEL, TWIN] {
        let both = wait_for(LOAD_BOUND, || async {
            served_by(&a, model).await == ["b", "c"]
        })
        .await;
        assert!(both.is_some(), "{model}: {}", c.log());
    }
    deploy_chat(&a, &[&a]).await;
    let twin = package_variant("chat", |m| {
        m.replace("name = \"chat\"", "name = \"twin\"")
            .replace(&format!("\"{DEFAULT_MODEL}\""), &format!("\"{TWIN}\""))
    });
    a.deploy(twin.path());
    let ok = wait_for(BOUND, || async {
        a.get("twin", "/models").await.status() == 200
    })
    .await;
    assert!(ok.is_some());

    // Both members idle: the first model goes to the first in order (b).
    let (status, v) = greedy(&a, 4).await;
    assert_eq!(status, 200, "{v}");
    let seen = wait_for(BOUND, || async {
        instances_on(&a, "b").await == [DEFAULT_MODEL]
    })
    .await;
    assert!(seen.is_some(), "{}", get_json(&a, "/v1/cluster").await);
    // The second model packs onto the busy member, not the idle one.
    let resp = client()
        .post(format!(
            "{}/fn/twin/?max_tokens=4&temperature=0&stream=false",
            a.url
        ))
        .body("Name three colours.")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let packed = wait_for(BOUND, || async { instances_on(&a, "b").await.len() == 2 }).await;
    assert!(packed.is_some(), "{}", get_json(&a, "/v1/cluster").await);
    assert!(instances_on(&a, "c").await.is_empty());
    // The controller placed both, and `slinfer cluster status` shows it.
    for model in [DEFAULT_MODEL, TWIN] {
        let placed = wait_for(BOUND, || async {
            placed_by_controller(&a, model, "request").await == ["b"]
        })
        .await;
        assert!(placed.is_some(), "{}", get_json(&a, "/v1/cluster").await);
    }
    let (ok, out, err) = a.cli(&["cluster", "status"]);
    assert!(ok, "{err}");
    println!("{out}");
    assert!(out.contains(TWIN), "{out}");
    assert!(out.contains("PLACED BY THE CONTROLLER"), "{out}");

    // b lost: the controller (b itself before, a or c now) starts both
    // models on c before any request asks for them.
    b.kill();
    let lost = Instant::now();
    let replaced = wait_for(Duration::from_secs(30), || async {
        instances_on(&a, "c").await.len() == 2
    })
    .await;
    assert!(replaced.is_some(), "{}", get_json(&a, "/v1/cluster").await);
    for model in [DEFAULT_MODEL, TWIN] {
        let placed = wait_for(BOUND, || async {
            placed_by_controller(&a, model, "lost member").await == ["c"]
        })
        .await;
        assert!(placed.is_some(), "{}", get_json(&a, "/v1/cluster").await);
    }
    println!(
        "kill -9 of b: both its models loaded on c {:?} later",
        lost.elapsed()
    );
}
