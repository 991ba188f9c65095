//! # The inference room
//!
//! The live path "request → slinfer-scheduler (wall clock) → engine (OpenVINO
//! CPU) → token stream". [`Inference::start`] opens the models dir, detects the
//! devices and starts one driver thread that owns the [`Scheduler`]
//! (policy `slinfer`) on the wall clock; it executes the scheduler's commands
//! through one worker thread per loaded instance (loads, KV resizes, unloads
//! and iterations run there, never on a tokio worker). A worker runs an
//! iteration's ragged batch, samples each request with its own [`Sampler`],
//! detokenizes incrementally, checks EOS, stop sequences and lengths, and
//! sends the text straight to the request's [`GenerationStream`].
//!
//! Defaults (all in this file): see [`DEFAULT_TTFT_SLO_S`],
//! [`DEFAULT_TPOT_SLO_S`], [`DEFAULT_MAX_TOKENS`], [`KEEP_ALIVE_S`],
//! [`MEMORY_MARGIN_BYTES`]; the context length comes from `model.toml`.
//!
//! [`Scheduler`]: slinfer_scheduler::Scheduler
//! [`Sampler`]: slinfer_engine::Sampler

mod cost;
mod driver;
pub mod graphs;
mod text;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use slinfer_engine::package::{ModelPackage, PackageKind, package_dirs};

use crate::metrics::{DeviceLabels, LlmMetrics, ModelLabel, OutcomeLabels};
use tokio::sync::mpsc;

/// TTFT SLO when the caller passes 0 (seconds; this CPU, small models).
pub const DEFAULT_TTFT_SLO_S: f64 = 5.0;
/// TPOT SLO when the caller passes 0 (seconds per output token).
pub const DEFAULT_TPOT_SLO_S: f64 = 0.5;
/// `max_tokens` when the caller gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Idle time before an instance is unloaded (the CPU engine recompiles the
/// model on every load, which takes seconds).
pub const KEEP_ALIVE_S: f64 = 300.0;
/// Memory kept free for the rest of the process: the CPU budget is
/// MemAvailable at start minus this, or `SLINFER_INFERENCE_MEMORY_BYTES`.
pub const MEMORY_MARGIN_BYTES: u64 = 2 << 30;
/// Memory the scheduler reserves per instance beyond its weights (compiled
/// model, workspace).
pub const INSTANCE_OVERHEAD_BYTES: u64 = 256 << 20;
/// Seconds an overloaded caller is told to wait before retrying.
pub const RETRY_AFTER_S: f64 = 1.0;

/// Errors of the inference API.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("model {0:?} not found")]
    ModelNotFound(String),
    #[error("prompt of {prompt_tokens} tokens does not fit the context of {context_tokens}")]
    PromptTooLong {
        prompt_tokens: u32,
        context_tokens: u32,
    },
    #[error("overloaded: retry after {retry_after_s} s")]
    Overloaded { retry_after_s: f64 },
    #[error("the request missed its deadline")]
    DeadlineMissed,
    #[error("engine error: {0}")]
    Engine(String),
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    #[error("model {0:?} is already registered")]
    ModelExists(String),
}

/// A generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Caller identity (predictive look-ahead, metrics).
    pub function: String,
    pub model: String,
    pub prompt: Prompt,
    pub params: GenerationParams,
    /// 0: [`DEFAULT_TTFT_SLO_S`].
    pub ttft_slo_s: f64,
    /// 0: [`DEFAULT_TPOT_SLO_S`].
    pub tpot_slo_s: f64,
}

#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    /// Rendered with the model's own chat template (model.toml).
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub ttft_s: f64,
}

/// Live state, for tests and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferenceStats {
    /// Requests submitted and not ended.
    pub live_requests: usize,
    pub instances: Vec<InstanceStats>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStats {
    pub instance: u64,
    pub model: String,
    pub kv_blocks_in_use: usize,
    pub kv_blocks_capacity: usize,
}

/// A served model, as `slinfer models ls` and the status show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub family: String,
    pub source: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length_tokens: usize,
    pub kv_bytes_per_token: u64,
    pub weights_bytes: u64,
}

impl ModelInfo {
    fn of(m: &ModelEntry) -> ModelInfo {
        let (man, cfg) = (&m.package.manifest, &m.package.manifest.config);
        ModelInfo {
            name: m.name.clone(),
            family: cfg.family.clone(),
            source: man.source.clone(),
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            context_length_tokens: cfg.context_length_tokens,
            kv_bytes_per_token: man.kv_bytes_per_token,
            weights_bytes: m.weights_bytes,
        }
    }
}

/// The live scheduler's state (`GET /v1/status`, `slinfer status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InferenceStatus {
    pub devices: Vec<slinfer_scheduler::NodeSnapshot>,
    pub models: Vec<ModelStatus>,
    pub live_requests: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    #[serde(flatten)]
    pub info: ModelInfo,
    pub queued_requests: usize,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceStatus {
    /// `cpu:0`: device kind and scheduler node.
    pub device: String,
    #[serde(flatten)]
    pub scheduler: slinfer_scheduler::InstanceSnapshot,
    /// What the engine holds (absent while loading).
    pub kv_blocks_in_use: Option<usize>,
    pub kv_blocks_capacity: Option<usize>,
}

/// What a request's stream receives.
#[derive(Debug)]
pub(crate) enum Event {
    /// The first token was produced (generate returns).
    Started,
    Text(String),
    Done(Usage),
    Error(InferenceError),
}

/// One model of the models dir.
pub(crate) struct ModelEntry {
    pub name: String,
    pub dir: PathBuf,
    pub package: ModelPackage,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub weights_bytes: u64,
}

impl ModelEntry {
    fn context_tokens(&self) -> u32 {
        self.package.manifest.config.context_length_tokens as u32
    }
}

// The binding shares `Inference` across tasks and keeps streams in them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Inference>();
    send_sync::<GenerationStream>();
};

/// Options of [`Inference::start_with`].
#[derive(Clone, Default)]
pub struct InferenceOptions {
    /// The virtualenv with the `openvino` wheel; default `$SLINFER_VENV`.
    pub venv: Option<PathBuf>,
    /// Memory the CPU device may hold for instances; default: see
    /// [`MEMORY_MARGIN_BYTES`].
    pub memory_bytes: Option<u64>,
    /// Where request outcomes and scheduler state are recorded (the host's
    /// `/metrics`); default: a private set.
    pub metrics: Option<Arc<LlmMetrics>>,
}

/// The served models: ids index `all` and never change (a removed model's
/// entry stays, unnamed, for requests still running on it).
#[derive(Default)]
struct Models {
    all: Vec<Arc<ModelEntry>>,
    by_name: HashMap<String, usize>,
}

/// The inference service; share it as `Arc<Inference>`.
pub struct Inference {
    models: RwLock<Models>,
    metrics: Arc<LlmMetrics>,
    to_driver: Mutex<std::sync::mpsc::Sender<driver::Msg>>,
    driver: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_id: AtomicU64,
    stats: Arc<driver::SharedStats>,
    functions: Mutex<HashMap<String, u32>>,
}

impl Inference {
    /// Open `models_dir` (each subfolder with an LLM's model.toml is a model), detect
    /// devices (OpenVINO CPU; CUDA is not driven yet), start the live
    /// scheduler and device workers.
    pub fn start(models_dir: &Path) -> anyhow::Result<Arc<Inference>> {
        Self::start_with(models_dir, &InferenceOptions::default())
    }

    /// [`Inference::start`] with explicit options.
    pub fn start_with(
        models_dir: &Path,
        options: &InferenceOptions,
    ) -> anyhow::Result<Arc<Inference>> {
        let mut models = Models::default();
        // Tensor models (`kind = "tensor"`) are wasi:nn's, not ours.
        let entries = package_dirs(models_dir, PackageKind::Llm)
            .map_err(|e| anyhow::anyhow!("models dir {}: {e}", models_dir.display()))?;
        for dir in entries {
            match open_model(&dir) {
                Ok(m) => {
                    models.by_name.insert(m.name.clone(), models.all.len());
                    models.all.push(Arc::new(m));
                }
                Err(e) => tracing::warn!("skipping model {}: {e:#}", dir.display()),
            }
        }
        let backend = slinfer_openvino::OpenVinoBackend::new(&slinfer_openvino::BackendOptions {
            venv: options.venv.clone(),
            ..Default::default()
        })
        .map_err(|e| anyhow::anyhow!("OpenVINO CPU engine: {e}"))?;
        let capacity = options.memory_bytes.unwrap_or_else(memory_budget);
        let stats = Arc::new(driver::SharedStats::default());
        let metrics = options.metrics.clone().unwrap_or_default();
        let (tx, driver) = driver::spawn(
            models.all.clone(),
            Arc::new(backend),
            capacity,
            stats.clone(),
            metrics.clone(),
        )?;
        Ok(Arc::new(Inference {
            models: RwLock::new(models),
            metrics,
            to_driver: Mutex::new(tx),
            driver: Mutex::new(Some(driver)),
            next_id: AtomicU64::new(1),
            stats,
            functions: Mutex::new(HashMap::new()),
        }))
    }

    fn send(&self, msg: driver::Msg) -> Result<(), InferenceError> {
        self.to_driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg)
            .map_err(|_| InferenceError::Engine("the inference driver has stopped".into()))
    }

    /// Serves the model package in `dir` (imported while the host runs);
    /// returns its name.
    pub fn add_model(&self, dir: &Path) -> Result<String, InferenceError> {
        let entry =
            Arc::new(open_model(dir).map_err(|e| InferenceError::Engine(format!("{e:#}")))?);
        let name = entry.name.clone();
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        if models.by_name.contains_key(&name) {
            return Err(InferenceError::ModelExists(name));
        }
        // Under the lock, so the driver learns models in id order.
        self.send(driver::Msg::AddModel(entry.clone()))?;
        let id = models.all.len();
        models.by_name.insert(name.clone(), id);
        models.all.push(entry);
        Ok(name)
    }

    /// Stops serving `name`: new requests get `ModelNotFound` at once;
    /// requests already running finish, then its instances unload.
    pub fn remove_model(&self, name: &str) -> Result<(), InferenceError> {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        let idx = models
            .by_name
            .remove(name)
            .ok_or_else(|| InferenceError::ModelNotFound(name.to_string()))?;
        self.send(driver::Msg::RetireModel(idx))
    }

    /// The models served now.
    pub fn model_infos(&self) -> Vec<ModelInfo> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ModelInfo> = models
            .by_name
            .values()
            .map(|&i| ModelInfo::of(&models.all[i]))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Names of the models served now, sorted.
    pub fn models(&self) -> Vec<String> {
        self.model_infos().into_iter().map(|m| m.name).collect()
    }

    fn model(&self, name: &str) -> Result<(usize, Arc<ModelEntry>), InferenceError> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        models
            .by_name
            .get(name)
            .map(|&i| (i, models.all[i].clone()))
            .ok_or_else(|| InferenceError::ModelNotFound(name.to_string()))
    }

    pub fn tokenize(&self, model: &str, text: &str) -> Result<Vec<u32>, InferenceError> {
        let (_, m) = self.model(model)?;
        m.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| InferenceError::Engine(format!("tokenizer: {e}")))
    }

    pub fn detokenize(&self, model: &str, tokens: &[u32]) -> Result<String, InferenceError> {
        let (_, m) = self.model(model)?;
        let vocab = m.tokenizer.get_vocab_size(true) as u32;
        if let Some(t) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(InferenceError::InvalidParams(format!(
                "token id {t} is outside the vocabulary ({vocab})"
            )));
        }
        m.tokenizer
            .decode(tokens, false)
            .map_err(|e| InferenceError::Engine(format!("tokenizer: {e}")))
    }

    /// The text a chat prompt becomes with the model's template.
    pub fn render_chat(
        &self,
        model: &str,
        messages: &[ChatMessage],
    ) -> Result<String, InferenceError> {
        let (_, m) = self.model(model)?;
        let template = m.package.manifest.chat_template.as_deref().ok_or_else(|| {
            InferenceError::InvalidParams(format!("model {model} has no chat template"))
        })?;
        let token = |id: u32| m.tokenizer.id_to_token(id).unwrap_or_default();
        let cfg = &m.package.manifest.config;
        let bos = cfg.bos_token_id.map(token).unwrap_or_default();
        let eos = cfg
            .eos_token_ids
            .first()
            .copied()
            .map(token)
            .unwrap_or_default();
        text::render_chat(template, messages, &bos, &eos)
    }

    /// Live requests and KV blocks in use per instance.
    pub fn stats(&self) -> InferenceStats {
        self.stats.snapshot()
    }

    /// The scheduler's view of devices, models and instances, with what the
    /// engine holds.
    pub fn status(&self) -> InferenceStatus {
        let snap = self.stats.scheduler();
        let engine = self.stats.snapshot();
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ModelStatus> = models
            .by_name
            .values()
            .map(|&idx| ModelStatus {
                info: ModelInfo::of(&models.all[idx]),
                queued_requests: snap.queued.get(&(idx as u32)).copied().unwrap_or(0),
                instances: snap
                    .instances
                    .iter()
                    .filter(|i| i.model == idx as u32)
                    .map(|i| {
                        let e = engine.instances.iter().find(|e| e.instance == i.instance);
                        InstanceStatus {
                            device: format!("{}:{}", i.kind.name(), i.node),
                            scheduler: i.clone(),
                            kv_blocks_in_use: e.map(|e| e.kv_blocks_in_use),
                            kv_blocks_capacity: e.map(|e| e.kv_blocks_capacity),
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        InferenceStatus {
            devices: snap.nodes,
            models: out,
            live_requests: engine.live_requests,
        }
    }

    /// Sets the scheduler-state gauges of `/metrics` from [`Self::status`].
    pub fn refresh_metrics(&self) {
        let status = self.status();
        let m = &self.metrics;
        m.clear_gauges();
        for model in &status.models {
            let name = &model.info.name;
            m.queued
                .get_or_create(&ModelLabel {
                    model: name.clone(),
                })
                .set(model.queued_requests as i64);
            for i in &model.instances {
                let l = DeviceLabels {
                    model: name.clone(),
                    device: i.device.clone(),
                };
                m.instances.get_or_create(&l).inc();
                m.batch.get_or_create(&l).inc_by(i.scheduler.batch as i64);
                m.kv_blocks_committed
                    .get_or_create(&l)
                    .inc_by(i.scheduler.kv_blocks_committed as i64);
                m.kv_blocks_planned
                    .get_or_create(&l)
                    .inc_by(i.scheduler.kv_blocks_planned as i64);
                m.kv_blocks_in_use
                    .get_or_create(&l)
                    .inc_by(i.kv_blocks_in_use.unwrap_or(0) as i64);
            }
        }
    }

    /// Submit a generation; tokens flow through the returned stream, which
    /// is handed back once the first token exists (or the request failed).
    /// Dropping the stream cancels the request and frees its KV sequence.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationStream, InferenceError> {
        let (idx, m) = self.model(&req.model)?;
        let p = &req.params;
        let max_tokens = p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err(InferenceError::InvalidParams(
                "max_tokens must be at least 1".into(),
            ));
        }
        let temperature = p.temperature.unwrap_or(0.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(InferenceError::InvalidParams(
                "temperature must be >= 0".into(),
            ));
        }
        let top_p = p.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(InferenceError::InvalidParams(
                "top_p must be in (0, 1]".into(),
            ));
        }
        let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(InferenceError::InvalidParams(
                "repetition_penalty must be > 0".into(),
            ));
        }
        let ttft = slo(req.ttft_slo_s, DEFAULT_TTFT_SLO_S, "ttft_slo_s")?;
        let tpot = slo(req.tpot_slo_s, DEFAULT_TPOT_SLO_S, "tpot_slo_s")?;
        let text = match &req.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(msgs) => self.render_chat(&req.model, msgs)?,
        };
        let prompt = self.tokenize(&req.model, &text)?;
        let context = m.context_tokens();
        if prompt.is_empty() {
            return Err(InferenceError::InvalidParams("empty prompt".into()));
        }
        if prompt.len() as u32 >= context {
            return Err(InferenceError::PromptTooLong {
                prompt_tokens: prompt.len() as u32,
                context_tokens: context,
            });
        }
        let seed = match p.seed {
            Some(s) => s,
            None => getrandom::u64().unwrap_or(0x5eed),
        };
        let sampling = slinfer_engine::SamplingParams {
            temperature,
            top_k: p.top_k.unwrap_or(0) as usize,
            top_p,
            repetition_penalty,
            seed,
        };
        let function = {
            let mut f = self.functions.lock().unwrap_or_else(|e| e.into_inner());
            let n = f.len() as u32;
            *f.entry(req.function.clone()).or_insert(n)
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let state = driver::GenState::new(driver::GenInit {
            id,
            model: m,
            prompt,
            sampling,
            max_tokens,
            stop: p.stop.clone(),
            context_tokens: context,
            tx,
            cancelled: cancelled.clone(),
            ttft_slo_s: ttft,
            tpot_slo_s: tpot,
            metrics: self.metrics.clone(),
        });
        let to_driver = self
            .to_driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut stream = GenerationStream {
            id,
            model: req.model.clone(),
            metrics: self.metrics.clone(),
            rx,
            cancelled,
            to_driver: Some(to_driver.clone()),
            usage: None,
            pending: None,
            done: false,
        };
        to_driver
            .send(driver::Msg::Submit {
                model: idx,
                function,
                state: Box::new(state),
            })
            .map_err(|_| InferenceError::Engine("the inference driver has stopped".into()))?;
        // Wait for the first token (or the failure) so that errors such as
        // `Overloaded` come back from here.
        match stream.rx.recv().await {
            Some(Event::Started) => Ok(stream),
            Some(Event::Error(e)) => {
                stream.done = true;
                Err(e)
            }
            Some(ev) => {
                stream.pending = Some(ev);
                Ok(stream)
            }
            None => {
                stream.done = true;
                Err(InferenceError::Engine(
                    "the inference driver has stopped".into(),
                ))
            }
        }
    }
}

impl Drop for Inference {
    /// Stops the driver and the instance workers (their instances and KV
    /// pools are freed); streams still open end with an error.
    fn drop(&mut self) {
        let _ = self.send(driver::Msg::Shutdown);
        let driver = self.driver.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = driver.take() {
            let _ = t.join();
        }
    }
}

fn slo(v: f64, default: f64, name: &str) -> Result<f64, InferenceError> {
    if v == 0.0 {
        Ok(default)
    } else if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(InferenceError::InvalidParams(format!("{name} must be > 0")))
    }
}

fn open_model(dir: &Path) -> anyhow::Result<ModelEntry> {
    let package = ModelPackage::open(dir)?;
    let tok_path = package
        .tokenizer_path()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let weights_bytes = package
        .openvino_ir_path()
        .and_then(|x| std::fs::metadata(x.with_extension("bin")).ok())
        .map(|m| m.len())
        .ok_or_else(|| anyhow::anyhow!("{}: no OpenVINO IR; re-import it", dir.display()))?;
    Ok(ModelEntry {
        name: package.manifest.name.clone(),
        dir: dir.to_path_buf(),
        package,
        tokenizer: Arc::new(tokenizer),
        weights_bytes,
    })
}

/// Bytes the CPU device may hold for instances: `SLINFER_INFERENCE_MEMORY_BYTES`,
/// or MemAvailable minus [`MEMORY_MARGIN_BYTES`].
fn memory_budget() -> u64 {
    if let Some(v) = std::env::var("SLINFER_INFERENCE_MEMORY_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return v;
    }
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30);
    avail.saturating_sub(MEMORY_MARGIN_BYTES).max(512 << 20)
}

/// The tokens of one generation.
pub struct GenerationStream {
    id: u64,
    model: String,
    metrics: Arc<LlmMetrics>,
    rx: mpsc::UnboundedReceiver<Event>,
    cancelled: Arc<AtomicBool>,
    to_driver: Option<std::sync::mpsc::Sender<driver::Msg>>,
    usage: Option<Usage>,
    pending: Option<Event>,
    done: bool,
}

impl GenerationStream {
    /// Next chunk of text (one or more tokens, UTF-8 safe), or None when
    /// finished.
    pub async fn next(&mut self) -> Option<Result<String, InferenceError>> {
        loop {
            if self.done {
                return None;
            }
            let ev = match self.pending.take() {
                Some(ev) => Some(ev),
                None => self.rx.recv().await,
            };
            match ev {
                Some(Event::Started) => continue,
                Some(Event::Text(t)) if t.is_empty() => continue,
                Some(Event::Text(t)) => return Some(Ok(t)),
                Some(Event::Done(u)) => {
                    self.usage = Some(u);
                    self.done = true;
                    self.to_driver = None;
                    return None;
                }
                Some(Event::Error(e)) => {
                    self.done = true;
                    self.to_driver = None;
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    return Some(Err(InferenceError::Engine(
                        "the inference driver has stopped".into(),
                    )));
                }
            }
        }
    }

    /// Valid after `next` returned None.
    pub fn usage(&self) -> Usage {
        self.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            generated_tokens: 0,
            finish_reason: FinishReason::Stop,
            ttft_s: 0.0,
        })
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if self.done && self.usage.is_some() {
            return;
        }
        if !self.done {
            self.metrics
                .requests
                .get_or_create(&OutcomeLabels {
                    model: self.model.clone(),
                    outcome: "cancelled".into(),
                })
                .inc();
        }
        self.cancelled.store(true, Ordering::Relaxed);
        if let Some(tx) = self.to_driver.take() {
            let _ = tx.send(driver::Msg::Cancel(self.id));
        }
    }
}
