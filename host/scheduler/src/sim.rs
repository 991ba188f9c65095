//! The simulator: a virtual-clock event loop that drives the scheduler and
//! executes its commands with profiled durations. It alone knows each
//! request's true output length, and reports completion through
//! `iteration_done` like a real engine would. It also keeps its own account
//! of device memory, so the scheduler's no-OOM promise is checked from the
//! outside.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use serde::Serialize;

use crate::model::{CostModel, DeviceKind, ModelTypeId, NodeSpec, PerKind};
use crate::profile::Profile;
use crate::scheduler::{
    ActionId, ActionOp, Command, InstanceId, NodeId, Policy, Request, RequestId, RequestOutcome,
    Scheduler, SchedulerConfig,
};
use crate::trace::TraceRequest;

/// The evaluation's SLOs: TTFT ≤ max(input / tokens_per_s, min) + load
/// delay; TPOT (mean over the output) ≤ tpot.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub ttft_tokens_per_s: f64,
    pub ttft_min_s: f64,
    pub tpot_s: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            ttft_tokens_per_s: 512.0,
            ttft_min_s: 0.5,
            tpot_s: 0.25,
        }
    }
}

impl Slo {
    pub fn ttft_s(&self, input_tokens: u64) -> f64 {
        (input_tokens as f64 / self.ttft_tokens_per_s).max(self.ttft_min_s)
    }
}

/// One simulation run's setup.
#[derive(Clone, Debug)]
pub struct SimSetup {
    pub scheduler: SchedulerConfig,
    pub model_type: ModelTypeId,
    pub gpus: usize,
    pub cpus: usize,
    pub gpu_capacity_bytes: u64,
    pub cpu_capacity_bytes: u64,
    pub slo: Slo,
}

impl SimSetup {
    /// The paper's cluster and settings from the profile file.
    pub fn paper(
        profile: &Profile,
        policy: Policy,
        model_type: ModelTypeId,
        gpus: usize,
        cpus: usize,
    ) -> Self {
        let p = &profile.paper;
        let mut scheduler = SchedulerConfig::paper(policy);
        scheduler.safety = PerKind::new(p.safety_cpu, p.safety_gpu);
        scheduler.slo_margin = p.scheduler_margin;
        scheduler.ttft_cap_s = p.ttft_cap_s;
        scheduler.instance_overhead_bytes = p.instance_overhead_bytes;
        SimSetup {
            scheduler,
            model_type,
            gpus,
            cpus,
            gpu_capacity_bytes: p.gpu_node_bytes,
            cpu_capacity_bytes: p.cpu_node_bytes,
            slo: Slo {
                tpot_s: p.tpot_slo_s,
                ..Slo::default()
            },
        }
    }

    fn nodes(&self) -> Vec<NodeSpec> {
        let gpu = (0..self.gpus).map(|_| NodeSpec {
            kind: DeviceKind::Gpu,
            capacity_bytes: self.gpu_capacity_bytes,
        });
        let cpu = (0..self.cpus).map(|_| NodeSpec {
            kind: DeviceKind::Cpu,
            capacity_bytes: self.cpu_capacity_bytes,
        });
        gpu.chain(cpu).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSummary {
    pub kind: DeviceKind,
    pub capacity_bytes: u64,
    pub peak_committed_bytes: u64,
}

/// The machine-readable result of one run (the `--json` contract).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub policy: Policy,
    pub preempt_keeps_kv: bool,
    pub model: String,
    pub models: usize,
    pub gpus: usize,
    pub cpus: usize,
    pub requests: usize,
    pub completed: usize,
    pub slo_met: usize,
    pub slo_attainment: f64,
    pub dropped: usize,
    pub dropped_by_reason: BTreeMap<String, usize>,
    pub ttft_p50_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub tpot_p50_s: Option<f64>,
    pub tpot_p99_s: Option<f64>,
    pub decode_tokens_per_node_s: f64,
    pub avg_nodes_in_use: f64,
    pub cold_starts: usize,
    pub preemptions: usize,
    pub preempted_requests: usize,
    /// Times the simulated devices saw more committed memory than they
    /// have, or a batch whose KV outgrew its pool; the policy promises 0.
    pub memory_violations: usize,
    /// Requests that ended more than once, or never; the policy promises 0.
    pub end_violations: usize,
    /// Bytes still held on devices once everything has ended: an instance
    /// that never reached its keep-alive unload. The policy promises 0.
    pub held_bytes_at_end: u64,
    pub makespan_s: f64,
    pub nodes: Vec<NodeSummary>,
}

/// A summary plus the per-request samples plots need.
#[derive(Clone, Debug, PartialEq)]
pub struct SimResult {
    pub summary: Summary,
    /// TTFT of every completed request, sorted.
    pub ttfts_s: Vec<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Time(f64);

impl Eq for Time {}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival(usize),
    RunEnd(NodeId),
    ActionEnd(ActionId),
    Wakeup,
}

#[derive(Clone, Debug)]
struct SimReq {
    generated: u64,
    first_token_s: Option<f64>,
    finish_s: Option<f64>,
    /// Model-load delay the scheduler says this request waited through;
    /// the SLO forgives it, as the paper's evaluation does.
    load_delay_s: f64,
    ended: u32,
}

/// A `Run`'s requests: (id, context tokens) to prefill, restore, decode.
struct Batch<'a> {
    prefill: &'a [(RequestId, u64)],
    restore: &'a [(RequestId, u64)],
    decode: &'a [(RequestId, u64)],
}

struct Pending {
    instance: InstanceId,
    /// (request, tokens, finished, first token at, finish at)
    outcomes: Vec<(RequestId, u64, bool, f64, f64)>,
}

struct NodeState {
    spec: NodeSpec,
    used_bytes: u64,
    peak_bytes: u64,
    run: Option<Pending>,
}

struct World<'a> {
    profile: &'a Profile,
    reqs: &'a [TraceRequest],
    state: Vec<SimReq>,
    nodes: Vec<NodeState>,
    /// Per instance: (weights bytes, KV bytes) the device holds.
    held: HashMap<InstanceId, (u64, u64)>,
    actions: HashMap<ActionId, (NodeId, InstanceId, ActionOp)>,
    heap: BinaryHeap<Reverse<(Time, u64, Event)>>,
    seq: u64,
    wakeup_at: Option<f64>,
    cold_starts: usize,
    preemptions: usize,
    preempted_requests: usize,
    memory_violations: usize,
    dropped_by_reason: BTreeMap<String, usize>,
    decode_tokens: u64,
}

impl World<'_> {
    fn push(&mut self, t: f64, ev: Event) {
        self.seq += 1;
        self.heap.push(Reverse((Time(t), self.seq, ev)));
    }

    fn bump_used(&mut self, node: NodeId, add: u64) {
        let n = &mut self.nodes[node];
        n.used_bytes += add;
        n.peak_bytes = n.peak_bytes.max(n.used_bytes);
        if n.used_bytes > n.spec.capacity_bytes {
            self.memory_violations += 1;
        }
    }

    fn execute(&mut self, cmds: Vec<Command>, now: f64) {
        for c in cmds {
            match c {
                Command::Action {
                    node,
                    action,
                    instance,
                    model_type,
                    op,
                    ..
                } => {
                    let kind = self.nodes[node].spec.kind;
                    let dur = match op {
                        ActionOp::Load {
                            weights_bytes,
                            kv_bytes,
                        } => {
                            self.cold_starts += 1;
                            self.held.insert(instance, (weights_bytes, kv_bytes));
                            self.bump_used(node, weights_bytes + kv_bytes);
                            self.profile.load_s(model_type, kind)
                        }
                        ActionOp::ResizeKv { kv_bytes } => {
                            let held = self.held.get_mut(&instance).expect("resize after load");
                            if kv_bytes > held.1 {
                                let add = kv_bytes - held.1;
                                held.1 = kv_bytes;
                                self.bump_used(node, add);
                            }
                            self.profile.kv_resize_s(model_type, kind)
                        }
                        ActionOp::Unload => self.profile.unload_s(model_type, kind),
                    };
                    self.actions.insert(action, (node, instance, op));
                    self.push(now + dur, Event::ActionEnd(action));
                }
                Command::Run {
                    node,
                    instance,
                    model_type,
                    iterations,
                    prefill,
                    restore,
                    decode,
                } => self.start_run(
                    node,
                    instance,
                    model_type,
                    iterations,
                    Batch {
                        prefill: &prefill,
                        restore: &restore,
                        decode: &decode,
                    },
                    now,
                ),
                Command::Preempt { instance, requests } => {
                    self.preemptions += 1;
                    self.preempted_requests += requests.len();
                    for n in &mut self.nodes {
                        if let Some(run) = n.run.as_mut().filter(|r| r.instance == instance) {
                            run.outcomes.retain(|o| !requests.contains(&o.0));
                        }
                    }
                }
                Command::Completed {
                    request,
                    load_delay_s,
                } => {
                    let s = &mut self.state[request as usize];
                    s.ended += 1;
                    s.load_delay_s = load_delay_s;
                }
                Command::Dropped {
                    request, reason, ..
                } => {
                    self.state[request as usize].ended += 1;
                    *self
                        .dropped_by_reason
                        .entry(reason.name().to_string())
                        .or_default() += 1;
                }
            }
        }
    }

    fn start_run(
        &mut self,
        node: NodeId,
        instance: InstanceId,
        mtype: ModelTypeId,
        iterations: u32,
        Batch {
            prefill,
            restore,
            decode,
        }: Batch,
        now: f64,
    ) {
        let kind = self.nodes[node].spec.kind;
        let spec = &self.profile.models[mtype.0 as usize];
        let mut outcomes = Vec::new();
        let mut t = now;
        let mut kv_tokens_blocks = 0;
        if !prefill.is_empty() || !restore.is_empty() {
            if !prefill.is_empty() {
                let tokens: u64 = prefill.iter().map(|p| p.1).sum();
                t += self.profile.prefill_s(mtype, kind, tokens);
            }
            let restored: u64 = restore.iter().map(|p| p.1).sum();
            t += self.profile.kv_swap_s(mtype, kind, restored);
            for &(rid, ctx) in prefill.iter().chain(restore) {
                let s = &self.state[rid as usize];
                let done = s.generated + 1 >= self.reqs[rid as usize].output_tokens;
                outcomes.push((rid, 1, done, t, t));
                kv_tokens_blocks += spec.blocks_for_tokens(kind, ctx + 1);
            }
        } else {
            let mut live: Vec<(RequestId, u64, u64)> = decode
                .iter()
                .map(|&(rid, ctx)| {
                    (
                        rid,
                        ctx,
                        self.reqs[rid as usize].output_tokens - self.state[rid as usize].generated,
                    )
                })
                .collect();
            let mut produced: HashMap<RequestId, (u64, f64)> = HashMap::new();
            for _ in 0..iterations {
                live.retain(|l| l.2 > 0);
                if live.is_empty() {
                    break;
                }
                let avg = live.iter().map(|l| l.1).sum::<u64>() / live.len() as u64;
                t += self.profile.decode_s(mtype, kind, avg, live.len() as u64);
                for l in &mut live {
                    l.1 += 1;
                    l.2 -= 1;
                    let e = produced.entry(l.0).or_insert((0, t));
                    e.0 += 1;
                    e.1 = t;
                }
            }
            for &(rid, ctx) in decode {
                let (tokens, at) = produced.get(&rid).copied().unwrap_or((0, now));
                let done = self.state[rid as usize].generated + tokens
                    >= self.reqs[rid as usize].output_tokens;
                outcomes.push((rid, tokens, done, at, at));
                kv_tokens_blocks += spec.blocks_for_tokens(kind, ctx + tokens);
            }
            self.decode_tokens += outcomes.iter().map(|o| o.1).sum::<u64>();
        }
        let held_kv = self.held.get(&instance).map_or(0, |h| h.1);
        if kv_tokens_blocks * spec.block_bytes(kind) > held_kv {
            self.memory_violations += 1;
        }
        self.nodes[node].run = Some(Pending { instance, outcomes });
        self.push(t, Event::RunEnd(node));
    }
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[idx])
}

/// Replays `reqs` (ids are their positions) through the policy in `setup`.
/// `models` is how many distinct models the trace selection serves.
pub fn simulate(
    profile: &Profile,
    setup: &SimSetup,
    reqs: &[TraceRequest],
    models: usize,
) -> SimResult {
    let nodes = setup.nodes();
    let mut sched = Scheduler::new(
        setup.scheduler.clone(),
        profile.models.clone(),
        nodes.clone(),
        profile.clone(),
    );
    let mut w = World {
        profile,
        reqs,
        state: vec![
            SimReq {
                generated: 0,
                first_token_s: None,
                finish_s: None,
                load_delay_s: 0.0,
                ended: 0,
            };
            reqs.len()
        ],
        nodes: nodes
            .into_iter()
            .map(|spec| NodeState {
                spec,
                used_bytes: 0,
                peak_bytes: 0,
                run: None,
            })
            .collect(),
        held: HashMap::new(),
        actions: HashMap::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        wakeup_at: None,
        cold_starts: 0,
        preemptions: 0,
        preempted_requests: 0,
        memory_violations: 0,
        dropped_by_reason: BTreeMap::new(),
        decode_tokens: 0,
    };
    for (i, r) in reqs.iter().enumerate() {
        w.push(r.arrival_s, Event::Arrival(i));
    }
    let mut last_t = 0.0;
    let mut node_s = 0.0;
    while let Some(Reverse((Time(now), _, ev))) = w.heap.pop() {
        let in_use = w.nodes.iter().filter(|n| n.used_bytes > 0).count();
        node_s += in_use as f64 * (now - last_t);
        last_t = now;
        match ev {
            Event::Arrival(i) => {
                let r = &reqs[i];
                sched.submit(
                    Request {
                        id: i as RequestId,
                        model: r.function,
                        model_type: setup.model_type,
                        function: r.function,
                        input_tokens: r.input_tokens,
                        ttft_slo_s: setup.slo.ttft_s(r.input_tokens),
                        tpot_slo_s: setup.slo.tpot_s,
                        arrival_s: r.arrival_s,
                    },
                    now,
                );
            }
            Event::RunEnd(node) => {
                let run = w.nodes[node].run.take().expect("a run ends only once");
                let mut outcomes = Vec::with_capacity(run.outcomes.len());
                for (rid, tokens, finished, first_at, last_at) in run.outcomes {
                    let s = &mut w.state[rid as usize];
                    if tokens > 0 && s.first_token_s.is_none() {
                        s.first_token_s = Some(first_at);
                    }
                    s.generated += tokens;
                    if finished {
                        s.finish_s = Some(last_at);
                    }
                    outcomes.push(RequestOutcome {
                        request: rid,
                        tokens,
                        finished,
                    });
                }
                sched.iteration_done(node, run.instance, &outcomes, now);
            }
            Event::ActionEnd(action) => {
                let (node, instance, op) = w.actions.remove(&action).expect("actions end once");
                let held = w.held.get_mut(&instance).expect("held since load");
                let freed = match op {
                    ActionOp::ResizeKv { kv_bytes } if kv_bytes < held.1 => {
                        let f = held.1 - kv_bytes;
                        held.1 = kv_bytes;
                        f
                    }
                    ActionOp::Unload => {
                        let (wb, kb) = w.held.remove(&instance).expect("held");
                        wb + kb
                    }
                    _ => 0,
                };
                w.nodes[node].used_bytes -= freed;
                sched.action_done(node, action, now);
            }
            Event::Wakeup => sched.tick(now),
        }
        let cmds = sched.drain_commands();
        w.execute(cmds, now);
        if let Some(t) = sched.next_wakeup_s()
            && t > now
            && w.wakeup_at.is_none_or(|s| s <= now || t < s)
        {
            w.wakeup_at = Some(t);
            w.push(t, Event::Wakeup);
        }
    }
    summarize(&w, setup, models, last_t, node_s)
}

fn summarize(
    w: &World,
    setup: &SimSetup,
    models: usize,
    makespan_s: f64,
    node_s: f64,
) -> SimResult {
    let mut ttfts = Vec::new();
    let mut tpots = Vec::new();
    let mut slo_met = 0;
    let mut end_violations = 0;
    for (i, s) in w.state.iter().enumerate() {
        if s.ended != 1 {
            end_violations += 1;
        }
        let (Some(first), Some(finish)) = (s.first_token_s, s.finish_s) else {
            continue;
        };
        let r = &w.reqs[i];
        let ttft = first - r.arrival_s;
        let tpot = if r.output_tokens > 1 {
            (finish - first) / (r.output_tokens - 1) as f64
        } else {
            0.0
        };
        ttfts.push(ttft);
        tpots.push(tpot);
        if ttft <= setup.slo.ttft_s(r.input_tokens) + s.load_delay_s && tpot <= setup.slo.tpot_s {
            slo_met += 1;
        }
    }
    ttfts.sort_by(f64::total_cmp);
    tpots.sort_by(f64::total_cmp);
    let requests = w.reqs.len();
    let dropped = w.dropped_by_reason.values().sum();
    let summary = Summary {
        policy: setup.scheduler.policy,
        preempt_keeps_kv: setup.scheduler.preempt_keeps_kv,
        model: w.profile.models[setup.model_type.0 as usize].name.clone(),
        models,
        gpus: setup.gpus,
        cpus: setup.cpus,
        requests,
        completed: ttfts.len(),
        slo_met,
        slo_attainment: if requests == 0 {
            0.0
        } else {
            slo_met as f64 / requests as f64
        },
        dropped,
        dropped_by_reason: w.dropped_by_reason.clone(),
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p99_s: percentile(&ttfts, 0.99),
        tpot_p50_s: percentile(&tpots, 0.5),
        tpot_p99_s: percentile(&tpots, 0.99),
        decode_tokens_per_node_s: if node_s > 0.0 {
            w.decode_tokens as f64 / node_s
        } else {
            0.0
        },
        avg_nodes_in_use: if makespan_s > 0.0 {
            node_s / makespan_s
        } else {
            0.0
        },
        cold_starts: w.cold_starts,
        preemptions: w.preemptions,
        preempted_requests: w.preempted_requests,
        memory_violations: w.memory_violations,
        end_violations,
        held_bytes_at_end: w.nodes.iter().map(|n| n.used_bytes).sum(),
        makespan_s,
        nodes: w
            .nodes
            .iter()
            .map(|n| NodeSummary {
                kind: n.spec.kind,
                capacity_bytes: n.spec.capacity_bytes,
                peak_committed_bytes: n.peak_bytes,
            })
            .collect(),
    };
    SimResult {
        summary,
        ttfts_s: ttfts,
    }
}
