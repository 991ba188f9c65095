//! The live host's cost model. Each model type starts from a conservative
//! static estimate derived from its weight size; when an instance is first
//! loaded the worker calibrates it (a warm-up step, two prefills of different
//! lengths, decode steps at batch 1 and 2) and replaces the estimate; from then
//! on every observed iteration corrects it through an exponentially weighted
//! moving average of observed/predicted time (separately for prefill and
//! decode). The scheduler applies its own safety factors on top.

use std::sync::{Arc, RwLock};

use slinfer_scheduler::{CostModel, DeviceKind, ModelTypeId};

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
    /// Conservative guesses from the weight size (a 135M model's 270 MB
    /// gives ~90 ms for a 32-token prefill and ~40 ms per decode step on two
    /// cores), replaced by the calibration on first load.
    pub fn estimate(weights_bytes: u64) -> Self {
        let gb = weights_bytes as f64 / 1e9;
        Costs {
            prefill_base_s: 0.02 + 0.05 * gb,
            prefill_per_token_s: 0.008 * gb.max(0.05),
            decode_base_s: 0.02 + 0.08 * gb,
            decode_per_seq_s: 0.004 * gb.max(0.05) + 0.001,
            load_s: 2.0 + 4.0 * gb,
            prefill_factor: 1.0,
            decode_factor: 1.0,
        }
    }

    pub fn prefill_raw_s(&self, tokens: u64) -> f64 {
        self.prefill_base_s + self.prefill_per_token_s * tokens as f64
    }

    pub fn decode_raw_s(&self, batch: u64) -> f64 {
        self.decode_base_s + self.decode_per_seq_s * batch as f64
    }
}

/// Shared between the scheduler (reads) and the device workers (updates).
#[derive(Clone)]
pub(crate) struct LiveCost(pub Arc<RwLock<Vec<Costs>>>);

impl LiveCost {
    pub fn new(costs: Vec<Costs>) -> Self {
        LiveCost(Arc::new(RwLock::new(costs)))
    }

    fn get(&self, model: ModelTypeId) -> Costs {
        let v = self.0.read().unwrap_or_else(|e| e.into_inner());
        v.get(model.0 as usize)
            .copied()
            .unwrap_or_else(|| Costs::estimate(1 << 30))
    }

    /// Adds the estimate of a model type registered at run time.
    pub fn push(&self, costs: Costs) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(costs);
    }

    pub fn update(&self, model: ModelTypeId, f: impl FnOnce(&mut Costs)) {
        let mut v = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = v.get_mut(model.0 as usize) {
            f(c);
        }
    }

    /// Folds one observed prefill iteration into the correction.
    pub fn observe_prefill(&self, model: ModelTypeId, tokens: u64, observed_s: f64) {
        self.update(model, |c| {
            let r = (observed_s / c.prefill_raw_s(tokens).max(1e-6)).clamp(0.25, 4.0);
            c.prefill_factor = (1.0 - EWMA_ALPHA) * c.prefill_factor + EWMA_ALPHA * r;
        });
    }

    /// Folds one observed decode iteration into the correction.
    pub fn observe_decode(&self, model: ModelTypeId, batch: u64, observed_s: f64) {
        self.update(model, |c| {
            let r = (observed_s / c.decode_raw_s(batch).max(1e-6)).clamp(0.25, 4.0);
            c.decode_factor = (1.0 - EWMA_ALPHA) * c.decode_factor + EWMA_ALPHA * r;
        });
    }
}

impl CostModel for LiveCost {
    fn prefill_s(&self, model: ModelTypeId, _kind: DeviceKind, tokens: u64) -> f64 {
        let c = self.get(model);
        c.prefill_raw_s(tokens) * c.prefill_factor
    }
    fn decode_s(&self, model: ModelTypeId, _kind: DeviceKind, _context: u64, batch: u64) -> f64 {
        let c = self.get(model);
        c.decode_raw_s(batch) * c.decode_factor
    }
    fn load_s(&self, model: ModelTypeId, _kind: DeviceKind) -> f64 {
        self.get(model).load_s
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
