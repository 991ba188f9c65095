//! The scheduler state machine: inputs (`submit`, `iteration_done`,
//! `action_done`, `cancel`, `tick`) change its state; it answers with
//! [`Command`]s for the driver and a `next_wakeup_s` for timed retries.
//! It never reads a clock and never learns a request's output length before
//! the driver reports it finished.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::Serialize;

use crate::model::{CostModel, DeviceKind, ModelSpec, ModelTypeId, NodeSpec};
use crate::predict::{OutputPredictor, PredictorConfig};

pub type RequestId = u64;
pub type InstanceId = u64;
pub type ActionId = u64;
pub type NodeId = usize;
/// One served model (the paper serves one distinct model per function).
pub type ModelId = u32;

/// What the scheduler is told about a request on arrival.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: RequestId,
    pub model: ModelId,
    pub model_type: ModelTypeId,
    pub function: u32,
    pub input_tokens: u64,
    /// The evaluation's SLOs; the scheduler plans against a margin of them.
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    pub arrival_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Policy {
    #[serde(rename = "sllm")]
    Sllm,
    #[serde(rename = "sllm+c")]
    SllmC,
    #[serde(rename = "sllm+c+s")]
    SllmCS,
    #[serde(rename = "slinfer")]
    Slinfer,
    /// `slinfer` with the predictive look-ahead (beyond the paper).
    #[serde(rename = "slinfer+p")]
    SlinferPredictive,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Sllm,
        Policy::SllmC,
        Policy::SllmCS,
        Policy::Slinfer,
        Policy::SlinferPredictive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Sllm => "sllm",
            Policy::SllmC => "sllm+c",
            Policy::SllmCS => "sllm+c+s",
            Policy::Slinfer => "slinfer",
            Policy::SlinferPredictive => "slinfer+p",
        }
    }

    pub fn parse(name: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == name)
    }

    fn is_sllm(self) -> bool {
        matches!(self, Policy::Sllm | Policy::SllmC | Policy::SllmCS)
    }

    fn uses_cpu(self) -> bool {
        self != Policy::Sllm
    }

    /// Instances one device may hold under the `sllm` baselines.
    fn sllm_shares(self) -> u32 {
        if self == Policy::SllmCS { 2 } else { 1 }
    }
}

/// Every tunable of the policy, defaulting to the paper's published settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub policy: Policy,
    pub lookahead_tokens: u64,
    pub min_instance_tokens: u64,
    pub kv_watermark: f64,
    pub retry_interval_s: f64,
    /// Idle time before an instance is unloaded, by device kind.
    pub keep_alive_s: [f64; 2],
    /// The scheduler plans against `margin ×` the evaluation SLOs.
    pub slo_margin: f64,
    pub ttft_cap_s: f64,
    /// Estimates are profile × safety factor, by device kind.
    pub safety: [f64; 2],
    pub instance_overhead_bytes: u64,
    pub predictor: PredictorConfig,
    /// Preempted requests keep their KV (swapped to host memory and back)
    /// instead of recomputing it. Beyond the paper; off by default.
    pub preempt_keeps_kv: bool,
    /// CPU instances scale their KV pool like GPU ones instead of keeping
    /// `ModelSpec::cpu_kv_bytes` (the paper's artifact keeps it fixed; the
    /// live host's CPU engine owns resizable block tensors). Off by default.
    pub cpu_kv_scales: bool,
}

impl SchedulerConfig {
    pub fn paper(policy: Policy) -> Self {
        SchedulerConfig {
            policy,
            lookahead_tokens: 512,
            min_instance_tokens: 4096,
            kv_watermark: 0.25,
            retry_interval_s: 0.25,
            keep_alive_s: [0.0, 1.0],
            slo_margin: 0.95,
            ttft_cap_s: 8.0,
            safety: [1.1, 1.05],
            instance_overhead_bytes: 1536 * 1024 * 1024,
            predictor: PredictorConfig::default(),
            preempt_keeps_kv: false,
            cpu_kv_scales: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Never placed before its first-token deadline passed.
    DeadlinePassedWaiting,
    /// Evicted by a preemption and not re-placed before its next-token deadline.
    DeadlinePassedAfterPreemption,
    Cancelled,
    /// No node this policy may use can ever host it.
    Unservable,
}

impl DropReason {
    pub fn name(self) -> &'static str {
        match self {
            DropReason::DeadlinePassedWaiting => "deadline_passed_waiting",
            DropReason::DeadlinePassedAfterPreemption => "deadline_passed_after_preemption",
            DropReason::Cancelled => "cancelled",
            DropReason::Unservable => "unservable",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ActionOp {
    /// Bring weights in and allocate the KV pool.
    Load { weights_bytes: u64, kv_bytes: u64 },
    /// Set the KV pool to `kv_bytes` (grow or shrink).
    ResizeKv { kv_bytes: u64 },
    /// Free weights and KV.
    Unload,
}

/// What the driver must do. Actions and runs end with `action_done` and
/// `iteration_done`; the rest are notices.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Action {
        node: NodeId,
        action: ActionId,
        instance: InstanceId,
        model: ModelId,
        model_type: ModelTypeId,
        op: ActionOp,
    },
    /// Run up to `iterations` iterations of the instance's batch: one
    /// prefill iteration over `prefill` (tokens to (re)compute) and
    /// `restore` (tokens of KV to bring back from host memory), each
    /// yielding its next token; or decode iterations over `decode`
    /// (current context).
    Run {
        node: NodeId,
        instance: InstanceId,
        model_type: ModelTypeId,
        iterations: u32,
        prefill: Vec<(RequestId, u64)>,
        restore: Vec<(RequestId, u64)>,
        decode: Vec<(RequestId, u64)>,
    },
    /// The instance gave these requests up; they will be re-placed, their KV
    /// recomputed (or, with `preempt_keeps_kv`, swapped out to host memory
    /// and restored).
    Preempt {
        instance: InstanceId,
        requests: Vec<RequestId>,
    },
    Completed {
        request: RequestId,
        load_delay_s: f64,
    },
    Dropped {
        request: RequestId,
        reason: DropReason,
    },
}

/// Per-request result of a `Run`, reported by the driver.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestOutcome {
    pub request: RequestId,
    pub tokens: u64,
    pub finished: bool,
}

#[derive(Clone, Debug)]
struct ReqState {
    req: Request,
    generated: u64,
    prefilled: bool,
    /// Its KV waits in host memory to be restored (`preempt_keeps_kv`).
    kv_saved: bool,
    instance: Option<InstanceId>,
    attached_s: f64,
    load_delay_s: f64,
    next_retry_s: f64,
    preempted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Load { blocks: u64 },
    Resize { blocks: u64 },
    Unload,
}

#[derive(Clone, Debug)]
struct Instance {
    id: InstanceId,
    model: ModelId,
    mtype: ModelTypeId,
    node: NodeId,
    requests: Vec<RequestId>,
    /// Planned view: as if every queued action were done (admission uses it).
    planned_loaded: bool,
    planned_blocks: u64,
    /// Committed view: what the device may hold now (memory safety uses it).
    committed_loaded: bool,
    committed_blocks: u64,
    queue: VecDeque<(ActionId, Op)>,
    running: Option<(ActionId, Op, f64)>,
    /// KV stays at its load-time size (CPU instances, `sllm` baselines).
    fixed_kv: bool,
    retiring: bool,
    idle_since_s: Option<f64>,
    /// `sllm+c+s` bills device time to throttle each share to its half.
    bill_start_s: f64,
    busy_total_s: f64,
    run_started_s: f64,
}

#[derive(Clone, Debug)]
struct Node {
    spec: NodeSpec,
    busy: Option<InstanceId>,
    instances: Vec<InstanceId>,
}

/// A node's state as admission sees one instance of it: the shadow copy
/// that a candidate request is added to before validation.
#[derive(Clone, Debug)]
struct View {
    id: Option<InstanceId>,
    kind: DeviceKind,
    static_bytes: u64,
    planned_blocks: u64,
    block_bytes: u64,
    fixed_kv: bool,
    need_blocks: u64,
    batch: u64,
    context_tokens: u64,
    prefill_tokens: u64,
    restore_tokens: u64,
    deadline_s: f64,
    tpot_s: f64,
    loading: bool,
    mtype: ModelTypeId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Checks {
    memory: bool,
    decode: bool,
    prefill: bool,
}

impl Checks {
    fn all(self) -> bool {
        self.memory && self.decode && self.prefill
    }
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Existing(InstanceId),
    New(ModelTypeId),
}

/// What a status page shows of one device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSnapshot {
    pub node: NodeId,
    pub kind: DeviceKind,
    pub capacity_bytes: u64,
    /// What the device may hold now (actions started).
    pub committed_bytes: u64,
    /// As if every queued action were done.
    pub planned_bytes: u64,
}

/// What a status page shows of one instance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceSnapshot {
    pub instance: InstanceId,
    pub model: ModelId,
    pub node: NodeId,
    pub kind: DeviceKind,
    /// `loading`, `loaded`, `unloading` or `retiring`.
    pub state: &'static str,
    /// Requests placed on it (its batch).
    pub batch: usize,
    pub kv_blocks_committed: u64,
    pub kv_blocks_planned: u64,
    pub block_bytes: u64,
}

/// A read-only picture of the scheduler, for metrics and `slinfer status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub nodes: Vec<NodeSnapshot>,
    pub instances: Vec<InstanceSnapshot>,
    /// Requests waiting for an instance, per model (models with none omitted).
    pub queued: BTreeMap<ModelId, usize>,
}

/// The policy's state machine. Generic over the cost model so the
/// simulator and the live host share every decision.
pub struct Scheduler<C: CostModel> {
    cfg: SchedulerConfig,
    models: Vec<ModelSpec>,
    cost: C,
    nodes: Vec<Node>,
    instances: HashMap<InstanceId, Instance>,
    by_model: HashMap<ModelId, Vec<InstanceId>>,
    sllm_round_robin: HashMap<ModelId, usize>,
    requests: HashMap<RequestId, ReqState>,
    pending: Vec<RequestId>,
    predictor: OutputPredictor,
    /// Models taken out of service: their instances unload as soon as idle.
    retired_models: HashSet<ModelId>,
    next_instance: InstanceId,
    next_action: ActionId,
    out: Vec<Command>,
}

fn kind_factor(v: [f64; 2], kind: DeviceKind) -> f64 {
    v[kind.index()]
}

impl<C: CostModel> Scheduler<C> {
    pub fn new(
        cfg: SchedulerConfig,
        models: Vec<ModelSpec>,
        nodes: Vec<NodeSpec>,
        cost: C,
    ) -> Self {
        Scheduler {
            cfg,
            models,
            cost,
            nodes: nodes
                .into_iter()
                .map(|spec| Node {
                    spec,
                    busy: None,
                    instances: Vec::new(),
                })
                .collect(),
            instances: HashMap::new(),
            by_model: HashMap::new(),
            sllm_round_robin: HashMap::new(),
            requests: HashMap::new(),
            pending: Vec::new(),
            predictor: OutputPredictor::default(),
            retired_models: HashSet::new(),
            next_instance: 0,
            next_action: 0,
            out: Vec::new(),
        }
    }

    /// Commands produced since the last call, in the order they were decided.
    pub fn drain_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.out)
    }

    pub fn submit(&mut self, req: Request, now_s: f64) {
        let id = req.id;
        let usable = self.nodes.iter().any(|n| {
            self.kind_usable(n.spec.kind, req.model_type)
                && self.fits_alone(&req, n.spec.kind, n.spec.capacity_bytes)
        });
        if !usable {
            self.out.push(Command::Dropped {
                request: id,
                reason: DropReason::Unservable,
            });
            return;
        }
        self.requests.insert(
            id,
            ReqState {
                req,
                generated: 0,
                prefilled: false,
                kv_saved: false,
                instance: None,
                attached_s: now_s,
                load_delay_s: 0.0,
                next_retry_s: now_s,
                preempted: false,
            },
        );
        self.pending.push(id);
        self.pump(now_s);
    }

    pub fn iteration_done(
        &mut self,
        node: NodeId,
        instance: InstanceId,
        outcomes: &[RequestOutcome],
        now_s: f64,
    ) {
        if self.nodes[node].busy == Some(instance) {
            self.nodes[node].busy = None;
        }
        let mut finished = Vec::new();
        if let Some(inst) = self.instances.get_mut(&instance) {
            inst.busy_total_s += now_s - inst.run_started_s;
            for o in outcomes {
                let Some(r) = self.requests.get_mut(&o.request) else {
                    continue;
                };
                if r.instance != Some(instance) {
                    continue;
                }
                r.generated += o.tokens;
                if o.tokens > 0 {
                    r.prefilled = true;
                    r.kv_saved = false;
                }
                if o.finished {
                    finished.push(o.request);
                }
            }
        }
        for id in finished {
            let r = self.detach(id, now_s);
            self.predictor.record(r.req.function, r.generated);
            self.out.push(Command::Completed {
                request: id,
                load_delay_s: r.load_delay_s,
            });
        }
        if self.instances.contains_key(&instance) {
            self.rescale(instance, now_s);
        }
        self.pump(now_s);
    }

    pub fn action_done(&mut self, node: NodeId, action: ActionId, now_s: f64) {
        let Some(&id) = self.nodes[node].instances.iter().find(|i| {
            self.instances[i]
                .running
                .is_some_and(|(a, _, _)| a == action)
        }) else {
            return;
        };
        let inst = self
            .instances
            .get_mut(&id)
            .expect("node lists live instances");
        let (_, op, started_s) = inst.running.take().expect("matched above");
        match op {
            Op::Load { .. } => {
                let attached: Vec<RequestId> = inst.requests.clone();
                for rid in attached {
                    let r = self
                        .requests
                        .get_mut(&rid)
                        .expect("attached requests are live");
                    r.load_delay_s += (now_s - r.attached_s.max(started_s)).max(0.0);
                }
            }
            Op::Resize { blocks } => inst.committed_blocks = blocks,
            Op::Unload => {
                inst.committed_loaded = false;
                inst.committed_blocks = 0;
                if inst.retiring {
                    self.instances.remove(&id);
                    self.nodes[node].instances.retain(|&i| i != id);
                }
            }
        }
        self.pump(now_s);
    }

    pub fn cancel(&mut self, request: RequestId, now_s: f64) {
        if !self.requests.contains_key(&request) {
            return;
        }
        let inst = self.requests[&request].instance;
        self.detach(request, now_s);
        if let Some(i) = inst {
            self.rescale(i, now_s);
        }
        self.out.push(Command::Dropped {
            request,
            reason: DropReason::Cancelled,
        });
        self.pump(now_s);
    }

    pub fn tick(&mut self, now_s: f64) {
        self.pump(now_s);
    }

    /// When the scheduler next needs a `tick` if nothing else happens.
    pub fn next_wakeup_s(&self) -> Option<f64> {
        let retry = self.pending.iter().map(|r| self.requests[r].next_retry_s);
        let idle = self.nodes.iter().flat_map(|n| {
            n.instances.iter().filter_map(|i| {
                let inst = &self.instances[i];
                let ka = self.keep_alive_s(inst, n.spec.kind);
                inst.idle_since_s.filter(|_| !inst.retiring).map(|t| t + ka)
            })
        });
        let throttle = self
            .nodes
            .iter()
            .filter(|n| n.busy.is_none())
            .flat_map(|n| {
                n.instances.iter().filter_map(|i| {
                    let inst = &self.instances[i];
                    (self.runnable(inst) && !inst.requests.is_empty())
                        .then(|| self.throttle_until(inst))
                })
            });
        retry.chain(idle).chain(throttle).min_by(f64::total_cmp)
    }

    /// Adds a model type at run time (a model imported into a live host);
    /// returns its id.
    pub fn add_model_type(&mut self, spec: ModelSpec) -> ModelTypeId {
        self.models.push(spec);
        ModelTypeId((self.models.len() - 1) as u16)
    }

    /// Takes a served model out of service: its instances unload as soon as
    /// they are idle (requests already placed finish first). The driver must
    /// not submit more requests for it.
    pub fn retire_model(&mut self, model: ModelId, now_s: f64) {
        self.retired_models.insert(model);
        self.pump(now_s);
    }

    fn keep_alive_s(&self, inst: &Instance, kind: DeviceKind) -> f64 {
        if self.retired_models.contains(&inst.model) {
            0.0
        } else {
            kind_factor(self.cfg.keep_alive_s, kind)
        }
    }

    /// Requests that have been submitted and have not ended.
    pub fn live_requests(&self) -> usize {
        self.requests.len()
    }

    /// The state of every device and instance, and the queues.
    pub fn snapshot(&self) -> Snapshot {
        let nodes = (0..self.nodes.len())
            .map(|n| NodeSnapshot {
                node: n,
                kind: self.nodes[n].spec.kind,
                capacity_bytes: self.nodes[n].spec.capacity_bytes,
                committed_bytes: self.committed_bytes(n),
                planned_bytes: self.planned_bytes(n),
            })
            .collect();
        let mut instances: Vec<InstanceSnapshot> = self
            .instances
            .values()
            .map(|i| {
                let kind = self.nodes[i.node].spec.kind;
                let state = if i.retiring {
                    "retiring"
                } else if !i.planned_loaded {
                    "unloading"
                } else if !i.committed_loaded || matches!(i.running, Some((_, Op::Load { .. }, _)))
                {
                    "loading"
                } else {
                    "loaded"
                };
                InstanceSnapshot {
                    instance: i.id,
                    model: i.model,
                    node: i.node,
                    kind,
                    state,
                    batch: i.requests.len(),
                    kv_blocks_committed: i.committed_blocks,
                    kv_blocks_planned: i.planned_blocks,
                    block_bytes: self.models[i.mtype.0 as usize].block_bytes(kind),
                }
            })
            .collect();
        instances.sort_by_key(|i| i.instance);
        let mut queued = BTreeMap::new();
        for r in self.requests.values().filter(|r| r.instance.is_none()) {
            *queued.entry(r.req.model).or_insert(0) += 1;
        }
        Snapshot {
            nodes,
            instances,
            queued,
        }
    }

    // ---- deadlines and estimates -------------------------------------

    fn ttft_plan_s(&self, r: &Request) -> f64 {
        (r.ttft_slo_s * self.cfg.slo_margin).min(self.cfg.ttft_cap_s * self.cfg.slo_margin)
    }

    fn tpot_plan_s(&self, r: &Request) -> f64 {
        r.tpot_slo_s * self.cfg.slo_margin
    }

    fn next_token_deadline_s(&self, r: &ReqState) -> f64 {
        r.req.arrival_s
            + r.load_delay_s
            + self.ttft_plan_s(&r.req)
            + self.tpot_plan_s(&r.req) * r.generated as f64
    }

    fn lookahead_tokens(&self, r: &ReqState) -> u64 {
        let predicted = (self.cfg.policy == Policy::SlinferPredictive)
            .then(|| {
                self.predictor
                    .lookahead_tokens(&self.cfg.predictor, r.req.function, r.generated)
            })
            .flatten();
        predicted.unwrap_or(self.cfg.lookahead_tokens)
    }

    fn kind_usable(&self, kind: DeviceKind, mtype: ModelTypeId) -> bool {
        let spec = &self.models[mtype.0 as usize];
        let cap_ok = !self.cfg.policy.is_sllm() || spec.sllm_exclusive_cap[kind.index()].is_some();
        (kind == DeviceKind::Gpu || self.cfg.policy.uses_cpu())
            && cap_ok
            && spec.slots_per_node[kind.index()] > 0
    }

    fn fits_alone(&self, req: &Request, kind: DeviceKind, capacity_bytes: u64) -> bool {
        let spec = &self.models[req.model_type.0 as usize];
        let need = spec.blocks_for_tokens(kind, req.input_tokens + self.cfg.lookahead_tokens)
            * spec.block_bytes(kind);
        let kv = self
            .fixed_kv_bytes(spec, kind, capacity_bytes)
            .unwrap_or(need);
        need <= kv && spec.weights_bytes + self.cfg.instance_overhead_bytes + kv <= capacity_bytes
    }

    /// KV bytes of an instance whose pool does not scale, or `None`.
    fn fixed_kv_bytes(
        &self,
        spec: &ModelSpec,
        kind: DeviceKind,
        capacity_bytes: u64,
    ) -> Option<u64> {
        if kind == DeviceKind::Cpu && !self.cfg.cpu_kv_scales {
            return Some(spec.cpu_kv_bytes);
        }
        self.cfg.policy.is_sllm().then(|| {
            (capacity_bytes / self.cfg.policy.sllm_shares() as u64)
                .saturating_sub(spec.weights_bytes + self.cfg.instance_overhead_bytes)
        })
    }

    /// The iteration that prefills new requests and restores swapped ones.
    fn estimate_first_step_s(&self, v: &View) -> f64 {
        let prefill = if v.prefill_tokens > 0 {
            self.cost.prefill_s(v.mtype, v.kind, v.prefill_tokens)
        } else {
            0.0
        };
        let restore = self.cost.kv_swap_s(v.mtype, v.kind, v.restore_tokens);
        (prefill + restore) * kind_factor(self.cfg.safety, v.kind)
    }

    fn estimate_decode_s(
        &self,
        mtype: ModelTypeId,
        kind: DeviceKind,
        context: u64,
        batch: u64,
    ) -> f64 {
        self.cost.decode_s(mtype, kind, context, batch) * kind_factor(self.cfg.safety, kind)
    }

    // ---- shadow validation -------------------------------------------

    fn request_blocks(&self, spec: &ModelSpec, kind: DeviceKind, r: &ReqState) -> u64 {
        spec.blocks_for_tokens(
            kind,
            r.req.input_tokens + r.generated + self.lookahead_tokens(r),
        )
    }

    fn min_blocks(&self, spec: &ModelSpec, kind: DeviceKind, sum_blocks: u64) -> u64 {
        if sum_blocks == 0 {
            0
        } else {
            sum_blocks.max(spec.blocks_for_tokens(kind, self.cfg.min_instance_tokens))
        }
    }

    fn view(
        &self,
        kind: DeviceKind,
        inst: Option<&Instance>,
        new: Option<(ModelTypeId, u64)>,
        extra: Option<RequestId>,
    ) -> View {
        let mtype = inst.map_or_else(|| new.expect("new view has a type").0, |i| i.mtype);
        let spec = &self.models[mtype.0 as usize];
        let mut v = View {
            id: inst.map(|i| i.id),
            kind,
            static_bytes: 0,
            planned_blocks: 0,
            block_bytes: spec.block_bytes(kind),
            fixed_kv: inst.is_some_and(|i| i.fixed_kv),
            need_blocks: 0,
            batch: 0,
            context_tokens: 0,
            prefill_tokens: 0,
            restore_tokens: 0,
            deadline_s: f64::INFINITY,
            tpot_s: f64::INFINITY,
            loading: false,
            mtype,
        };
        match (inst, new) {
            (Some(i), _) => {
                if i.planned_loaded {
                    v.static_bytes = spec.weights_bytes + self.cfg.instance_overhead_bytes;
                }
                v.planned_blocks = i.planned_blocks;
                v.loading = i
                    .queue
                    .iter()
                    .map(|(_, o)| o)
                    .chain(i.running.iter().map(|(_, o, _)| o))
                    .any(|o| matches!(o, Op::Load { .. }));
            }
            (None, Some((_, fixed_blocks))) => {
                v.static_bytes = spec.weights_bytes + self.cfg.instance_overhead_bytes;
                v.planned_blocks = fixed_blocks;
                v.fixed_kv = fixed_blocks > 0;
                v.loading = self.cost.load_s(mtype, kind) > 0.0;
            }
            (None, None) => unreachable!("a view is of an instance or a new one"),
        }
        let members = inst.map(|i| i.requests.as_slice()).unwrap_or(&[]);
        let mut sum_blocks = 0;
        for rid in members.iter().chain(extra.iter()) {
            let r = &self.requests[rid];
            let ctx = r.req.input_tokens + r.generated;
            sum_blocks += self.request_blocks(spec, kind, r);
            v.batch += 1;
            v.context_tokens += ctx;
            if r.kv_saved {
                v.restore_tokens += ctx;
            } else if !r.prefilled {
                v.prefill_tokens += ctx;
            }
            v.deadline_s = v.deadline_s.min(self.next_token_deadline_s(r));
            v.tpot_s = v.tpot_s.min(self.tpot_plan_s(&r.req));
        }
        v.need_blocks = self.min_blocks(spec, kind, sum_blocks);
        v
    }

    fn node_views(&self, node: NodeId, target: Target, extra: RequestId) -> Vec<View> {
        let n = &self.nodes[node];
        let mut views: Vec<View> = n
            .instances
            .iter()
            .map(|i| {
                let inst = &self.instances[i];
                let ext = matches!(target, Target::Existing(t) if t == *i).then_some(extra);
                self.view(n.spec.kind, Some(inst), None, ext)
            })
            .collect();
        if let Target::New(mtype) = target {
            let spec = &self.models[mtype.0 as usize];
            let fixed = self
                .fixed_kv_bytes(spec, n.spec.kind, n.spec.capacity_bytes)
                .map_or(0, |b| b / spec.block_bytes(n.spec.kind));
            views.push(self.view(n.spec.kind, None, Some((mtype, fixed)), Some(extra)));
        }
        views
    }

    fn time_slice(&self, v: &View) -> f64 {
        if v.batch == 0 {
            return 0.0;
        }
        self.estimate_decode_s(v.mtype, v.kind, v.context_tokens / v.batch, v.batch) / v.tpot_s
    }

    /// Admission on a shadow copy of the node with `extra` added to `target`.
    fn validate(&self, node: NodeId, target: Target, extra: RequestId, now_s: f64) -> Checks {
        let views = self.node_views(node, target, extra);
        let is_target = |v: &View| match target {
            Target::Existing(t) => v.id == Some(t),
            Target::New(..) => v.id.is_none(),
        };
        let tv = views
            .iter()
            .find(|v| is_target(v))
            .expect("target is in its node's views");
        if self.cfg.policy.is_sllm() {
            let spec = &self.models[tv.mtype.0 as usize];
            let k = tv.kind.index();
            let cap = if self.cfg.policy.sllm_shares() > 1 {
                spec.sllm_half_share_cap[k]
            } else {
                spec.sllm_exclusive_cap[k]
            };
            let ok =
                cap.is_some_and(|c| tv.batch <= c as u64) && tv.need_blocks <= tv.planned_blocks;
            return Checks {
                memory: ok,
                decode: ok,
                prefill: ok,
            };
        }
        let capacity = self.nodes[node].spec.capacity_bytes;
        let memory = if tv.fixed_kv {
            tv.need_blocks <= tv.planned_blocks
                && views
                    .iter()
                    .map(|v| v.static_bytes + v.planned_blocks * v.block_bytes)
                    .sum::<u64>()
                    <= capacity
        } else {
            let total: u64 = views
                .iter()
                .map(|v| {
                    let blocks = if is_target(v) {
                        v.planned_blocks.max(v.need_blocks)
                    } else {
                        v.planned_blocks
                    };
                    v.static_bytes + blocks * v.block_bytes
                })
                .sum();
            total <= capacity
        };
        let decode = views.iter().map(|v| self.time_slice(v)).sum::<f64>() <= 1.0;
        let mut prefills: Vec<(f64, f64, bool)> = views
            .iter()
            .filter(|v| {
                v.prefill_tokens + v.restore_tokens > 0 && (v.kind == DeviceKind::Cpu || !v.loading)
            })
            .map(|v| (v.deadline_s, self.estimate_first_step_s(v), is_target(v)))
            .collect();
        prefills.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.2.cmp(&a.2)));
        let mut t = now_s;
        let mut influenced = false;
        let mut prefill = true;
        for (deadline, dur, tgt) in prefills {
            influenced |= tgt;
            t += dur;
            if influenced && t > deadline {
                prefill = false;
                break;
            }
        }
        Checks {
            memory,
            decode,
            prefill,
        }
    }

    // ---- placement -----------------------------------------------------

    fn try_place(&mut self, rid: RequestId, now_s: f64) -> bool {
        let (model, mtype) = {
            let r = &self.requests[&rid].req;
            (r.model, r.model_type)
        };
        let mut existing: Vec<InstanceId> = self.by_model.get(&model).cloned().unwrap_or_default();
        if self.cfg.policy.is_sllm() {
            let start = self.sllm_round_robin.get(&model).copied().unwrap_or(0);
            let n = existing.len();
            for k in 0..n {
                let id = existing[(start + k) % n];
                let node = self.instances[&id].node;
                if self.validate(node, Target::Existing(id), rid, now_s).all() {
                    self.sllm_round_robin
                        .insert(model, (start + k + 1) % n.max(1));
                    self.attach(rid, id, now_s);
                    return true;
                }
            }
        } else {
            existing.sort_by_key(|i| (std::cmp::Reverse(self.instances[i].requests.len()), *i));
            for &id in &existing {
                let node = self.instances[&id].node;
                if self.validate(node, Target::Existing(id), rid, now_s).all() {
                    self.attach(rid, id, now_s);
                    return true;
                }
            }
            for &id in &existing {
                if let Some(victim) = self.preemption_victim(id, rid, now_s) {
                    self.preempt(victim, now_s);
                    self.attach(rid, id, now_s);
                    return true;
                }
            }
        }
        for node in self.placement_order(mtype) {
            if !self.node_has_slot(node, mtype) {
                continue;
            }
            if self.validate(node, Target::New(mtype), rid, now_s).all() {
                let id = self.create_instance(node, model, mtype, now_s);
                self.attach(rid, id, now_s);
                return true;
            }
        }
        false
    }

    /// Nodes for a new instance: CPU pool first, then GPU; within a pool the
    /// busiest node first (bin-packing), nodes with no instance last.
    fn placement_order(&self, mtype: ModelTypeId) -> Vec<NodeId> {
        let mut order = Vec::new();
        for kind in [DeviceKind::Cpu, DeviceKind::Gpu] {
            if !self.kind_usable(kind, mtype) {
                continue;
            }
            let mut used: Vec<(f64, NodeId)> = Vec::new();
            let mut empty = Vec::new();
            for (id, n) in self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.spec.kind == kind)
            {
                if n.instances.is_empty() {
                    empty.push(id);
                    continue;
                }
                let load = match kind {
                    DeviceKind::Cpu => n
                        .instances
                        .iter()
                        .map(|i| {
                            self.time_slice(&self.view(kind, Some(&self.instances[i]), None, None))
                        })
                        .sum::<f64>(),
                    DeviceKind::Gpu => self.planned_bytes(id) as f64,
                };
                used.push((load, id));
            }
            used.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            order.extend(used.into_iter().map(|(_, id)| id));
            order.extend(empty);
        }
        order
    }

    fn node_has_slot(&self, node: NodeId, mtype: ModelTypeId) -> bool {
        let n = &self.nodes[node];
        let slots = self.models[mtype.0 as usize].slots_per_node[n.spec.kind.index()] as usize;
        let limit = if self.cfg.policy.is_sllm() {
            slots.min(self.cfg.policy.sllm_shares() as usize)
        } else {
            slots
        };
        n.instances.len() < limit
    }

    fn planned_bytes(&self, node: NodeId) -> u64 {
        self.nodes[node]
            .instances
            .iter()
            .map(|i| self.instance_bytes(&self.instances[i], true))
            .sum()
    }

    fn committed_bytes(&self, node: NodeId) -> u64 {
        self.nodes[node]
            .instances
            .iter()
            .map(|i| self.instance_bytes(&self.instances[i], false))
            .sum()
    }

    fn instance_bytes(&self, inst: &Instance, planned: bool) -> u64 {
        let spec = &self.models[inst.mtype.0 as usize];
        let kind = self.nodes[inst.node].spec.kind;
        let (loaded, blocks) = if planned {
            (inst.planned_loaded, inst.planned_blocks)
        } else {
            (inst.committed_loaded, inst.committed_blocks)
        };
        let weights = if loaded {
            spec.weights_bytes + self.cfg.instance_overhead_bytes
        } else {
            0
        };
        weights + blocks * spec.block_bytes(kind)
    }

    /// Proactive preemption: on GPU when only memory blocks `target`, on CPU
    /// when only the decode time slice does; the victim is a neighbour with
    /// a batch no larger than the target's whose footprint (or time slice)
    /// covers the shortfall, smallest batch first.
    fn preemption_victim(
        &self,
        target: InstanceId,
        rid: RequestId,
        now_s: f64,
    ) -> Option<InstanceId> {
        let node = self.instances[&target].node;
        let kind = self.nodes[node].spec.kind;
        let checks = self.validate(node, Target::Existing(target), rid, now_s);
        let views = self.node_views(node, Target::Existing(target), rid);
        let tv = views.iter().find(|v| v.id == Some(target))?;
        let gap = match kind {
            DeviceKind::Gpu if !checks.memory && checks.decode && checks.prefill => {
                let total: u64 = views
                    .iter()
                    .map(|v| {
                        let b = if v.id == Some(target) {
                            v.planned_blocks.max(v.need_blocks)
                        } else {
                            v.planned_blocks
                        };
                        v.static_bytes + b * v.block_bytes
                    })
                    .sum();
                total as f64 - self.nodes[node].spec.capacity_bytes as f64
            }
            DeviceKind::Cpu if checks.memory && !checks.decode && checks.prefill => {
                if self.time_slice(tv) > 1.0 {
                    return None;
                }
                views.iter().map(|v| self.time_slice(v)).sum::<f64>() - 1.0
            }
            _ => return None,
        };
        let mut candidates: Vec<&View> = views
            .iter()
            .filter(|v| {
                let id = v.id.expect("existing instances only");
                let inst = &self.instances[&id];
                id != target
                    && !inst.retiring
                    && inst.planned_loaded
                    && self.nodes[node].busy != Some(id)
                    && inst.running.is_none()
                    && v.batch <= tv.batch
                    && (kind == DeviceKind::Gpu || v.batch > 0)
            })
            .collect();
        candidates.sort_by_key(|v| (v.batch, v.id));
        let covers = |v: &View| match kind {
            DeviceKind::Gpu => (v.static_bytes + v.planned_blocks * v.block_bytes) as f64 >= gap,
            DeviceKind::Cpu => self.time_slice(v) >= gap,
        };
        candidates
            .into_iter()
            .find(|v| covers(v))
            .and_then(|v| v.id)
    }

    fn preempt(&mut self, victim: InstanceId, now_s: f64) {
        let inst = self.instances.get_mut(&victim).expect("victim is live");
        let evicted = std::mem::take(&mut inst.requests);
        self.evict(victim, evicted, now_s + self.cfg.retry_interval_s);
        self.retire(victim);
    }

    /// Sends requests already detached from `instance` back to be re-placed.
    fn evict(&mut self, instance: InstanceId, evicted: Vec<RequestId>, retry_at_s: f64) {
        let keep = self.cfg.preempt_keeps_kv;
        for rid in &evicted {
            let r = self
                .requests
                .get_mut(rid)
                .expect("evicted requests are live");
            r.instance = None;
            r.kv_saved = keep && (r.prefilled || r.kv_saved);
            r.prefilled = false;
            r.preempted = true;
            r.next_retry_s = retry_at_s;
        }
        self.pending.extend(evicted.iter().copied());
        self.out.push(Command::Preempt {
            instance,
            requests: evicted,
        });
    }

    fn create_instance(
        &mut self,
        node: NodeId,
        model: ModelId,
        mtype: ModelTypeId,
        now_s: f64,
    ) -> InstanceId {
        let id = self.next_instance;
        self.next_instance += 1;
        let spec = &self.models[mtype.0 as usize];
        let kind = self.nodes[node].spec.kind;
        let fixed = self.fixed_kv_bytes(spec, kind, self.nodes[node].spec.capacity_bytes);
        let blocks = fixed.map_or(0, |b| b / spec.block_bytes(kind));
        self.instances.insert(
            id,
            Instance {
                id,
                model,
                mtype,
                node,
                requests: Vec::new(),
                planned_loaded: true,
                planned_blocks: blocks,
                committed_loaded: false,
                committed_blocks: 0,
                queue: VecDeque::new(),
                running: None,
                fixed_kv: fixed.is_some(),
                retiring: false,
                idle_since_s: None,
                bill_start_s: now_s,
                busy_total_s: 0.0,
                run_started_s: now_s,
            },
        );
        self.enqueue(id, Op::Load { blocks });
        self.nodes[node].instances.push(id);
        self.by_model.entry(model).or_default().push(id);
        id
    }

    fn attach(&mut self, rid: RequestId, inst: InstanceId, now_s: f64) {
        let r = self.requests.get_mut(&rid).expect("placing a live request");
        r.instance = Some(inst);
        r.attached_s = now_s;
        self.pending.retain(|&p| p != rid);
        let i = self
            .instances
            .get_mut(&inst)
            .expect("placing on a live instance");
        i.requests.push(rid);
        i.idle_since_s = None;
        self.rescale(inst, now_s);
    }

    fn detach(&mut self, rid: RequestId, now_s: f64) -> ReqState {
        let r = self.requests.remove(&rid).expect("ending a live request");
        match r.instance {
            Some(i) => {
                let inst = self
                    .instances
                    .get_mut(&i)
                    .expect("attached to a live instance");
                inst.requests.retain(|&x| x != rid);
                if inst.requests.is_empty() {
                    inst.idle_since_s = Some(now_s);
                }
            }
            None => self.pending.retain(|&p| p != rid),
        }
        r
    }

    fn retire(&mut self, id: InstanceId) {
        let inst = self
            .instances
            .get_mut(&id)
            .expect("retiring a live instance");
        inst.retiring = true;
        let model = inst.model;
        if let Some(v) = self.by_model.get_mut(&model) {
            v.retain(|&i| i != id);
        }
        self.enqueue(id, Op::Unload);
    }

    // ---- KV scaling and the action queue ------------------------------

    /// Forward-looking KV scaling with hysteresis: grow to the target when
    /// the minimum exceeds the allocation; shrink only when the target falls
    /// below allocation / (1 + watermark).
    fn rescale(&mut self, id: InstanceId, now_s: f64) {
        let inst = &self.instances[&id];
        if inst.retiring {
            return;
        }
        let planned = inst.planned_blocks;
        if inst.fixed_kv {
            self.evict_overflow(id, planned, now_s);
            return;
        }
        let node = inst.node;
        let kind = self.nodes[node].spec.kind;
        let spec = &self.models[inst.mtype.0 as usize];
        let view = self.view(kind, Some(inst), None, None);
        let w = self.cfg.kv_watermark;
        let min = view.need_blocks;
        let target = self.min_blocks(spec, kind, ((min as f64) * (1.0 + w)).ceil() as u64);
        if min > planned {
            let own = self.instance_bytes(inst, true);
            let others = self.planned_bytes(node) - own;
            let statics = own - planned * view.block_bytes;
            let room = self.nodes[node]
                .spec
                .capacity_bytes
                .saturating_sub(others + statics)
                / view.block_bytes;
            let new = target.min(room).max(planned);
            if new > planned {
                self.enqueue(id, Op::Resize { blocks: new });
            }
            self.evict_overflow(id, new, now_s);
        } else if (target as f64) < planned as f64 / (1.0 + w) {
            self.enqueue(id, Op::Resize { blocks: target });
        }
    }

    /// The engine must never run out of KV: if even the next grant's tokens
    /// do not fit the planned pool, the youngest requests go back to be
    /// re-placed.
    fn evict_overflow(&mut self, id: InstanceId, blocks: u64, now_s: f64) {
        let inst = &self.instances[&id];
        let kind = self.nodes[inst.node].spec.kind;
        let spec = &self.models[inst.mtype.0 as usize];
        let quota = spec.gpu_decode_quota.max(1) as u64;
        let mut hard: u64 = inst
            .requests
            .iter()
            .map(|r| {
                let r = &self.requests[r];
                spec.blocks_for_tokens(kind, r.req.input_tokens + r.generated + quota)
            })
            .sum();
        let mut evicted = Vec::new();
        let mut members = inst.requests.clone();
        while hard > blocks {
            let Some(rid) = members.pop() else { break };
            let r = &self.requests[&rid];
            hard -= spec.blocks_for_tokens(kind, r.req.input_tokens + r.generated + quota);
            evicted.push(rid);
        }
        if evicted.is_empty() {
            return;
        }
        let inst = self.instances.get_mut(&id).expect("live");
        inst.requests.retain(|r| !evicted.contains(r));
        if inst.requests.is_empty() {
            inst.idle_since_s = Some(now_s);
        }
        self.evict(id, evicted, now_s);
    }

    fn enqueue(&mut self, id: InstanceId, op: Op) {
        let inst = self
            .instances
            .get_mut(&id)
            .expect("queueing on a live instance");
        match op {
            Op::Load { blocks } => {
                inst.planned_loaded = true;
                inst.planned_blocks = blocks;
            }
            Op::Resize { blocks } => {
                inst.planned_blocks = blocks;
                // A resize that has not started yet is superseded, not stacked.
                if let Some((_, Op::Resize { blocks: b })) = inst.queue.back_mut() {
                    *b = blocks;
                    return;
                }
            }
            Op::Unload => {
                inst.planned_loaded = false;
                inst.planned_blocks = 0;
            }
        }
        let aid = self.next_action;
        self.next_action += 1;
        inst.queue.push_back((aid, op));
    }

    /// Starts queued actions. Decreases always start (their memory returns
    /// when they finish); increases start in queue order, each only if the
    /// committed footprint plus its increase fits the node.
    fn start_actions(&mut self, node: NodeId, now_s: f64) {
        let mut heads: Vec<(ActionId, InstanceId)> = self.nodes[node]
            .instances
            .iter()
            .filter_map(|i| {
                let inst = &self.instances[i];
                if inst.running.is_some() || self.nodes[node].busy == Some(*i) {
                    return None;
                }
                inst.queue.front().map(|(a, _)| (*a, *i))
            })
            .collect();
        heads.sort();
        let capacity = self.nodes[node].spec.capacity_bytes;
        let mut blocked = false;
        for (_, id) in heads {
            let inst = &self.instances[&id];
            let (aid, op) = *inst.queue.front().expect("has a head");
            let spec = &self.models[inst.mtype.0 as usize];
            let kind = self.nodes[node].spec.kind;
            let bb = spec.block_bytes(kind);
            let increase = match op {
                Op::Load { blocks } => {
                    spec.weights_bytes + self.cfg.instance_overhead_bytes + blocks * bb
                }
                Op::Resize { blocks } => blocks.saturating_sub(inst.committed_blocks) * bb,
                Op::Unload => 0,
            };
            if increase > 0 && (blocked || self.committed_bytes(node) + increase > capacity) {
                blocked = true;
                continue;
            }
            let inst = self.instances.get_mut(&id).expect("live");
            inst.queue.pop_front();
            let (model, mtype) = (inst.model, inst.mtype);
            let op_out = match op {
                Op::Load { blocks } => {
                    inst.committed_loaded = true;
                    inst.committed_blocks = blocks;
                    ActionOp::Load {
                        weights_bytes: spec.weights_bytes + self.cfg.instance_overhead_bytes,
                        kv_bytes: blocks * bb,
                    }
                }
                Op::Resize { blocks } => {
                    if blocks > inst.committed_blocks {
                        inst.committed_blocks = blocks;
                    }
                    ActionOp::ResizeKv {
                        kv_bytes: blocks * bb,
                    }
                }
                Op::Unload => ActionOp::Unload,
            };
            inst.running = Some((aid, op, now_s));
            self.out.push(Command::Action {
                node,
                action: aid,
                instance: id,
                model,
                model_type: mtype,
                op: op_out,
            });
        }
    }

    // ---- the per-node arbiter ------------------------------------------

    fn runnable(&self, inst: &Instance) -> bool {
        inst.committed_loaded && inst.running.is_none() && inst.queue.is_empty() && !inst.retiring
    }

    fn throttle_until(&self, inst: &Instance) -> f64 {
        let shares = self.cfg.policy.sllm_shares();
        if shares > 1 {
            inst.bill_start_s + inst.busy_total_s * shares as f64
        } else {
            f64::NEG_INFINITY
        }
    }

    /// Grants the free device to the runnable instance with the least
    /// headroom (earliest next-token deadline).
    fn arbitrate(&mut self, node: NodeId, now_s: f64) {
        if self.nodes[node].busy.is_some() {
            return;
        }
        let kind = self.nodes[node].spec.kind;
        let mut best: Option<(f64, InstanceId)> = None;
        for i in &self.nodes[node].instances {
            let inst = &self.instances[i];
            if inst.requests.is_empty() || !self.runnable(inst) || self.throttle_until(inst) > now_s
            {
                continue;
            }
            let deadline = inst
                .requests
                .iter()
                .map(|r| self.next_token_deadline_s(&self.requests[r]))
                .fold(f64::INFINITY, f64::min);
            if best.is_none_or(|(d, id)| deadline < d || (deadline == d && *i < id)) {
                best = Some((deadline, *i));
            }
        }
        let Some((_, id)) = best else { return };
        let inst = &self.instances[&id];
        let mut prefill = Vec::new();
        let mut restore = Vec::new();
        let mut decode = Vec::new();
        for rid in &inst.requests {
            let r = &self.requests[rid];
            let ctx = r.req.input_tokens + r.generated;
            if r.prefilled {
                decode.push((*rid, ctx));
            } else if r.kv_saved {
                restore.push((*rid, ctx));
            } else {
                prefill.push((*rid, ctx));
            }
        }
        let iterations = if !prefill.is_empty() || !restore.is_empty() {
            decode.clear();
            1
        } else if kind == DeviceKind::Cpu {
            1
        } else {
            self.models[inst.mtype.0 as usize].gpu_decode_quota.max(1)
        };
        let mtype = inst.mtype;
        self.instances.get_mut(&id).expect("live").run_started_s = now_s;
        self.nodes[node].busy = Some(id);
        self.out.push(Command::Run {
            node,
            instance: id,
            model_type: mtype,
            iterations,
            prefill,
            restore,
            decode,
        });
    }

    fn pump(&mut self, now_s: f64) {
        for n in 0..self.nodes.len() {
            let kind = self.nodes[n].spec.kind;
            let expired: Vec<InstanceId> = self.nodes[n]
                .instances
                .iter()
                .copied()
                .filter(|i| {
                    let inst = &self.instances[i];
                    let ka = self.keep_alive_s(inst, kind);
                    !inst.retiring
                        && inst.requests.is_empty()
                        && self.nodes[n].busy != Some(*i)
                        && inst.idle_since_s.is_some_and(|t| now_s >= t + ka)
                })
                .collect();
            for i in expired {
                self.retire(i);
            }
        }
        let due: Vec<RequestId> = self
            .pending
            .iter()
            .copied()
            .filter(|r| self.requests[r].next_retry_s <= now_s)
            .collect();
        for rid in due {
            let r = &self.requests[&rid];
            if now_s > self.next_token_deadline_s(r) {
                let reason = if r.preempted {
                    DropReason::DeadlinePassedAfterPreemption
                } else {
                    DropReason::DeadlinePassedWaiting
                };
                self.detach(rid, now_s);
                self.out.push(Command::Dropped {
                    request: rid,
                    reason,
                });
            } else if !self.try_place(rid, now_s) {
                self.requests.get_mut(&rid).expect("live").next_retry_s =
                    now_s + self.cfg.retry_interval_s;
            }
        }
        for n in 0..self.nodes.len() {
            self.start_actions(n, now_s);
            self.arbitrate(n, now_s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simple costs, so each test controls exactly which check binds.
    struct Flat {
        prefill_s: f64,
        decode_s: f64,
        decode_per_request_s: f64,
    }

    impl CostModel for Flat {
        fn prefill_s(&self, _: ModelTypeId, _: DeviceKind, _: u64) -> f64 {
            self.prefill_s
        }
        fn decode_s(&self, _: ModelTypeId, _: DeviceKind, _: u64, batch: u64) -> f64 {
            self.decode_s + self.decode_per_request_s * batch as f64
        }
        fn load_s(&self, _: ModelTypeId, _: DeviceKind) -> f64 {
            0.0
        }
        fn kv_resize_s(&self, _: ModelTypeId, _: DeviceKind) -> f64 {
            0.0
        }
        fn unload_s(&self, _: ModelTypeId, _: DeviceKind) -> f64 {
            0.0
        }
        fn kv_swap_s(&self, _: ModelTypeId, _: DeviceKind, _: u64) -> f64 {
            0.0
        }
    }

    const WEIGHTS: u64 = 1000;
    const FAST: Flat = Flat {
        prefill_s: 0.01,
        decode_s: 0.01,
        decode_per_request_s: 0.0,
    };

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            weights_bytes: WEIGHTS,
            kv_bytes_per_token: 1,
            block_tokens: [32, 16],
            cpu_kv_bytes: 4096,
            slots_per_node: [2, 4],
            sllm_exclusive_cap: [Some(8), Some(8)],
            sllm_half_share_cap: [Some(4), Some(4)],
            gpu_decode_quota: 2,
        }
    }

    fn sched(policy: Policy, nodes: &[(DeviceKind, u64)], cost: Flat) -> Scheduler<Flat> {
        let mut cfg = SchedulerConfig::paper(policy);
        cfg.instance_overhead_bytes = 0;
        cfg.min_instance_tokens = 64;
        cfg.lookahead_tokens = 16;
        let nodes = nodes
            .iter()
            .map(|&(kind, capacity_bytes)| NodeSpec {
                kind,
                capacity_bytes,
            })
            .collect();
        Scheduler::new(cfg, vec![spec()], nodes, cost)
    }

    fn req(id: RequestId, model: ModelId, input_tokens: u64, ttft_slo_s: f64) -> Request {
        Request {
            id,
            model,
            model_type: ModelTypeId(0),
            function: model,
            input_tokens,
            ttft_slo_s,
            tpot_slo_s: 0.25,
            arrival_s: 0.0,
        }
    }

    /// Completes every action the scheduler starts, returning all commands.
    fn settle<C: CostModel>(s: &mut Scheduler<C>, now: f64) -> Vec<Command> {
        let mut seen = Vec::new();
        loop {
            let cmds = s.drain_commands();
            if cmds.is_empty() {
                return seen;
            }
            for c in &cmds {
                if let Command::Action { node, action, .. } = c {
                    s.action_done(*node, *action, now);
                }
            }
            seen.extend(cmds);
        }
    }

    fn load_nodes(cmds: &[Command]) -> Vec<NodeId> {
        loads(cmds).into_iter().map(|l| l.0).collect()
    }

    fn loads(cmds: &[Command]) -> Vec<(NodeId, InstanceId)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Action {
                    node,
                    instance,
                    op: ActionOp::Load { .. },
                    ..
                } => Some((*node, *instance)),
                _ => None,
            })
            .collect()
    }

    fn runs(cmds: &[Command]) -> Vec<InstanceId> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Run { instance, .. } => Some(*instance),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn arbiter_grants_the_least_headroom_first() {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        s.submit(req(1, 1, 100, 2.0), 0.0);
        s.submit(req(2, 2, 100, 0.6), 0.0);
        let cmds = settle(&mut s, 0.0);
        let l = loads(&cmds);
        assert_eq!(l.len(), 2);
        // Instance 0 was granted as soon as it loaded (alone on the device);
        // once it yields, model 2's tighter TTFT deadline wins the device
        // even though model 1's request arrived first.
        s.iteration_done(0, l[0].1, &[], 0.01);
        let next = runs(&s.drain_commands());
        assert_eq!(next, vec![l[1].1]);
    }

    #[test]
    fn memory_check_keeps_a_request_waiting_then_drops_it_at_its_deadline() {
        // Room for one instance with its 4-block floor, not two.
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Gpu, WEIGHTS + 10 * 16 + 500)],
            FAST,
        );
        s.submit(req(1, 1, 100, 1.0), 0.0);
        s.submit(req(2, 2, 100, 1.0), 0.0);
        let cmds = settle(&mut s, 0.0);
        assert_eq!(loads(&cmds).len(), 1);
        assert_eq!(s.next_wakeup_s(), Some(0.25));
        s.tick(2.0);
        let dropped: Vec<_> = s
            .drain_commands()
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Dropped {
                        request: 2,
                        reason: DropReason::DeadlinePassedWaiting
                    }
                )
            })
            .collect();
        assert_eq!(dropped.len(), 1);
    }

    #[test]
    fn decode_check_spreads_instances_whose_slices_exceed_the_device() {
        // Each instance alone takes 0.15 / (0.25 × 0.95) ≈ 63% of the device.
        let slow = Flat {
            decode_s: 0.15,
            ..FAST
        };
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Gpu, 1 << 20), (DeviceKind::Gpu, 1 << 20)],
            slow,
        );
        s.submit(req(1, 1, 100, 1.0), 0.0);
        s.submit(req(2, 2, 100, 1.0), 0.0);
        let nodes: Vec<NodeId> = load_nodes(&settle(&mut s, 0.0));
        assert_eq!(nodes, vec![0, 1]);
    }

    #[test]
    fn prefill_check_spreads_prefills_that_would_miss_their_deadlines() {
        // One prefill (0.5 × 1.05) fits the 0.95 s plan; two in a row do not.
        let slow = Flat {
            prefill_s: 0.5,
            ..FAST
        };
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Gpu, 1 << 20), (DeviceKind::Gpu, 1 << 20)],
            slow,
        );
        s.submit(req(1, 1, 100, 1.0), 0.0);
        let mut cmds = settle(&mut s, 0.0);
        // Loaded: its prefill now counts (while loading, the load delay
        // extends its deadline and the check skips it).
        s.submit(req(2, 2, 100, 1.0), 0.0);
        cmds.extend(settle(&mut s, 0.0));
        let nodes: Vec<NodeId> = load_nodes(&cmds);
        assert_eq!(nodes, vec![0, 1]);
    }

    /// Two GPUs then a CPU; requests 1..=`models` each for its own model,
    /// all at once. The nodes their instances load on, in load order.
    fn load_nodes_for_distinct_models(policy: Policy, models: ModelId) -> Vec<NodeId> {
        let mut s = sched(
            policy,
            &[
                (DeviceKind::Gpu, 1 << 20),
                (DeviceKind::Gpu, 1 << 20),
                (DeviceKind::Cpu, 1 << 20),
            ],
            FAST,
        );
        for m in 1..=models {
            s.submit(req(m as RequestId, m, 100, 1.0), 0.0);
        }
        load_nodes(&settle(&mut s, 0.0))
    }

    #[test]
    fn placement_prefers_cpu_then_the_busiest_node_and_empty_nodes_last() {
        // Two CPU slots first, then packing onto one GPU.
        assert_eq!(
            load_nodes_for_distinct_models(Policy::Slinfer, 4),
            vec![2, 2, 0, 0]
        );
        // sllm: GPUs only, one exclusive instance each.
        assert_eq!(load_nodes_for_distinct_models(Policy::Sllm, 3), vec![0, 1]);
    }

    #[test]
    fn existing_instances_are_tried_largest_batch_first() {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        s.submit(req(1, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        let first = s.by_model[&1][0];
        // A second instance of the same model, as if made when the first was full.
        let second = s.create_instance(0, 1, ModelTypeId(0), 0.0);
        settle(&mut s, 0.0);
        s.submit(req(2, 1, 100, 1.0), 0.0);
        assert_eq!(s.requests[&2].instance, Some(first));
        assert!(s.instances[&second].requests.is_empty());
    }

    /// Capacity for two instances and 40 blocks of KV between them.
    fn two_model_node() -> Scheduler<Flat> {
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Gpu, 2 * WEIGHTS + 40 * 16)],
            FAST,
        );
        s.submit(req(1, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        // Model 2 is the laxer one, so model 1 holds the device.
        s.submit(req(2, 2, 100, 3.0), 0.0);
        settle(&mut s, 0.0);
        s.submit(req(3, 1, 100, 1.0), 0.0);
        s.submit(req(4, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        s
    }

    /// Request 5 (model 1) goes to instance `a` by preempting request 2
    /// (model 2) from its neighbour `b`.
    fn submit_5_preempts_2(s: &mut Scheduler<Flat>, a: InstanceId, b: InstanceId) {
        s.submit(req(5, 1, 100, 1.0), 0.0);
        let cmds = s.drain_commands();
        assert!(cmds.contains(&Command::Preempt {
            instance: b,
            requests: vec![2]
        }));
        assert_eq!(s.requests[&5].instance, Some(a));
    }

    #[test]
    fn gpu_preemption_evicts_a_smaller_neighbour_when_only_memory_fails() {
        let mut s = two_model_node();
        let a = s.by_model[&1][0];
        let b = s.by_model[&2][0];
        assert_eq!(s.instances[&a].planned_blocks, 30);
        submit_5_preempts_2(&mut s, a, b);
        assert!(s.pending.contains(&2));
        assert!(!s.by_model[&2].contains(&b));
    }

    #[test]
    fn preemption_can_keep_kv_so_the_request_is_restored_not_recomputed() {
        let mut s = two_model_node();
        s.cfg.preempt_keeps_kv = true;
        // As if model 2's request had run its prefill.
        s.requests.get_mut(&2).unwrap().prefilled = true;
        s.submit(req(5, 1, 100, 1.0), 0.0);
        let r = &s.requests[&2];
        assert!(r.kv_saved && !r.prefilled && r.instance.is_none());
        // Re-placed (capacity freed by finishing model 1's work), it restores.
        let a = s.by_model[&1][0];
        let done: Vec<RequestOutcome> = [1, 3, 4, 5]
            .map(|request| RequestOutcome {
                request,
                tokens: 1,
                finished: true,
            })
            .to_vec();
        s.iteration_done(0, a, &done, 0.1);
        let mut cmds = settle(&mut s, 0.3);
        s.tick(0.3);
        cmds.extend(settle(&mut s, 0.3));
        let restored = cmds.iter().any(|c| {
            matches!(c, Command::Run { restore, prefill, .. } if restore == &vec![(2, 100)] && prefill.is_empty())
        });
        assert!(restored, "{cmds:?}");
    }

    #[test]
    fn cpu_preemption_evicts_a_smaller_neighbour_when_only_decode_fails() {
        // Slice of one instance: (0.02 + 0.04 × batch) × 1.1 / 0.2375.
        let cost = Flat {
            decode_s: 0.02,
            decode_per_request_s: 0.04,
            ..FAST
        };
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], cost);
        s.submit(req(1, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        s.submit(req(2, 2, 100, 3.0), 0.0);
        s.submit(req(3, 1, 100, 1.0), 0.0);
        s.submit(req(4, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        let a = s.by_model[&1][0];
        let b = s.by_model[&2][0];
        assert_eq!(s.instances[&a].requests.len(), 3);
        // Batch 4 alone is 0.83 of the CPU; with the neighbour's 0.28, 1.11.
        submit_5_preempts_2(&mut s, a, b);
    }

    #[test]
    fn shared_sllm_instances_are_throttled_to_their_share_of_device_time() {
        let mut s = sched(Policy::SllmCS, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        s.submit(req(1, 1, 100, 1.0), 0.0);
        let cmds = settle(&mut s, 0.0);
        let i = runs(&cmds)[0];
        let one = [RequestOutcome {
            request: 1,
            tokens: 1,
            finished: false,
        }];
        s.iteration_done(0, i, &one, 0.1);
        // 0.1 s busy since billing started at 0: idle until 0.2.
        assert!(runs(&s.drain_commands()).is_empty());
        assert_eq!(s.next_wakeup_s(), Some(0.2));
        s.tick(0.2);
        assert_eq!(runs(&s.drain_commands()), vec![i]);
    }

    #[test]
    fn snapshot_shows_instances_kv_and_queues() {
        // Room for one request of 300 tokens, not two.
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Gpu, WEIGHTS + 30 * 16)],
            FAST,
        );
        s.submit(req(1, 1, 300, 1.0), 0.0);
        let snap = s.snapshot();
        assert_eq!(snap.instances.len(), 1);
        let i = &snap.instances[0];
        assert_eq!(
            (i.model, i.kind, i.state, i.batch),
            (1, DeviceKind::Gpu, "loading", 1)
        );
        // Planned at once; committed when the load action starts.
        assert_eq!((i.kv_blocks_committed, i.kv_blocks_planned), (0, 25));
        assert_eq!(snap.nodes[0].planned_bytes, WEIGHTS + 25 * 16);
        assert!(snap.queued.is_empty());
        settle(&mut s, 0.0);
        let snap = s.snapshot();
        assert_eq!(snap.instances[0].state, "loaded");
        assert_eq!(snap.instances[0].kv_blocks_committed, 25);
        assert_eq!(snap.nodes[0].committed_bytes, WEIGHTS + 25 * 16);
        // A request the device has no room for now waits in the queue.
        s.submit(req(2, 1, 300, 10.0), 0.0);
        assert_eq!(s.snapshot().queued.get(&1), Some(&1));
    }

    #[test]
    fn retired_models_unload_when_idle_and_new_types_can_be_added() {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
        s.cfg.keep_alive_s = [300.0, 300.0];
        let t = s.add_model_type(spec());
        assert_eq!(t, ModelTypeId(1));
        let mut r = req(1, 7, 100, 1.0);
        r.model_type = t;
        s.submit(r, 0.0);
        let i = s.by_model[&7][0];
        settle(&mut s, 0.0);
        // Busy: retiring waits for the request to end.
        s.retire_model(7, 0.1);
        assert!(!s.instances[&i].retiring);
        let done = RequestOutcome {
            request: 1,
            tokens: 1,
            finished: true,
        };
        s.iteration_done(0, i, &[done], 0.2);
        s.tick(0.2);
        let cmds = settle(&mut s, 0.2);
        assert!(
            cmds.iter().any(|c| matches!(c, Command::Action { instance, op: ActionOp::Unload, .. } if *instance == i)),
            "{cmds:?}"
        );
    }

    #[test]
    fn cpu_kv_is_fixed_unless_cpu_kv_scales() {
        let fixed_blocks = spec().cpu_kv_bytes / 32;
        for scales in [false, true] {
            let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
            s.cfg.cpu_kv_scales = scales;
            s.submit(req(1, 1, 300, 1.0), 0.0);
            let i = s.by_model[&1][0];
            // ceil(316 / 32) = 10 blocks, target 13.
            let first = if scales { 13 } else { fixed_blocks };
            assert_eq!(s.instances[&i].planned_blocks, first, "scales: {scales}");
            s.submit(req(2, 1, 400, 1.0), 0.0);
            // 10 + ceil(416 / 32) = 23 blocks: grow to ceil(23 × 1.25) = 29.
            let grown = if scales { 29 } else { fixed_blocks };
            assert_eq!(s.instances[&i].planned_blocks, grown, "scales: {scales}");
            settle(&mut s, 0.0);
            let done = RequestOutcome {
                request: 2,
                tokens: 1,
                finished: true,
            };
            s.iteration_done(0, i, &[done], 0.1);
            let shrunk = if scales { 13 } else { fixed_blocks };
            assert_eq!(s.instances[&i].planned_blocks, shrunk, "scales: {scales}");
        }
    }

    #[test]
    fn kv_scaling_grows_to_target_and_shrinks_only_past_the_watermark() {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        s.submit(req(1, 1, 300, 1.0), 0.0);
        let i = s.by_model[&1][0];
        // ceil(316 / 16) = 20 blocks, target 25.
        assert_eq!(s.instances[&i].planned_blocks, 25);
        s.submit(req(2, 1, 20, 1.0), 0.0);
        // 23 blocks still fit in 25: no action.
        assert_eq!(s.instances[&i].planned_blocks, 25);
        s.submit(req(3, 1, 100, 1.0), 0.0);
        // 31 > 25: grow to ceil(31 × 1.25) = 39.
        assert_eq!(s.instances[&i].planned_blocks, 39);
        settle(&mut s, 0.0);
        let done = |r| RequestOutcome {
            request: r,
            tokens: 1,
            finished: true,
        };
        // Back to 20 blocks, target 25 < 39 / 1.25: shrink.
        s.iteration_done(0, i, &[done(2), done(3)], 0.1);
        assert_eq!(s.instances[&i].planned_blocks, 25);
        settle(&mut s, 0.1);
        // 1 more token: need still 20 (317 tokens), target 25 = allocation: stays.
        s.iteration_done(
            0,
            i,
            &[RequestOutcome {
                request: 1,
                tokens: 1,
                finished: false,
            }],
            0.2,
        );
        assert_eq!(s.instances[&i].planned_blocks, 25);
    }

    #[test]
    fn grows_wait_for_committed_memory_and_shrinks_always_start() {
        let cap = 2 * WEIGHTS + 10 * 16;
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, cap)], FAST);
        let a = s.create_instance(0, 1, ModelTypeId(0), 0.0);
        let b = s.create_instance(0, 2, ModelTypeId(0), 0.0);
        s.enqueue(a, Op::Resize { blocks: 0 });
        s.enqueue(b, Op::Resize { blocks: 0 });
        s.instances.get_mut(&a).unwrap().planned_blocks = 0;
        s.tick(0.0);
        settle(&mut s, 0.0);
        // b holds 8 blocks; a wants 6: committed would be 2×1000 + 14×16 > cap.
        s.enqueue(b, Op::Resize { blocks: 8 });
        s.tick(0.0);
        settle(&mut s, 0.0);
        s.enqueue(a, Op::Resize { blocks: 6 });
        s.start_actions(0, 0.0);
        let early = s.drain_commands();
        assert!(early.is_empty(), "the grow must wait: {early:?}");
        s.enqueue(b, Op::Resize { blocks: 2 });
        s.start_actions(0, 0.0);
        let shrink = s.drain_commands();
        assert!(
            matches!(shrink.as_slice(), [Command::Action { instance, op: ActionOp::ResizeKv { kv_bytes: 32 }, .. }] if *instance == b),
            "{shrink:?}"
        );
        // Until the shrink finishes, its memory still counts as held.
        s.start_actions(0, 0.0);
        assert!(s.drain_commands().is_empty());
        let Command::Action { action, .. } = &shrink[0] else {
            unreachable!()
        };
        s.action_done(0, *action, 0.0);
        let grow = s.drain_commands();
        assert!(
            matches!(grow.as_slice(), [Command::Action { instance, op: ActionOp::ResizeKv { kv_bytes: 96 }, .. }] if *instance == a)
        );
        assert!(s.committed_bytes(0) <= cap);
    }

    #[test]
    fn a_request_outgrowing_the_node_is_evicted_and_its_empty_instance_retires() {
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Gpu, WEIGHTS + 10 * 16)],
            FAST,
        );
        s.submit(req(1, 1, 100, 30.0), 0.0);
        settle(&mut s, 0.0);
        let i = s.by_model[&1][0];
        assert_eq!(s.instances[&i].planned_blocks, 10);
        let grown = [RequestOutcome {
            request: 1,
            tokens: 60,
            finished: false,
        }];
        // 160 tokens + the next grant's 2 need 11 blocks; only 10 ever fit.
        s.iteration_done(0, i, &grown, 1.0);
        let cmds = s.drain_commands();
        assert!(cmds.contains(&Command::Preempt {
            instance: i,
            requests: vec![1]
        }));
        assert!(s.instances[&i].requests.is_empty());
        assert_eq!(s.instances[&i].idle_since_s, Some(1.0));
        s.tick(2.0);
        let unloads = settle(&mut s, 2.0)
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Action {
                        op: ActionOp::Unload,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(unloads, 1);
    }

    #[test]
    fn cancel_ends_a_request_once_and_frees_its_instance() {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        s.submit(req(1, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        s.cancel(1, 0.05);
        s.cancel(1, 0.06);
        let drops = s
            .drain_commands()
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Dropped {
                        reason: DropReason::Cancelled,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(drops, 1);
        assert_eq!(s.live_requests(), 0);
        // Keep-alive (1 s on GPU) then unload.
        assert_eq!(s.next_wakeup_s(), Some(1.05));
    }
}
