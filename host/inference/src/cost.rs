//! The live host's cost model, per model type and device kind. Each starts
//! from a conservative static estimate derived from the weight size; when an
//! instance is loaded its runner calibrates it (a warm-up step, two prefills of different
//! lengths, decode steps at batch 1 and 2) and replaces the estimate; from then
//! on every observed iteration corrects it through an exponentially weighted
//! moving average of observed/predicted time (separately for prefill and
//! decode). The scheduler applies its own safety factors on top.
//!
//! With a measured profile (`serve --profile`, written by `slinfer
//! profile`), a model the profile covers is planned with its tables instead
//! (prefill by prompt tokens, decode by context and batch, load, unload and
//! resize times), as measured: no calibration at load and no correction,
//! the costs `slinfer simulate` predicts with. (The correction is a single
//! factor: folding in a 1-token prefill the table clamps would move the
//! plan of a 4,000-token one.)

use std::sync::{Arc, RwLock};

use slinfer_scheduler::{CostModel, DeviceKind, ModelTypeId, PerKind, Profile};

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

/// A measured profile the live scheduler plans with (`serve --profile`).
#[derive(Clone, Debug, PartialEq)]
pub struct PlanProfile {
    pub profile: Arc<Profile>,
    /// The profile's model that plans a model it does not name (`serve
    /// --profile-model`): copies and fine-tunes of one base cost the same.
    pub default_model: Option<String>,
}

impl PlanProfile {
    /// The profile's entry for the model `name`, if any.
    fn model_for(&self, name: &str) -> Option<ModelTypeId> {
        let p = &self.profile;
        p.model_type(name)
            .ok()
            .or_else(|| p.model_type(self.default_model.as_deref()?).ok())
    }
}

struct Entry {
    costs: PerKind<Costs>,
    /// The profile's model for this one on each kind, where the profile
    /// has tables for it there.
    profiled: PerKind<Option<ModelTypeId>>,
}

/// Shared between the scheduler (reads) and the instance runners (updates).
#[derive(Clone, Default)]
pub(crate) struct LiveCost {
    entries: Arc<RwLock<Vec<Entry>>>,
    profile: Option<PlanProfile>,
}

impl LiveCost {
    pub fn new(profile: Option<PlanProfile>) -> Self {
        LiveCost {
            entries: Arc::default(),
            profile,
        }
    }

    /// The model's costs on `kind`, and its profile entry where the profile
    /// covers that kind.
    fn get(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
    ) -> (Costs, Option<(&Profile, ModelTypeId)>) {
        let v = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let Some(e) = v.get(model.0 as usize) else {
            return (Costs::estimate(kind, 1 << 30), None);
        };
        let profiled = self
            .profile
            .as_ref()
            .zip(e.profiled[kind])
            .map(|(p, m)| (p.profile.as_ref(), m));
        (e.costs[kind], profiled)
    }

    /// Whether the profile plans `model` on `kind` (its runners then skip
    /// the calibration at load).
    pub fn profiled(&self, model: ModelTypeId, kind: DeviceKind) -> bool {
        self.get(model, kind).1.is_some()
    }

    /// Adds the estimates of a model type (its id is the next index).
    pub fn push(&self, name: &str, costs: PerKind<Costs>) {
        let profiled = PerKind::splat(()).map(|kind, ()| {
            let p = self.profile.as_ref()?;
            p.model_for(name).filter(|&m| p.profile.covers(m, kind))
        });
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Entry { costs, profiled });
    }

    pub fn update(&self, model: ModelTypeId, kind: DeviceKind, f: impl FnOnce(&mut Costs)) {
        let mut v = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = v.get_mut(model.0 as usize) {
            f(&mut e.costs[kind]);
        }
    }

    /// Folds an observation into the correction of a model the profile
    /// does not plan on `kind` (one lock: it runs after every step).
    fn correct(&self, model: ModelTypeId, kind: DeviceKind, f: impl FnOnce(&mut Costs)) {
        let mut v = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = v.get_mut(model.0 as usize)
            && e.profiled[kind].is_none()
        {
            f(&mut e.costs[kind]);
        }
    }

    /// Folds one observed prefill iteration into the correction (none for
    /// a profiled model).
    pub fn observe_prefill(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        tokens: u64,
        observed_s: f64,
    ) {
        self.correct(model, kind, |c| {
            let r = (observed_s / c.prefill_raw_s(tokens).max(1e-6)).clamp(0.25, 4.0);
            c.prefill_factor = (1.0 - EWMA_ALPHA) * c.prefill_factor + EWMA_ALPHA * r;
        });
    }

    /// Folds one observed decode iteration into the correction (none for a
    /// profiled model).
    pub fn observe_decode(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        batch: u64,
        observed_s: f64,
    ) {
        self.correct(model, kind, |c| {
            let r = (observed_s / c.decode_raw_s(batch).max(1e-6)).clamp(0.25, 4.0);
            c.decode_factor = (1.0 - EWMA_ALPHA) * c.decode_factor + EWMA_ALPHA * r;
        });
    }

    /// A time the profile measured for `model` on `kind`, else `fallback`.
    fn profiled_or(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        measured: impl Fn(&Profile, ModelTypeId) -> f64,
        fallback: impl Fn(&Costs) -> f64,
    ) -> f64 {
        let (c, profiled) = self.get(model, kind);
        profiled.map_or_else(|| fallback(&c), |(p, m)| measured(p, m))
    }
}

impl CostModel for LiveCost {
    fn prefill_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        self.profiled_or(
            model,
            kind,
            |p, m| p.prefill_s(m, kind, tokens),
            |c| c.prefill_raw_s(tokens) * c.prefill_factor,
        )
    }
    fn decode_s(&self, model: ModelTypeId, kind: DeviceKind, context: u64, batch: u64) -> f64 {
        self.profiled_or(
            model,
            kind,
            |p, m| p.decode_s(m, kind, context, batch),
            |c| c.decode_raw_s(batch) * c.decode_factor,
        )
    }
    fn load_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64 {
        self.profiled_or(
            model,
            kind,
            |p, m| p.load_s(m, kind, fresh_bytes),
            |c| c.load_s,
        )
    }
    fn kv_resize_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64 {
        self.profiled_or(
            model,
            kind,
            |p, m| p.kv_resize_s(m, kind, fresh_bytes),
            |_| 0.01,
        )
    }
    fn unload_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64 {
        self.profiled_or(model, kind, |p, m| p.unload_s(m, kind), |_| 0.05)
    }
    fn kv_swap_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        self.profiled_or(
            model,
            kind,
            |p, m| p.kv_swap_s(m, kind, tokens),
            |_| tokens as f64 * 2e-6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = r#"{
      "safety_factors_used_by_artifact_scheduler": {"gpu": 1.05, "cpu": 1.1},
      "models": {"base": {"weights_gb": 0.3, "kv_kb_per_token": 90,
                 "block_tokens": {"cpu": 32, "gpu": 16}, "cpu_kv_gb": 1}},
      "cluster_in_paper": {"gpu_node_memory_gb": 10, "cpu_node_memory_gb": 20,
        "instance_slots_per_cpu": {"base": 4}, "per_instance_overhead_gb": 0.5},
      "slo_in_paper": {"tpot_s": 0.05, "scheduler_margin": 0.95, "ttft_cap_s": 8},
      "latency": {"base": {"cpu": {"cpu": {
        "prefill_ms_by_input_tokens": [[16, 10], [512, 250]],
        "decode_ms_by_context_then_batch": [[128, [[1, 8], [16, 24]]], [1024, [[1, 16], [16, 48]]]],
        "load_ms": 1300, "unload_ms": 30, "kv_resize_ms": 7}}}}
    }"#;

    fn live(default_model: Option<&str>) -> LiveCost {
        let cost = LiveCost::new(Some(PlanProfile {
            profile: Arc::new(Profile::parse(PROFILE).unwrap()),
            default_model: default_model.map(str::to_string),
        }));
        for name in ["base", "a-copy"] {
            cost.push(name, Costs::estimates(PerKind::splat(300 << 20)));
        }
        cost
    }

    const BASE: ModelTypeId = ModelTypeId(0);
    const COPY: ModelTypeId = ModelTypeId(1);
    const CPU: DeviceKind = DeviceKind::Cpu;

    #[test]
    fn a_profiled_model_is_planned_with_the_profiles_tables() {
        let cost = live(None);
        assert!(cost.profiled(BASE, CPU));
        assert_eq!(cost.decode_s(BASE, CPU, 128, 16), 0.024);
        assert_eq!(cost.decode_s(BASE, CPU, 1024, 1), 0.016);
        assert_eq!(cost.prefill_s(BASE, CPU, 512), 0.25);
        assert_eq!(cost.load_s(BASE, CPU, 0), 1.3);
        assert_eq!(cost.kv_resize_s(BASE, CPU, 0), 0.007);
        // Not on a kind the profile has no table for, nor a model it does
        // not name: those keep the estimate (and the calibration at load).
        assert!(!cost.profiled(BASE, DeviceKind::Gpu));
        assert!(!cost.profiled(COPY, CPU));
        let estimate = Costs::estimate(CPU, 300 << 20);
        assert_eq!(cost.decode_s(COPY, CPU, 128, 16), estimate.decode_raw_s(16));
    }

    #[test]
    fn the_default_model_plans_the_models_the_profile_does_not_name() {
        let cost = live(Some("base"));
        assert!(cost.profiled(COPY, CPU));
        assert_eq!(cost.decode_s(COPY, CPU, 128, 16), 0.024);
    }

    #[test]
    fn observed_steps_correct_the_estimate_but_not_the_profile() {
        let cost = live(None);
        let estimate = cost.decode_s(COPY, CPU, 128, 4);
        for _ in 0..40 {
            cost.observe_decode(BASE, CPU, 4, 0.2);
            cost.observe_decode(COPY, CPU, 4, 2.0 * estimate);
            cost.observe_prefill(BASE, CPU, 1, 0.2);
        }
        assert_eq!(cost.decode_s(BASE, CPU, 128, 16), 0.024);
        assert_eq!(cost.prefill_s(BASE, CPU, 512), 0.25);
        let corrected = cost.decode_s(COPY, CPU, 128, 4);
        assert!(
            (corrected / estimate - 2.0).abs() < 0.01,
            "{corrected} vs {estimate}"
        );
    }
}
