//! The simulator: a virtual-clock event loop that drives the scheduler and
//! executes its commands with profiled durations. It alone knows each
//! request's true output length, and reports completion through
//! `iteration_done` like a real engine would. It also keeps its own account
//! of device memory, so the scheduler's no-OOM promise is checked from the
//! outside.
//!
//! With [`SimSetup::cluster`] it simulates a cluster instead of one
//! machine: every device is a member with a scheduler of its own, and a
//! router sends each request to the members in the order their last
//! published state suggests (a dry run of each member's own placement on a
//! copy as old as the last publish, in [`routing_order`]), one
//! network hop per try; a member that cannot place it now refuses and the
//! next is tried; the last one keeps it waiting.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use serde::Serialize;

use crate::model::{CostModel, DeviceKind, ModelTypeId, NodeSpec, PerKind};
use crate::profile::Profile;
use crate::scheduler::{
    ActionId, ActionOp, Command, InstanceId, NodeId, Policy, Request, RequestId, RequestOutcome,
    Scheduler, SchedulerConfig, routing_order,
};
use crate::trace::{SplitMix64, TraceRequest};

/// The evaluation's SLOs: TTFT ≤ max(input / tokens_per_s, min) + load
/// delay; TPOT (mean over the output) ≤ tpot.
#[derive(Clone, Debug, PartialEq, Serialize)]
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
    /// Simulate a cluster of one member per device; `None`: one machine
    /// with one scheduler over every device.
    pub cluster: Option<ClusterSim>,
}

/// How a simulated cluster shares state and routes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ClusterSim {
    /// How often members publish their state (a router sees it this old).
    pub publish_every_s: f64,
    /// One network hop: a request sent to a member arrives this much later.
    pub hop_s: f64,
}

impl Default for ClusterSim {
    /// The live cluster's heartbeat (250 ms) and a LAN hop (1 ms).
    fn default() -> Self {
        ClusterSim {
            publish_every_s: 0.25,
            hop_s: 0.001,
        }
    }
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
                ttft_tokens_per_s: p
                    .ttft_tokens_per_s
                    .unwrap_or(Slo::default().ttft_tokens_per_s),
                ttft_min_s: p.ttft_min_s.unwrap_or(Slo::default().ttft_min_s),
            },
            cluster: None,
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

/// One kind of device's share of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KindSummary {
    /// Completed requests whose last token came from a device of this kind.
    pub served: usize,
    pub slo_met: usize,
    /// Instances loaded on devices of this kind.
    pub cold_starts: usize,
    /// The devices' time spent in iterations, over the makespan and the
    /// devices of the kind (`None` where it cannot be measured).
    pub busy_fraction: Option<f64>,
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
    /// Per kind of device (`cpu`, `gpu`): what it served, so a reader sees
    /// what the CPUs add on top of sharing the GPUs.
    pub by_kind: BTreeMap<String, KindSummary>,
    /// The cluster simulated, if one was.
    pub cluster: Option<ClusterSim>,
    /// Tries beyond each request's first member (refused, sent on).
    pub routing_retries: usize,
}

/// What became of one request of the trace: the fields of `scripts/replay.py`'s
/// `per_request` records, so that a live run and its prediction compare
/// request by request.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestRecord {
    /// Its place in the trace (the requests' order).
    pub index: usize,
    pub function: u32,
    pub arrival_s: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `met`, `missed` (completed, SLO not met), `dropped`, or `unfinished`
    /// (never ended: an end violation, which the policy promises never
    /// happens).
    pub outcome: &'static str,
    /// Why it was dropped (a `dropped_by_reason` key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpot_s: Option<f64>,
    /// The load it waited through (a cold start), as the scheduler says.
    pub load_delay_s: f64,
    /// The kind of device its last iteration ran on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<&'static str>,
}

/// A summary plus every request's record.
#[derive(Clone, Debug, PartialEq)]
pub struct SimResult {
    pub summary: Summary,
    /// In the trace's order.
    pub per_request: Vec<RequestRecord>,
}

impl SimResult {
    /// TTFT of every completed request, sorted.
    pub fn ttfts_s(&self) -> Vec<f64> {
        let mut t: Vec<f64> = self.per_request.iter().filter_map(|r| r.ttft_s).collect();
        t.sort_by(f64::total_cmp);
        t
    }
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
    /// Request i reaches the k-th member of its route.
    Deliver(usize, usize),
    /// On a global node.
    RunEnd(NodeId),
    /// Of member m.
    ActionEnd(usize, ActionId),
    Wakeup(usize),
    /// Every member publishes its state.
    Publish,
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
    /// The kind of device its last iteration ran on.
    kind: Option<DeviceKind>,
    /// Why it was dropped, if it was.
    dropped: Option<&'static str>,
}

/// A `Run`'s requests: (id, context tokens) to prefill, restore, decode.
struct Batch<'a> {
    prefill: &'a [(RequestId, u64)],
    restore: &'a [(RequestId, u64)],
    decode: &'a [(RequestId, u64)],
}

struct Pending {
    /// (member, its instance id)
    instance: (usize, InstanceId),
    /// (request, tokens, finished, first token at, finish at)
    outcomes: Vec<(RequestId, u64, bool, f64, f64)>,
}

struct NodeState {
    spec: NodeSpec,
    used_bytes: u64,
    peak_bytes: u64,
    /// What its KV pools hold, and the most they have held at once.
    kv_bytes: u64,
    peak_kv_bytes: u64,
    /// Seconds spent in iterations.
    busy_s: f64,
    cold_starts: usize,
    run: Option<Pending>,
}

struct World<'a> {
    profile: &'a Profile,
    reqs: &'a [TraceRequest],
    state: Vec<SimReq>,
    nodes: Vec<NodeState>,
    /// Per (member, instance): (weights bytes, KV bytes) the device holds.
    held: HashMap<(usize, InstanceId), (u64, u64)>,
    /// Per (member, action): its global node, instance and op.
    actions: HashMap<(usize, ActionId), (NodeId, InstanceId, ActionOp)>,
    heap: BinaryHeap<Reverse<(Time, u64, Event)>>,
    seq: u64,
    cold_starts: usize,
    preemptions: usize,
    preempted_requests: usize,
    memory_violations: usize,
    dropped_by_reason: BTreeMap<String, usize>,
    decode_tokens: u64,
    /// Draws each run's step-time ratio (`Profile::step_time_ratio`).
    rng: SplitMix64,
}

impl World<'_> {
    fn push(&mut self, t: f64, ev: Event) {
        self.seq += 1;
        self.heap.push(Reverse((Time(t), self.seq, ev)));
    }

    /// Adds `add` bytes, `kv_add` of them KV pool, to what `node` holds;
    /// returns how far that raised its pools' high-water mark (memory
    /// written fresh: see `CostModel::load_s`).
    fn bump_used(&mut self, node: NodeId, add: u64, kv_add: u64) -> u64 {
        let n = &mut self.nodes[node];
        n.used_bytes += add;
        n.kv_bytes += kv_add;
        let fresh = n.kv_bytes.saturating_sub(n.peak_kv_bytes);
        n.peak_kv_bytes = n.peak_kv_bytes.max(n.kv_bytes);
        n.peak_bytes = n.peak_bytes.max(n.used_bytes);
        if n.used_bytes > n.spec.capacity_bytes {
            self.memory_violations += 1;
        }
        fresh
    }

    /// Carry out member `m`'s commands; its node ids start at global
    /// node `first_node`.
    fn execute(&mut self, cmds: Vec<Command>, (m, first_node): (usize, NodeId), now: f64) {
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
                    let node = first_node + node;
                    let kind = self.nodes[node].spec.kind;
                    let dur = match op {
                        ActionOp::Load {
                            weights_bytes,
                            kv_bytes,
                        } => {
                            self.cold_starts += 1;
                            self.nodes[node].cold_starts += 1;
                            self.held.insert((m, instance), (weights_bytes, kv_bytes));
                            let fresh = self.bump_used(node, weights_bytes + kv_bytes, kv_bytes);
                            self.profile.load_s(model_type, kind, fresh)
                        }
                        ActionOp::ResizeKv { kv_bytes } => {
                            let held = self
                                .held
                                .get_mut(&(m, instance))
                                .expect("resize after load");
                            let mut fresh = 0;
                            if kv_bytes > held.1 {
                                let add = kv_bytes - held.1;
                                held.1 = kv_bytes;
                                fresh = self.bump_used(node, add, add);
                            }
                            self.profile.kv_resize_s(model_type, kind, fresh)
                        }
                        ActionOp::Unload => self.profile.unload_s(model_type, kind),
                    };
                    self.actions.insert((m, action), (node, instance, op));
                    self.push(now + dur, Event::ActionEnd(m, action));
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
                    first_node + node,
                    (m, instance),
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
                        if let Some(run) = n.run.as_mut().filter(|r| r.instance == (m, instance)) {
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
                    let s = &mut self.state[request as usize];
                    s.ended += 1;
                    s.dropped = Some(reason.name());
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
        instance: (usize, InstanceId),
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
        // How much longer or shorter than the profile's time this run takes
        // (1 unless the profile says how live steps vary).
        let prefills = !prefill.is_empty() || !restore.is_empty();
        let ratio = self
            .profile
            .step_time_ratio(mtype, kind, prefills, self.rng.next_f64());
        if prefills {
            if !prefill.is_empty() {
                let tokens: u64 = prefill.iter().map(|p| p.1).sum();
                t += ratio * self.profile.prefill_s(mtype, kind, tokens);
            }
            let restored: u64 = restore.iter().map(|p| p.1).sum();
            t += ratio * self.profile.kv_swap_s(mtype, kind, restored);
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
                t += ratio * self.profile.decode_s(mtype, kind, avg, live.len() as u64);
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
        for o in &outcomes {
            self.state[o.0 as usize].kind = Some(kind);
        }
        self.nodes[node].busy_s += t - now;
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

/// A scheduler of the simulation: the one of a machine, or one member of a
/// cluster.
struct Member<'p> {
    sched: Scheduler<&'p Profile>,
    /// Its state as last published (cluster only).
    published: Option<Scheduler<&'p Profile>>,
    /// Its node 0 is this global node.
    first_node: NodeId,
    wakeup_at: Option<f64>,
}

impl Member<'_> {
    /// Hand its commands to the world and keep one wakeup queued.
    fn settle(&mut self, m: usize, w: &mut World, now: f64) {
        let cmds = self.sched.drain_commands();
        w.execute(cmds, (m, self.first_node), now);
        self.wake(m, w, now);
    }

    fn wake(&mut self, m: usize, w: &mut World, now: f64) {
        if let Some(t) = self.sched.next_wakeup_s()
            && t > now
            && self.wakeup_at.is_none_or(|s| s <= now || t < s)
        {
            self.wakeup_at = Some(t);
            w.push(t, Event::Wakeup(m));
        }
    }
}

/// The members to try for `req`, best first, on their published state
/// ([`routing_order`]).
fn route(members: &[Member], req: &Request, now: f64) -> Vec<usize> {
    routing_order(members.iter().enumerate().map(|(m, member)| {
        let published = member.published.as_ref().unwrap_or(&member.sched);
        let (kind, load) = published.node_load(0);
        (m, published.probe(req, now), kind, load)
    }))
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
    let new_scheduler = |nodes: Vec<NodeSpec>| {
        Scheduler::new(
            setup.scheduler.clone(),
            profile.models.clone(),
            nodes,
            profile,
        )
    };
    let mut members: Vec<Member> = match setup.cluster {
        None => vec![Member {
            sched: new_scheduler(nodes.clone()),
            published: None,
            first_node: 0,
            wakeup_at: None,
        }],
        Some(_) => nodes
            .iter()
            .enumerate()
            .map(|(g, spec)| {
                let sched = new_scheduler(vec![spec.clone()]);
                Member {
                    published: Some(sched.clone()),
                    sched,
                    first_node: g,
                    wakeup_at: None,
                }
            })
            .collect(),
    };
    // Global node → (member, its node).
    let owner: Vec<(usize, NodeId)> = (0..nodes.len())
        .map(|g| match setup.cluster {
            None => (0, g),
            Some(_) => (g, 0),
        })
        .collect();
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
                kind: None,
                dropped: None,
            };
            reqs.len()
        ],
        nodes: nodes
            .into_iter()
            .map(|spec| NodeState {
                spec,
                used_bytes: 0,
                peak_bytes: 0,
                kv_bytes: 0,
                peak_kv_bytes: 0,
                busy_s: 0.0,
                cold_starts: 0,
                run: None,
            })
            .collect(),
        held: HashMap::new(),
        actions: HashMap::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        cold_starts: 0,
        preemptions: 0,
        preempted_requests: 0,
        memory_violations: 0,
        dropped_by_reason: BTreeMap::new(),
        rng: SplitMix64(0),
        decode_tokens: 0,
    };
    for (i, r) in reqs.iter().enumerate() {
        w.push(r.arrival_s, Event::Arrival(i));
    }
    if let Some(c) = setup.cluster {
        w.push(c.publish_every_s, Event::Publish);
    }
    let request = |i: usize| {
        let r = &reqs[i];
        Request {
            id: i as RequestId,
            model: r.function,
            model_type: setup.model_type,
            function: r.function,
            input_tokens: r.input_tokens,
            max_output_tokens: None,
            ttft_slo_s: setup.slo.ttft_s(r.input_tokens),
            tpot_slo_s: setup.slo.tpot_s,
            arrival_s: r.arrival_s,
        }
    };
    let mut routes: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut routing_retries = 0;
    let mut last_t = 0.0;
    let mut node_s = 0.0;
    while let Some(Reverse((Time(now), _, ev))) = w.heap.pop() {
        let in_use = w.nodes.iter().filter(|n| n.used_bytes > 0).count();
        node_s += in_use as f64 * (now - last_t);
        last_t = now;
        let m = match ev {
            Event::Arrival(i) => match setup.cluster {
                None => {
                    members[0].sched.submit(request(i), now);
                    0
                }
                Some(c) => {
                    routes.insert(i, route(&members, &request(i), now));
                    w.push(now + c.hop_s, Event::Deliver(i, 0));
                    continue;
                }
            },
            Event::Deliver(i, k) => {
                let route = &routes[&i];
                let m = route[k];
                let sched = &mut members[m].sched;
                sched.submit(request(i), now);
                let mut cmds = sched.drain_commands();
                if k + 1 < route.len() {
                    // Refused at once, or waiting: the next member.
                    let refused = cmds
                        .iter()
                        .position(|c| matches!(c, Command::Dropped { request, .. } if *request == i as RequestId));
                    let refused = match refused {
                        Some(at) => {
                            cmds.remove(at);
                            true
                        }
                        None => sched.withdraw(i as RequestId, now),
                    };
                    if refused {
                        routing_retries += 1;
                        let hop = setup.cluster.map_or(0.0, |c| c.hop_s);
                        w.push(now + hop, Event::Deliver(i, k + 1));
                    }
                } else {
                    routes.remove(&i);
                }
                w.execute(cmds, (m, members[m].first_node), now);
                members[m].wake(m, &mut w, now);
                continue;
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
                let (m, local) = owner[node];
                members[m]
                    .sched
                    .iteration_done(local, run.instance.1, &outcomes, now);
                m
            }
            Event::ActionEnd(m, action) => {
                let (node, instance, op) =
                    w.actions.remove(&(m, action)).expect("actions end once");
                let held = w.held.get_mut(&(m, instance)).expect("held since load");
                let (freed, kv_freed) = match op {
                    ActionOp::ResizeKv { kv_bytes } if kv_bytes < held.1 => {
                        let f = held.1 - kv_bytes;
                        held.1 = kv_bytes;
                        (f, f)
                    }
                    ActionOp::Unload => {
                        let (wb, kb) = w.held.remove(&(m, instance)).expect("held");
                        (wb + kb, kb)
                    }
                    _ => (0, 0),
                };
                w.nodes[node].used_bytes -= freed;
                w.nodes[node].kv_bytes -= kv_freed;
                members[m].sched.action_done(owner[node].1, action, now);
                m
            }
            Event::Wakeup(m) => {
                members[m].sched.tick(now);
                m
            }
            Event::Publish => {
                for member in &mut members {
                    member.published = Some(member.sched.clone());
                }
                // Until the rest of the run is over.
                if let Some(c) = setup.cluster
                    && !w.heap.is_empty()
                {
                    w.push(now + c.publish_every_s, Event::Publish);
                }
                continue;
            }
        };
        members[m].settle(m, &mut w, now);
    }
    let mut result = summarize(&w, setup, models, last_t, node_s);
    result.summary.routing_retries = routing_retries;
    result
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
    let mut by_kind: BTreeMap<String, KindSummary> = BTreeMap::new();
    for kind in DeviceKind::ALL {
        let nodes: Vec<&NodeState> = w.nodes.iter().filter(|n| n.spec.kind == kind).collect();
        if nodes.is_empty() {
            continue;
        }
        let busy_s: f64 = nodes.iter().map(|n| n.busy_s).sum();
        by_kind.insert(
            kind.name().to_string(),
            KindSummary {
                cold_starts: nodes.iter().map(|n| n.cold_starts).sum(),
                busy_fraction: (makespan_s > 0.0)
                    .then(|| busy_s / (makespan_s * nodes.len() as f64)),
                ..KindSummary::default()
            },
        );
    }
    let mut per_request = Vec::with_capacity(w.reqs.len());
    for (i, s) in w.state.iter().enumerate() {
        if s.ended != 1 {
            end_violations += 1;
        }
        let r = &w.reqs[i];
        let mut record = RequestRecord {
            index: i,
            function: r.function,
            arrival_s: r.arrival_s,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            outcome: if s.dropped.is_some() {
                "dropped"
            } else {
                "unfinished"
            },
            reason: s.dropped,
            ttft_s: None,
            tpot_s: None,
            load_delay_s: s.load_delay_s,
            device: s.kind.map(DeviceKind::name),
        };
        let (Some(first), Some(finish)) = (s.first_token_s, s.finish_s) else {
            per_request.push(record);
            continue;
        };
        let ttft = first - r.arrival_s;
        let tpot = if r.output_tokens > 1 {
            (finish - first) / (r.output_tokens - 1) as f64
        } else {
            0.0
        };
        ttfts.push(ttft);
        tpots.push(tpot);
        let kind = s
            .kind
            .map(|k| by_kind.entry(k.name().to_string()).or_default());
        // The paper's SLO allows the load delay; where the scheduler counts
        // the load against the TTFT SLO (the live host), so does the tally.
        let load_allowance_s = match setup.scheduler.ttft_counts_load {
            true => 0.0,
            false => s.load_delay_s,
        };
        let met =
            ttft <= setup.slo.ttft_s(r.input_tokens) + load_allowance_s && tpot <= setup.slo.tpot_s;
        slo_met += usize::from(met);
        if let Some(k) = kind {
            k.served += 1;
            k.slo_met += usize::from(met);
        }
        record.outcome = if met { "met" } else { "missed" };
        (record.ttft_s, record.tpot_s) = (Some(ttft), Some(tpot));
        per_request.push(record);
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
        by_kind,
        cluster: setup.cluster,
        routing_retries: 0,
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
        per_request,
    }
}
