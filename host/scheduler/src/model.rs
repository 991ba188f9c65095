//! What the scheduler knows about devices and models, and the cost-model
//! door through which it estimates time: the simulator implements it from
//! profiled tables, the live host from measurements.

use serde::Serialize;

/// The two kinds of device the policy treats differently (KV scaling,
/// quotas, keep-alive, placement order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

impl DeviceKind {
    pub fn index(self) -> usize {
        match self {
            DeviceKind::Cpu => 0,
            DeviceKind::Gpu => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
        }
    }
}

/// Index of a model *type* (architecture + weights size, e.g. llama-2-7b) in
/// the catalog; many distinct served models may share one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelTypeId(pub u16);

/// Facts about one model type that placement and memory accounting need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub weights_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// KV block size in tokens, indexed by [`DeviceKind::index`].
    pub block_tokens: [u64; 2],
    /// CPU instances keep a fixed KV allocation (as the paper's artifact does).
    pub cpu_kv_bytes: u64,
    /// Most instances of this type one node may host, by device kind.
    pub slots_per_node: [u32; 2],
    /// The `sllm` baselines' per-instance concurrency caps, by device kind:
    /// exclusive device, and half-shared device. `None`: kind not usable.
    pub sllm_exclusive_cap: [Option<u32>; 2],
    pub sllm_half_share_cap: [Option<u32>; 2],
    /// Iterations granted per arbiter grant during GPU decode: bigger for
    /// smaller models, whose short iterations would otherwise be dominated
    /// by the grant round trip.
    pub gpu_decode_quota: u32,
}

impl ModelSpec {
    pub fn block_bytes(&self, kind: DeviceKind) -> u64 {
        self.block_tokens[kind.index()] * self.kv_bytes_per_token
    }

    pub fn blocks_for_tokens(&self, kind: DeviceKind, tokens: u64) -> u64 {
        tokens.div_ceil(self.block_tokens[kind.index()])
    }
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSpec {
    pub kind: DeviceKind,
    pub capacity_bytes: u64,
}

/// Time estimates the policy plans with. Implementations must be
/// deterministic; the scheduler applies its own safety factors on top.
pub trait CostModel {
    /// One prefill iteration over `tokens` prompt tokens (summed over the batch).
    fn prefill_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64;
    /// One decode iteration of `batch` sequences of average `context_tokens`.
    fn decode_s(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        context_tokens: u64,
        batch: u64,
    ) -> f64;
    /// Bringing the weights onto the device (cold start).
    fn load_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64;
    /// Resizing the KV pool, and unloading (both short bookkeeping on a device).
    fn kv_resize_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64;
    fn unload_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64;
    /// Moving `tokens` of one request's KV out to host memory and back.
    fn kv_swap_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64;
}
