//! The live inference path on two or more devices, on the pure-Rust
//! reference engine and tiny real models (`slinfer_test_support::tiny`):
//! placement (CPU first, the GPU when the CPU is full), KV pools that grow
//! and shrink, preemption with recomputation, cancellation, a device that
//! fails at run time, and shutdown. No virtualenv and no native library:
//! these run in seconds anywhere.
//!
//! The reference engine computes each row of a batch with the same loops, so
//! an answer does not depend on the batch it ran in: every answer here must
//! equal the model's own greedy decode, token for token.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slinfer_engine::package::ModelPackage;
use slinfer_engine::paired::PairedBackend;
use slinfer_engine::reference::ReferenceBackend;
use slinfer_engine::sampler::argmax;
use slinfer_engine::{
    Backend, DeviceInfo, DeviceKind, EngineError, Footprint, LlmInstance, LoadOptions,
    MemoryReport, ModelConfig, ModelSource, SeqId, StepEntry,
};
use slinfer_inference::{
    Constraint, DeviceLabels, FinishReason, GenerateRequest, GenerationParams, IDLE_KV_TOKENS,
    INSTANCE_OVERHEAD_BYTES, Inference, InferenceConfig, InferenceError, InferenceStatus,
    LlmMetrics, MemoryBudget, OutcomeLabels, Prompt, Scheduling, TokenLogprobs, Usage,
};
use slinfer_test_support::{peak_then_fall, tiny};

const MIB: u64 = 1 << 20;

/// A folder of tiny model packages, one per `(name, seed)`.
fn models(list: &[(&str, u64)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in list {
        tiny::write_package(dir.path(), name, *seed);
    }
    dir
}

fn device(
    name: &str,
    kind: DeviceKind,
    backend: Arc<dyn Backend>,
    bytes: u64,
) -> slinfer_inference::Device {
    slinfer_inference::Device {
        name: name.into(),
        kind,
        backend,
        index: 0,
        capacity_bytes: bytes,
    }
}

/// `cpu:0` or `gpu:0` with 1 GiB.
fn cpu(backend: Arc<dyn Backend>) -> slinfer_inference::Device {
    device("cpu:0", DeviceKind::Cpu, backend, 1 << 30)
}

fn gpu(backend: Arc<dyn Backend>) -> slinfer_inference::Device {
    device("gpu:0", DeviceKind::Gpu, backend, 1 << 30)
}

fn reference(kind: DeviceKind, bytes: u64) -> Arc<dyn Backend> {
    Arc::new(ReferenceBackend::with_devices(kind, &[bytes]))
}

fn start(dir: &Path, devices: Vec<slinfer_inference::Device>) -> (Arc<Inference>, Arc<LlmMetrics>) {
    start_with(dir, devices, None, Scheduling::default())
}

/// [`start`] with an idle CPU pool that shrinks to nothing.
fn start_without_idle_kv(
    dir: &Path,
    devices: Vec<slinfer_inference::Device>,
) -> (Arc<Inference>, Arc<LlmMetrics>) {
    let scheduling = Scheduling {
        idle_kv_tokens: 0,
        ..Default::default()
    };
    start_with(dir, devices, None, scheduling)
}

fn start_with(
    dir: &Path,
    devices: Vec<slinfer_inference::Device>,
    memory: Option<Arc<MemoryBudget>>,
    scheduling: Scheduling,
) -> (Arc<Inference>, Arc<LlmMetrics>) {
    let metrics = Arc::new(LlmMetrics::default());
    let inf = Inference::start(
        dir,
        InferenceConfig {
            devices,
            metrics: Some(metrics.clone()),
            memory,
            scheduling,
        },
    )
    .unwrap();
    (inf, metrics)
}

fn request(model: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        function: "test".into(),
        model: model.into(),
        prompt: Prompt::Text(prompt.into()),
        params: GenerationParams {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        ttft_slo_s: 0.0,
        ttft_prompt_tokens_per_s: 0.0,
        tpot_slo_s: 0.0,
        arrived: None,
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

/// Asserts that `req` is refused as invalid, with a message that says `says`.
async fn refused(inf: &Inference, req: GenerateRequest, says: &str) {
    match collect(inf, req).await {
        Err(InferenceError::InvalidParams(m)) => assert!(m.contains(says), "{m}"),
        other => panic!("{says}: {other:?}"),
    }
}

/// The model's greedy answer, decoded directly on the reference engine one
/// token at a time.
fn greedy(dir: &Path, model: &str, prompt: &str, n: usize) -> String {
    let (tok, out, _) = greedy_steps(dir, model, prompt, n);
    tok.decode(&out, false).unwrap()
}

/// The model on the reference engine with an empty sequence 1, its
/// tokenizer, and `prompt`'s tokens.
fn loaded(
    dir: &Path,
    model: &str,
    prompt: &str,
) -> (tokenizers::Tokenizer, Box<dyn LlmInstance>, Vec<u32>) {
    let pkg = dir.join(model);
    let tok = tokenizers::Tokenizer::from_file(pkg.join("tokenizer.json")).unwrap();
    let ids = tok.encode(prompt, true).unwrap().get_ids().to_vec();
    let mut inst = ReferenceBackend::default()
        .load(&ModelSource::Package(pkg), 0, &LoadOptions::default())
        .unwrap();
    inst.add_sequence(1).unwrap();
    (tok, inst, ids)
}

/// [`greedy`]'s tokens and the logits each was chosen from.
fn greedy_steps(
    dir: &Path,
    model: &str,
    prompt: &str,
    n: usize,
) -> (tokenizers::Tokenizer, Vec<u32>, Vec<Vec<f32>>) {
    let (tok, mut inst, ids) = loaded(dir, model, prompt);
    let (mut out, mut steps) = (Vec::new(), Vec::new());
    let mut next = ids;
    while out.len() < n {
        let logits = inst
            .step(&[StepEntry {
                seq: 1,
                tokens: next,
            }])
            .unwrap();
        let t = argmax(&logits[0]);
        assert_ne!(t, tiny::EOS, "tiny models never choose EOS");
        out.push(t);
        steps.push(logits[0].clone());
        next = vec![t];
    }
    (tok, out, steps)
}

/// Waits until nothing is live and no KV block is in use.
async fn quiet(inf: &Inference) {
    for _ in 0..400 {
        let s = inf.stats();
        if s.live_requests == 0 && s.instances.iter().all(|i| i.kv_blocks_in_use == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("requests or KV blocks still live: {:?}", inf.stats());
}

/// The devices the model's instances are on.
fn placed(inf: &Inference, model: &str) -> Vec<String> {
    inf.status()
        .models
        .iter()
        .filter(|m| m.info.name == model)
        .flat_map(|m| m.instances.iter().map(|i| i.device.clone()))
        .collect()
}

fn outcomes(metrics: &LlmMetrics, model: &str, outcome: &str) -> u64 {
    metrics
        .requests
        .get_or_create(&OutcomeLabels {
            model: model.into(),
            outcome: outcome.into(),
        })
        .get()
}

#[tokio::test]
async fn models_go_to_the_cpu_first_then_the_gpu_and_answer_exactly() {
    let dir = models(&[("tiny-a", 1), ("tiny-b", 2)]);
    // Room on the CPU for one instance, not two.
    let (inf, metrics) = start(
        dir.path(),
        vec![
            device(
                "cpu:0",
                DeviceKind::Cpu,
                reference(DeviceKind::Cpu, 0),
                INSTANCE_OVERHEAD_BYTES + 8 * MIB,
            ),
            device(
                "gpu:0",
                DeviceKind::Gpu,
                reference(DeviceKind::Gpu, 0),
                4 << 30,
            ),
        ],
    );
    assert_eq!(inf.models(), ["tiny-a", "tiny-b"]);
    let info = &inf.model_infos()[0];
    assert_eq!(
        info.footprints["gpu"],
        Footprint::of_config(&tiny::config(), 4, 4),
        "the reference engine's f32 footprint, per kind"
    );
    let (a, usage) = collect(&inf, request("tiny-a", "Hello", 40)).await.unwrap();
    assert_eq!(a, greedy(dir.path(), "tiny-a", "Hello", 40));
    assert_eq!(
        (usage.generated_tokens, usage.finish_reason),
        (40, FinishReason::Length)
    );
    assert_eq!(placed(&inf, "tiny-a"), ["cpu:0"]);
    // tiny-a stays loaded (keep-alive): tiny-b does not fit beside it.
    let (b, _) = collect(&inf, request("tiny-b", "World", 40)).await.unwrap();
    assert_eq!(b, greedy(dir.path(), "tiny-b", "World", 40));
    assert_eq!(placed(&inf, "tiny-b"), ["gpu:0"]);
    // Four at once on each device, batched: each answer is still exact.
    let prompts = ["one", "two two", "three three three", "four"];
    let runs = prompts.iter().flat_map(|p| {
        ["tiny-a", "tiny-b"].map(|m| {
            let inf = inf.clone();
            async move { (m, *p, collect(&inf, request(m, p, 24)).await) }
        })
    });
    for (m, p, out) in futures::future::join_all(runs).await {
        assert_eq!(out.unwrap().0, greedy(dir.path(), m, p, 24), "{m} {p:?}");
    }
    quiet(&inf).await;
    let status = inf.status();
    let names: Vec<(&str, &str)> = status
        .devices
        .iter()
        .map(|d| (d.name.as_str(), d.backend.as_str()))
        .collect();
    assert_eq!(names, [("cpu:0", "reference"), ("gpu:0", "reference")]);
    assert!(status.devices.iter().all(|d| d.failed.is_none()));
    assert_eq!(outcomes(&metrics, "tiny-a", "finished"), 5);
    let cold = |model: &str, device: &str| {
        metrics
            .cold_starts
            .get_or_create(&DeviceLabels {
                model: model.into(),
                device: device.into(),
            })
            .get()
    };
    assert_eq!((cold("tiny-a", "cpu:0"), cold("tiny-b", "gpu:0")), (1, 1));
}

/// KV blocks the instances have room for, all together.
fn kv_capacity(inf: &Inference) -> usize {
    inf.stats()
        .instances
        .iter()
        .map(|i| i.kv_blocks_capacity)
        .sum()
}

#[tokio::test]
async fn kv_pools_grow_with_load_and_shrink_after() {
    let dir = models(&[("tiny", 3)]);
    let (inf, _) = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]);
    collect(&inf, request("tiny", "warm", 2)).await.unwrap();
    quiet(&inf).await;
    let idle = kv_capacity(&inf);
    let runs = (0..8).map(|i| {
        let inf = inf.clone();
        async move { collect(&inf, request("tiny", &format!("prompt {i}"), 200)).await }
    });
    let (outs, peak, after) = peak_then_fall(
        futures::future::join_all(runs),
        || kv_capacity(&inf),
        Duration::from_millis(1),
        // The CPU pool shrinks 2 s after its last request (KV_SHRINK_DELAY_CPU_S).
        Duration::from_secs(5),
    )
    .await;
    for o in outs {
        assert_eq!(o.unwrap().1.generated_tokens, 200);
    }
    eprintln!("KV blocks: idle {idle}, peak {peak}, after {after}");
    // Eight requests plan prompt + 200 tokens each (their max_tokens, less
    // than the 512-token look-ahead; 16-token blocks): beyond the idle pool.
    assert!(peak >= 8 * 200 / 16, "idle {idle}, peak {peak}");
    assert!(
        after < peak,
        "the pool did not shrink: peak {peak}, after {after}"
    );
}

/// After idle a CPU pool with no idle floor shrinks to nothing; a burst of requests arriving
/// together then grows it once, just before their first step, however
/// many grows the scheduler granted as they joined (one reallocation of
/// the pool, not one a grant).
#[tokio::test]
async fn a_burst_after_idle_grows_the_pool_once_before_its_first_step() {
    let dir = models(&[("tiny", 5)]);
    let paced = Paced::new(DeviceKind::Cpu, 1, None);
    let events = paced.events.clone();
    let (inf, _) = start_without_idle_kv(dir.path(), vec![cpu(Arc::new(paced))]);
    collect(&inf, request("tiny", "warm", 2)).await.unwrap();
    pools_shrunk(&inf).await;
    let from = events.lock().unwrap().len();
    let runs = (0..8).map(|i| {
        let inf = inf.clone();
        async move { collect(&inf, request("tiny", &format!("prompt {i}"), 200)).await }
    });
    for o in futures::future::join_all(runs).await {
        assert_eq!(o.unwrap().1.generated_tokens, 200);
    }
    let burst = events.lock().unwrap()[from..].to_vec();
    let first_step = burst.iter().position(|e| *e == Event::Step).unwrap();
    assert_eq!(burst[..first_step], [Event::Grow], "{burst:?}");
}

/// Waits for the idle pools to shrink to nothing (2 s after the last
/// request, KV_SHRINK_DELAY_CPU_S).
async fn pools_shrunk(inf: &Inference) {
    for _ in 0..100 {
        if kv_capacity(inf) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        kv_capacity(inf),
        0,
        "the idle pool did not shrink to nothing"
    );
}

/// The status once the first device is out of placement, or after a
/// second: the driver hears of a failure just after the failed request
/// ends.
async fn first_device_failed(inf: &Inference) -> InferenceStatus {
    let mut status = inf.status();
    for _ in 0..200 {
        if status.devices[0].scheduler.failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        status = inf.status();
    }
    status
}

/// A grow made just before a run that fails (no memory for the pool) ends
/// that run's request as the device failing, takes the device out of
/// placement, and the retry is answered on the other device.
#[tokio::test]
async fn a_grow_that_fails_before_a_run_fails_its_request_and_the_device() {
    let dir = models(&[("tiny", 6)]);
    let paced = Paced::new(DeviceKind::Cpu, 0, None);
    let fail_grows = paced.fail_grows.clone();
    let (inf, _) = start_without_idle_kv(
        dir.path(),
        vec![
            device("cpu:0", DeviceKind::Cpu, Arc::new(paced), 1 << 30),
            gpu(reference(DeviceKind::Gpu, 0)),
        ],
    );
    collect(&inf, request("tiny", "warm", 2)).await.unwrap();
    pools_shrunk(&inf).await;
    fail_grows.store(true, Ordering::SeqCst);
    let e = collect(&inf, request("tiny", "after idle", 20))
        .await
        .unwrap_err();
    match &e {
        InferenceError::Unavailable { message, .. } => {
            assert!(message.contains("device cpu:0 failed"), "{message}");
            assert!(
                message.contains("no memory for the grown pool"),
                "{message}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let status = first_device_failed(&inf).await;
    assert!(
        status.devices[0].scheduler.failed,
        "{:?}",
        status.devices[0]
    );
    let (text, _) = collect(&inf, request("tiny", "after idle", 20))
        .await
        .unwrap();
    assert_eq!(text, greedy(dir.path(), "tiny", "after idle", 20));
}

/// A test double: the reference engine at a real device's pace (each step
/// sleeps), so that requests overlap long enough to contend.
struct Paced {
    inner: ReferenceBackend,
    step: Duration,
    /// From this many steps on (counted over every instance), each step
    /// fails as a device whose driver died would.
    fail_from: Option<usize>,
    steps: Arc<AtomicUsize>,
    /// Tokens stepped (counted over every instance).
    tokens: Arc<AtomicUsize>,
    meter: Option<Meter>,
    /// What the engine was asked to do, in order (every instance).
    events: Arc<Mutex<Vec<Event>>>,
    /// While set, every grow of a pool fails as memory that cannot be had.
    fail_grows: Arc<AtomicBool>,
    /// While set, a step that goes on with a prompt begun in an earlier
    /// step (chunked prefill) waits.
    hold_continued: Arc<AtomicBool>,
}

/// A call the double records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Grow,
    Shrink,
    Step,
}

/// Makes the double report memory in use, as a real engine's
/// `Backend::used_bytes` would: each instance holds `extra` bytes beyond
/// its KV pool.
#[derive(Clone)]
struct Meter {
    extra: u64,
    used: Arc<AtomicU64>,
}

impl Paced {
    fn backend(kind: DeviceKind, step_ms: u64, fail_from: Option<usize>) -> Arc<dyn Backend> {
        Arc::new(Paced::new(kind, step_ms, fail_from))
    }

    fn new(kind: DeviceKind, step_ms: u64, fail_from: Option<usize>) -> Paced {
        Paced {
            inner: ReferenceBackend::with_devices(kind, &[0]),
            step: Duration::from_millis(step_ms),
            fail_from,
            steps: Arc::new(AtomicUsize::new(0)),
            tokens: Arc::new(AtomicUsize::new(0)),
            meter: None,
            events: Arc::default(),
            fail_grows: Arc::default(),
            hold_continued: Arc::default(),
        }
    }
}

impl Backend for Paced {
    fn name(&self) -> &str {
        "paced-reference"
    }
    fn kind(&self) -> DeviceKind {
        self.inner.kind()
    }
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError> {
        self.inner.devices()
    }
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError> {
        self.inner.footprint(package)
    }
    fn used_bytes(&self, _device: usize) -> Option<u64> {
        self.meter.as_ref().map(|m| m.used.load(Ordering::SeqCst))
    }
    fn load(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<Box<dyn LlmInstance>, EngineError> {
        let inst = PacedInstance {
            inner: self.inner.load(source, device, options)?,
            step: self.step,
            fail_from: self.fail_from,
            steps: self.steps.clone(),
            tokens: self.tokens.clone(),
            meter: self.meter.clone(),
            events: self.events.clone(),
            fail_grows: self.fail_grows.clone(),
            hold_continued: self.hold_continued.clone(),
        };
        if let Some(m) = &self.meter {
            m.used
                .fetch_add(m.extra + inst.kv_bytes(), Ordering::SeqCst);
        }
        Ok(Box::new(inst))
    }
}

struct PacedInstance {
    inner: Box<dyn LlmInstance>,
    step: Duration,
    fail_from: Option<usize>,
    steps: Arc<AtomicUsize>,
    tokens: Arc<AtomicUsize>,
    meter: Option<Meter>,
    events: Arc<Mutex<Vec<Event>>>,
    fail_grows: Arc<AtomicBool>,
    hold_continued: Arc<AtomicBool>,
}

impl PacedInstance {
    fn kv_bytes(&self) -> u64 {
        self.inner.kv_capacity_blocks() as u64 * self.inner.kv_bytes_per_block()
    }
}

impl Drop for PacedInstance {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.used
                .fetch_sub(m.extra + self.kv_bytes(), Ordering::SeqCst);
        }
    }
}

impl LlmInstance for PacedInstance {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn block_size_tokens(&self) -> usize {
        self.inner.block_size_tokens()
    }
    fn kv_bytes_per_block(&self) -> u64 {
        self.inner.kv_bytes_per_block()
    }
    fn weight_bytes(&self) -> u64 {
        self.inner.weight_bytes()
    }
    fn kv_capacity_blocks(&self) -> usize {
        self.inner.kv_capacity_blocks()
    }
    fn kv_blocks_in_use(&self) -> usize {
        self.inner.kv_blocks_in_use()
    }
    fn kv_blocks_held_only_by(&self, seqs: &[SeqId]) -> usize {
        self.inner.kv_blocks_held_only_by(seqs)
    }
    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        let grow = blocks > self.inner.kv_capacity_blocks();
        let event = if grow { Event::Grow } else { Event::Shrink };
        self.events.lock().unwrap().push(event);
        if grow && self.fail_grows.load(Ordering::SeqCst) {
            return Err(EngineError::OutOfMemory {
                requested_bytes: blocks as u64 * self.inner.kv_bytes_per_block(),
                detail: "no memory for the grown pool".into(),
            });
        }
        let before = self.kv_bytes();
        self.inner.resize_kv(blocks)?;
        if let Some(m) = &self.meter {
            m.used.fetch_add(self.kv_bytes(), Ordering::SeqCst);
            m.used.fetch_sub(before, Ordering::SeqCst);
        }
        Ok(())
    }
    fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.inner.add_sequence(seq)
    }
    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.inner.free_sequence(seq)
    }
    fn fork_sequence(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), EngineError> {
        self.inner.fork_sequence(src, dst, tokens)
    }
    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.inner.sequence_len(seq)
    }
    fn blocks_needed(&self, batch: &[StepEntry]) -> Result<usize, EngineError> {
        self.inner.blocks_needed(batch)
    }
    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
        let continues = batch
            .iter()
            .any(|e| e.tokens.len() > 1 && self.inner.sequence_len(e.seq).is_some_and(|l| l > 0));
        while continues && self.hold_continued.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.events.lock().unwrap().push(Event::Step);
        std::thread::sleep(self.step);
        let n = self.steps.fetch_add(1, Ordering::Relaxed);
        let tokens = batch.iter().map(|e| e.tokens.len()).sum();
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        if self.fail_from.is_some_and(|f| n >= f) {
            return Err(EngineError::Device("the device fell off the bus".into()));
        }
        self.inner.step(batch)
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
}

#[tokio::test]
async fn a_request_preempted_off_a_full_gpu_is_recomputed_to_the_same_answer() {
    let dir = models(&[("tiny-a", 4), ("tiny-b", 5)]);
    let probe = start(dir.path(), vec![gpu(reference(DeviceKind::Gpu, 0))]).0;
    let f = probe.model_infos()[0].footprints["gpu"];
    drop(probe);
    let instance = INSTANCE_OVERHEAD_BYTES + f.weights_bytes;
    let block = 16 * f.kv_bytes_per_token;
    // Two instances and 170 KV blocks. tiny-a's request plans 80 blocks
    // (1,024 tokens and the watermark) all along; tiny-b's requests may
    // generate 712 tokens, so each plans its prompt and the whole 512-token
    // look-ahead for its first 200: two need 66 to 90 blocks, a third at
    // least 99 more: beyond the room beside tiny-a, and only memory stands
    // in the way, so tiny-a's smaller batch is preempted.
    let (inf, metrics) = start(
        dir.path(),
        vec![device(
            "gpu:0",
            DeviceKind::Gpu,
            Paced::backend(DeviceKind::Gpu, 5, None),
            2 * instance + 170 * block,
        )],
    );
    // tiny-a's request has a loose TPOT SLO: tiny-b's, with less headroom,
    // get the device first, so tiny-a's instance is mostly idle (an instance
    // in a run is never preempted).
    let mut relaxed = request("tiny-a", "a long one", 300);
    relaxed.tpot_slo_s = 10.0;
    let mut long = inf.generate(relaxed).await.unwrap();
    let long = tokio::spawn(async move {
        let mut text = String::new();
        while let Some(chunk) = long.next().await {
            text.push_str(&chunk.unwrap());
        }
        (text, long.usage())
    });
    let mut b = Vec::new();
    for p in ["b one", "b two", "b three"] {
        let mut s = inf.generate(request("tiny-b", p, 712)).await.unwrap();
        b.push(tokio::spawn(async move {
            let mut text = String::new();
            while let Some(chunk) = s.next().await {
                text.push_str(&chunk.unwrap());
            }
            (p, text)
        }));
    }
    for h in b {
        let (p, text) = h.await.unwrap();
        assert_eq!(text, greedy(dir.path(), "tiny-b", p, 712), "{p}");
    }
    let (text, usage) = long.await.unwrap();
    assert_eq!(usage.generated_tokens, 300);
    assert_eq!(text, greedy(dir.path(), "tiny-a", "a long one", 300));
    let preempted = metrics
        .preemptions
        .get_or_create(&DeviceLabels {
            model: "tiny-a".into(),
            device: "gpu:0".into(),
        })
        .get();
    assert!(preempted >= 1, "tiny-a's request was not preempted");
    quiet(&inf).await;
}

#[tokio::test]
async fn a_caller_hanging_up_frees_its_sequence() {
    let dir = models(&[("tiny", 6)]);
    let (inf, metrics) = start(
        dir.path(),
        vec![cpu(Paced::backend(DeviceKind::Cpu, 2, None))],
    );
    let mut s = inf
        .generate(request("tiny", "hang up", 2000))
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    // The runner publishes what its instance holds after each run.
    while inf
        .stats()
        .instances
        .iter()
        .all(|i| i.kv_blocks_in_use == 0)
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(inf.stats().live_requests, 1);
    drop(s);
    quiet(&inf).await;
    assert_eq!(outcomes(&metrics, "tiny", "cancelled"), 1);
    assert_eq!(outcomes(&metrics, "tiny", "finished"), 0);
}

#[tokio::test]
async fn a_device_that_fails_leaves_placement_and_the_others_carry_on() {
    let dir = models(&[("tiny", 7)]);
    // The CPU's engine fails from its 40th step on (the load's calibration
    // takes a few): mid-generation.
    let (inf, metrics) = start(
        dir.path(),
        vec![
            device(
                "cpu:0",
                DeviceKind::Cpu,
                Paced::backend(DeviceKind::Cpu, 0, Some(40)),
                1 << 30,
            ),
            gpu(reference(DeviceKind::Gpu, 0)),
        ],
    );
    let e = collect(&inf, request("tiny", "first", 100))
        .await
        .unwrap_err();
    match &e {
        InferenceError::Unavailable {
            message,
            retry_after_s,
        } => {
            assert!(message.contains("device cpu:0 failed"), "{message}");
            assert!(message.contains("fell off the bus"), "{message}");
            assert!(*retry_after_s > 0.0);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let status = first_device_failed(&inf).await;
    let cpu = &status.devices[0];
    assert!(cpu.scheduler.failed, "{cpu:?}");
    assert!(cpu.failed.as_deref().unwrap().contains("fell off the bus"));
    assert!(placed(&inf, "tiny").iter().all(|d| d != "cpu:0"));
    // The retry goes to the GPU and succeeds.
    let (text, _) = collect(&inf, request("tiny", "first", 100)).await.unwrap();
    assert_eq!(text, greedy(dir.path(), "tiny", "first", 100));
    assert_eq!(placed(&inf, "tiny"), ["gpu:0"]);
    assert_eq!(outcomes(&metrics, "tiny", "unavailable"), 1);
    quiet(&inf).await;
}

#[tokio::test]
async fn with_every_device_failed_requests_are_unavailable_not_hung() {
    let dir = models(&[("tiny", 8)]);
    let (inf, _) = start(
        dir.path(),
        vec![device(
            "cpu:0",
            DeviceKind::Cpu,
            Paced::backend(DeviceKind::Cpu, 0, Some(0)),
            1 << 30,
        )],
    );
    // The load's calibration fails first, then the first step.
    let first = collect(&inf, request("tiny", "x", 5)).await.unwrap_err();
    assert!(
        matches!(
            first,
            InferenceError::Unavailable { .. } | InferenceError::Engine(_)
        ),
        "{first}"
    );
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        collect(&inf, request("tiny", "x", 5)),
    )
    .await
    .expect("a request hangs with no device left")
    .unwrap_err();
    assert!(
        matches!(again, InferenceError::Unavailable { .. }),
        "{again}"
    );
}

#[tokio::test]
async fn packages_no_device_can_load_are_refused_with_the_reason() {
    let dir = models(&[("tiny", 9)]);
    // A package whose weights are gone: the reference engine cannot load it.
    let broken = tiny::write_package(dir.path(), "broken", 1);
    std::fs::remove_file(broken.join("model.safetensors")).unwrap();
    let toml = std::fs::read_to_string(broken.join("model.toml")).unwrap();
    std::fs::write(
        broken.join("model.toml"),
        toml.replace("safetensors = \"model.safetensors\"\n", ""),
    )
    .unwrap();
    let (inf, _) = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]);
    assert_eq!(inf.models(), ["tiny"]);
    let e = inf.add_model(&broken).unwrap_err().to_string();
    assert!(e.contains("no device of this host can load it"), "{e}");
    assert!(e.contains("no GGUF or safetensors weights"), "{e}");
    assert!(matches!(
        inf.generate(request("broken", "x", 1)).await,
        Err(InferenceError::ModelNotFound(_))
    ));
}

#[tokio::test]
async fn dropping_the_service_ends_open_streams_and_joins_its_threads() {
    let dir = models(&[("tiny", 10)]);
    let (inf, _) = start(
        dir.path(),
        vec![
            cpu(Paced::backend(DeviceKind::Cpu, 2, None)),
            gpu(Paced::backend(DeviceKind::Gpu, 2, None)),
        ],
    );
    let mut s = inf.generate(request("tiny", "long", 2000)).await.unwrap();
    s.next().await.unwrap().unwrap();
    tokio::task::spawn_blocking(move || drop(inf))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream hangs after the service stopped");
    assert!(ended.is_some(), "the stream finished normally");
}

/// The scheduler's static figure for each instance.
fn static_bytes(inf: &Inference) -> Vec<u64> {
    inf.status()
        .models
        .iter()
        .flat_map(|m| &m.instances)
        .map(|i| i.scheduler.static_bytes)
        .collect()
}

#[tokio::test]
async fn an_instance_counts_what_its_engine_measured_it_holds() {
    let dir = models(&[("tiny", 9)]);
    let extra = 300 * MIB;
    let backend = Paced {
        meter: Some(Meter {
            extra,
            used: Arc::new(AtomicU64::new(0)),
        }),
        ..Paced::new(DeviceKind::Cpu, 0, None)
    };
    let (inf, _) = start(dir.path(), vec![cpu(Arc::new(backend))]);
    let estimate = INSTANCE_OVERHEAD_BYTES + inf.model_infos()[0].footprints["cpu"].weights_bytes;
    assert_ne!(estimate, extra);
    collect(&inf, request("tiny", "measure me", 4))
        .await
        .unwrap();
    assert_eq!(static_bytes(&inf), [extra]);
    let s = inf.status();
    let i = &s.models[0].instances[0].scheduler;
    let kv = i.kv_blocks_committed * i.block_bytes;
    assert_eq!(s.devices[0].scheduler.committed_bytes, extra + kv, "{s:?}");
}

/// A pair of engines grows each engine's pool only before that engine's
/// first step, so after load it holds less KV than its pool counts: what
/// it measured it holds beyond its KV is still both engines' `extra`.
#[tokio::test]
async fn a_paired_instance_counts_the_kv_its_engines_hold_not_its_pool() {
    let dir = models(&[("tiny", 40)]);
    let extra = 300 * MIB;
    let used = Arc::new(AtomicU64::new(0));
    let metered = || -> Arc<dyn Backend> {
        Arc::new(Paced {
            meter: Some(Meter {
                extra,
                used: used.clone(),
            }),
            ..Paced::new(DeviceKind::Cpu, 0, None)
        })
    };
    let pair = PairedBackend::new(metered(), metered(), 8).unwrap();
    let (inf, _) = start(dir.path(), vec![cpu(Arc::new(pair))]);
    collect(&inf, request("tiny", "measure me", 4))
        .await
        .unwrap();
    assert_eq!(static_bytes(&inf), [2 * extra]);
}

#[tokio::test]
async fn a_cpu_device_shares_the_host_memory_budget_with_functions() {
    let dir = models(&[("tiny", 10)]);
    let probe = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]).0;
    let instance = INSTANCE_OVERHEAD_BYTES + probe.model_infos()[0].footprints["cpu"].weights_bytes;
    drop(probe);
    let budget = MemoryBudget::fixed(instance + 64 * MIB);
    // Functions hold all but a few MiB: no room for an instance.
    let held = instance + 60 * MIB;
    assert!(budget.try_reserve_functions(held));
    let (inf, _) = start_with(
        dir.path(),
        vec![cpu(reference(DeviceKind::Cpu, 0))],
        Some(budget.clone()),
        Scheduling::default(),
    );
    let mut req = request("tiny", "wait for memory", 4);
    req.ttft_slo_s = 60.0;
    let waiting = tokio::spawn({
        let inf = inf.clone();
        async move { collect(&inf, req).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "it must wait for room");
    assert!(placed(&inf, "tiny").is_empty());
    let s = inf.status();
    assert_eq!(s.devices[0].scheduler.room_bytes, 4 * MIB, "{s:?}");
    // The functions let go: the request is served.
    budget.release_functions(held);
    let (text, _) = waiting.await.unwrap().unwrap();
    assert_eq!(text, greedy(dir.path(), "tiny", "wait for memory", 4));
    // Now the instance holds its part, functions may not take it.
    let engines = budget.usage().engines_bytes;
    assert!(engines >= instance, "{engines} < {instance}");
    assert!(!budget.try_reserve_functions(instance + 64 * MIB - engines + 1));
    assert!(budget.try_reserve_functions(instance + 64 * MIB - engines));
}

#[tokio::test]
async fn long_prompts_are_prefilled_in_chunks_to_the_same_answers() {
    let dir = models(&[("tiny", 11)]);
    let (inf, _) = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]);
    // Two prompts of ~700 tokens submitted together: more than one CPU
    // prefill chunk (512 tokens), and the second is split across steps.
    let prompts: Vec<String> = ["first", "second"]
        .iter()
        .map(|w| {
            format!(
                "{w}: {}",
                "the quick brown fox jumps over a lazy dog; ".repeat(16)
            )
        })
        .collect();
    let runs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (inf, p) = (inf.clone(), p.clone());
            tokio::spawn(async move { collect(&inf, request("tiny", &p, 8)).await })
        })
        .collect();
    for (p, r) in prompts.iter().zip(runs) {
        let (text, usage) = r.await.unwrap().unwrap();
        assert!(usage.prompt_tokens > 600, "{usage:?}");
        assert_eq!(text, greedy(dir.path(), "tiny", p, 8));
    }
}

/// `tiny` on a paced CPU engine (`step_ms` a step), loaded and calibrated
/// by a first request, for the tests that count what prefills computed.
struct Counted {
    inf: Arc<Inference>,
    metrics: Arc<LlmMetrics>,
    /// Tokens the engine stepped.
    computed: Arc<AtomicUsize>,
}

impl Counted {
    async fn start(dir: &Path, step_ms: u64) -> Counted {
        let paced = Paced::new(DeviceKind::Cpu, step_ms, None);
        let computed = paced.tokens.clone();
        let (inf, metrics) = start(dir, vec![cpu(Arc::new(paced))]);
        collect(&inf, request("tiny", "warm up", 2)).await.unwrap();
        quiet(&inf).await;
        Counted {
            inf,
            metrics,
            computed,
        }
    }

    fn computed(&self) -> usize {
        self.computed.load(Ordering::SeqCst)
    }

    /// Prompt tokens copied rather than computed, as the metric counts them.
    fn copied(&self) -> usize {
        let labels = DeviceLabels {
            model: "tiny".into(),
            device: "cpu:0".into(),
        };
        self.metrics
            .prompt_tokens_shared
            .get_or_create(&labels)
            .get() as usize
    }
}

/// Prompts that begin alike and arrive together: the first computes what
/// they have in common, the others start as copies of it and compute only
/// the rest; each gets the answer it gets alone.
#[tokio::test]
async fn prompts_that_begin_alike_are_prefilled_once_to_the_same_answers() {
    let dir = models(&[("tiny", 11)]);
    // Loaded and calibrated first, so that the counts below are the burst's.
    let c = Counted::start(dir.path(), 0).await;
    let inf = &c.inf;
    let common = "the quick brown fox jumps over a lazy dog; ".repeat(8);
    let prompts: Vec<String> = (0..4).map(|i| format!("{common}then {i}")).collect();
    let (before, copied_before) = (c.computed(), c.copied());
    let runs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (inf, p) = (inf.clone(), p.clone());
            tokio::spawn(async move { collect(&inf, request("tiny", &p, 6)).await })
        })
        .collect();
    let (mut prompt_tokens, mut cached) = (0, 0);
    for (p, r) in prompts.iter().zip(runs) {
        let (text, usage) = r.await.unwrap().unwrap();
        assert_eq!(text, greedy(dir.path(), "tiny", p, 6));
        prompt_tokens += usage.prompt_tokens as usize;
        cached += usage.cached_tokens as usize;
    }
    // Each prompt's tokens once, and five decode steps of one token each,
    // less what the prompts took from one another.
    let shared = prompt_tokens + 4 * 5 - (c.computed() - before);
    println!("{prompt_tokens} prompt tokens; {shared} came from another prompt");
    let common_tokens = inf.tokenize("tiny", &common).unwrap().len();
    assert!(shared >= common_tokens, "{shared} tokens shared");
    // And counted so, in the metric and in the requests' usage.
    assert_eq!(c.copied() - copied_before, shared);
    assert_eq!(cached, shared);
    quiet(inf).await;
}

/// Prompts that arrive while one that begins alike is decoding start as
/// copies of its first tokens and compute only the rest, without a step of
/// their own; each gets the answer it gets alone, and so does the one they
/// copied. Another function's prompt copies nothing.
#[tokio::test]
async fn prompts_that_begin_like_a_running_one_start_as_copies_of_it() {
    let dir = models(&[("tiny", 11)]);
    let c = Counted::start(dir.path(), 5).await;
    let inf = &c.inf;
    let common = "the quick brown fox jumps over a lazy dog; ".repeat(8);
    let prompts: Vec<String> = (0..4).map(|i| format!("{common}then {i}")).collect();
    let (before, copied_before) = (c.computed(), c.copied());
    // The first has its first token (its prompt is in the KV) and decodes
    // on while the others come, one after the other; the last from
    // another function.
    let mut first = inf
        .generate(request("tiny", &prompts[0], 120))
        .await
        .unwrap();
    let (mut prompt_tokens, mut cached) = (0, 0);
    for (i, p) in prompts[1..].iter().enumerate() {
        let mut req = request("tiny", p, 6);
        if i == 2 {
            req.function = "other".into();
        }
        let copied_so_far = c.copied();
        let (text, usage) = collect(inf, req).await.unwrap();
        assert_eq!(text, greedy(dir.path(), "tiny", p, 6));
        prompt_tokens += usage.prompt_tokens as usize;
        cached += usage.cached_tokens as usize;
        if i == 2 {
            assert_eq!(usage.cached_tokens, 0);
            assert_eq!(
                c.copied(),
                copied_so_far,
                "another function's prompt copied"
            );
        }
    }
    assert!(
        inf.stats().live_requests > 0,
        "the first ended before the others"
    );
    let mut text = String::new();
    while let Some(chunk) = first.next().await {
        text.push_str(&chunk.unwrap());
    }
    assert_eq!(text, greedy(dir.path(), "tiny", &prompts[0], 120));
    prompt_tokens += first.usage().prompt_tokens as usize;
    assert_eq!(
        first.usage().cached_tokens,
        0,
        "the first copied from nothing"
    );
    // Each prompt's tokens once and a token a decode step (119, and 5 for
    // each of the other three), less what the second and third copied.
    let shared = prompt_tokens + 119 + 3 * 5 - (c.computed() - before);
    let common_tokens = inf.tokenize("tiny", &common).unwrap().len();
    assert!(
        shared >= 2 * common_tokens,
        "{shared} of {prompt_tokens} prompt tokens copied; {common_tokens} in common"
    );
    assert_eq!(c.copied() - copied_before, shared);
    assert_eq!(
        cached, shared,
        "the requests' usage counts what they copied"
    );
    quiet(inf).await;
}

/// The next call of a conversation, whose prompt is the last call's prompt
/// and answer and more, starts as a copy of the last call's sequence, kept
/// after it ended, and gets the answer it gets alone. The same prompt
/// again, and another function's call, copy nothing.
#[tokio::test]
async fn the_next_call_of_a_conversation_copies_the_last_ones_prompt_and_answer() {
    let dir = models(&[("tiny", 11)]);
    let c = Counted::start(dir.path(), 0).await;
    let inf = &c.inf;
    let first = "the quick brown fox jumps over a lazy dog; ".repeat(4);
    let (answer, usage) = collect(inf, request("tiny", &first, 8)).await.unwrap();
    assert_eq!(usage.cached_tokens, 0);
    // The same prompt again is computed as the first time.
    let (again, usage) = collect(inf, request("tiny", &first, 8)).await.unwrap();
    assert_eq!((again.as_str(), usage.cached_tokens), (answer.as_str(), 0));
    let next = format!("{first}{answer} and then");
    let (before, copied_before) = (c.computed(), c.copied());
    let (text, usage) = collect(inf, request("tiny", &next, 6)).await.unwrap();
    assert_eq!(text, greedy(dir.path(), "tiny", &next, 6));
    // The first call's prompt and answer are in the KV but its last token
    // (sampled, never fed): the copy reaches into the answer.
    let prompt = inf.tokenize("tiny", &first).unwrap().len();
    let cached = usage.cached_tokens as usize;
    assert!(
        cached > prompt && cached < prompt + 8,
        "{cached} tokens copied; the first prompt has {prompt}"
    );
    // The engine computed the rest of the prompt and 5 decode steps.
    assert_eq!(
        c.computed() - before,
        usage.prompt_tokens as usize - cached + 5
    );
    assert_eq!(c.copied() - copied_before, cached);
    let mut other = request("tiny", &next, 6);
    other.function = "other".into();
    let (text, usage) = collect(inf, other).await.unwrap();
    assert_eq!(text, greedy(dir.path(), "tiny", &next, 6));
    assert_eq!(usage.cached_tokens, 0, "another function's call copied");
    quiet(inf).await;
}

/// An idle CPU pool shrinks to its floor (`Scheduling::idle_kv_tokens`),
/// not to nothing: the last call's sequence stays in it, kept, and the next
/// call of its conversation after the shrink still copies it. Without the
/// floor the pool goes back whole and the next call computes everything.
#[tokio::test]
async fn an_idle_pool_keeps_the_last_call_for_the_next_one_of_its_conversation() {
    let dir = models(&[("tiny", 12)]);
    for floor in [true, false] {
        let devices = vec![cpu(reference(DeviceKind::Cpu, 0))];
        let (inf, _) = if floor {
            start(dir.path(), devices)
        } else {
            start_without_idle_kv(dir.path(), devices)
        };
        // A burst grows the pool beyond the floor.
        let runs = (0..8).map(|i| {
            let inf = inf.clone();
            async move { collect(&inf, request("tiny", &format!("prompt {i}"), 200)).await }
        });
        for o in futures::future::join_all(runs).await {
            o.unwrap();
        }
        let grown = kv_capacity(&inf);
        let first = "the quick brown fox jumps over a lazy dog; ".repeat(4);
        let (answer, _) = collect(&inf, request("tiny", &first, 8)).await.unwrap();
        // The pool shrinks 2 s after the last request (KV_SHRINK_DELAY_CPU_S).
        for _ in 0..100 {
            if kv_capacity(&inf) < grown {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stats = inf.stats();
        let i = &stats.instances[0];
        assert_eq!(i.kv_blocks_in_use, 0, "{i:?}");
        if floor {
            // The floor's tokens in the reference engine's 16-token blocks.
            assert_eq!(i.kv_blocks_capacity, IDLE_KV_TOKENS as usize / 16, "{i:?}");
            assert!(grown > i.kv_blocks_capacity, "grown to {grown}: {i:?}");
            assert!(i.kv_blocks_kept > 0, "{i:?}");
        } else {
            assert_eq!((i.kv_blocks_capacity, i.kv_blocks_kept), (0, 0), "{i:?}");
        }
        let next = format!("{first}{answer} and then");
        let (text, usage) = collect(&inf, request("tiny", &next, 6)).await.unwrap();
        assert_eq!(text, greedy(dir.path(), "tiny", &next, 6));
        let prompt = inf.tokenize("tiny", &first).unwrap().len();
        if floor {
            assert!(usage.cached_tokens as usize > prompt, "{usage:?}");
        } else {
            assert_eq!(usage.cached_tokens, 0, "{usage:?}");
        }
        quiet(&inf).await;
    }
}

#[tokio::test]
async fn a_prompt_gets_its_first_token_when_its_own_prefill_step_ends() {
    let dir = models(&[("tiny", 11)]);
    let paced = Paced::new(DeviceKind::Cpu, 1, None);
    let hold = paced.hold_continued.clone();
    hold.store(true, Ordering::SeqCst);
    let (inf, _) = start(dir.path(), vec![cpu(Arc::new(paced))]);
    // A long prompt and a short one arrive together (the model loads
    // first): one prefill of two steps, shortest first: the short prompt
    // and the long one's first tokens up to the 512-token chunk, then the
    // rest of the long one.
    let short = "a short question";
    let long = format!(
        "a long one: {}",
        "the quick brown fox jumps over a lazy dog; ".repeat(16)
    );
    // With log-probabilities every token is a chunk of its own, text or not.
    let with_logprobs = |prompt: &str| {
        let mut r = request("tiny", prompt, 6);
        r.params.logprobs = Some(1);
        r
    };
    // Each `generate` returns once its request has its first token.
    let spawn = |prompt: String| {
        let inf = inf.clone();
        tokio::spawn(async move { inf.generate(with_logprobs(&prompt)).await })
    };
    let second = spawn(long.clone());
    let first = spawn(short.to_string());
    // The second step is held: the short prompt's first token must come
    // out of the first.
    let got = tokio::time::timeout(Duration::from_secs(20), first).await;
    let held = !second.is_finished();
    hold.store(false, Ordering::SeqCst);
    let mut first = got
        .expect("the short prompt's first token waited for the long prompt's prefill")
        .unwrap()
        .unwrap();
    assert!(
        held,
        "the long prompt was answered before its last step ran"
    );
    let chunk = first.next_chunk().await.unwrap().unwrap();
    assert_eq!(chunk.tokens.len(), 1, "{chunk:?}");
    let mut text = chunk.text;
    while let Some(c) = first.next_chunk().await {
        text.push_str(&c.unwrap().text);
    }
    assert_eq!(text, greedy(dir.path(), "tiny", short, 6));
    let mut second = second.await.unwrap().unwrap();
    text.clear();
    while let Some(c) = second.next_chunk().await {
        text.push_str(&c.unwrap().text);
    }
    assert!(second.usage().prompt_tokens > 512, "{:?}", second.usage());
    assert_eq!(text, greedy(dir.path(), "tiny", &long, 6));
}

/// The chosen tokens and their log-probabilities of a whole generation.
async fn tokens_of(inf: &Inference, req: GenerateRequest) -> Vec<TokenLogprobs> {
    let mut s = inf.generate(req).await.unwrap();
    let mut tokens = Vec::new();
    while let Some(chunk) = s.next_chunk().await {
        tokens.extend(chunk.unwrap().tokens);
    }
    tokens
}

#[tokio::test]
async fn logprobs_are_the_log_softmax_of_the_engines_logits_and_a_logit_bias_steers_sampling() {
    let dir = models(&[("tiny-a", 3)]);
    let (inf, _) = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]);
    let (_, ids, logits) = greedy_steps(dir.path(), "tiny-a", "hello there", 8);
    let mut req = request("tiny-a", "hello there", 8);
    req.params.logprobs = Some(4);
    let tokens = tokens_of(&inf, req).await;
    assert_eq!(
        tokens.iter().map(|t| t.chosen.token).collect::<Vec<_>>(),
        ids
    );
    for (t, l) in tokens.iter().zip(&logits) {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = f64::from(max)
            + l.iter()
                .map(|&v| f64::from(v - max).exp())
                .sum::<f64>()
                .ln();
        let expected = (f64::from(l[t.chosen.token as usize]) - log_z) as f32;
        assert!(
            (t.chosen.logprob - expected).abs() < 1e-3,
            "{t:?} vs {expected}"
        );
        assert_eq!(t.top.len(), 4);
        assert_eq!(
            (t.top[0].token, t.top[0].logprob),
            (t.chosen.token, t.chosen.logprob)
        );
        assert!(t.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(!t.chosen.bytes.is_empty());
    }

    // A bias of 100 makes one token win every step; of -100, never.
    let force = ids[0] ^ 1;
    let mut req = request("tiny-a", "hello there", 5);
    req.params.logit_bias = vec![(force, 100.0)];
    req.params.logprobs = Some(0);
    let forced = tokens_of(&inf, req).await;
    assert!(forced.iter().all(|t| t.chosen.token == force), "{forced:?}");
    let mut req = request("tiny-a", "hello there", 8);
    req.params.logit_bias = vec![(ids[0], -100.0)];
    req.params.logprobs = Some(0);
    let banned = tokens_of(&inf, req).await;
    assert!(
        banned.iter().all(|t| t.chosen.token != ids[0]),
        "{banned:?}"
    );

    // A bias for a token the model lacks, and values out of range, are refused.
    let vocab = tiny::config().vocab_size as u32;
    for (bias, says) in [
        (vec![(vocab, 1.0)], "vocabulary"),
        (vec![(1, 101.0)], "[-100, 100]"),
    ] {
        let mut req = request("tiny-a", "hi", 2);
        req.params.logit_bias = bias;
        refused(&inf, req, says).await;
    }
    let mut req = request("tiny-a", "hi", 2);
    req.params.logprobs = Some(21);
    assert!(matches!(
        collect(&inf, req).await,
        Err(InferenceError::InvalidParams(_))
    ));
}

#[tokio::test]
async fn a_constraint_keeps_every_sampled_output_inside_it_and_its_end_ends_the_generation() {
    let dir = models(&[("tiny-a", 3)]);
    let (inf, _) = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]);
    let run = |constraint: Constraint, temperature: f32, seed: u64| {
        let mut req = request("tiny-a", "answer:", 120);
        req.params.constraint = Some(constraint);
        req.params.temperature = Some(temperature);
        req.params.seed = Some(seed);
        let inf = inf.clone();
        async move { collect(&inf, req).await }
    };
    let schema = r#"{"type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                       "ok": {"type": "boolean"},
                       "tag": {"enum": ["red", "green"]}},
        "required": ["n", "ok", "tag"], "additionalProperties": false}"#;
    // Greedy and sampled at two temperatures: always a complete, valid
    // value, ended by the constraint (the tiny model never picks EOS).
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (3.0, 3)] {
        let (text, usage) = run(Constraint::JsonSchema(schema.into()), temperature, seed)
            .await
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let n = v["n"].as_u64().unwrap_or_else(|| panic!("{text}"));
        assert!(n <= 999 && v["ok"].is_boolean(), "{text}");
        assert!(
            ["red", "green"].contains(&v["tag"].as_str().unwrap()),
            "{text}"
        );
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
        assert_eq!(usage.finish_reason, FinishReason::Stop, "{text}");
    }
    for seed in 0..5 {
        let (text, usage) = run(Constraint::Regex("[a-c]{3}-[0-9]{2}".into()), 2.0, seed)
            .await
            .unwrap();
        let b = text.as_bytes();
        assert!(
            b.len() == 6
                && b[..3].iter().all(|c| (b'a'..=b'c').contains(c))
                && b[3] == b'-'
                && b[4..].iter().all(u8::is_ascii_digit),
            "{text:?}"
        );
        assert_eq!(
            (usage.generated_tokens, usage.finish_reason),
            (6, FinishReason::Stop)
        );
    }
    let grammar = "start: answer \"!\"\nanswer: \"yes\" | \"no\" | \"maybe\"";
    let (text, _) = run(Constraint::Lark(grammar.into()), 1.0, 4).await.unwrap();
    assert!(
        ["yes!", "no!", "maybe!"].contains(&text.as_str()),
        "{text:?}"
    );
    // A length limit cuts a constrained output like any other.
    let mut req = request("tiny-a", "x", 3);
    req.params.constraint = Some(Constraint::Regex("[a-z]{10}".into()));
    let (text, usage) = collect(&inf, req).await.unwrap();
    assert_eq!((text.len(), usage.finish_reason), (3, FinishReason::Length));

    // Bad constraints are refused before anything runs, naming the problem.
    for (constraint, says) in [
        (
            Constraint::JsonSchema("{\"type\": ".into()),
            "json schema is not JSON",
        ),
        (
            Constraint::JsonSchema(r#"{"type": "frobnicate"}"#.into()),
            "json schema",
        ),
        (Constraint::Regex("([a-z]".into()), "regex"),
        (
            Constraint::Lark("start: undefined_rule".into()),
            "undefined_rule",
        ),
    ] {
        let mut req = request("tiny-a", "x", 3);
        req.params.constraint = Some(constraint);
        refused(&inf, req, says).await;
    }
    let mut req = request("tiny-a", "x", 3);
    req.params.constraint = Some(Constraint::Regex("a+".into()));
    req.params.min_tokens = Some(2);
    refused(&inf, req, "constraint").await;
    quiet(&inf).await;
}

#[tokio::test]
async fn an_embedding_is_the_normalised_final_hidden_state_of_the_prompts_last_token() {
    let dir = models(&[("tiny-a", 3)]);
    let (inf, _) = start(dir.path(), vec![cpu(reference(DeviceKind::Cpu, 0))]);
    let embed = |prompt: &str| {
        let mut req = request("tiny-a", prompt, 1);
        req.params.max_tokens = None;
        req.params.embed = true;
        let inf = inf.clone();
        async move {
            let mut s = inf.generate(req).await?;
            let mut chunks = Vec::new();
            while let Some(c) = s.next_chunk().await {
                chunks.push(c?);
            }
            Ok::<_, InferenceError>((chunks, s.usage()))
        }
    };
    // The model's own hidden state, computed directly.
    let direct = |prompt: &str| {
        let (_, mut inst, ids) = loaded(dir.path(), "tiny-a", prompt);
        inst.step(&[StepEntry {
            seq: 1,
            tokens: ids,
        }])
        .unwrap();
        let h = inst.last_hidden().unwrap().remove(0);
        let norm = h.iter().map(|x| x * x).sum::<f32>().sqrt();
        h.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    // Several at once (batched in one prefill), each its own answer, and a
    // generation in the same prefill is answered as one.
    let prompts = ["hello there", "a longer sentence to embed", "x"];
    let (answers, generated) = tokio::join!(
        futures::future::join_all(prompts.iter().map(|p| embed(p))),
        collect(&inf, request("tiny-a", "hello there", 4))
    );
    assert_eq!(
        generated.unwrap().0,
        greedy(dir.path(), "tiny-a", "hello there", 4)
    );
    for (p, answer) in prompts.iter().zip(answers) {
        let (chunks, usage) = answer.unwrap();
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        let v = &chunks[0].embedding;
        assert!(chunks[0].text.is_empty() && chunks[0].tokens.is_empty());
        assert_eq!(v.len(), tiny::config().hidden_size);
        let want = direct(p);
        assert!(
            v.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{p}: {v:?} vs {want:?}"
        );
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert_eq!(usage.prompt_tokens as usize, p.len());
        assert_eq!(
            (usage.generated_tokens, usage.finish_reason),
            (0, FinishReason::Stop)
        );
    }
    // What an embedding cannot take is refused.
    let mut req = request("tiny-a", "x", 1);
    req.params.embed = true;
    req.params.constraint = Some(Constraint::Regex("a".into()));
    refused(&inf, req, "embedding").await;
    quiet(&inf).await;
}

#[tokio::test]
async fn choices_of_one_prompt_compute_it_once_and_each_answers_as_alone() {
    let dir = models(&[("tiny-a", 3)]);
    let paced = Paced::new(DeviceKind::Cpu, 0, None);
    let tokens = paced.tokens.clone();
    let (inf, _) = start(dir.path(), vec![cpu(Arc::new(paced))]);
    let prompt = "a prompt of some length to share";
    let answers = |req: GenerateRequest, n: u32| {
        let inf = inf.clone();
        async move {
            let mut out = Vec::new();
            for mut s in inf.generate_choices(req, n).await.unwrap() {
                let mut text = String::new();
                while let Some(c) = s.next().await {
                    text.push_str(&c.unwrap());
                }
                out.push((text, s.usage()));
            }
            out
        }
    };
    // The instance loads (and calibrates) first.
    collect(&inf, request("tiny-a", "warm", 2)).await.unwrap();
    quiet(&inf).await;
    // Greedy: every choice is the model's greedy answer; the prompt's
    // tokens went through the engine once, each choice's decode its own.
    let before = tokens.load(Ordering::Relaxed);
    let greedy_text = greedy(dir.path(), "tiny-a", prompt, 8);
    let got = answers(request("tiny-a", prompt, 8), 3).await;
    assert_eq!(got.len(), 3);
    for (text, usage) in &got {
        assert_eq!(text, &greedy_text);
        assert_eq!(usage.generated_tokens, 8);
    }
    let prompt_tokens = got[0].1.prompt_tokens as usize;
    assert_eq!(
        tokens.load(Ordering::Relaxed) - before,
        prompt_tokens + 3 * 7,
        "one prefill of {prompt_tokens} tokens, three decodes of 7"
    );
    quiet(&inf).await;
    // Sampled with a seed: choice i is what a lone request with seed + i
    // answers.
    let mut req = request("tiny-a", prompt, 12);
    req.params.temperature = Some(1.5);
    req.params.seed = Some(40);
    let got = answers(req.clone(), 3).await;
    for (i, (text, _)) in got.iter().enumerate() {
        let mut alone = req.clone();
        alone.params.seed = Some(40 + i as u64);
        assert_eq!(text, &collect(&inf, alone).await.unwrap().0, "choice {i}");
    }
    assert!(got[0].0 != got[1].0 || got[1].0 != got[2].0, "{got:?}");
    // Bounds.
    for n in [0, 17] {
        match inf.generate_choices(request("tiny-a", prompt, 2), n).await {
            Err(InferenceError::InvalidParams(m)) => assert!(m.contains("n must be"), "{m}"),
            other => panic!("{n}: {}", other.is_ok()),
        }
    }
    quiet(&inf).await;
}
