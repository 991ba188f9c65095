//! A read-only picture of the scheduler, for metrics and `slinfer status`.

use super::*;

/// What a status page shows of one device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSnapshot {
    pub node: NodeId,
    pub kind: DeviceKind,
    pub capacity_bytes: u64,
    /// What instances may hold now (the capacity less what others use).
    pub room_bytes: u64,
    /// What the device may hold now (actions started).
    pub committed_bytes: u64,
    /// As if every queued action were done.
    pub planned_bytes: u64,
    /// Out of placement since its device failed.
    pub failed: bool,
    /// How busy it is for bin-packing ([`super::bin_packing_order`]): on a
    /// CPU the decode time slices of its instances, on a GPU its planned
    /// bytes; none without instances. A cluster's router orders members
    /// by it.
    pub load: Option<f64>,
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
    /// What it holds besides its KV pool (measured once loaded).
    pub static_bytes: u64,
}

/// A read-only picture of the scheduler, for metrics and `slinfer status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub nodes: Vec<NodeSnapshot>,
    pub instances: Vec<InstanceSnapshot>,
    /// Requests waiting for an instance, per model (models with none omitted).
    pub queued: BTreeMap<ModelId, usize>,
}

impl<C: CostModel> Scheduler<C> {
    /// The state of every device and instance, and the queues.
    pub fn snapshot(&self) -> Snapshot {
        let nodes = (0..self.nodes.len())
            .map(|n| NodeSnapshot {
                node: n,
                kind: self.nodes[n].spec.kind,
                capacity_bytes: self.nodes[n].spec.capacity_bytes,
                room_bytes: self.nodes[n].room_bytes,
                committed_bytes: self.committed_bytes(n),
                planned_bytes: self.planned_bytes(n),
                failed: self.nodes[n].failed,
                load: self.load_of(n),
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
                    static_bytes: i.static_bytes,
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
}
