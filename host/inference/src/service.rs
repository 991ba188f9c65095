//! [`Inference`]: the service callers hold. It keeps the model catalog,
//! checks and tokenizes requests, hands them to the driver thread, and reads
//! the published state for status and metrics.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use slinfer_engine::package::{PackageKind, package_dirs};
use tokio::sync::mpsc;

use crate::api::{
    ChatMessage, DEFAULT_TPOT_SLO_S, DEFAULT_TTFT_SLO_S, DeviceStatus, GenerateRequest,
    InferenceError, InferenceStats, InferenceStatus, InstanceStatus, MAX_CHOICES, ModelInfo,
    ModelStatus, Prompt, Scheduling,
};
use crate::catalog::{Catalog, ModelEntry};
use crate::devices::Device;
use crate::driver::{self, Msg};
use crate::generation::{Event, Generation, GenerationStream};
use crate::memory::MemoryBudget;
use crate::metrics::LlmMetrics;
use crate::stats::SharedStats;

/// Other members of a cluster, for generations this host does not serve
/// or cannot take now. The binary implements it on the cluster; this crate
/// knows nothing of the network.
pub trait Remote: Send + Sync {
    /// Run `req` on another member that serves its model, the best
    /// candidate first: `ModelNotFound` when none serves it, the
    /// candidates' refusal (`Overloaded`, with the shortest retry hint)
    /// when none takes it.
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> Pin<Box<dyn Future<Output = Result<GenerationStream, InferenceError>> + Send + '_>>;

    /// Models other members serve now.
    fn models(&self) -> Vec<String>;
}

/// What [`Inference::start`] serves on.
#[derive(Default)]
pub struct InferenceConfig {
    /// Each becomes one scheduler node; CPUs are tried first. None: the
    /// service serves no model itself and routes every generation to its
    /// [`Remote`].
    pub devices: Vec<Device>,
    /// Where request outcomes and scheduler state are recorded (the host's
    /// `/metrics`); default: a private set.
    pub metrics: Option<Arc<LlmMetrics>>,
    /// The host-wide budget that instances on the CPU share with the
    /// functions' Wasm memories (re-read every second); `None`: CPU devices
    /// keep their `capacity_bytes`.
    pub memory: Option<Arc<MemoryBudget>>,
    pub scheduling: Scheduling,
}

// The binding shares `Inference` across tasks and keeps streams in them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Inference>();
    send_sync::<GenerationStream>();
};

/// The inference service; share it as `Arc<Inference>`.
pub struct Inference {
    catalog: RwLock<Catalog>,
    devices: Vec<Device>,
    metrics: Arc<LlmMetrics>,
    to_driver: Mutex<std::sync::mpsc::Sender<Msg>>,
    driver: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_id: AtomicU64,
    stats: Arc<SharedStats>,
    functions: Mutex<HashMap<String, u32>>,
    remote: OnceLock<Arc<dyn Remote>>,
    policy: slinfer_scheduler::Policy,
}

impl Inference {
    /// Opens `models_dir` (each subfolder with an LLM's model.toml that one
    /// of the devices can load is a model) and starts the driver on
    /// `config.devices`.
    pub fn start(models_dir: &Path, config: InferenceConfig) -> anyhow::Result<Arc<Inference>> {
        let mut catalog = Catalog::default();
        // Tensor models (`kind = "tensor"`) are wasi:nn's, not ours; with no
        // device, no model is ours.
        let entries = match config.devices.is_empty() {
            true => Vec::new(),
            false => package_dirs(models_dir, PackageKind::Llm)
                .map_err(|e| anyhow::anyhow!("models dir {}: {e}", models_dir.display()))?,
        };
        for dir in entries {
            match ModelEntry::open(&dir, &config.devices) {
                Ok(m) => {
                    catalog.add(Arc::new(m));
                }
                Err(e) => tracing::warn!("skipping model {}: {e:#}", dir.display()),
            }
        }
        let stats = Arc::new(SharedStats::default());
        let metrics = config.metrics.unwrap_or_default();
        let policy = config.scheduling.policy;
        let (tx, driver) = driver::spawn(
            catalog.all.clone(),
            config.devices.clone(),
            (stats.clone(), metrics.clone()),
            config.memory,
            config.scheduling,
        )?;
        Ok(Arc::new(Inference {
            catalog: RwLock::new(catalog),
            devices: config.devices,
            metrics,
            to_driver: Mutex::new(tx),
            driver: Mutex::new(Some(driver)),
            next_id: AtomicU64::new(1),
            stats,
            functions: Mutex::new(HashMap::new()),
            remote: OnceLock::new(),
            policy,
        }))
    }

    /// Route generations this host does not serve, or cannot take now, to
    /// `remote` (once, when the host joins a cluster).
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        if self.remote.set(remote).is_err() {
            tracing::warn!("the inference service already has a remote");
        }
    }

    fn sender(&self) -> std::sync::mpsc::Sender<Msg> {
        self.to_driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn send(&self, msg: Msg) -> Result<(), InferenceError> {
        self.sender()
            .send(msg)
            .map_err(|_| InferenceError::Engine("the inference driver has stopped".into()))
    }

    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The devices it serves on.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Serves the model package in `dir` (imported while the host runs);
    /// returns its name.
    pub fn add_model(&self, dir: &Path) -> Result<String, InferenceError> {
        let entry = Arc::new(
            ModelEntry::open(dir, &self.devices)
                .map_err(|e| InferenceError::Engine(format!("{e:#}")))?,
        );
        let name = entry.name.clone();
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        if catalog.by_name.contains_key(&name) {
            return Err(InferenceError::ModelExists(name));
        }
        // Under the lock, so the driver learns models in id order.
        self.send(Msg::AddModel(entry.clone()))?;
        catalog.add(entry);
        Ok(name)
    }

    /// Stops serving `name`: new requests get `ModelNotFound` at once;
    /// requests already running finish, then its instances unload.
    pub fn remove_model(&self, name: &str) -> Result<(), InferenceError> {
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        let idx = catalog
            .by_name
            .remove(name)
            .ok_or_else(|| InferenceError::ModelNotFound(name.to_string()))?;
        self.send(Msg::RetireModel(idx))
    }

    /// The models served now, sorted by name.
    pub fn model_infos(&self) -> Vec<ModelInfo> {
        self.catalog()
            .served()
            .into_iter()
            .map(|(_, m)| m.info())
            .collect()
    }

    /// Names of the models served now, sorted: here, and by other
    /// members of the cluster.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.model_infos().into_iter().map(|m| m.name).collect();
        if let Some(r) = self.remote.get() {
            names.extend(r.models());
            names.sort();
            names.dedup();
        }
        names
    }

    fn model(&self, name: &str) -> Result<(usize, Arc<ModelEntry>), InferenceError> {
        self.catalog().get(name)
    }

    pub fn tokenize(&self, model: &str, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.model(model)?.1.tokenize(text)
    }

    pub fn detokenize(&self, model: &str, tokens: &[u32]) -> Result<String, InferenceError> {
        self.model(model)?.1.detokenize(tokens)
    }

    /// The text a chat prompt becomes with the model's template.
    pub fn render_chat(
        &self,
        model: &str,
        messages: &[ChatMessage],
        tools: Option<&str>,
    ) -> Result<String, InferenceError> {
        self.model(model)?.1.render_chat(messages, tools)
    }

    /// Live requests and KV blocks in use per instance.
    pub fn stats(&self) -> InferenceStats {
        self.stats.snapshot()
    }

    /// The scheduler's view of devices, models and instances, with what the
    /// engines hold.
    pub fn status(&self) -> InferenceStatus {
        let snap = self.stats.scheduler();
        let engine = self.stats.snapshot();
        let devices = snap
            .nodes
            .iter()
            .map(|n| {
                let d = &self.devices[n.node];
                DeviceStatus {
                    name: d.name.clone(),
                    backend: d.backend.name().to_string(),
                    scheduler: n.clone(),
                    failed: self.stats.failure(n.node),
                }
            })
            .collect();
        let models = self
            .catalog()
            .served()
            .into_iter()
            .map(|(idx, m)| ModelStatus {
                info: m.info(),
                queued_requests: snap.queued.get(&(idx as u32)).copied().unwrap_or(0),
                admission: self.stats.admission(idx),
                instances: snap
                    .instances
                    .iter()
                    .filter(|i| i.model == idx as u32)
                    .map(|i| {
                        let e = engine.instances.iter().find(|e| e.instance == i.instance);
                        InstanceStatus {
                            device: self.devices[i.node].name.clone(),
                            scheduler: i.clone(),
                            kv_blocks_in_use: e.map(|e| e.kv_blocks_in_use),
                            kv_blocks_kept: e.map(|e| e.kv_blocks_kept),
                            kv_blocks_capacity: e.map(|e| e.kv_blocks_capacity),
                        }
                    })
                    .collect(),
            })
            .collect();
        InferenceStatus {
            policy: self.policy,
            devices,
            models,
            live_requests: engine.live_requests,
        }
    }

    /// Sets the scheduler-state gauges of `/metrics` from [`Self::status`].
    pub fn refresh_metrics(&self) {
        self.metrics.refresh(&self.status());
    }

    /// Submits a generation; tokens flow through the returned stream, which
    /// is handed back once the first token exists (or the request failed).
    /// Dropping the stream cancels the request and frees its KV sequence.
    ///
    /// With a [`Remote`], a model this host does not serve goes there, and
    /// so does a request this host refuses for want of room (`Overloaded`,
    /// `Unavailable`); when no other member takes it either, the answer is
    /// [`InferenceError::first_refusal`] of this host's and theirs.
    pub async fn generate(
        &self,
        mut req: GenerateRequest,
    ) -> Result<GenerationStream, InferenceError> {
        let Some(remote) = self.remote.get() else {
            return self.generate_here(req).await;
        };
        req.arrived.get_or_insert_with(Instant::now);
        if self.model(&req.model).is_err() {
            return remote.generate(req).await;
        }
        match self.generate_here(req.clone()).await {
            Err(
                local @ (InferenceError::Overloaded { .. } | InferenceError::Unavailable { .. }),
            ) => remote
                .generate(req)
                .await
                .map_err(|e| local.first_refusal(e)),
            r => r,
        }
    }

    /// [`Self::generate`] on this host's devices only (never routed): what
    /// a request another member sent here runs.
    pub async fn generate_here(
        &self,
        req: GenerateRequest,
    ) -> Result<GenerationStream, InferenceError> {
        let mut one = self.choices_here(req, 1).await?;
        Ok(one.pop().expect("one choice"))
    }

    /// `n` continuations of one prompt (1 to [`MAX_CHOICES`]), each its own
    /// stream; choice `i` samples with `seed + i` when a seed is given.
    /// Here, the prompt's KV is computed once and shared by the choices
    /// that an instance prefills together (`LlmInstance::fork_sequence`);
    /// a model served only by other members runs each choice there.
    pub async fn generate_choices(
        &self,
        mut req: GenerateRequest,
        n: u32,
    ) -> Result<Vec<GenerationStream>, InferenceError> {
        if n == 0 || n > MAX_CHOICES {
            return Err(InferenceError::InvalidParams(format!(
                "n must be from 1 to {MAX_CHOICES}"
            )));
        }
        if n == 1 {
            return Ok(vec![self.generate(req).await?]);
        }
        match self.remote.get() {
            Some(remote) if self.model(&req.model).is_err() => {
                req.arrived.get_or_insert_with(Instant::now);
                let choices = (0..n).map(|i| {
                    remote.generate(GenerateRequest {
                        params: req.params.choice(i),
                        ..req.clone()
                    })
                });
                futures::future::try_join_all(choices).await
            }
            _ => self.choices_here(req, n).await,
        }
    }

    async fn choices_here(
        &self,
        mut req: GenerateRequest,
        n: u32,
    ) -> Result<Vec<GenerationStream>, InferenceError> {
        let (idx, m) = self.model(&req.model)?;
        req.params.check()?;
        req.params.check_tokens(m.vocab_size)?;
        if req.params.embed {
            // One step: the prompt's (the scheduler plans a 1-token answer).
            req.params.max_tokens = Some(1);
        }
        let ttft = slo(req.ttft_slo_s, DEFAULT_TTFT_SLO_S, "ttft_slo_s")?;
        let rate = req.ttft_prompt_tokens_per_s;
        if !(rate.is_finite() && rate >= 0.0) {
            return Err(InferenceError::InvalidParams(
                "ttft_prompt_tokens_per_s must be 0 or more".into(),
            ));
        }
        let tpot = slo(req.tpot_slo_s, DEFAULT_TPOT_SLO_S, "tpot_slo_s")?;
        let bytes = match &req.prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(msgs) => msgs.iter().map(|c| c.role.len() + c.content.len()).sum(),
        };
        m.check_prompt_bytes(bytes)?;
        // Rendering and tokenizing take time in proportion to the prompt:
        // on the blocking pool, never on an async worker.
        // So does compiling a constraint (the first one of a model builds
        // its token trie).
        let (entry, text, params) = (m.clone(), req.prompt, req.params.clone());
        let (prompt, constrained) = tokio::task::spawn_blocking(move || {
            let constrained = params.constraint.map(|c| entry.constrain(&c)).transpose()?;
            let text = match text {
                Prompt::Text(_) if params.tools.is_some() => {
                    return Err(InferenceError::InvalidParams(
                        "tools need a chat prompt".into(),
                    ));
                }
                Prompt::Text(t) => t,
                Prompt::Chat(msgs) => entry.render_chat(&msgs, params.tools.as_deref())?,
            };
            Ok::<_, InferenceError>((entry.tokenize(&text)?, constrained))
        })
        .await
        .map_err(|e| InferenceError::Engine(format!("tokenizing: {e}")))??;
        if prompt.is_empty() {
            return Err(InferenceError::InvalidParams("empty prompt".into()));
        }
        let context = m.context_tokens();
        if prompt.len() as u32 >= context {
            return Err(InferenceError::PromptTooLong {
                prompt_tokens: prompt.len() as u32,
                context_tokens: context,
            });
        }
        let function = {
            let mut f = self.functions.lock().unwrap_or_else(|e| e.into_inner());
            let n = f.len() as u32;
            *f.entry(req.function.clone()).or_insert(n)
        };
        let ttft = match rate > 0.0 {
            true => ttft.max(prompt.len() as f64 / rate),
            false => ttft,
        };
        let arrived = req.arrived.unwrap_or_else(Instant::now);
        let to_driver = self.sender();
        let mut streams = Vec::with_capacity(n as usize);
        let mut first = None;
        let mut generations = Vec::with_capacity(n as usize);
        for i in 0..n {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let cancelled = Arc::new(AtomicBool::new(false));
            let generation = Generation::new(
                id,
                m.clone(),
                prompt.clone(),
                &req.params.choice(i),
                (arrived, (ttft, tpot)),
                tx,
                cancelled.clone(),
                self.metrics.clone(),
            )
            .with_constraint(constrained.clone())
            .with_fork_of(first)
            .with_owner(function);
            first.get_or_insert(id);
            streams.push(GenerationStream {
                id,
                rx,
                cancelled,
                to_driver: Some(to_driver.clone()),
                usage: None,
                pending: None,
                done: false,
            });
            generations.push(Arc::new(Mutex::new(generation)));
        }
        // All at once: the driver queues every choice before it grants any.
        to_driver
            .send(Msg::Submit {
                model: idx,
                function,
                generations,
            })
            .map_err(|_| InferenceError::Engine("the inference driver has stopped".into()))?;
        // Wait for the first tokens (or a failure) so that errors such as
        // `Overloaded` come back from here; the others are cancelled then.
        for stream in &mut streams {
            match stream.rx.recv().await {
                Some(Event::Started) => {}
                Some(Event::Error(e)) => {
                    stream.done = true;
                    stream.to_driver = None;
                    return Err(e);
                }
                Some(ev) => stream.pending = Some(ev),
                None => {
                    stream.done = true;
                    return Err(InferenceError::Engine(
                        "the inference driver has stopped".into(),
                    ));
                }
            }
        }
        Ok(streams)
    }
}

impl Drop for Inference {
    /// Stops the driver and the instance runners (their instances and KV
    /// pools are freed); streams still open end with an error.
    fn drop(&mut self) {
        let _ = self.send(Msg::Shutdown);
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
