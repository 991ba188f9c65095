//! Shadow validation: a copy of a node's state with the candidate request
//! added, checked for memory (with look-ahead), the decode time slice and
//! prefill deadlines.

use super::*;

impl<C: CostModel> Scheduler<C> {
    pub(super) fn request_blocks(&self, spec: &ModelSpec, kind: DeviceKind, r: &ReqState) -> u64 {
        spec.blocks_for_tokens(
            kind,
            r.req.input_tokens + r.generated + self.lookahead_tokens(r),
        )
    }

    pub(super) fn min_blocks(&self, spec: &ModelSpec, kind: DeviceKind, sum_blocks: u64) -> u64 {
        if sum_blocks == 0 {
            0
        } else {
            sum_blocks.max(spec.blocks_for_tokens(kind, self.cfg.min_instance_tokens))
        }
    }

    pub(super) fn view(
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
                    v.static_bytes = i.static_bytes;
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
                v.static_bytes = self.static_bytes(mtype, kind);
                v.planned_blocks = fixed_blocks;
                v.fixed_kv = fixed_blocks > 0;
                let kv_bytes = fixed_blocks * self.models[mtype.0 as usize].block_bytes(kind);
                v.loading = self.cost.load_s(mtype, kind, kv_bytes) > 0.0;
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

    pub(super) fn node_views(&self, node: NodeId, target: Target, extra: RequestId) -> Vec<View> {
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
                .fixed_kv_bytes(mtype, n.spec.kind, n.spec.capacity_bytes)
                .map_or(0, |b| b / spec.block_bytes(n.spec.kind));
            views.push(self.view(n.spec.kind, None, Some((mtype, fixed)), Some(extra)));
        }
        views
    }

    pub(super) fn time_slice(&self, v: &View) -> f64 {
        if v.batch == 0 {
            return 0.0;
        }
        self.estimate_decode_s(v.mtype, v.kind, v.context_tokens / v.batch, v.batch) / v.tpot_s
    }

    /// Admission on a shadow copy of the node with `extra` added to `target`.
    pub(super) fn validate(
        &self,
        node: NodeId,
        target: Target,
        extra: RequestId,
        now_s: f64,
    ) -> Checks {
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
            let k = tv.kind;
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
        let capacity = self.nodes[node].room_bytes;
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
        // Cold starts count once the model has an instance somewhere: for
        // a model with none, its cold start is the best that can be done.
        let counts_load = self.cfg.ttft_counts_load
            && self
                .by_model
                .get(&self.requests[&extra].req.model)
                .is_some_and(|i| !i.is_empty());
        let prefill = if counts_load {
            self.prefills_fit_counting_loads(&views, is_target, (node, target), extra, now_s)
        } else {
            self.prefills_fit(&views, is_target, now_s)
        };
        Checks {
            memory,
            decode,
            prefill,
        }
    }

    /// The paper's prefill check: prefills in deadline order from now;
    /// none from the target's on may miss its deadline.
    fn prefills_fit(&self, views: &[View], is_target: impl Fn(&View) -> bool, now_s: f64) -> bool {
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
        for (deadline, dur, tgt) in prefills {
            influenced |= tgt;
            t += dur;
            if influenced && t > deadline {
                return false;
            }
        }
        true
    }

    /// The prefill check when cold starts count
    /// (`SchedulerConfig::ttft_counts_load`): prefills in deadline order,
    /// each starting once its instance has loaded, and on a CPU once every
    /// load there has ended (a CPU starts a queued load as soon as it is
    /// free and grants no iteration while it runs). The new request must
    /// meet its own deadline, and no prefill may turn late that would be on
    /// time without it (those late anyway, behind a load, do not refuse
    /// it): on a CPU, a new instance's load turns the waiting prefills of
    /// the instances there late.
    fn prefills_fit_counting_loads(
        &self,
        views: &[View],
        is_target: impl Fn(&View) -> bool,
        (node, target): (NodeId, Target),
        extra: RequestId,
        now_s: f64,
    ) -> bool {
        let own_deadline_s = self.next_token_deadline_s(&self.requests[&extra]);
        let first_step = |v: &View| {
            if v.prefill_tokens + v.restore_tokens > 0 {
                self.estimate_first_step_s(v)
            } else {
                0.0
            }
        };
        // The target instance's own prefills, without the new request.
        let target_without_s = match target {
            Target::Existing(id) => {
                let inst = &self.instances[&id];
                first_step(&self.view(self.nodes[inst.node].spec.kind, Some(inst), None, None))
            }
            Target::New(..) => 0.0,
        };
        let loaded_at = self.loaded_at_s(views, node, now_s);
        // On a CPU, when its loads will all have ended, with the new
        // instance's (loaded last) and without.
        let cpu = self.nodes[node].spec.kind == DeviceKind::Cpu;
        let loads_end = |with_new: bool| {
            views
                .iter()
                .zip(&loaded_at)
                .filter(|(v, _)| cpu && v.loading && (with_new || v.id.is_some()))
                .map(|(_, &at)| at)
                .fold(now_s, f64::max)
        };
        let (end_with, end_without) = (loads_end(true), loads_end(false));
        let mut prefills: Vec<(f64, f64, f64, bool, f64, f64)> = views
            .iter()
            .zip(&loaded_at)
            .filter(|(v, _)| v.prefill_tokens + v.restore_tokens > 0)
            .map(|(v, &ready_s)| {
                let tgt = is_target(v);
                let dur = first_step(v);
                let without = if tgt { target_without_s } else { dur };
                let ready = (ready_s.max(end_with), ready_s.max(end_without));
                (v.deadline_s, dur, without, tgt, ready.0, ready.1)
            })
            .collect();
        prefills.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.3.cmp(&a.3)));
        let (mut t, mut t_without) = (now_s, now_s);
        for (deadline, dur, without, tgt, ready_s, ready_without_s) in prefills {
            t = t.max(ready_s) + dur;
            if without > 0.0 {
                t_without = t_without.max(ready_without_s) + without;
            }
            let turned_late = t > deadline && t_without <= deadline;
            if turned_late || (tgt && t > own_deadline_s) {
                return false;
            }
        }
        true
    }
}
