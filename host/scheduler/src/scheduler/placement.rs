//! Placement: existing instances first, then proactive preemption, then a
//! new instance on a node in CPU-first, bin-packing order (on a node with
//! room, else on one where unloading idle instances makes room); and the
//! bookkeeping of attaching, detaching, evicting and retiring.

use super::*;

impl<C: CostModel> Scheduler<C> {
    pub(super) fn try_place(&mut self, rid: RequestId, now_s: f64) -> bool {
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
                if self.fits_giving_back_idle_kv(node, Target::Existing(id), rid, now_s) {
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
        let order = self.placement_order(mtype);
        for &node in &order {
            if !self.node_has_slot(node, mtype) {
                continue;
            }
            if self.fits_giving_back_idle_kv(node, Target::New(mtype), rid, now_s) {
                let id = self.create_instance(node, model, mtype, now_s);
                self.attach(rid, id, now_s);
                return true;
            }
        }
        // No node takes a new instance as it stands: an instance kept
        // loaded only for its keep-alive never keeps a request waiting.
        // The first node (same order) where unloading its longest-idle
        // instances makes room unloads them, and the new one loads after.
        // The sllm baselines keep the paper's artifact's behaviour: an
        // instance unloads only when its keep-alive ends.
        let unload_idle = !self.cfg.policy.is_sllm();
        for &node in order.iter().filter(|_| unload_idle) {
            if let Some(idle) = self.idle_to_unload(node, mtype, rid, now_s) {
                for i in idle {
                    self.retire(i);
                }
                let id = self.create_instance(node, model, mtype, now_s);
                self.attach(rid, id, now_s);
                return true;
            }
        }
        false
    }

    /// Whether instance `id` is idle: not retiring, no request, nothing
    /// running or queued, and not its device's current run.
    pub(super) fn is_idle(&self, id: InstanceId) -> bool {
        let inst = &self.instances[&id];
        !inst.retiring
            && inst.requests.is_empty()
            && inst.running.is_none()
            && inst.queue.is_empty()
            && self.nodes[inst.node].busy != Some(id)
    }

    /// The fewest of `node`'s idle instances (no request, nothing running
    /// or queued), longest idle first, whose unloading would let a new
    /// instance of `mtype` take `rid`; `None` when unloading every idle
    /// one would not. Only instances whose keep-alive would hold them past
    /// `rid`'s deadline count: one that unloads sooner by itself is waited
    /// for, as its model may be asked for again meanwhile (with the
    /// paper's keep-alive of a second or less, that is every one).
    fn idle_to_unload(
        &mut self,
        node: NodeId,
        mtype: ModelTypeId,
        rid: RequestId,
        now_s: f64,
    ) -> Option<Vec<InstanceId>> {
        let kind = self.nodes[node].spec.kind;
        let deadline_s = self.next_token_deadline_s(&self.requests[&rid]);
        let mut idle: Vec<(f64, InstanceId)> = self.nodes[node]
            .instances
            .iter()
            .filter_map(|i| {
                let inst = &self.instances[i];
                let since = inst.idle_since_s.filter(|_| self.is_idle(*i))?;
                (since + self.keep_alive_s(inst, kind) > deadline_s).then_some((since, *i))
            })
            .collect();
        if idle.is_empty() {
            return None;
        }
        idle.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        // Try on the node's list with the idle ones left out, then put the
        // list back: admission reads the node's instances from it.
        let all = self.nodes[node].instances.clone();
        let mut unloaded = Vec::new();
        let mut fits = false;
        for (_, i) in idle {
            self.nodes[node].instances.retain(|&x| x != i);
            unloaded.push(i);
            if self.node_has_slot(node, mtype)
                && self.validate(node, Target::New(mtype), rid, now_s).all()
            {
                fits = true;
                break;
            }
        }
        self.nodes[node].instances = all;
        fits.then_some(unloaded)
    }

    /// Nodes for a new instance: CPU pool first, then GPU; within a pool the
    /// busiest node first (bin-packing), nodes with no instance last.
    pub(super) fn placement_order(&self, mtype: ModelTypeId) -> Vec<NodeId> {
        let usable = |kind| self.kind_usable(kind, mtype);
        bin_packing_order(
            self.nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| usable(n.spec.kind) && !n.failed)
                .map(|(id, n)| (id, n.spec.kind, self.load_of(id))),
        )
    }

    /// How busy a node is, for bin-packing: on a CPU the decode time
    /// slices its instances take, on a GPU its planned bytes; `None` with
    /// no instance.
    pub(super) fn load_of(&self, node: NodeId) -> Option<f64> {
        let n = &self.nodes[node];
        if n.instances.is_empty() {
            return None;
        }
        let kind = n.spec.kind;
        Some(match kind {
            DeviceKind::Cpu => n
                .instances
                .iter()
                .map(|i| self.time_slice(&self.view(kind, Some(&self.instances[i]), None, None)))
                .sum::<f64>(),
            DeviceKind::Gpu => self.planned_bytes(node) as f64,
        })
    }

    pub(super) fn node_has_slot(&self, node: NodeId, mtype: ModelTypeId) -> bool {
        let n = &self.nodes[node];
        let slots = self.models[mtype.0 as usize].slots_per_node[n.spec.kind] as usize;
        let limit = if self.cfg.policy.is_sllm() {
            slots.min(self.cfg.policy.sllm_shares() as usize)
        } else {
            slots
        };
        n.instances.len() < limit
    }

    pub(super) fn planned_bytes(&self, node: NodeId) -> u64 {
        self.nodes[node]
            .instances
            .iter()
            .map(|i| self.instance_bytes(&self.instances[i], true))
            .sum()
    }

    pub(super) fn committed_bytes(&self, node: NodeId) -> u64 {
        self.nodes[node]
            .instances
            .iter()
            .map(|i| self.instance_bytes(&self.instances[i], false))
            .sum()
    }

    pub(super) fn instance_bytes(&self, inst: &Instance, planned: bool) -> u64 {
        let spec = &self.models[inst.mtype.0 as usize];
        let kind = self.nodes[inst.node].spec.kind;
        let (loaded, blocks) = if planned {
            (inst.planned_loaded, inst.planned_blocks)
        } else {
            (inst.committed_loaded, inst.committed_blocks)
        };
        let weights = if loaded { inst.static_bytes } else { 0 };
        weights + blocks * spec.block_bytes(kind)
    }

    /// Proactive preemption: on GPU when only memory blocks `target`, on CPU
    /// when only the decode time slice does; the victim is a neighbour with
    /// a batch no larger than the target's whose footprint (or time slice)
    /// covers the shortfall, smallest batch first.
    pub(super) fn preemption_victim(
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
                total as f64 - self.nodes[node].room_bytes as f64
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

    pub(super) fn preempt(&mut self, victim: InstanceId, now_s: f64) {
        let inst = self.instances.get_mut(&victim).expect("victim is live");
        let evicted = std::mem::take(&mut inst.requests);
        self.evict(victim, evicted, now_s + self.cfg.retry_interval_s);
        self.retire(victim);
    }

    /// Sends requests already detached from `instance` back to be re-placed.
    pub(super) fn evict(&mut self, instance: InstanceId, evicted: Vec<RequestId>, retry_at_s: f64) {
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

    pub(super) fn create_instance(
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
        let fixed = self.fixed_kv_bytes(mtype, kind, self.nodes[node].spec.capacity_bytes);
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
                static_bytes: self.static_bytes(mtype, kind),
                retiring: false,
                idle_since_s: None,
                bill_start_s: now_s,
                busy_total_s: 0.0,
                run_started_s: now_s,
                shrink_due_s: None,
                load_fresh_bytes: 0,
            },
        );
        self.enqueue(id, Op::Load { blocks });
        self.nodes[node].instances.push(id);
        self.by_model.entry(model).or_default().push(id);
        id
    }

    pub(super) fn attach(&mut self, rid: RequestId, inst: InstanceId, now_s: f64) {
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

    pub(super) fn detach(&mut self, rid: RequestId, now_s: f64) -> ReqState {
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

    pub(super) fn retire(&mut self, id: InstanceId) {
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
}

/// The placement order of `candidates` (an id, its kind of device, its
/// load or `None` when it holds no instance): CPUs before GPUs; within a
/// kind the busiest first (bin-packing onto the fewest devices), the empty
/// ones last, ties by id. One machine orders its devices with it, a
/// cluster's router its members.
pub fn bin_packing_order<T: Ord + Copy>(
    candidates: impl IntoIterator<Item = (T, DeviceKind, Option<f64>)>,
) -> Vec<T> {
    let candidates: Vec<_> = candidates.into_iter().collect();
    let mut order = Vec::with_capacity(candidates.len());
    for kind in [DeviceKind::Cpu, DeviceKind::Gpu] {
        let mut used: Vec<(f64, T)> = Vec::new();
        let mut empty = Vec::new();
        for &(id, k, load) in &candidates {
            match (k == kind, load) {
                (false, _) => {}
                (true, Some(load)) => used.push((load, id)),
                (true, None) => empty.push(id),
            }
        }
        used.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        empty.sort();
        order.extend(used.into_iter().map(|(_, id)| id));
        order.extend(empty);
    }
    order
}
