//! KV scaling with hysteresis and the per-instance action queue (load,
//! resize, unload), started only when the committed footprint fits.

use super::*;

impl<C: CostModel> Scheduler<C> {
    /// Forward-looking KV scaling with hysteresis: grow to the target (or
    /// by the kind's grow factor, within half the room the target leaves)
    /// when the minimum exceeds the allocation; shrink only when the target
    /// falls below allocation / (grow factor × (1 + watermark)), no request
    /// of the model waits to be placed (it would grow the pool straight
    /// back: on a CPU a grow reallocates the pool, hundreds of ms for a GiB,
    /// while the instance runs nothing), and it has stayed so for the
    /// kind's shrink delay.
    pub(super) fn rescale(&mut self, id: InstanceId, now_s: f64) {
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
        // No lower than the kind's idle floor, which a pool never grows for.
        let floor = spec
            .blocks_for_tokens(kind, self.cfg.idle_kv_tokens[kind])
            .min(planned);
        let target = self
            .min_blocks(spec, kind, ((min as f64) * (1.0 + w)).ceil() as u64)
            .max(floor);
        // A pool grown ahead by the grow factor shrinks only once its need
        // falls as far below that; an idle one (no need) shrinks to the floor.
        let grow = self.cfg.kv_grow_factor[kind];
        let oversized = if min == 0 {
            planned > target
        } else {
            (target as f64) * grow < planned as f64 / (1.0 + w)
        };
        let shrinks = oversized && !self.model_waits(inst.model);
        let delay = self.cfg.kv_shrink_delay_s[kind];
        let due = match inst.shrink_due_s {
            _ if !shrinks || delay <= 0.0 => None,
            None => Some(now_s + delay),
            Some(t) if now_s < t => Some(t),
            Some(_) => None,
        };
        if min > planned {
            let mut room = self.grow_room(id);
            if room < target {
                let idle = self.idle_kv_holders(node, Some(id));
                if !idle.is_empty() {
                    self.give_back_idle_kv(&idle);
                    room = self.grow_room(id);
                }
            }
            let ahead = (planned as f64 * grow).ceil() as u64;
            let spare = room.saturating_sub(target) / 2;
            let new = target.max(ahead.min(target + spare)).min(room).max(planned);
            if new > planned {
                self.enqueue(id, Op::Resize { blocks: new });
            }
            self.evict_overflow(id, new, now_s);
        } else if shrinks && due.is_none() {
            self.enqueue(id, Op::Resize { blocks: target });
        }
        self.instances.get_mut(&id).expect("live").shrink_due_s = due;
    }

    /// The blocks instance `id`'s pool could grow to on its node, beside
    /// the others' planned memory.
    fn grow_room(&self, id: InstanceId) -> u64 {
        let inst = &self.instances[&id];
        let node = inst.node;
        let block_bytes =
            self.models[inst.mtype.0 as usize].block_bytes(self.nodes[node].spec.kind);
        let own = self.instance_bytes(inst, true);
        let others = self.planned_bytes(node) - own;
        let statics = own - inst.planned_blocks * block_bytes;
        self.nodes[node].room_bytes.saturating_sub(others + statics) / block_bytes
    }

    /// `node`'s idle instances (no request, nothing running or queued)
    /// with KV planned where the kind keeps an idle floor
    /// ([`SchedulerConfig::idle_kv_tokens`]), but `except`: KV kept only
    /// for a next call that may not come, which a request that needs the
    /// memory now takes first.
    fn idle_kv_holders(&self, node: NodeId, except: Option<InstanceId>) -> Vec<InstanceId> {
        if self.cfg.idle_kv_tokens[self.nodes[node].spec.kind] == 0 {
            return Vec::new();
        }
        self.nodes[node]
            .instances
            .iter()
            .copied()
            .filter(|&i| {
                let inst = &self.instances[&i];
                Some(i) != except && !inst.fixed_kv && inst.planned_blocks > 0 && self.is_idle(i)
            })
            .collect()
    }

    /// Shrinks the pools of `idle` ([`Self::idle_kv_holders`]) to nothing
    /// (a shrink starts at once; a load or grow that needs the memory waits
    /// for it).
    fn give_back_idle_kv(&mut self, idle: &[InstanceId]) {
        for &i in idle {
            self.enqueue(i, Op::Resize { blocks: 0 });
        }
    }

    /// Whether `rid` fits `target` on `node` as [`Self::validate`] says, or
    /// once the node's idle instances give back their idle floors' KV
    /// (which they then do).
    pub(super) fn fits_giving_back_idle_kv(
        &mut self,
        node: NodeId,
        target: Target,
        rid: RequestId,
        now_s: f64,
    ) -> bool {
        if self.validate(node, target, rid, now_s).all() {
            return true;
        }
        let except = match target {
            Target::Existing(t) => Some(t),
            Target::New(_) => None,
        };
        let idle = self.idle_kv_holders(node, except);
        if idle.is_empty() {
            return false;
        }
        let kept: Vec<u64> = idle
            .iter()
            .map(|i| std::mem::take(&mut self.instances.get_mut(i).expect("live").planned_blocks))
            .collect();
        let fits = self.validate(node, target, rid, now_s).all();
        for (i, blocks) in idle.iter().zip(kept) {
            self.instances.get_mut(i).expect("live").planned_blocks = blocks;
        }
        if fits {
            self.give_back_idle_kv(&idle);
        }
        fits
    }

    /// Whether a request of `model` waits to be placed.
    fn model_waits(&self, model: ModelId) -> bool {
        self.pending
            .iter()
            .any(|r| self.requests[r].req.model == model && self.requests[r].instance.is_none())
    }

    /// The engine must never run out of KV: if even the next grant's tokens
    /// do not fit the planned pool, the youngest requests go back to be
    /// re-placed.
    pub(super) fn evict_overflow(&mut self, id: InstanceId, blocks: u64, now_s: f64) {
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

    pub(super) fn enqueue(&mut self, id: InstanceId, op: Op) {
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
                // A load or resize that has not started yet takes the new
                // size rather than being followed by another action (the
                // instance loads with the pool its first requests need).
                if let Some((_, Op::Resize { blocks: b } | Op::Load { blocks: b })) =
                    inst.queue.back_mut()
                {
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

    /// Of `increase` more bytes of KV pool on `node`, those above its
    /// pools' high-water mark.
    pub(super) fn fresh_bytes(&self, node: NodeId, increase: u64) -> u64 {
        let kind = self.nodes[node].spec.kind;
        let pools: u64 = self.nodes[node]
            .instances
            .iter()
            .map(|i| {
                let inst = &self.instances[i];
                inst.committed_blocks * self.models[inst.mtype.0 as usize].block_bytes(kind)
            })
            .sum();
        (pools + increase).saturating_sub(self.nodes[node].peak_kv_bytes)
    }

    /// Starts queued actions. Decreases always start (their memory returns
    /// when they finish); increases start in queue order, each only if the
    /// committed footprint plus its increase fits the node. A CPU loads one
    /// instance at a time, and not beside an iteration: a load (reading and
    /// compiling the model) takes the same cores, so two at once would each
    /// take about twice the time planned (see [`Self::loaded_at_s`]).
    pub(super) fn start_actions(&mut self, node: NodeId, now_s: f64) {
        let mut cpu_taken = self.nodes[node].spec.kind == DeviceKind::Cpu
            && (self.nodes[node].busy.is_some() || self.loading_on(node));
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
        let capacity = self.nodes[node].room_bytes;
        let mut blocked = false;
        for (_, id) in heads {
            let inst = &self.instances[&id];
            let (aid, op) = *inst.queue.front().expect("has a head");
            let spec = &self.models[inst.mtype.0 as usize];
            let kind = self.nodes[node].spec.kind;
            let bb = spec.block_bytes(kind);
            let kv_increase = match op {
                Op::Load { blocks } => blocks * bb,
                Op::Resize { blocks } => blocks.saturating_sub(inst.committed_blocks) * bb,
                Op::Unload => 0,
            };
            let increase = match op {
                Op::Load { .. } => inst.static_bytes + kv_increase,
                _ => kv_increase,
            };
            if increase > 0 && (blocked || self.committed_bytes(node) + increase > capacity) {
                blocked = true;
                continue;
            }
            if matches!(op, Op::Load { .. }) && cpu_taken {
                continue;
            }
            cpu_taken |= matches!(op, Op::Load { .. }) && kind == DeviceKind::Cpu;
            let fresh = self.fresh_bytes(node, kv_increase);
            self.nodes[node].peak_kv_bytes += fresh;
            let inst = self.instances.get_mut(&id).expect("live");
            inst.queue.pop_front();
            let (model, mtype) = (inst.model, inst.mtype);
            let op_out = match op {
                Op::Load { blocks } => {
                    inst.committed_loaded = true;
                    inst.committed_blocks = blocks;
                    inst.load_fresh_bytes = fresh;
                    ActionOp::Load {
                        weights_bytes: inst.static_bytes,
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
}
