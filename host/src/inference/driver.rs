//! The wall-clock driver (one thread owning the [`Scheduler`]) and the
//! device workers (one thread per loaded instance).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slinfer_engine::{
    Backend, LlmInstance, LoadOptions, ModelSource, Sampler, SamplingParams, StepEntry,
};
use slinfer_scheduler::{
    ActionOp, Command, DeviceKind, DropReason, InstanceId, ModelSpec, ModelTypeId, NodeId,
    NodeSpec, Policy, Request, RequestId, RequestOutcome, Scheduler, SchedulerConfig, Snapshot,
};

use crate::metrics::{DeviceLabels, LlmMetrics, ModelLabel, OutcomeLabels, SloLabels};

use super::cost::{Costs, LiveCost};
use super::text::{Detokenizer, Step};
use super::{
    Event, FinishReason, INSTANCE_OVERHEAD_BYTES, InferenceError, InferenceStats, InstanceStats,
    KEEP_ALIVE_S, ModelEntry, RETRY_AFTER_S, Usage,
};

/// KV block size the scheduler plans with on the CPU (bytes are what
/// matter: the engine converts the granted bytes to its own blocks).
const CPU_BLOCK_TOKENS: u64 = 32;
/// Instances the CPU device may host at once (of any models; memory and
/// the time-slice checks decide within this).
const CPU_INSTANCE_SLOTS: u32 = 8;
/// Smallest KV pool of a loaded instance, in tokens (the scheduler scales
/// it with the live requests' needs plus look-ahead, and back).
const MIN_INSTANCE_TOKENS: u64 = 1024;
/// Sequence ids the calibration uses (request ids count up from 1).
const CALIBRATION_SEQ: u64 = u64::MAX - 8;
/// Seconds between tries to load an instance whose load failed.
const LOAD_RETRY_S: f64 = 10.0;

#[derive(Default)]
pub(crate) struct SharedStats {
    live: Mutex<usize>,
    instances: Mutex<HashMap<InstanceId, InstanceStats>>,
    scheduler: Mutex<Snapshot>,
}

impl SharedStats {
    pub(crate) fn scheduler(&self) -> Snapshot {
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn snapshot(&self) -> InferenceStats {
        let live = *self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut instances: Vec<InstanceStats> = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        instances.sort_by_key(|i| i.instance);
        InferenceStats {
            live_requests: live,
            instances,
        }
    }

    fn set_instance(&self, id: InstanceId, model: &str, inst: Option<&dyn LlmInstance>) {
        let mut m = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        match inst {
            Some(i) => {
                m.insert(
                    id,
                    InstanceStats {
                        instance: id,
                        model: model.to_string(),
                        kv_blocks_in_use: i.kv_blocks_in_use(),
                        kv_blocks_capacity: i.kv_capacity_blocks(),
                    },
                );
            }
            None => {
                m.remove(&id);
            }
        }
    }
}

pub(crate) struct GenInit {
    pub id: RequestId,
    pub model: Arc<ModelEntry>,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub context_tokens: u32,
    pub tx: tokio::sync::mpsc::UnboundedSender<Event>,
    pub cancelled: Arc<AtomicBool>,
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    pub metrics: Arc<LlmMetrics>,
}

/// One request's generation state; it travels to the worker for a run and
/// back.
pub(crate) struct GenState {
    id: RequestId,
    model: Arc<ModelEntry>,
    prompt: Vec<u32>,
    /// Tokens sampled so far (EOS excluded).
    generated: Vec<u32>,
    sampler: Sampler,
    max_tokens: u32,
    context_tokens: u32,
    detok: Detokenizer,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
    cancelled: Arc<AtomicBool>,
    submitted: Instant,
    ttft_s: Option<f64>,
    /// Ended (finished or failed); its sequence is to be freed.
    ended: bool,
    /// Instance holding its KV sequence.
    instance: Option<InstanceId>,
    ttft_slo_s: f64,
    tpot_slo_s: f64,
    /// Tokens sampled (EOS included).
    sampled: u32,
    metrics: Arc<LlmMetrics>,
}

impl GenState {
    pub(crate) fn new(i: GenInit) -> Self {
        GenState {
            id: i.id,
            model: i.model,
            prompt: i.prompt,
            generated: Vec::new(),
            sampler: Sampler::new(i.sampling),
            max_tokens: i.max_tokens,
            context_tokens: i.context_tokens,
            detok: Detokenizer::new(i.stop),
            tx: i.tx,
            cancelled: i.cancelled,
            submitted: Instant::now(),
            ttft_s: None,
            ended: false,
            instance: None,
            ttft_slo_s: i.ttft_slo_s,
            tpot_slo_s: i.tpot_slo_s,
            sampled: 0,
            metrics: i.metrics,
        }
    }

    /// Counts how the request ended; `slo_met` is None when it does not
    /// count towards the SLO (cancelled, failed).
    fn record(&self, outcome: &str, slo_met: Option<bool>) {
        let model = &self.model.name;
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels {
                model: model.clone(),
                outcome: outcome.into(),
            })
            .inc();
        if let Some(met) = slo_met {
            let result = if met { "met" } else { "missed" };
            self.metrics
                .slo
                .get_or_create(&SloLabels {
                    model: model.clone(),
                    result: result.into(),
                })
                .inc();
        }
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn fail(&mut self, e: InferenceError) {
        if !self.ended {
            self.ended = true;
            match &e {
                InferenceError::Overloaded { .. } => self.record("overloaded", Some(false)),
                InferenceError::DeadlineMissed => self.record("deadline_missed", Some(false)),
                _ => self.record("failed", None),
            }
            let _ = self.tx.send(Event::Error(e));
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        let tail = self.detok.flush(&self.model.tokenizer);
        if reason == FinishReason::Length && !tail.is_empty() {
            let _ = self.tx.send(Event::Text(tail));
        }
        self.ended = true;
        let ttft_s = self.ttft_s.unwrap_or(0.0);
        let label = ModelLabel {
            model: self.model.name.clone(),
        };
        self.metrics.ttft.get_or_create(&label).observe(ttft_s);
        let mut met = ttft_s <= self.ttft_slo_s;
        if self.sampled > 1 {
            let decode_s = self.submitted.elapsed().as_secs_f64() - ttft_s;
            let tpot_s = decode_s / f64::from(self.sampled - 1);
            self.metrics.tpot.get_or_create(&label).observe(tpot_s);
            met &= tpot_s <= self.tpot_slo_s;
        }
        self.record("finished", Some(met));
        let _ = self.tx.send(Event::Done(Usage {
            prompt_tokens: self.prompt.len() as u32,
            generated_tokens: self.generated.len() as u32,
            finish_reason: reason,
            ttft_s: self.ttft_s.unwrap_or(0.0),
        }));
    }

    /// Samples from `logits` and hands the text out; returns whether it ended.
    fn accept(&mut self, logits: &[f32]) -> bool {
        // Only a repetition penalty reads the history: skip the copy otherwise.
        let token = if self.sampler.params().repetition_penalty == 1.0 {
            self.sampler.sample(logits, &[])
        } else {
            let mut history = Vec::with_capacity(self.prompt.len() + self.generated.len());
            history.extend_from_slice(&self.prompt);
            history.extend_from_slice(&self.generated);
            self.sampler.sample(logits, &history)
        };
        self.sampled += 1;
        if self.ttft_s.is_none() {
            self.ttft_s = Some(self.submitted.elapsed().as_secs_f64());
            let _ = self.tx.send(Event::Started);
        }
        let cfg = &self.model.package.manifest.config;
        if cfg.eos_token_ids.contains(&token) {
            let tail = self.detok.flush(&self.model.tokenizer);
            if !tail.is_empty() {
                let _ = self.tx.send(Event::Text(tail));
            }
            self.finish(FinishReason::Stop);
            return true;
        }
        self.generated.push(token);
        match self.detok.push(&self.model.tokenizer, token) {
            Step::Stopped(t) => {
                if !t.is_empty() {
                    let _ = self.tx.send(Event::Text(t));
                }
                self.finish(FinishReason::Stop);
                true
            }
            Step::Text(t) => {
                if !t.is_empty() {
                    let _ = self.tx.send(Event::Text(t));
                }
                let len = (self.prompt.len() + self.generated.len()) as u32;
                if self.generated.len() as u32 >= self.max_tokens || len >= self.context_tokens {
                    self.finish(FinishReason::Length);
                    true
                } else {
                    false
                }
            }
        }
    }
}

pub(crate) enum Msg {
    Submit {
        model: usize,
        function: u32,
        state: Box<GenState>,
    },
    Cancel(RequestId),
    /// A model imported while the host runs; its id is the next index.
    AddModel(Arc<ModelEntry>),
    /// Take a model out of service (see `Scheduler::retire_model`).
    RetireModel(usize),
    /// Fail what waits, stop the workers (dropping their instances), exit.
    Shutdown,
    ActionDone {
        node: NodeId,
        action: u64,
    },
    RunDone {
        node: NodeId,
        instance: InstanceId,
        states: Vec<GenState>,
        outcomes: Vec<RequestOutcome>,
    },
}

enum Job {
    Load {
        node: NodeId,
        action: u64,
        kv_bytes: u64,
    },
    Resize {
        node: NodeId,
        action: u64,
        kv_bytes: u64,
    },
    Unload {
        node: NodeId,
        action: u64,
    },
    Run {
        node: NodeId,
        iterations: u32,
        prefill: Vec<GenState>,
        decode: Vec<GenState>,
    },
    Free(Vec<RequestId>),
}

struct Slot {
    state: Option<GenState>,
    instance: Option<InstanceId>,
}

struct Driver {
    sched: Scheduler<LiveCost>,
    models: Vec<Arc<ModelEntry>>,
    backend: Arc<dyn Backend>,
    cost: LiveCost,
    t0: Instant,
    reqs: HashMap<RequestId, Slot>,
    workers: HashMap<InstanceId, Sender<Job>>,
    /// Worker threads not yet known to have exited.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Metric labels of each instance (model, device).
    labels: HashMap<InstanceId, DeviceLabels>,
    /// Device kind of each scheduler node.
    kinds: Vec<DeviceKind>,
    me: Sender<Msg>,
    stats: Arc<SharedStats>,
    metrics: Arc<LlmMetrics>,
}

/// What the scheduler knows of a model on this host's CPU.
fn model_spec(m: &ModelEntry) -> ModelSpec {
    ModelSpec {
        name: m.name.clone(),
        weights_bytes: m.weights_bytes,
        kv_bytes_per_token: m.package.manifest.kv_bytes_per_token.max(1),
        block_tokens: [CPU_BLOCK_TOKENS, 16],
        // Unused: CPU pools scale (`cpu_kv_scales`).
        cpu_kv_bytes: 0,
        slots_per_node: [CPU_INSTANCE_SLOTS, 0],
        sllm_exclusive_cap: [None, None],
        sllm_half_share_cap: [None, None],
        gpu_decode_quota: 8,
    }
}

/// Starts the driver thread; returns its inbox and its handle (send
/// [`Msg::Shutdown`], then join it).
pub(crate) fn spawn(
    models: Vec<Arc<ModelEntry>>,
    backend: Arc<dyn Backend>,
    capacity_bytes: u64,
    stats: Arc<SharedStats>,
    metrics: Arc<LlmMetrics>,
) -> anyhow::Result<(Sender<Msg>, std::thread::JoinHandle<()>)> {
    let specs: Vec<ModelSpec> = models.iter().map(|m| model_spec(m)).collect();
    let cost = LiveCost::new(
        models
            .iter()
            .map(|m| Costs::estimate(m.weights_bytes))
            .collect(),
    );
    let mut cfg = SchedulerConfig::paper(Policy::Slinfer);
    cfg.keep_alive_s = [KEEP_ALIVE_S, KEEP_ALIVE_S];
    cfg.instance_overhead_bytes = INSTANCE_OVERHEAD_BYTES;
    cfg.cpu_kv_scales = true;
    cfg.min_instance_tokens = MIN_INSTANCE_TOKENS;
    let nodes = vec![NodeSpec {
        kind: DeviceKind::Cpu,
        capacity_bytes,
    }];
    let sched = Scheduler::new(cfg, specs, nodes.clone(), cost.clone());
    let (tx, rx) = channel();
    let mut d = Driver {
        sched,
        models,
        backend,
        cost,
        t0: Instant::now(),
        reqs: HashMap::new(),
        workers: HashMap::new(),
        threads: Vec::new(),
        labels: HashMap::new(),
        kinds: nodes.iter().map(|n| n.kind).collect(),
        me: tx.clone(),
        stats,
        metrics,
    };
    let handle = std::thread::Builder::new()
        .name("slinfer-inference-driver".into())
        .spawn(move || d.run(rx))?;
    Ok((tx, handle))
}

impl Driver {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let wait = self
                .sched
                .next_wakeup_s()
                .map(|t| (t - self.now()).clamp(0.002, 3600.0))
                .unwrap_or(3600.0);
            match rx.recv_timeout(Duration::from_secs_f64(wait)) {
                Ok(Msg::Shutdown) => return self.shutdown(),
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.now();
                    self.sched.tick(now);
                }
                // Never happens: the driver holds a sender itself.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let cmds = self.sched.drain_commands();
            for c in cmds {
                tracing::trace!(command = ?c, "inference");
                self.execute(c);
            }
            *self.stats.live.lock().unwrap_or_else(|e| e.into_inner()) = self.reqs.len();
            *self
                .stats
                .scheduler
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = self.sched.snapshot();
        }
    }

    fn shutdown(&mut self) {
        for slot in self.reqs.values_mut() {
            if let Some(s) = slot.state.as_mut() {
                s.fail(InferenceError::Engine("inference is shutting down".into()));
            }
        }
        // Requests inside a run end when their worker drops them.
        self.reqs.clear();
        self.workers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn handle(&mut self, m: Msg) {
        let now = self.now();
        match m {
            Msg::Submit {
                model,
                function,
                state,
            } => {
                let (ttft_slo_s, tpot_slo_s) = (state.ttft_slo_s, state.tpot_slo_s);
                let id = state.id;
                let input_tokens = state.prompt.len() as u64;
                if state.cancelled() {
                    return;
                }
                self.reqs.insert(
                    id,
                    Slot {
                        state: Some(*state),
                        instance: None,
                    },
                );
                self.sched.submit(
                    Request {
                        id,
                        model: model as u32,
                        model_type: ModelTypeId(model as u16),
                        function,
                        input_tokens,
                        ttft_slo_s,
                        tpot_slo_s,
                        arrival_s: now,
                    },
                    now,
                );
            }
            Msg::Cancel(id) => {
                // In a run, the worker or `RunDone` frees it.
                if self.reqs.get(&id).is_some_and(|s| s.state.is_some()) {
                    let slot = self.reqs.remove(&id).expect("present");
                    self.free_on(slot.instance, vec![id]);
                }
                // Idempotent: a request the scheduler no longer has is ignored.
                self.sched.cancel(id, now);
            }
            Msg::ActionDone { node, action } => self.sched.action_done(node, action, now),
            Msg::AddModel(entry) => {
                let t = self.sched.add_model_type(model_spec(&entry));
                debug_assert_eq!(t.0 as usize, self.models.len());
                self.cost.push(Costs::estimate(entry.weights_bytes));
                self.models.push(entry);
            }
            Msg::RetireModel(model) => self.sched.retire_model(model as u32, now),
            Msg::Shutdown => unreachable!("handled by run"),
            Msg::RunDone {
                node,
                instance,
                states,
                outcomes,
            } => {
                let finished: HashMap<RequestId, bool> =
                    outcomes.iter().map(|o| (o.request, o.finished)).collect();
                let mut cancelled = Vec::new();
                for mut s in states {
                    let id = s.id;
                    // What the scheduler is told decides, not the flag now:
                    // a cancel that raced the end of the run is done here.
                    if finished.get(&id).copied().unwrap_or(true) {
                        self.reqs.remove(&id);
                    } else if s.cancelled() {
                        self.reqs.remove(&id);
                        self.free_on(s.instance, vec![id]);
                        cancelled.push(id);
                    } else if let Some(slot) = self.reqs.get_mut(&id) {
                        slot.instance = s.instance;
                        slot.state = Some(s);
                    } else {
                        // Dropped by the scheduler while in the run.
                        s.fail(InferenceError::DeadlineMissed);
                        self.free_on(s.instance, vec![id]);
                    }
                }
                self.sched.iteration_done(node, instance, &outcomes, now);
                for id in cancelled {
                    self.sched.cancel(id, now);
                }
            }
        }
    }

    fn free_on(&self, instance: Option<InstanceId>, ids: Vec<RequestId>) {
        if let Some(w) = instance.and_then(|i| self.workers.get(&i)) {
            let _ = w.send(Job::Free(ids));
        }
    }

    fn execute(&mut self, c: Command) {
        match c {
            Command::Action {
                node,
                action,
                instance,
                model,
                op,
                ..
            } => match op {
                ActionOp::Load { kv_bytes, .. } => {
                    let labels = DeviceLabels {
                        model: self.models[model as usize].name.clone(),
                        device: format!("{}:{node}", self.kinds[node].name()),
                    };
                    self.metrics.cold_starts.get_or_create(&labels).inc();
                    self.labels.insert(instance, labels);
                    let (tx, rx) = channel();
                    let w = Worker {
                        id: instance,
                        model: self.models[model as usize].clone(),
                        mtype: ModelTypeId(model as u16),
                        backend: self.backend.clone(),
                        inst: None,
                        load_error: None,
                        kv_bytes: 0,
                        last_load: None,
                        cost: self.cost.clone(),
                        to_driver: self.me.clone(),
                        stats: self.stats.clone(),
                    };
                    let spawned = std::thread::Builder::new()
                        .name(format!("slinfer-instance-{instance}"))
                        .spawn(move || w.serve(rx));
                    match spawned {
                        Ok(t) => {
                            self.threads.retain(|t| !t.is_finished());
                            self.threads.push(t);
                        }
                        Err(e) => tracing::error!("cannot start an instance worker: {e}"),
                    }
                    let _ = tx.send(Job::Load {
                        node,
                        action,
                        kv_bytes,
                    });
                    self.workers.insert(instance, tx);
                }
                ActionOp::ResizeKv { kv_bytes } => self.send_job(
                    instance,
                    node,
                    action,
                    Job::Resize {
                        node,
                        action,
                        kv_bytes,
                    },
                ),
                ActionOp::Unload => {
                    self.send_job(instance, node, action, Job::Unload { node, action });
                    self.workers.remove(&instance);
                    self.labels.remove(&instance);
                }
            },
            Command::Run {
                node,
                instance,
                iterations,
                prefill,
                restore,
                decode,
                ..
            } => {
                let mut missing = Vec::new();
                let mut take = |list: &[(RequestId, u64)]| -> Vec<GenState> {
                    let mut out = Vec::new();
                    for (id, _) in list {
                        match self.reqs.get_mut(id).and_then(|s| s.state.take()) {
                            Some(s) => out.push(s),
                            None => missing.push(*id),
                        }
                    }
                    out
                };
                // Restores never happen (`preempt_keeps_kv` is off): recompute.
                let mut pre = take(&prefill);
                pre.extend(take(&restore));
                let dec = take(&decode);
                // Never leave the scheduler running a request the host lost.
                let now = self.now();
                for id in missing {
                    self.sched.cancel(id, now);
                }
                let job = Job::Run {
                    node,
                    iterations,
                    prefill: pre,
                    decode: dec,
                };
                match self.workers.get(&instance) {
                    Some(w) => {
                        if let Err(std::sync::mpsc::SendError(job)) = w.send(job) {
                            self.run_failed(node, instance, job);
                        }
                    }
                    None => self.run_failed(node, instance, job),
                }
            }
            Command::Preempt { instance, requests } => {
                if let Some(l) = self.labels.get(&instance) {
                    self.metrics
                        .preemptions
                        .get_or_create(l)
                        .inc_by(requests.len() as u64);
                }
                for id in &requests {
                    if let Some(slot) = self.reqs.get_mut(id) {
                        slot.instance = None;
                        if let Some(s) = slot.state.as_mut() {
                            s.instance = None;
                        }
                    }
                }
                self.free_on(Some(instance), requests);
            }
            Command::Completed { .. } => {}
            Command::Dropped { request, reason } => {
                let Some(mut slot) = self.reqs.remove(&request) else {
                    return;
                };
                let err = match reason {
                    DropReason::DeadlinePassedWaiting => Some(InferenceError::Overloaded {
                        retry_after_s: RETRY_AFTER_S,
                    }),
                    DropReason::DeadlinePassedAfterPreemption => {
                        Some(InferenceError::DeadlineMissed)
                    }
                    DropReason::Unservable => Some(InferenceError::Engine(
                        "no device has room for this model and prompt".into(),
                    )),
                    DropReason::Cancelled => None,
                };
                if let Some(s) = slot.state.as_mut() {
                    if let Some(e) = err {
                        s.fail(e);
                    }
                    let inst = s.instance;
                    self.free_on(inst, vec![request]);
                }
            }
        }
    }

    fn send_job(&mut self, instance: InstanceId, node: NodeId, action: u64, job: Job) {
        let sent = self
            .workers
            .get(&instance)
            .map(|w| w.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            let _ = self.me.send(Msg::ActionDone { node, action });
        }
    }

    /// A run whose instance has no worker: its requests fail.
    fn run_failed(&mut self, node: NodeId, instance: InstanceId, job: Job) {
        if let Job::Run {
            prefill, decode, ..
        } = job
        {
            let mut outcomes = Vec::new();
            let mut states = Vec::new();
            for mut s in prefill.into_iter().chain(decode) {
                s.fail(InferenceError::Engine("the instance is gone".into()));
                outcomes.push(RequestOutcome {
                    request: s.id,
                    tokens: 0,
                    finished: true,
                });
                states.push(s);
            }
            let _ = self.me.send(Msg::RunDone {
                node,
                instance,
                states,
                outcomes,
            });
        }
    }
}

struct Worker {
    id: InstanceId,
    model: Arc<ModelEntry>,
    mtype: ModelTypeId,
    backend: Arc<dyn Backend>,
    inst: Option<Box<dyn LlmInstance>>,
    load_error: Option<String>,
    /// The KV grant of the last load, and when it was tried (a failed load
    /// is retried by a later run, at most every [`LOAD_RETRY_S`]).
    kv_bytes: u64,
    last_load: Option<Instant>,
    cost: LiveCost,
    to_driver: Sender<Msg>,
    stats: Arc<SharedStats>,
}

impl Worker {
    fn serve(mut self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            let stop = matches!(job, Job::Unload { .. });
            self.job(job);
            self.stats
                .set_instance(self.id, &self.model.name, self.inst.as_deref());
            if stop {
                return;
            }
        }
        // The driver went away: drop the instance.
        self.stats.set_instance(self.id, &self.model.name, None);
    }

    fn blocks_for(&self, kv_bytes: u64) -> usize {
        self.inst
            .as_ref()
            .map(|i| (kv_bytes / i.kv_bytes_per_block().max(1)) as usize)
            .unwrap_or(0)
    }

    /// Loads the instance with the granted KV bytes and calibrates.
    fn load(&mut self, kv_bytes: u64) {
        self.kv_bytes = kv_bytes;
        self.last_load = Some(Instant::now());
        let t = Instant::now();
        let per_block = self.model.package.manifest.kv_bytes_per_token * CPU_BLOCK_TOKENS;
        let opts = LoadOptions {
            initial_kv_blocks: (kv_bytes / per_block.max(1)) as usize,
            ..Default::default()
        };
        match self
            .backend
            .load(&ModelSource::Package(self.model.dir.clone()), 0, &opts)
        {
            Ok(mut inst) => {
                // The engine's own block size and bytes: fit the grant.
                let blocks = (kv_bytes / inst.kv_bytes_per_block().max(1)) as usize;
                if blocks != inst.kv_capacity_blocks()
                    && let Err(e) = inst.resize_kv(blocks)
                {
                    tracing::warn!("resizing the KV pool after load: {e}");
                }
                let load_s = t.elapsed().as_secs_f64();
                self.calibrate(inst.as_mut(), load_s);
                self.inst = Some(inst);
                self.load_error = None;
            }
            Err(e) => {
                tracing::error!("loading {}: {e}", self.model.name);
                self.load_error = Some(e.to_string());
            }
        }
    }

    fn job(&mut self, job: Job) {
        match job {
            Job::Load {
                node,
                action,
                kv_bytes,
            } => {
                self.load(kv_bytes);
                let _ = self.to_driver.send(Msg::ActionDone { node, action });
            }
            Job::Resize {
                node,
                action,
                kv_bytes,
            } => {
                let blocks = self.blocks_for(kv_bytes);
                if let Some(i) = self.inst.as_mut() {
                    let blocks = blocks.max(i.kv_blocks_in_use());
                    if let Err(e) = i.resize_kv(blocks) {
                        tracing::warn!("resizing the KV pool: {e}");
                    }
                }
                let _ = self.to_driver.send(Msg::ActionDone { node, action });
            }
            Job::Unload { node, action } => {
                self.inst = None;
                let _ = self.to_driver.send(Msg::ActionDone { node, action });
            }
            Job::Free(ids) => {
                if let Some(i) = self.inst.as_mut() {
                    for id in ids {
                        if i.sequence_len(id).is_some() {
                            let _ = i.free_sequence(id);
                        }
                    }
                }
            }
            Job::Run {
                node,
                iterations,
                prefill,
                decode,
            } => {
                let (states, outcomes) = self.run(iterations, prefill, decode);
                let _ = self.to_driver.send(Msg::RunDone {
                    node,
                    instance: self.id,
                    states,
                    outcomes,
                });
            }
        }
    }

    /// Measures prefill and decode on the fresh instance (see `cost`).
    fn calibrate(&self, inst: &mut dyn LlmInstance, load_s: f64) {
        let a = CALIBRATION_SEQ;
        let b = CALIBRATION_SEQ + 1;
        let tok = self.model.package.manifest.config.bos_token_id.unwrap_or(1);
        let need = |n: usize| n.div_ceil(inst.block_size_tokens());
        if inst.kv_capacity_blocks() < need(72) + need(16) + 2 {
            self.cost.update(self.mtype, |c| c.load_s = load_s);
            return;
        }
        let result = measure(inst, a, b, tok, load_s);
        for s in [a, b] {
            if inst.sequence_len(s).is_some() {
                let _ = inst.free_sequence(s);
            }
        }
        match result {
            Some(c) => {
                tracing::info!(model = %self.model.name, ?c, "calibrated the cost model");
                self.cost.update(self.mtype, |x| *x = c);
            }
            None => self.cost.update(self.mtype, |c| c.load_s = load_s),
        }
    }

    fn fail_all(states: &mut [GenState], e: &str, outcomes: &mut HashMap<RequestId, u64>) {
        for s in states.iter_mut() {
            if !s.ended && !s.cancelled() {
                s.fail(InferenceError::Engine(e.to_string()));
                outcomes.entry(s.id).or_insert(0);
            }
        }
    }

    fn run(
        &mut self,
        iterations: u32,
        mut prefill: Vec<GenState>,
        mut decode: Vec<GenState>,
    ) -> (Vec<GenState>, Vec<RequestOutcome>) {
        let mut produced: HashMap<RequestId, u64> = HashMap::new();
        if self.inst.is_none()
            && self
                .last_load
                .is_some_and(|t| t.elapsed().as_secs_f64() >= LOAD_RETRY_S)
        {
            self.load(self.kv_bytes);
        }
        let Some(inst) = self.inst.as_mut() else {
            let e = format!(
                "model {} could not be loaded: {}",
                self.model.name,
                self.load_error.as_deref().unwrap_or("unknown error")
            );
            Self::fail_all(&mut prefill, &e, &mut produced);
            Self::fail_all(&mut decode, &e, &mut produced);
            prefill.extend(decode);
            return Self::finish_run(None, prefill, produced);
        };
        if !prefill.is_empty() {
            // Prefill (recomputing what a preempted request had generated).
            let mut batch = Vec::new();
            let mut members = Vec::new();
            for (k, s) in prefill.iter_mut().enumerate() {
                if s.cancelled() || s.ended {
                    continue;
                }
                if inst.sequence_len(s.id).is_some() {
                    let _ = inst.free_sequence(s.id);
                }
                if let Err(e) = inst.add_sequence(s.id) {
                    s.fail(InferenceError::Engine(e.to_string()));
                    produced.insert(s.id, 0);
                    continue;
                }
                s.instance = Some(self.id);
                let mut tokens = s.prompt.clone();
                tokens.extend_from_slice(&s.generated);
                batch.push(StepEntry { seq: s.id, tokens });
                members.push(k);
            }
            let n_tokens: u64 = batch.iter().map(|e| e.tokens.len() as u64).sum();
            let t = Instant::now();
            let res = if batch.is_empty() {
                Ok(Vec::new())
            } else {
                inst.step(&batch)
            };
            match res {
                Ok(logits) => {
                    if !batch.is_empty() {
                        self.cost
                            .observe_prefill(self.mtype, n_tokens, t.elapsed().as_secs_f64());
                    }
                    for (k, l) in members.into_iter().zip(logits) {
                        let s = &mut prefill[k];
                        s.accept(&l);
                        produced.insert(s.id, 1);
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for k in members {
                        let s = &mut prefill[k];
                        s.fail(InferenceError::Engine(e.clone()));
                        produced.insert(s.id, 0);
                    }
                }
            }
        }
        for _ in 0..iterations.max(1) {
            if decode.is_empty() {
                break;
            }
            let mut batch = Vec::new();
            let mut members = Vec::new();
            for (k, s) in decode.iter().enumerate() {
                if s.cancelled() || s.ended {
                    continue;
                }
                let Some(&last) = s.generated.last() else {
                    continue;
                };
                batch.push(StepEntry {
                    seq: s.id,
                    tokens: vec![last],
                });
                members.push(k);
            }
            if batch.is_empty() {
                break;
            }
            let t = Instant::now();
            match inst.step(&batch) {
                Ok(logits) => {
                    self.cost.observe_decode(
                        self.mtype,
                        batch.len() as u64,
                        t.elapsed().as_secs_f64(),
                    );
                    for (k, l) in members.into_iter().zip(logits) {
                        let s = &mut decode[k];
                        s.accept(&l);
                        *produced.entry(s.id).or_insert(0) += 1;
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for k in members {
                        let s = &mut decode[k];
                        s.fail(InferenceError::Engine(e.clone()));
                        produced.entry(s.id).or_insert(0);
                    }
                    break;
                }
            }
        }
        prefill.extend(decode);
        Self::finish_run(Some(inst.as_mut()), prefill, produced)
    }

    /// Frees the sequences of ended and cancelled requests and builds the
    /// outcomes.
    fn finish_run(
        mut inst: Option<&mut dyn LlmInstance>,
        states: Vec<GenState>,
        produced: HashMap<RequestId, u64>,
    ) -> (Vec<GenState>, Vec<RequestOutcome>) {
        let mut outcomes = Vec::new();
        for s in &states {
            let gone = s.ended || s.cancelled();
            if gone
                && let Some(i) = inst.as_deref_mut()
                && i.sequence_len(s.id).is_some()
            {
                let _ = i.free_sequence(s.id);
            }
            outcomes.push(RequestOutcome {
                request: s.id,
                tokens: produced.get(&s.id).copied().unwrap_or(0),
                finished: gone,
            });
        }
        (states, outcomes)
    }
}

fn timed(inst: &mut dyn LlmInstance, batch: &[StepEntry]) -> Option<f64> {
    let t = Instant::now();
    inst.step(batch).ok()?;
    Some(t.elapsed().as_secs_f64())
}

/// The calibration steps on sequences `a` and `b` (see `cost`).
fn measure(inst: &mut dyn LlmInstance, a: u64, b: u64, tok: u32, load_s: f64) -> Option<Costs> {
    let entry = |seq, n| StepEntry {
        seq,
        tokens: vec![tok; n],
    };
    inst.add_sequence(a).ok()?;
    inst.add_sequence(b).ok()?;
    // Warm-up (the first inference is slow), then measure.
    timed(inst, &[entry(a, 8)])?;
    inst.free_sequence(a).ok()?;
    inst.add_sequence(a).ok()?;
    let p8 = timed(inst, &[entry(a, 8)])?;
    let p64 = timed(inst, &[entry(b, 64)])?;
    let mut d1 = f64::INFINITY;
    let mut d2 = f64::INFINITY;
    for _ in 0..3 {
        d1 = d1.min(timed(inst, &[entry(a, 1)])?);
        d2 = d2.min(timed(inst, &[entry(a, 1), entry(b, 1)])?);
    }
    let per_token = ((p64 - p8) / 56.0).max(1e-5);
    let per_seq = (d2 - d1).max(1e-4);
    Some(Costs {
        prefill_base_s: (p8 - 8.0 * per_token).max(1e-3),
        prefill_per_token_s: per_token,
        decode_base_s: (d1 - per_seq).max(1e-3),
        decode_per_seq_s: per_seq,
        load_s,
        prefill_factor: 1.0,
        decode_factor: 1.0,
    })
}
