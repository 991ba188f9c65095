//! What the scheduler knows about devices and models, and the cost-model
//! door through which it estimates time: the simulator implements it from
//! profiled tables, the live host from measurements.

pub use slinfer_device::{DeviceKind, PerKind};

/// Index of a model *type* (architecture + weights size, e.g. llama-2-7b) in
/// the catalog; many distinct served models may share one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelTypeId(pub u16);

/// Facts about one model type that placement and memory accounting need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// What an instance holds on each kind of device (engines differ: the
    /// CPU engine keeps int4 weights and a u8 KV cache, the GPU one f16).
    pub weights_bytes: PerKind<u64>,
    pub kv_bytes_per_token: PerKind<u64>,
    /// KV block size in tokens.
    pub block_tokens: PerKind<u64>,
    /// CPU instances keep a fixed KV allocation (as the paper's artifact does).
    pub cpu_kv_bytes: u64,
    /// Most instances of this type one node may host (0: the kind cannot
    /// serve it).
    pub slots_per_node: PerKind<u32>,
    /// The `sllm` baselines' per-instance concurrency caps: exclusive
    /// device, and half-shared device. `None`: kind not usable.
    pub sllm_exclusive_cap: PerKind<Option<u32>>,
    pub sllm_half_share_cap: PerKind<Option<u32>>,
    /// Iterations granted per arbiter grant during GPU decode: bigger for
    /// smaller models, whose short iterations would otherwise be dominated
    /// by the grant round trip.
    pub gpu_decode_quota: u32,
}

impl ModelSpec {
    pub fn block_bytes(&self, kind: DeviceKind) -> u64 {
        self.block_tokens[kind] * self.kv_bytes_per_token[kind]
    }

    pub fn blocks_for_tokens(&self, kind: DeviceKind, tokens: u64) -> u64 {
        tokens.div_ceil(self.block_tokens[kind])
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
    /// Bringing the weights onto the device with a first KV pool (cold
    /// start), of which `fresh_bytes` lie above the most the device's pools
    /// have held at once: memory the process has not written, which costs
    /// more than memory a freed pool leaves (see the profile's
    /// `kv_write_ms_per_gib`).
    fn load_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64;
    /// Resizing the KV pool (`fresh_bytes` as for a load), and unloading.
    fn kv_resize_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64;
    fn unload_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64;
    /// Moving `tokens` of one request's KV out to host memory and back.
    fn kv_swap_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64;
}

/// A borrowed cost model (the simulator's schedulers share one profile).
impl<C: CostModel + ?Sized> CostModel for &C {
    fn prefill_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        (**self).prefill_s(model, kind, tokens)
    }
    fn decode_s(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        context_tokens: u64,
        batch: u64,
    ) -> f64 {
        (**self).decode_s(model, kind, context_tokens, batch)
    }
    fn load_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64 {
        (**self).load_s(model, kind, fresh_bytes)
    }
    fn kv_resize_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64 {
        (**self).kv_resize_s(model, kind, fresh_bytes)
    }
    fn unload_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64 {
        (**self).unload_s(model, kind)
    }
    fn kv_swap_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        (**self).kv_swap_s(model, kind, tokens)
    }
}
