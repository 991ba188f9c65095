//! The devices the service places instances on. The binary discovers them
//! (it is the one place that knows the engine crates) and passes them in;
//! each becomes one scheduler node. Also the default capacities.

use std::sync::Arc;

use slinfer_engine::{Backend, DeviceKind};

/// GPU memory left free beyond the scheduler's plan (driver, cuBLAS
/// workspaces, other processes): the larger of this and
/// [`GPU_MEMORY_MARGIN_FRACTION`] of the device.
pub const GPU_MEMORY_MARGIN_BYTES: u64 = 1 << 30;
pub const GPU_MEMORY_MARGIN_FRACTION: f64 = 0.05;

/// One device and the engine that loads instances on it.
#[derive(Clone)]
pub struct Device {
    /// `cpu:0`, `cuda:0`: how status, metrics and logs name it.
    pub name: String,
    pub kind: DeviceKind,
    pub backend: Arc<dyn Backend>,
    /// Its index among the backend's devices.
    pub index: usize,
    /// Bytes the scheduler may fill with weights and KV (on a CPU, the
    /// host memory budget, when there is one, bounds it further).
    pub capacity_bytes: u64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("backend", &self.backend.name())
            .field("index", &self.index)
            .field("capacity_bytes", &self.capacity_bytes)
            .finish()
    }
}

/// Bytes a GPU with `free_bytes` free of `total_bytes` may hold for
/// instances (see [`GPU_MEMORY_MARGIN_BYTES`]).
pub fn gpu_capacity_bytes(free_bytes: u64, total_bytes: u64) -> u64 {
    let margin =
        GPU_MEMORY_MARGIN_BYTES.max((total_bytes as f64 * GPU_MEMORY_MARGIN_FRACTION) as u64);
    free_bytes.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_capacity_keeps_a_margin() {
        assert_eq!(
            gpu_capacity_bytes(80 << 30, 80 << 30),
            (80u64 << 30) - (4 << 30)
        );
        assert_eq!(gpu_capacity_bytes(8 << 30, 8 << 30), 7 << 30);
        assert_eq!(gpu_capacity_bytes(1 << 29, 8 << 30), 0);
    }
}
