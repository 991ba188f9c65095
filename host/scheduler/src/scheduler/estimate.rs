//! Deadlines and time estimates: the SLOs the policy plans against and the
//! cost model times its safety factor.

use super::*;

impl<C: CostModel> Scheduler<C> {
    pub(super) fn ttft_plan_s(&self, r: &Request) -> f64 {
        (r.ttft_slo_s * self.cfg.slo_margin).min(self.cfg.ttft_cap_s * self.cfg.slo_margin)
    }

    pub(super) fn tpot_plan_s(&self, r: &Request) -> f64 {
        r.tpot_slo_s * self.cfg.slo_margin
    }

    pub(super) fn next_token_deadline_s(&self, r: &ReqState) -> f64 {
        let load_delay_s = if self.cfg.ttft_counts_load {
            0.0
        } else {
            r.load_delay_s
        };
        r.req.arrival_s
            + load_delay_s
            + self.ttft_plan_s(&r.req)
            + self.tpot_plan_s(&r.req) * r.generated as f64
    }

    /// The tokens a request's KV is planned ahead of its context: the
    /// look-ahead (or the predictor's), never past its `max_output_tokens`.
    pub(super) fn lookahead_tokens(&self, r: &ReqState) -> u64 {
        let predicted = (self.cfg.policy == Policy::SlinferPredictive)
            .then(|| {
                self.predictor
                    .lookahead_tokens(&self.cfg.predictor, r.req.function, r.generated)
            })
            .flatten();
        r.req
            .bounded_lookahead(predicted.unwrap_or(self.cfg.lookahead_tokens), r.generated)
    }

    pub(super) fn kind_usable(&self, kind: DeviceKind, mtype: ModelTypeId) -> bool {
        let spec = &self.models[mtype.0 as usize];
        let cap_ok = !self.cfg.policy.is_sllm() || spec.sllm_exclusive_cap[kind].is_some();
        let has_gpu = || self.nodes.iter().any(|n| n.spec.kind == DeviceKind::Gpu);
        (kind == DeviceKind::Gpu || self.cfg.policy.uses_cpu_beside_gpus() || !has_gpu())
            && cap_ok
            && spec.slots_per_node[kind] > 0
    }

    pub(super) fn fits_alone(&self, req: &Request, kind: DeviceKind, capacity_bytes: u64) -> bool {
        let spec = &self.models[req.model_type.0 as usize];
        let lookahead = req.bounded_lookahead(self.cfg.lookahead_tokens, 0);
        let need =
            spec.blocks_for_tokens(kind, req.input_tokens + lookahead) * spec.block_bytes(kind);
        let kv = self
            .fixed_kv_bytes(req.model_type, kind, capacity_bytes)
            .unwrap_or(need);
        need <= kv && self.static_bytes(req.model_type, kind) + kv <= capacity_bytes
    }

    /// What a new instance of `mtype` on `kind` holds besides its KV pool:
    /// what the last one measured, or the estimate (weights and overhead).
    pub(super) fn static_bytes(&self, mtype: ModelTypeId, kind: DeviceKind) -> u64 {
        self.measured_static
            .get(&(mtype, kind))
            .copied()
            .unwrap_or_else(|| {
                self.models[mtype.0 as usize].weights_bytes[kind] + self.cfg.instance_overhead_bytes
            })
    }

    /// KV bytes of an instance whose pool does not scale, or `None`.
    pub(super) fn fixed_kv_bytes(
        &self,
        mtype: ModelTypeId,
        kind: DeviceKind,
        capacity_bytes: u64,
    ) -> Option<u64> {
        // The sllm baselines keep a fixed pool on the CPU whatever the host
        // could do, as the paper's artifact does.
        if kind == DeviceKind::Cpu && (!self.cfg.cpu_kv_scales || self.cfg.policy.is_sllm()) {
            return Some(self.models[mtype.0 as usize].cpu_kv_bytes);
        }
        self.cfg.policy.is_sllm().then(|| {
            (capacity_bytes / self.cfg.policy.sllm_shares() as u64)
                .saturating_sub(self.static_bytes(mtype, kind))
        })
    }

    /// How long until `v`'s instance has loaded: its load's estimate (with
    /// the memory it writes fresh), less what has run of it. `node` is
    /// where a new instance would go.
    pub(super) fn load_left_s(&self, v: &View, node: NodeId, now_s: f64) -> f64 {
        if !v.loading {
            return 0.0;
        }
        let inst = v.id.map(|id| &self.instances[&id]);
        if let Some((inst, Some((_, Op::Load { .. }, started_s)))) =
            inst.map(|i| (i, i.running.as_ref()))
        {
            let load_s = self.cost.load_s(v.mtype, v.kind, inst.load_fresh_bytes);
            return (started_s + load_s - now_s).max(0.0);
        }
        let blocks = inst
            .and_then(|i| {
                i.queue.iter().find_map(|(_, op)| match op {
                    Op::Load { blocks } => Some(*blocks),
                    _ => None,
                })
            })
            .unwrap_or(v.planned_blocks);
        let pool = blocks * self.models[v.mtype.0 as usize].block_bytes(v.kind);
        self.cost
            .load_s(v.mtype, v.kind, self.fresh_bytes(node, pool))
    }

    /// When each of a node's views will have loaded: now for one loaded,
    /// after what is left of its load otherwise; on a CPU also after the
    /// loads before it, which the node runs one at a time (the running one,
    /// then in queue order, a new instance last).
    pub(super) fn loaded_at_s(&self, views: &[View], node: NodeId, now_s: f64) -> Vec<f64> {
        let left: Vec<f64> = views
            .iter()
            .map(|v| self.load_left_s(v, node, now_s))
            .collect();
        let mut at: Vec<f64> = left.iter().map(|l| now_s + l).collect();
        let mut cpu_loads: Vec<((u8, ActionId), usize)> = views
            .iter()
            .enumerate()
            .filter(|(_, v)| v.loading && v.kind == DeviceKind::Cpu)
            .map(|(i, v)| {
                let inst = v.id.map(|id| &self.instances[&id]);
                let order = match inst {
                    Some(inst) if matches!(inst.running, Some((_, Op::Load { .. }, _))) => (0, 0),
                    Some(inst) => (1, inst.queue.front().map_or(ActionId::MAX, |(a, _)| *a)),
                    None => (2, ActionId::MAX),
                };
                (order, i)
            })
            .collect();
        cpu_loads.sort();
        let mut t = now_s;
        for (_, i) in cpu_loads {
            t += left[i];
            at[i] = t;
        }
        at
    }

    pub(super) fn estimate_first_step_s(&self, v: &View) -> f64 {
        let prefill = if v.prefill_tokens > 0 {
            self.cost.prefill_s(v.mtype, v.kind, v.prefill_tokens)
        } else {
            0.0
        };
        let restore = self.cost.kv_swap_s(v.mtype, v.kind, v.restore_tokens);
        (prefill + restore) * self.cfg.safety[v.kind]
    }

    pub(super) fn estimate_decode_s(
        &self,
        mtype: ModelTypeId,
        kind: DeviceKind,
        context: u64,
        batch: u64,
    ) -> f64 {
        self.cost.decode_s(mtype, kind, context, batch) * self.cfg.safety[kind]
    }
}
