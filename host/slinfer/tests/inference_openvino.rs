//! The inference room against the real imported default model on the
//! OpenVINO CPU engine, with OpenVINO GenAI as the reference (computed at
//! test time by `scripts/models/reference.py`, as the OpenVINO engine's own
//! tests do; `slinfer_test_support::reference` says which property each
//! comparison rests on).
//!
//! Needs what `./dev test` sets up: the model package in
//! `$SLINFER_MODELS_DIR` (default `<repo>/.data/models`) and the project
//! virtualenv (`$SLINFER_VENV`, default `<repo>/.venv`). The tests share one
//! [`Inference`] and take turns (the KV accounting checks need a quiet host).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use slinfer::devices::{CpuEngine, CpuOptions, DeviceName, DeviceSelection, discover};
use slinfer_inference::{
    ChatMessage, FinishReason, GenerateRequest, GenerationParams, Inference, InferenceConfig,
    InferenceError, MemoryBudget, Prompt, Usage,
};
use slinfer_test_support::reference::{self, Answer, Finish, Reference};
use slinfer_test_support::{
    DEFAULT_MODEL as MODEL, default_model_dir, models_dir, peak_then_fall, venv,
};

const NEW_TOKENS: usize = 32;
/// SmolLM2's `<|im_end|>` (model.toml's `eos_token_ids`).
const EOS: u32 = 2;
const PROMPTS: &[&str] = &["The capital of France is", "def fibonacci(n):"];

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `--cpu-engine openvino`: the engine these tests check against GenAI.
fn openvino() -> CpuOptions {
    CpuOptions {
        engine: CpuEngine::Openvino,
        ..Default::default()
    }
}

/// A service on the OpenVINO CPU device as `serve --devices cpu` finds it,
/// the host memory budget bounding it as under `serve`.
fn start() -> Arc<Inference> {
    let found = discover(
        &DeviceSelection::Only(vec![DeviceName::Cpu]),
        Some(&venv()),
        &openvino(),
        &models_dir(),
    )
    .unwrap_or_else(|e| panic!("{e:#}: run ./dev test (it installs the openvino wheel)"));
    let config = InferenceConfig {
        devices: found.devices,
        memory: Some(MemoryBudget::new(None).unwrap()),
        ..Default::default()
    };
    Inference::start(&models_dir(), config).unwrap()
}

fn inference() -> Arc<Inference> {
    static I: OnceLock<Arc<Inference>> = OnceLock::new();
    I.get_or_init(start).clone()
}

fn reference() -> &'static [Reference] {
    static R: OnceLock<Vec<Reference>> = OnceLock::new();
    R.get_or_init(|| reference::generate(&default_model_dir(), PROMPTS, NEW_TOKENS))
}

fn request(prompt: Prompt, params: GenerationParams) -> GenerateRequest {
    GenerateRequest {
        function: "test".into(),
        model: MODEL.into(),
        prompt,
        params,
        ttft_slo_s: 0.0,
        ttft_prompt_tokens_per_s: 0.0,
        tpot_slo_s: 0.0,
        arrived: None,
    }
}

fn greedy(max_tokens: u32) -> GenerationParams {
    GenerationParams {
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// Greedy, allowed 512 tokens but ending at the first space (a few tokens
/// in): the scheduler plans its KV for prompt + 512 tokens, its whole
/// look-ahead.
fn planned_long() -> GenerationParams {
    GenerationParams {
        stop: vec![" ".into()],
        ..greedy(512)
    }
}

async fn collect(inf: &Inference, req: GenerateRequest) -> Result<(String, Usage), InferenceError> {
    let mut s = inf.generate(req).await?;
    let mut text = String::new();
    while let Some(chunk) = s.next().await {
        text.push_str(&chunk?);
    }
    Ok((text, s.usage()))
}

/// The text GenAI's greedy tokens make, up to EOS.
fn expected_text(inf: &Inference, tokens: &[u32]) -> String {
    let end = tokens
        .iter()
        .position(|&t| t == EOS)
        .unwrap_or(tokens.len());
    inf.detokenize(MODEL, &tokens[..end]).unwrap()
}

async fn quiet(inf: &Inference) {
    for _ in 0..200 {
        let s = inf.stats();
        if s.live_requests == 0 && s.instances.iter().all(|i| i.kv_blocks_in_use == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("requests or KV blocks still live: {:?}", inf.stats());
}

#[tokio::test]
async fn greedy_text_matches_genai_alone_and_concurrently() {
    let _turn = TURN.lock().await;
    let inf = inference();
    assert!(inf.models().contains(&MODEL.to_string()));
    // `generate` can be awaited inside a spawned task.
    fn send<T: Send>(_: &T) {}
    send(&inf.generate(request(Prompt::Text("x".into()), greedy(1))));
    // One at a time: like for like with LLMPipeline (one sequence per step,
    // the same graph and kernels), so the same text on any CPU.
    for r in reference() {
        assert_eq!(inf.tokenize(MODEL, &r.prompt).unwrap(), r.prompt_ids);
        let (text, usage) = collect(&inf, request(Prompt::Text(r.prompt.clone()), greedy(32)))
            .await
            .unwrap();
        assert_eq!(
            text,
            expected_text(&inf, &r.tokens),
            "prompt {:?}",
            r.prompt
        );
        assert_eq!(usage.prompt_tokens as usize, r.prompt_ids.len());
        // GenAI ignored EOS; we stop there.
        match r.tokens.iter().position(|&t| t == EOS) {
            Some(n) => {
                assert_eq!(usage.generated_tokens as usize, n);
                assert_eq!(usage.finish_reason, FinishReason::Stop);
            }
            None => {
                assert_eq!(usage.generated_tokens, 32);
                assert_eq!(usage.finish_reason, FinishReason::Length);
            }
        }
        assert!(usage.ttft_s > 0.0);
    }
    // Four at once: batches composed by the scheduler as requests arrive,
    // which GenAI never forms. Each answer must be greedy up to a near-tie.
    let refs: Vec<&Reference> = reference().iter().chain(reference()).collect();
    let runs = refs.iter().map(|r| {
        let inf = inf.clone();
        let p = r.prompt.clone();
        async move { collect(&inf, request(Prompt::Text(p), greedy(32))).await }
    });
    let outs = futures::future::join_all(runs).await;
    let answers: Vec<Answer> = refs
        .iter()
        .zip(outs)
        .map(|(r, out)| {
            let (text, usage) = out.unwrap();
            let finish = match usage.finish_reason {
                FinishReason::Stop => Finish::Stop,
                FinishReason::Length => Finish::Length,
            };
            Answer::text(&r.prompt, &text).ended(finish, u64::from(usage.generated_tokens))
        })
        .collect();
    reference::assert_greedy(&default_model_dir(), "four at once", &answers);
    quiet(&inf).await;
}

#[tokio::test]
async fn chat_prompt_uses_the_models_template() {
    let _turn = TURN.lock().await;
    let inf = inference();
    let msgs = vec![ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let rendered = inf.render_chat(MODEL, &msgs, None).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let ids = inf.tokenize(MODEL, &rendered).unwrap();
    let (chat, usage) = collect(&inf, request(Prompt::Chat(msgs), greedy(16)))
        .await
        .unwrap();
    assert_eq!(usage.prompt_tokens as usize, ids.len());
    let (text, _) = collect(&inf, request(Prompt::Text(rendered), greedy(16)))
        .await
        .unwrap();
    // Alone, one after the other: the same steps, the same arithmetic.
    assert_eq!(chat, text);
    assert!(!chat.is_empty());
    quiet(&inf).await;
}

#[tokio::test]
async fn stop_sequences_max_tokens_and_seeded_sampling() {
    let _turn = TURN.lock().await;
    let inf = inference();
    let prompt = || Prompt::Text(PROMPTS[1].to_string());
    let (full, _) = collect(&inf, request(prompt(), greedy(32))).await.unwrap();
    // max_tokens
    let (_, usage) = collect(&inf, request(prompt(), greedy(5))).await.unwrap();
    assert_eq!(usage.generated_tokens, 5);
    assert_eq!(usage.finish_reason, FinishReason::Length);
    // A stop sequence taken from the middle of the greedy output.
    let mid = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[mid..].chars().take(3).collect();
    let at = full.find(&stop).unwrap();
    let mut params = greedy(32);
    params.stop = vec![stop.clone()];
    let (text, usage) = collect(&inf, request(prompt(), params)).await.unwrap();
    assert_eq!(text, full[..at], "stop {stop:?}");
    assert_eq!(usage.finish_reason, FinishReason::Stop);
    assert!(usage.generated_tokens < 32);
    // Seeded sampling repeats.
    let sampled = |seed| GenerationParams {
        max_tokens: Some(24),
        temperature: Some(0.9),
        top_k: Some(50),
        top_p: Some(0.95),
        seed: Some(seed),
        ..Default::default()
    };
    let (a, _) = collect(&inf, request(prompt(), sampled(7))).await.unwrap();
    let (b, _) = collect(&inf, request(prompt(), sampled(7))).await.unwrap();
    assert_eq!(a, b);
    // Parameters are checked.
    let mut bad = greedy(0);
    bad.max_tokens = Some(0);
    assert!(matches!(
        inf.generate(request(prompt(), bad)).await,
        Err(InferenceError::InvalidParams(_))
    ));
    let mut req = request(prompt(), greedy(4));
    req.model = "no-such-model".into();
    assert!(matches!(
        inf.generate(req).await,
        Err(InferenceError::ModelNotFound(_))
    ));
    quiet(&inf).await;
}

#[tokio::test]
async fn dropping_a_stream_frees_its_sequence() {
    let _turn = TURN.lock().await;
    let inf = inference();
    let mut s = inf
        .generate(request(Prompt::Text(PROMPTS[0].into()), greedy(200)))
        .await
        .unwrap();
    for _ in 0..3 {
        s.next().await.unwrap().unwrap();
    }
    let live = inf.stats();
    assert_eq!(live.live_requests, 1);
    assert!(live.instances.iter().any(|i| i.kv_blocks_in_use > 0));
    drop(s);
    quiet(&inf).await;
}

#[tokio::test]
async fn overload_gives_overloaded_errors_and_the_rest_finish() {
    let _turn = TURN.lock().await;
    let inf = inference();
    // A loaded instance first, so admission is about the batch.
    collect(&inf, request(Prompt::Text(PROMPTS[0].into()), greedy(2)))
        .await
        .unwrap();
    let runs = (0..24).map(|i| {
        let inf = inf.clone();
        async move {
            let mut req = request(Prompt::Text(format!("{} {i}", PROMPTS[i % 2])), greedy(8));
            req.ttft_slo_s = 0.05;
            req.tpot_slo_s = 0.2;
            collect(&inf, req).await
        }
    });
    let outs = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(runs))
        .await
        .expect("overloaded requests hang");
    let mut ok = 0;
    let mut overloaded = 0;
    for o in outs {
        match o {
            Ok((_, u)) => {
                assert!(u.generated_tokens >= 1);
                ok += 1;
            }
            Err(InferenceError::Overloaded { retry_after_s }) => {
                assert!(retry_after_s > 0.0);
                overloaded += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    eprintln!("overload: {ok} finished, {overloaded} overloaded");
    assert!(overloaded >= 1, "{ok} finished, none overloaded");
    quiet(&inf).await;
}

#[tokio::test]
async fn kv_pool_grows_with_load_and_shrinks_after() {
    let _turn = TURN.lock().await;
    let inf = inference();
    let capacity = |inf: &Inference| {
        inf.stats()
            .instances
            .iter()
            .filter(|i| i.model == MODEL)
            .map(|i| i.kv_blocks_capacity)
            .sum::<usize>()
    };
    collect(&inf, request(Prompt::Text(PROMPTS[0].into()), greedy(2)))
        .await
        .unwrap();
    quiet(&inf).await;
    let idle = capacity(&inf);
    let runs = (0..8).map(|i| {
        let inf = inf.clone();
        async move {
            let prompt = format!("{} {i}", PROMPTS[i % 2]);
            collect(&inf, request(Prompt::Text(prompt), planned_long())).await
        }
    });
    // The shrink is an action the instance's runner does after the last run.
    let (outs, peak, after) = peak_then_fall(
        futures::future::join_all(runs),
        || capacity(&inf),
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
    .await;
    for o in outs {
        o.unwrap();
    }
    eprintln!("KV blocks: idle {idle}, peak {peak}, after {after}");
    // Each request plans prompt + look-ahead (512 tokens): 8 of them need
    // far more than the idle pool.
    assert!(peak >= 8 * 512 / 32, "idle {idle}, peak {peak}");
    assert!(
        after < peak,
        "the pool did not shrink: peak {peak}, after {after}"
    );
}

/// Threads of this process whose name starts with `prefix` (Linux: names
/// are cut to 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

#[tokio::test]
async fn dropping_the_service_stops_its_threads() {
    let _turn = TURN.lock().await;
    // The driver's thread (instance workers cannot be counted this way:
    // OpenVINO's pool threads inherit their names).
    let before = threads_named("slinfer-inferen");
    let own = start();
    let mut s = own
        .generate(request(Prompt::Text(PROMPTS[1].into()), greedy(200)))
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    assert_eq!(threads_named("slinfer-inferen"), before + 1);
    // Joins the driver, which joins the instance workers.
    tokio::task::spawn_blocking(move || drop(own))
        .await
        .unwrap();
    assert_eq!(threads_named("slinfer-inferen"), before);
    // How the open stream ends is the driver's business, tested on the
    // reference engine (slinfer-inference's tests/devices.rs).
    drop(s);
}

#[tokio::test]
async fn more_requests_than_memory_admits_wait_or_are_refused_and_memory_holds() {
    let _turn = TURN.lock().await;
    let info = inference()
        .model_infos()
        .into_iter()
        .find(|m| m.name == MODEL)
        .unwrap();
    // The CPU's room comes from a host memory budget that the functions
    // share, as under `serve`. One request loads the instance, which is
    // measured; then functions take all but that instance and the KV of
    // about two requests (prompt + 512 look-ahead tokens each), not eight.
    let budget = MemoryBudget::fixed(64 << 30);
    let mut found = discover(
        &DeviceSelection::Only(vec![DeviceName::Cpu]),
        Some(&venv()),
        &openvino(),
        &models_dir(),
    )
    .unwrap();
    found.devices[0].capacity_bytes = u64::MAX;
    let own = Inference::start(
        &models_dir(),
        InferenceConfig {
            devices: found.devices,
            memory: Some(budget.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    collect(&own, request(Prompt::Text("warm up".into()), greedy(2)))
        .await
        .unwrap();
    let measured: u64 = own.status().models[0]
        .instances
        .iter()
        .map(|i| i.scheduler.static_bytes)
        .sum();
    // (At least the pool the idle instance keeps.)
    let pool = own.status().devices[0].scheduler.committed_bytes - measured;
    let kv_room = pool.max(2 * 560 * info.kv_bytes_per_token);
    let room = measured + kv_room;
    assert!(budget.try_reserve_functions((64 << 30) - room));
    // The driver applies the budget every second.
    for _ in 0..100 {
        if own.status().devices[0].scheduler.room_bytes == room {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(own.status().devices[0].scheduler.room_bytes, room);
    let runs = (0..8).map(|i| {
        let own = own.clone();
        async move {
            let prompt = format!("{} {i}", PROMPTS[i % 2]);
            let mut req = request(Prompt::Text(prompt), planned_long());
            // Long enough to wait for memory, not forever.
            req.ttft_slo_s = 20.0;
            collect(&own, req).await
        }
    });
    let all = futures::future::join_all(runs);
    tokio::pin!(all);
    let mut peak_bytes = 0;
    let mut peak_queued = 0;
    let outs = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            tokio::select! {
                outs = &mut all => break outs,
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    let st = own.status();
                    let m = st.models.iter().find(|m| m.info.name == MODEL).unwrap();
                    peak_queued = peak_queued.max(m.queued_requests);
                    peak_bytes = peak_bytes.max(st.devices[0].scheduler.committed_bytes);
                }
            }
        }
    })
    .await
    .expect("requests beyond memory hang");
    let (mut ok, mut overloaded) = (0, 0);
    for o in outs {
        match o {
            Ok(_) => ok += 1,
            Err(InferenceError::Overloaded { .. }) => overloaded += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    eprintln!(
        "memory overload: {ok} finished, {overloaded} overloaded, peak queue {peak_queued}, peak committed {peak_bytes} of {room} bytes"
    );
    assert!(ok >= 2, "{ok} finished");
    assert!(peak_queued >= 1, "nothing ever waited for memory");
    assert!(peak_bytes <= room, "{peak_bytes} > {room}");
    tokio::task::spawn_blocking(move || drop(own))
        .await
        .unwrap();
}

/// The embedding of `text` through the service.
async fn embedding(inf: &Inference, text: &str) -> Vec<f32> {
    let params = GenerationParams {
        embed: true,
        ..Default::default()
    };
    let mut s = inf
        .generate(request(Prompt::Text(text.into()), params))
        .await
        .unwrap();
    let mut v = Vec::new();
    while let Some(c) = s.next_chunk().await {
        v.extend(c.unwrap().embedding);
    }
    v
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum::<f64>()
    };
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

#[tokio::test]
async fn embeddings_are_the_final_hidden_state_openvino_computes_at_full_precision() {
    let _turn = TURN.lock().await;
    let inf = inference();
    let want = reference::hidden(&default_model_dir(), PROMPTS);
    for w in &want {
        assert_eq!(inf.tokenize(MODEL, &w.prompt).unwrap(), w.prompt_ids);
        let got = embedding(&inf, &w.prompt).await;
        assert_eq!(got.len(), 576, "SmolLM2-135M's hidden size");
        let norm: f64 = got
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        let c = cosine(&got, &w.hidden);
        println!("{:?}: cosine to the f32 stateful IR {c:.5}", w.prompt);
        assert!(c > 0.995, "{:?}: cosine {c}", w.prompt);
    }
    // Embedded together (one batch), each as alone.
    let alone = embedding(&inf, PROMPTS[0]).await;
    let both = futures::future::join_all(PROMPTS.iter().map(|p| embedding(&inf, p))).await;
    assert!(
        cosine(&both[0], &alone) > 0.9999,
        "{}",
        cosine(&both[0], &alone)
    );
    assert!(
        cosine(&both[0], &both[1]) < 0.99,
        "two texts, two embeddings"
    );
    quiet(&inf).await;
}
