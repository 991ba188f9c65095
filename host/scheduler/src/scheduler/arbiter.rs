//! The per-node arbiter (the device goes to the runnable instance with the
//! least headroom; a CPU waits out a load) and `pump`, which retires idle instances, retries
//! waiting requests and starts actions and runs.

use super::*;

impl<C: CostModel> Scheduler<C> {
    pub(super) fn runnable(&self, inst: &Instance) -> bool {
        inst.committed_loaded && inst.running.is_none() && inst.queue.is_empty() && !inst.retiring
    }

    /// When `inst` (with requests, on a device of `kind`) may run next: an
    /// `sllm` share's throttle, and, while it has nothing to decode, the
    /// end of its requests' gathering window
    /// ([`SchedulerConfig::prefill_gather_s`]).
    pub(super) fn not_before_s(&self, inst: &Instance, kind: DeviceKind) -> f64 {
        let shares = self.cfg.policy.sllm_shares();
        let throttle = if shares > 1 {
            inst.bill_start_s + inst.busy_total_s * shares as f64
        } else {
            f64::NEG_INFINITY
        };
        let gap = self.cfg.prefill_gather_s[kind];
        let joined = inst.requests.iter().map(|r| &self.requests[r]);
        if gap <= 0.0 || joined.clone().any(|r| r.prefilled) {
            return throttle;
        }
        let (first, last) = joined.fold((f64::INFINITY, f64::NEG_INFINITY), |(f, l), r| {
            (f.min(r.attached_s), l.max(r.attached_s))
        });
        throttle.max((last + gap).min(first + gap * GATHER_MAX_GAPS))
    }

    /// Whether an instance on `node` is loading now.
    pub(super) fn loading_on(&self, node: NodeId) -> bool {
        self.nodes[node]
            .instances
            .iter()
            .any(|i| matches!(self.instances[i].running, Some((_, Op::Load { .. }, _))))
    }

    /// Grants the free device to the runnable instance with the least
    /// headroom (earliest next-token deadline).
    pub(super) fn arbitrate(&mut self, node: NodeId, now_s: f64) {
        if self.nodes[node].busy.is_some() {
            return;
        }
        let kind = self.nodes[node].spec.kind;
        // A load on a CPU (reading and compiling the model) takes the same
        // cores as iterations: the device waits for it rather than run both
        // at half speed, which the cost model would not see.
        if kind == DeviceKind::Cpu && self.loading_on(node) {
            return;
        }
        let mut best: Option<(f64, InstanceId)> = None;
        for i in &self.nodes[node].instances {
            let inst = &self.instances[i];
            if inst.requests.is_empty()
                || !self.runnable(inst)
                || self.not_before_s(inst, kind) > now_s
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

    pub(super) fn pump(&mut self, now_s: f64) {
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
        let mut left: Vec<ModelId> = Vec::new();
        for rid in due {
            let r = &self.requests[&rid];
            left.push(r.req.model);
            if now_s > self.next_token_deadline_s(r) {
                let reason = if r.preempted {
                    DropReason::DeadlinePassedAfterPreemption
                } else {
                    DropReason::DeadlinePassedWaiting
                };
                let retry_after_s = self.queue_drain_s(rid, now_s);
                self.detach(rid, now_s);
                self.out.push(Command::Dropped {
                    request: rid,
                    reason,
                    retry_after_s,
                });
            } else if self.try_place(rid, now_s) {
                continue;
            } else if let Some(retry_after_s) = self.hopeless(rid, now_s) {
                self.detach(rid, now_s);
                self.out.push(Command::Dropped {
                    request: rid,
                    reason: DropReason::WouldMissDeadline,
                    retry_after_s,
                });
            } else {
                self.requests.get_mut(&rid).expect("live").next_retry_s =
                    now_s + self.cfg.retry_interval_s;
            }
        }
        // A pool whose shrink delay is over, or kept for requests that
        // waited (and were then placed or refused), shrinks now.
        let due: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.shrink_due_s.is_some_and(|t| t <= now_s))
            .map(|i| i.id)
            .collect();
        for i in due {
            self.rescale(i, now_s);
        }
        left.dedup();
        for model in left {
            let idle: Vec<InstanceId> = self
                .by_model
                .get(&model)
                .into_iter()
                .flatten()
                .copied()
                .filter(|i| self.instances[i].requests.is_empty())
                .collect();
            for i in idle {
                self.rescale(i, now_s);
            }
        }
        for n in 0..self.nodes.len() {
            self.start_actions(n, now_s);
            self.arbitrate(n, now_s);
        }
    }
}
