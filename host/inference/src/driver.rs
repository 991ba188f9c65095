//! The driver: one thread that owns the [`Scheduler`] on the wall clock.
//! It turns messages (submissions, cancels, finished runs and actions,
//! device failures) into scheduler inputs, and the scheduler's commands into
//! jobs for the instance runners. It only drives: generations sample, stream
//! and end themselves on the runners; the driver ends the ones the scheduler
//! drops and the ones whose callers hung up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use slinfer_scheduler::{
    ActionId, ActionOp, Command, DeviceKind, DropReason, InstanceId, ModelTypeId, NodeId, NodeSpec,
    PerKind, Request, RequestId, RequestOutcome, Scheduler, SchedulerConfig,
};

use crate::api::{
    DEFAULT_MAX_TOKENS, DEFAULT_TPOT_SLO_S, DEFAULT_TTFT_SLO_S, INSTANCE_OVERHEAD_BYTES,
    InferenceError, MIN_INSTANCE_TOKENS, RETRY_AFTER_S, Scheduling,
};
use crate::catalog::ModelEntry;
use crate::cost::{Costs, LiveCost};
use crate::devices::Device;
use crate::generation::{End, Shared, lock};
use crate::memory::{MEMORY_REFRESH, MemoryBudget};
use crate::metrics::{DeviceLabels, LlmMetrics};
use crate::runner::{InstanceRunner, Job, Links};
use crate::stats::SharedStats;

/// The longest wait a refused caller is told to take.
const MAX_RETRY_AFTER_S: f64 = 60.0;

pub(crate) enum Msg {
    /// Generations that arrived together (the choices of one prompt).
    Submit {
        model: usize,
        function: u32,
        generations: Vec<Shared>,
    },
    /// The caller hung up.
    Cancel(RequestId),
    /// A model imported while the host runs; its id is the next index.
    AddModel(Arc<ModelEntry>),
    /// Take a model out of service (see `Scheduler::retire_model`).
    RetireModel(usize),
    /// End what is live, stop the runners (dropping their instances), exit.
    Shutdown,
    ActionDone {
        node: NodeId,
        action: ActionId,
    },
    RunDone {
        node: NodeId,
        instance: InstanceId,
        outcomes: Vec<RequestOutcome>,
        /// Seconds the engine ran (0 for a run that never reached it).
        busy_s: f64,
        /// Prompt tokens its prefill copied from another prompt.
        shared_tokens: u64,
    },
    /// What a runner measured its freshly loaded instance holds besides its
    /// KV pool (sent before the load's `ActionDone`).
    InstanceMeasured {
        instance: InstanceId,
        static_bytes: u64,
    },
    /// An engine failed in a way that takes its device out of placement.
    DeviceFailed {
        node: NodeId,
        error: String,
    },
}

/// The policy the live host runs, with this host's settings (`slinfer
/// simulate --live-host` simulates with them too).
pub fn live_scheduler_config(scheduling: &Scheduling) -> SchedulerConfig {
    let mut cfg = SchedulerConfig::paper(scheduling.policy);
    cfg.keep_alive_s = PerKind::splat(scheduling.keep_alive_s);
    cfg.instance_overhead_bytes = INSTANCE_OVERHEAD_BYTES;
    // The engines own resizable KV pools (the sllm baselines keep a fixed
    // one on the CPU all the same, `ModelSpec::cpu_kv_bytes`).
    cfg.cpu_kv_scales = true;
    cfg.refuse_early = true;
    cfg.ttft_counts_load = true;
    // A function's manifest states its TTFT SLO; the paper's planning cap
    // (8 s, whatever the SLO) would refuse a caller who allowed longer.
    cfg.ttft_cap_s = f64::INFINITY;
    cfg.min_instance_tokens = MIN_INSTANCE_TOKENS;
    // The CPU engine grows a pool by reallocating and copying it (0.2 to 2
    // s per GiB measured under load, the device idle meanwhile): a pool a
    // burst just left is kept that long in case the next one needs it.
    cfg.kv_shrink_delay_s = PerKind::new(KV_SHRINK_DELAY_CPU_S, 0.0);
    // For the same reason a CPU pool that must grow doubles: a burst then
    // grows it a few times, not at each arrival.
    cfg.kv_grow_factor = PerKind::new(KV_GROW_FACTOR_CPU, 1.0);
    // An idle CPU instance keeps room for the sequences of its last
    // requests (a conversation's next call copies them) while it stays
    // loaded; a GPU pool goes back whole, as in the paper.
    cfg.idle_kv_tokens = PerKind::new(scheduling.idle_kv_tokens, 0);
    // A burst's requests come through HTTP and their functions to the
    // scheduler about a millisecond apart: an idle instance waits for the
    // rest, so that one prefill takes them all (and a pair of CPU engines
    // chooses its engine for all of them at once).
    cfg.prefill_gather_s = PerKind::splat(PREFILL_GATHER_S);
    cfg
}

/// How long an idle instance's first prefill waits for another request to
/// join it (at most four times this in all): three times the widest gap
/// measured between the requests of an eight-stream burst (1.05 ms, Intel
/// Xeon, BENCHMARKS.md).
const PREFILL_GATHER_S: f64 = 0.003;

/// How much at least a live CPU KV pool grows when it must.
const KV_GROW_FACTOR_CPU: f64 = 2.0;

/// How long the live host keeps an oversized CPU KV pool before shrinking it.
const KV_SHRINK_DELAY_CPU_S: f64 = 2.0;

struct Runner {
    node: NodeId,
    jobs: Sender<Job>,
    labels: DeviceLabels,
}

/// How often the driver probes where a typical new request of each model
/// would go (published with the status; a cluster's routers read it).
pub(crate) const ADMISSION_EVERY: Duration = Duration::from_millis(250);
/// The typical request probed: a prompt this long, the default SLOs.
const PROBE_PROMPT_TOKENS: u64 = 256;

struct Driver {
    sched: Scheduler<LiveCost>,
    /// When admission was last probed.
    probed: Instant,
    devices: Vec<Device>,
    models: Vec<Arc<ModelEntry>>,
    cost: LiveCost,
    t0: Instant,
    /// Every request submitted and not ended, by id.
    generations: HashMap<RequestId, Shared>,
    runners: HashMap<InstanceId, Runner>,
    /// Runner threads not yet known to have exited.
    threads: Vec<std::thread::JoinHandle<()>>,
    me: Sender<Msg>,
    stats: Arc<SharedStats>,
    metrics: Arc<LlmMetrics>,
    /// What the requests dropped by the last device failure are told.
    failure: String,
    /// The host memory budget the CPU devices draw from, and when it was
    /// last re-read.
    memory: Option<(Arc<MemoryBudget>, Instant)>,
}

/// Starts the driver thread; returns its inbox and its handle (send
/// [`Msg::Shutdown`], then join it).
pub(crate) fn spawn(
    models: Vec<Arc<ModelEntry>>,
    devices: Vec<Device>,
    (stats, metrics): (Arc<SharedStats>, Arc<LlmMetrics>),
    memory: Option<Arc<MemoryBudget>>,
    scheduling: Scheduling,
) -> anyhow::Result<(Sender<Msg>, std::thread::JoinHandle<()>)> {
    let cost = LiveCost::new(scheduling.profile.clone());
    let specs = models
        .iter()
        .map(|m| {
            let spec = m.spec();
            cost.push(&m.name, Costs::estimates(spec.weights_bytes));
            spec
        })
        .collect();
    let nodes = devices
        .iter()
        .map(|d| NodeSpec {
            kind: d.kind,
            capacity_bytes: d.capacity_bytes,
        })
        .collect();
    let sched = Scheduler::new(
        live_scheduler_config(&scheduling),
        specs,
        nodes,
        cost.clone(),
    );
    let (tx, rx) = channel();
    let mut d = Driver {
        sched,
        devices,
        models,
        cost,
        t0: Instant::now(),
        generations: HashMap::new(),
        runners: HashMap::new(),
        threads: Vec::new(),
        me: tx.clone(),
        stats,
        metrics,
        failure: String::new(),
        memory: memory.map(|m| (m, Instant::now() - MEMORY_REFRESH)),
        probed: Instant::now() - ADMISSION_EVERY,
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
            self.track_memory();
            let mut wait = self
                .sched
                .next_wakeup_s()
                .map(|t| (t - self.now()).clamp(0.002, 3600.0))
                .unwrap_or(3600.0);
            if self.memory.is_some() {
                wait = wait.min(MEMORY_REFRESH.as_secs_f64());
            }
            wait = wait.min(ADMISSION_EVERY.as_secs_f64());
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
            for c in self.sched.drain_commands() {
                tracing::trace!(command = ?c, "inference");
                self.execute(c);
            }
            let snapshot = self.sched.snapshot();
            if let Some((budget, _)) = &self.memory {
                budget.set_engines(
                    snapshot
                        .nodes
                        .iter()
                        .filter(|n| n.kind == DeviceKind::Cpu)
                        .map(|n| n.committed_bytes)
                        .sum(),
                );
            }
            self.stats.publish(self.generations.len(), snapshot);
            self.probe_admission();
        }
    }

    /// Every [`ADMISSION_EVERY`]: where a typical new request of each
    /// served model would go now (the scheduler's own placement, dry-run).
    fn probe_admission(&mut self) {
        if self.probed.elapsed() < ADMISSION_EVERY || self.devices.is_empty() {
            return;
        }
        self.probed = Instant::now();
        let now = self.now();
        let admission = (0..self.models.len())
            .map(|model| {
                let request = Request {
                    id: RequestId::MAX,
                    model: model as u32,
                    model_type: ModelTypeId(model as u16),
                    function: u32::MAX,
                    input_tokens: PROBE_PROMPT_TOKENS,
                    max_output_tokens: Some(DEFAULT_MAX_TOKENS.into()),
                    ttft_slo_s: DEFAULT_TTFT_SLO_S,
                    tpot_slo_s: DEFAULT_TPOT_SLO_S,
                    arrival_s: now,
                };
                (model, self.sched.probe(&request, now))
            })
            .collect();
        self.stats.publish_admission(admission);
    }

    /// Every [`MEMORY_REFRESH`]: gives each CPU device what the host memory
    /// budget (re-read by its own thread) leaves to instances.
    fn track_memory(&mut self) {
        let Some((budget, last)) = &mut self.memory else {
            return;
        };
        if last.elapsed() < MEMORY_REFRESH {
            return;
        }
        *last = Instant::now();
        let total = budget.usage().total_bytes;
        let room = budget.engine_capacity();
        let now = self.now();
        for (node, d) in self.devices.iter().enumerate() {
            if d.kind == DeviceKind::Cpu {
                let cap = d.capacity_bytes.min(total);
                self.sched.set_memory(node, cap, cap.min(room), now);
            }
        }
        for c in self.sched.drain_commands() {
            self.execute(c);
        }
    }

    fn shutdown(&mut self) {
        for g in self.generations.values() {
            lock(g).end(End::Failed(InferenceError::Engine(
                "inference is shutting down".into(),
            )));
        }
        self.generations.clear();
        // Closing their inboxes stops the runners; their instances drop.
        self.runners.clear();
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
                generations,
            } => {
                let mut requests = Vec::with_capacity(generations.len());
                for generation in generations {
                    let request = {
                        let g = lock(&generation);
                        if g.cancelled() {
                            continue;
                        }
                        Request {
                            id: g.id,
                            model: model as u32,
                            model_type: ModelTypeId(model as u16),
                            function,
                            input_tokens: g.prompt.len() as u64,
                            max_output_tokens: Some(g.max_output_tokens()),
                            ttft_slo_s: g.ttft_slo_s,
                            tpot_slo_s: g.tpot_slo_s,
                            // Deadlines count from the caller's arrival.
                            arrival_s: now - g.age_s(),
                        }
                    };
                    self.generations.insert(request.id, generation);
                    requests.push(request);
                }
                self.sched.submit_together(requests, now);
            }
            Msg::Cancel(id) => {
                if let Some(g) = self.generations.remove(&id) {
                    lock(&g).end(End::Cancelled);
                    self.free(&g);
                }
                // Idempotent: a request the scheduler no longer has is ignored.
                self.sched.cancel(id, now);
            }
            Msg::ActionDone { node, action } => self.sched.action_done(node, action, now),
            Msg::InstanceMeasured {
                instance,
                static_bytes,
            } => self.sched.instance_measured(instance, static_bytes, now),
            Msg::AddModel(entry) => {
                let spec = entry.spec();
                self.cost
                    .push(&entry.name, Costs::estimates(spec.weights_bytes));
                let t = self.sched.add_model_type(spec);
                debug_assert_eq!(t.0 as usize, self.models.len());
                self.models.push(entry);
            }
            Msg::RetireModel(model) => self.sched.retire_model(model as u32, now),
            Msg::Shutdown => unreachable!("handled by run"),
            Msg::RunDone {
                node,
                instance,
                outcomes,
                busy_s,
                shared_tokens,
            } => {
                if let Some(r) = self.runners.get(&instance) {
                    self.metrics.ran(&r.labels, busy_s, shared_tokens);
                }
                for o in outcomes.iter().filter(|o| o.finished) {
                    self.generations.remove(&o.request);
                }
                self.sched.iteration_done(node, instance, &outcomes, now);
            }
            Msg::DeviceFailed { node, error } => {
                if self.stats.failure(node).is_some() {
                    return;
                }
                tracing::error!(device = %self.devices[node].name, "the device failed and leaves placement: {error}");
                self.failure = format!("device {} failed: {error}", self.devices[node].name);
                self.stats.set_failed(node, error);
                // Their instances go with the device.
                self.runners.retain(|_, r| r.node != node);
                self.sched.fail_node(node, now);
            }
        }
    }

    /// Frees the KV sequence a generation holds, if any (its runner also
    /// forgets where the generation's KV was).
    fn free(&self, g: &Shared) {
        let on = lock(g).kv_on;
        if let Some(r) = on.and_then(|i| self.runners.get(&i)) {
            let _ = r.jobs.send(Job::Free(vec![g.clone()]));
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
                    self.start_runner(node, action, instance, model, kv_bytes)
                }
                ActionOp::ResizeKv { kv_bytes } => {
                    self.send_job(instance, node, action, Job::Resize { action, kv_bytes })
                }
                ActionOp::Unload => {
                    self.send_job(instance, node, action, Job::Unload { action });
                    self.runners.remove(&instance);
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
                let mut take = |list: &[(RequestId, u64)]| -> Vec<Shared> {
                    list.iter()
                        .filter_map(|(id, _)| {
                            let g = self.generations.get(id).cloned();
                            if g.is_none() {
                                missing.push(*id);
                            }
                            g
                        })
                        .collect()
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
                    iterations,
                    prefill: pre,
                    decode: dec,
                };
                let sent = match self.runners.get(&instance) {
                    Some(r) => r.jobs.send(job).map_err(|e| e.0),
                    None => Err(job),
                };
                if let Err(job) = sent {
                    self.run_failed(node, instance, job);
                }
            }
            Command::Preempt { instance, requests } => {
                let Some(r) = self.runners.get(&instance) else {
                    return;
                };
                self.metrics.preempted(&r.labels, requests.len());
                let gens = requests
                    .iter()
                    .filter_map(|id| self.generations.get(id).cloned())
                    .collect();
                let _ = r.jobs.send(Job::Free(gens));
            }
            Command::Completed { .. } => {}
            Command::Dropped {
                request,
                reason,
                retry_after_s,
            } => {
                let Some(g) = self.generations.remove(&request) else {
                    return;
                };
                let err = match reason {
                    DropReason::DeadlinePassedWaiting | DropReason::WouldMissDeadline => {
                        Some(InferenceError::Overloaded {
                            retry_after_s: retry_after_s
                                .unwrap_or(RETRY_AFTER_S)
                                .clamp(RETRY_AFTER_S, MAX_RETRY_AFTER_S),
                        })
                    }
                    DropReason::DeadlinePassedAfterPreemption => {
                        Some(InferenceError::DeadlineMissed)
                    }
                    DropReason::Unservable => Some(InferenceError::Unavailable {
                        message: "no device of this host has room for this model and prompt".into(),
                        retry_after_s: RETRY_AFTER_S,
                    }),
                    DropReason::DeviceFailed => Some(InferenceError::Unavailable {
                        message: self.failure.clone(),
                        retry_after_s: RETRY_AFTER_S,
                    }),
                    DropReason::Cancelled => None,
                };
                if let Some(e) = err {
                    lock(&g).end(End::Failed(e));
                }
                self.free(&g);
            }
        }
    }

    fn start_runner(
        &mut self,
        node: NodeId,
        action: ActionId,
        instance: InstanceId,
        model: u32,
        kv_bytes: u64,
    ) {
        let device = self.devices[node].clone();
        let entry = self.models[model as usize].clone();
        let labels = DeviceLabels {
            model: entry.name.clone(),
            device: device.name.clone(),
        };
        self.metrics.cold_start(&labels);
        let (jobs, inbox) = channel();
        let links = Links {
            cost: self.cost.clone(),
            to_driver: self.me.clone(),
            stats: self.stats.clone(),
        };
        let mtype = ModelTypeId(model as u16);
        let runner = InstanceRunner::new(instance, node, device, (mtype, entry), links);
        match std::thread::Builder::new()
            .name(format!("slinfer-instance-{instance}"))
            .spawn(move || runner.serve(inbox))
        {
            Ok(t) => {
                self.threads.retain(|t| !t.is_finished());
                self.threads.push(t);
            }
            Err(e) => tracing::error!("cannot start an instance runner: {e}"),
        }
        let _ = jobs.send(Job::Load { action, kv_bytes });
        self.runners.insert(instance, Runner { node, jobs, labels });
    }

    fn send_job(&mut self, instance: InstanceId, node: NodeId, action: ActionId, job: Job) {
        let sent = self
            .runners
            .get(&instance)
            .is_some_and(|r| r.jobs.send(job).is_ok());
        if !sent {
            let _ = self.me.send(Msg::ActionDone { node, action });
        }
    }

    /// A run whose instance has no runner: its requests fail.
    fn run_failed(&mut self, node: NodeId, instance: InstanceId, job: Job) {
        let Job::Run {
            prefill, decode, ..
        } = job
        else {
            return;
        };
        let mut outcomes = Vec::new();
        for g in prefill.iter().chain(&decode) {
            let mut g = lock(g);
            g.end(End::Failed(InferenceError::Engine(
                "the instance is gone".into(),
            )));
            outcomes.push(RequestOutcome {
                request: g.id,
                tokens: 0,
                finished: true,
            });
        }
        let _ = self.me.send(Msg::RunDone {
            node,
            instance,
            outcomes,
            busy_s: 0.0,
            shared_tokens: 0,
        });
    }
}
