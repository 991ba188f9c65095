//! The live host's cost model, per model type and device kind. Each starts
//! from a conservative static estimate derived from the weight size; when an
//! instance is loaded its runner calibrates it (a warm-up step, two prefills of different
//! lengths, decode steps at batch 1 and 2) and replaces the estimate; from then
//! on every observed iteration corrects it through an exponentially weighted
//! moving average of observed/predicted time (separately for prefill and
//! decode). The scheduler applies its own safety factors on top.

use std::sync::{Arc, RwLock};

use slinfer_scheduler::{CostModel, DeviceKind, ModelTypeId, PerKind};

/// Weight of a new observation in the moving average.
const EWMA_ALPHA: f64 = 0.2;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Costs {
    pub prefill_base_s: f64,
    pub prefill_per_token_s: f64,
    pub decode_base_s: f64,
    pub decode_per_seq_s: f64,
    pub load_s: f64,
    /// Observed/predicted corrections (EWMA), 1 at first.
    pub prefill_factor: f64,
    pub decode_factor: f64,
}

impl Costs {
    /// Conservative guesses from the weight size, replaced by the
    /// calibration on first load. CPU: a 135M model's 270 MB gives ~90 ms for
    /// a 32-token prefill and ~40 ms per decode step on two cores. GPU: a
    /// tenth of that, and loads bounded by host-to-device copies.
    pub fn estimate(kind: DeviceKind, weights_bytes: u64) -> Self {
        let gb = weights_bytes as f64 / 1e9;
        let cpu = Costs {
            prefill_base_s: 0.02 + 0.05 * gb,
            prefill_per_token_s: 0.008 * gb.max(0.05),
            decode_base_s: 0.02 + 0.08 * gb,
            decode_per_seq_s: 0.004 * gb.max(0.05) + 0.001,
            load_s: 2.0 + 4.0 * gb,
            prefill_factor: 1.0,
            decode_factor: 1.0,
        };
        match kind {
            DeviceKind::Cpu => cpu,
            DeviceKind::Gpu => Costs {
                prefill_base_s: cpu.prefill_base_s / 10.0,
                prefill_per_token_s: cpu.prefill_per_token_s / 10.0,
                decode_base_s: cpu.decode_base_s / 10.0,
                decode_per_seq_s: cpu.decode_per_seq_s / 10.0,
                load_s: 1.0 + gb,
                ..cpu
            },
        }
    }

    /// Both kinds' estimates for a model with these weight sizes.
    pub fn estimates(weights_bytes: PerKind<u64>) -> PerKind<Costs> {
        weights_bytes.map(Costs::estimate)
    }

    pub fn prefill_raw_s(&self, tokens: u64) -> f64 {
        self.prefill_base_s + self.prefill_per_token_s * tokens as f64
    }

    pub fn decode_raw_s(&self, batch: u64) -> f64 {
        self.decode_base_s + self.decode_per_seq_s * batch as f64
    }
}

/// Shared between the scheduler (reads) and the instance runners (updates).
#[derive(Clone, Default)]
pub(crate) struct LiveCost(Arc<RwLock<Vec<PerKind<Costs>>>>);

impl LiveCost {
    fn get(&self, model: ModelTypeId, kind: DeviceKind) -> Costs {
        let v = self.0.read().unwrap_or_else(|e| e.into_inner());
        v.get(model.0 as usize)
            .map(|c| c[kind])
            .unwrap_or_else(|| Costs::estimate(kind, 1 << 30))
    }

    /// Adds the estimates of a model type (its id is the next index).
    pub fn push(&self, costs: PerKind<Costs>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(costs);
    }

    pub fn update(&self, model: ModelTypeId, kind: DeviceKind, f: impl FnOnce(&mut Costs)) {
        let mut v = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = v.get_mut(model.0 as usize) {
            f(&mut c[kind]);
        }
    }

    /// Folds one observed prefill iteration into the correction.
    pub fn observe_prefill(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        tokens: u64,
        observed_s: f64,
    ) {
        self.update(model, kind, |c| {
            let r = (observed_s / c.prefill_raw_s(tokens).max(1e-6)).clamp(0.25, 4.0);
            c.prefill_factor = (1.0 - EWMA_ALPHA) * c.prefill_factor + EWMA_ALPHA * r;
        });
    }

    /// Folds one observed decode iteration into the correction.
    pub fn observe_decode(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        batch: u64,
        observed_s: f64,
    ) {
        self.update(model, kind, |c| {
            let r = (observed_s / c.decode_raw_s(batch).max(1e-6)).clamp(0.25, 4.0);
            c.decode_factor = (1.0 - EWMA_ALPHA) * c.decode_factor + EWMA_ALPHA * r;
        });
    }
}

impl CostModel for LiveCost {
    fn prefill_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        let c = self.get(model, kind);
        c.prefill_raw_s(tokens) * c.prefill_factor
    }
    fn decode_s(&self, model: ModelTypeId, kind: DeviceKind, _context: u64, batch: u64) -> f64 {
        let c = self.get(model, kind);
        c.decode_raw_s(batch) * c.decode_factor
    }
    fn load_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64 {
        self.get(model, kind).load_s
    }
    fn kv_resize_s(&self, _model: ModelTypeId, _kind: DeviceKind) -> f64 {
        0.01
    }
    fn unload_s(&self, _model: ModelTypeId, _kind: DeviceKind) -> f64 {
        0.05
    }
    fn kv_swap_s(&self, _model: ModelTypeId, _kind: DeviceKind, tokens: u64) -> f64 {
        tokens as f64 * 2e-6
    }
}
