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
        let target = self.min_blocks(spec, kind, ((min as f64) * (1.0 + w)).ceil() as u64);
        // A pool grown ahead by the grow factor shrinks only once its need
        // falls as far below that.
        let grow = self.cfg.kv_grow_factor[kind];
        let shrinks =
            (target as f64) * grow < planned as f64 / (1.0 + w) && !self.model_waits(inst.model);
        let delay = self.cfg.kv_shrink_delay_s[kind];
        let due = match inst.shrink_due_s {
            _ if !shrinks || delay <= 0.0 => None,
            None => Some(now_s + delay),
            Some(t) if now_s < t => Some(t),
            Some(_) => None,
        };
        if min > planned {
            let own = self.instance_bytes(inst, true);
            let others = self.planned_bytes(node) - own;
            let statics = own - planned * view.block_bytes;
            let room =
                self.nodes[node].room_bytes.saturating_sub(others + statics) / view.block_bytes;
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
