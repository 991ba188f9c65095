//! The scheduler state machine: inputs (`submit`, `iteration_done`,
//! `action_done`, `cancel`, `tick`) change its state; it answers with
//! [`Command`]s for the driver and a `next_wakeup_s` for timed retries.
//! It never reads a clock and never learns a request's output length before
//! the driver reports it finished.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::Serialize;

use crate::model::{CostModel, DeviceKind, ModelSpec, ModelTypeId, NodeSpec};
use crate::predict::OutputPredictor;

mod admission;
mod arbiter;
mod cluster;
mod estimate;
mod kv;
mod placement;
mod refusal;
mod snapshot;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_live;
mod types;

pub use cluster::{Probe, routing_order};
pub use placement::bin_packing_order;
pub use snapshot::{InstanceSnapshot, NodeSnapshot, Snapshot};
use types::GATHER_MAX_GAPS;
pub use types::{ActionOp, Command, DropReason, Policy, Request, RequestOutcome, SchedulerConfig};

pub type RequestId = u64;
pub type InstanceId = u64;
pub type ActionId = u64;
pub type NodeId = usize;
/// One served model (the paper serves one distinct model per function).
pub type ModelId = u32;

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
    /// What it holds besides its KV pool: the model type's estimate when
    /// placed, what the driver measured once loaded
    /// ([`Scheduler::instance_measured`]).
    static_bytes: u64,
    retiring: bool,
    idle_since_s: Option<f64>,
    /// `sllm+c+s` bills device time to throttle each share to its half.
    bill_start_s: f64,
    busy_total_s: f64,
    run_started_s: f64,
    /// When the pool, found oversized, may shrink
    /// (`SchedulerConfig::kv_shrink_delay_s`); `None` while it is needed.
    shrink_due_s: Option<f64>,
    /// Of its load's first pool, the bytes above the node's pools'
    /// high-water mark when the load started (what the load writes fresh;
    /// see [`CostModel::load_s`]).
    load_fresh_bytes: u64,
}

#[derive(Clone, Debug)]
struct Node {
    spec: NodeSpec,
    /// What instances may hold now, at most `spec.capacity_bytes` (a host
    /// sharing the device with other users lowers it; see `set_memory`).
    /// Admission and actions check against it; whether a request could
    /// ever fit checks against the capacity.
    room_bytes: u64,
    busy: Option<InstanceId>,
    instances: Vec<InstanceId>,
    /// Left placement for good (`fail_node`).
    failed: bool,
    /// The most its instances' KV pools have held at once: a new pool
    /// reuses memory below it and writes what lies above it fresh.
    peak_kv_bytes: u64,
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

/// The policy's state machine. Generic over the cost model so the
/// simulator and the live host share every decision.
#[derive(Clone)]
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
    /// Recent completion times per model (early refusal).
    completions: HashMap<ModelId, VecDeque<f64>>,
    /// What the last instance of a model type loaded on a kind of device
    /// measured besides its KV pool; new instances plan with it.
    measured_static: HashMap<(ModelTypeId, DeviceKind), u64>,
    next_instance: InstanceId,
    next_action: ActionId,
    out: Vec<Command>,
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
                    room_bytes: spec.capacity_bytes,
                    spec,
                    busy: None,
                    instances: Vec::new(),
                    failed: false,
                    peak_kv_bytes: 0,
                })
                .collect(),
            instances: HashMap::new(),
            by_model: HashMap::new(),
            sllm_round_robin: HashMap::new(),
            requests: HashMap::new(),
            pending: Vec::new(),
            predictor: OutputPredictor::default(),
            retired_models: HashSet::new(),
            completions: HashMap::new(),
            measured_static: HashMap::new(),
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
        self.submit_together([req], now_s);
    }

    /// Requests that arrived together (the choices of one prompt): all are
    /// queued before any is placed or granted, so that one instance can
    /// prefill them in one iteration.
    pub fn submit_together(&mut self, reqs: impl IntoIterator<Item = Request>, now_s: f64) {
        for req in reqs {
            if !self.servable(&req) {
                self.out.push(Command::Dropped {
                    request: req.id,
                    reason: DropReason::Unservable,
                    retry_after_s: None,
                });
                continue;
            }
            self.enqueue_request(req, now_s);
        }
        self.pump(now_s);
    }

    /// Whether some node this policy may use could ever host `req`.
    fn servable(&self, req: &Request) -> bool {
        self.nodes.iter().any(|n| {
            !n.failed
                && self.kind_usable(n.spec.kind, req.model_type)
                && self.fits_alone(req, n.spec.kind, n.spec.capacity_bytes)
        })
    }

    /// A new request waiting for placement.
    fn enqueue_request(&mut self, req: Request, now_s: f64) {
        let id = req.id;
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
            self.record_completion(r.req.model, now_s);
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
            retry_after_s: None,
        });
        self.pump(now_s);
    }

    /// Takes a node out of placement for good (its device failed): its
    /// instances are gone without unload actions, and the requests on them
    /// are dropped ([`DropReason::DeviceFailed`]) for the driver to fail;
    /// waiting requests go elsewhere or, with no node left, are unservable.
    pub fn fail_node(&mut self, node: NodeId, now_s: f64) {
        let n = &mut self.nodes[node];
        if n.failed {
            return;
        }
        n.failed = true;
        n.busy = None;
        for id in std::mem::take(&mut n.instances) {
            let inst = self
                .instances
                .remove(&id)
                .expect("node lists live instances");
            if let Some(v) = self.by_model.get_mut(&inst.model) {
                v.retain(|&i| i != id);
            }
            for rid in inst.requests {
                self.requests.remove(&rid);
                self.out.push(Command::Dropped {
                    request: rid,
                    reason: DropReason::DeviceFailed,
                    retry_after_s: None,
                });
            }
        }
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
        let not_before = self
            .nodes
            .iter()
            .filter(|n| n.busy.is_none())
            .flat_map(|n| {
                n.instances.iter().filter_map(|i| {
                    let inst = &self.instances[i];
                    (self.runnable(inst) && !inst.requests.is_empty())
                        .then(|| self.not_before_s(inst, n.spec.kind))
                })
            });
        let shrink = self.instances.values().filter_map(|i| i.shrink_due_s);
        retry
            .chain(idle)
            .chain(not_before)
            .chain(shrink)
            .min_by(f64::total_cmp)
    }

    /// Adds a model type at run time (a model imported into a live host);
    /// returns its id.
    /// What an instance really holds besides its KV pool, measured once
    /// loaded: it replaces the estimate for this instance and for the
    /// next instances of its model type on its kind of device.
    pub fn instance_measured(&mut self, instance: InstanceId, static_bytes: u64, now_s: f64) {
        let Some(inst) = self.instances.get_mut(&instance) else {
            return;
        };
        inst.static_bytes = static_bytes;
        let (mtype, node) = (inst.mtype, inst.node);
        let kind = self.nodes[node].spec.kind;
        self.measured_static.insert((mtype, kind), static_bytes);
        self.start_actions(node, now_s);
    }

    /// Changes what a device may hold: its capacity (what a request may
    /// ever use) and its room now (the capacity less what others use; the
    /// host re-reads both). Less room evicts nothing: actions that no longer
    /// fit wait, KV pools shrink as their load falls, and idle instances
    /// unload.
    pub fn set_memory(&mut self, node: NodeId, capacity_bytes: u64, room_bytes: u64, now_s: f64) {
        let n = &mut self.nodes[node];
        n.spec.capacity_bytes = capacity_bytes;
        n.room_bytes = room_bytes.min(capacity_bytes);
        self.start_actions(node, now_s);
    }

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
            self.cfg.keep_alive_s[kind]
        }
    }

    /// Requests that have been submitted and have not ended.
    pub fn live_requests(&self) -> usize {
        self.requests.len()
    }
}
