//! The published latency profile file (`slinfer-artifact-latency-ms.json`):
//! model facts, per-iteration latency tables, and a [`CostModel`] that
//! interpolates them.

use std::path::Path;

use serde_json::Value;

use crate::model::{CostModel, DeviceKind, ModelSpec, ModelTypeId, PerKind};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("reading profile {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing profile: {0}")]
    Json(#[from] serde_json::Error),
    #[error("profile field `{0}` is missing or malformed")]
    Field(String),
    #[error("model `{0}` is not in the profile (known: {1})")]
    UnknownModel(String, String),
}

/// `[(x, y)]` sorted by x; piecewise-linear inside, clamped below the first
/// point, proportional beyond the last (the file's stated rule).
#[derive(Clone, Debug, PartialEq)]
struct Curve(Vec<(f64, f64)>);

impl Curve {
    fn at(&self, x: f64) -> f64 {
        let pts = &self.0;
        let (x0, y0) = pts[0];
        if x <= x0 {
            return y0;
        }
        for w in pts.windows(2) {
            let ((xa, ya), (xb, yb)) = (w[0], w[1]);
            if x <= xb {
                return ya + (yb - ya) * (x - xa) / (xb - xa);
            }
        }
        let (xl, yl) = pts[pts.len() - 1];
        yl * x / xl
    }
}

#[derive(Clone, Debug, PartialEq)]
struct DeviceTables {
    prefill_ms: Curve,
    /// Rows by context length, each a curve over batch size.
    decode_ms: Vec<(f64, Curve)>,
    /// Measured by `slinfer profile` (the artifact's file has none): an
    /// instance's load (weights and first KV pool), unload, and one KV
    /// pool resize, in seconds.
    load_s: Option<f64>,
    unload_s: Option<f64>,
    kv_resize_s: Option<f64>,
    /// Measured by `slinfer profile`: seconds per byte to write KV pool
    /// memory the process has not written before, which a load or resize
    /// pays for what it adds above the high-water mark of the device's
    /// pools, beyond `load_s` and `kv_resize_s` (both timed on reused
    /// memory). On a virtual machine whose host takes freed memory back
    /// this is the host's first-touch cost: ~2.5-2.8 s per GiB on the AMD
    /// EPYC machines here, against ~0.4 for memory just freed. Zero where
    /// the profile does not say.
    kv_write_s_per_byte: f64,
    /// What the live host adds to each engine iteration beyond the engine's
    /// own step (the grant's round trip, sampling, detokenizing, the Wasm
    /// function and its HTTP stream, all on the cores a CPU engine uses),
    /// measured end to end by `scripts/experiment.py`: a fixed part per
    /// iteration and a part per sequence in the batch. Part of every
    /// prefill and decode time the profile gives; zero where it does not
    /// say.
    host_s_per_iteration: f64,
    host_s_per_token: f64,
    /// How the live host's steps vary around the times above: the ratio
    /// of a live run's time to the profile's, as quantiles at evenly
    /// spaced probabilities from lowest to highest (measured from a
    /// server's run log by `scripts/run_log.py`). The simulator draws
    /// each run's ratio from it; planning keeps the profile's times. None:
    /// every run takes exactly the profile's time.
    step_time_spread: Option<Vec<f64>>,
    /// The same for runs that prefill (their ratio differs from decode
    /// steps': the CPU plugin prepares kernels for each new prompt length).
    /// None: prefill runs draw from `step_time_spread`.
    prefill_time_spread: Option<Vec<f64>>,
}

impl DeviceTables {
    fn decode_ms(&self, context: f64, batch: f64) -> f64 {
        let rows = &self.decode_ms;
        if context <= rows[0].0 {
            return rows[0].1.at(batch);
        }
        for w in rows.windows(2) {
            let ((ca, ra), (cb, rb)) = (&w[0], &w[1]);
            if context <= *cb {
                let (ya, yb) = (ra.at(batch), rb.at(batch));
                return ya + (yb - ya) * (context - ca) / (cb - ca);
            }
        }
        let (cl, rl) = &rows[rows.len() - 1];
        rl.at(batch) * context / cl
    }
}

/// The parsed profile plus the load-bandwidth assumptions it lacks.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub models: Vec<ModelSpec>,
    tables: Vec<PerKind<Option<DeviceTables>>>,
    /// Weights load bandwidth per device kind; `None` means weights stay
    /// resident (the artifact never cold-starts CPU instances).
    pub load_bytes_per_s: PerKind<Option<f64>>,
    pub kv_resize_s: f64,
    /// Device ↔ host bandwidth for swapped KV (PCIe-class).
    pub kv_swap_bytes_per_s: f64,
    pub paper: PaperSettings,
}

/// The paper's cluster and SLO settings, as the file records them.
#[derive(Clone, Debug, PartialEq)]
pub struct PaperSettings {
    pub gpu_node_bytes: u64,
    pub cpu_node_bytes: u64,
    pub instance_overhead_bytes: u64,
    pub tpot_slo_s: f64,
    pub scheduler_margin: f64,
    pub ttft_cap_s: f64,
    pub safety_gpu: f64,
    pub safety_cpu: f64,
    /// The TTFT SLO as numbers, where the file gives them (a profile of
    /// this machine scales the paper's `max(input / 512, 0.5)` s to it);
    /// the artifact's file states it in words only.
    pub ttft_tokens_per_s: Option<f64>,
    pub ttft_min_s: Option<f64>,
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Result<&'a Value, ProfileError> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .ok_or_else(|| ProfileError::Field(path.join(".")))
}

fn num(v: &Value, path: &[&str]) -> Result<f64, ProfileError> {
    field(v, path)?
        .as_f64()
        .ok_or_else(|| ProfileError::Field(path.join(".")))
}

fn curve(v: &Value, what: &str) -> Result<Curve, ProfileError> {
    let bad = || ProfileError::Field(what.to_string());
    let pts = v
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    if pts.is_empty() || pts.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(bad());
    }
    Ok(Curve(pts))
}

fn device_tables(v: &Value, what: &str) -> Result<DeviceTables, ProfileError> {
    let prefill_ms = curve(field(v, &["prefill_ms_by_input_tokens"])?, what)?;
    let rows = field(v, &["decode_ms_by_context_then_batch"])?
        .as_array()
        .ok_or_else(|| ProfileError::Field(what.to_string()))?;
    let decode_ms = rows
        .iter()
        .map(|r| {
            let ctx = r
                .get(0)
                .and_then(Value::as_f64)
                .ok_or_else(|| ProfileError::Field(what.to_string()))?;
            Ok((ctx, curve(r.get(1).unwrap_or(&Value::Null), what)?))
        })
        .collect::<Result<Vec<_>, ProfileError>>()?;
    if decode_ms.is_empty() {
        return Err(ProfileError::Field(what.to_string()));
    }
    let seconds = |key: &str| -> Result<Option<f64>, ProfileError> {
        match v.get(key) {
            None => Ok(None),
            Some(x) => match x.as_f64() {
                Some(ms) if ms.is_finite() && ms >= 0.0 => Ok(Some(ms / 1000.0)),
                _ => Err(ProfileError::Field(format!("{what}.{key}"))),
            },
        }
    };
    Ok(DeviceTables {
        prefill_ms,
        decode_ms,
        load_s: seconds("load_ms")?,
        unload_s: seconds("unload_ms")?,
        kv_resize_s: seconds("kv_resize_ms")?,
        kv_write_s_per_byte: seconds("kv_write_ms_per_gib")?.unwrap_or(0.0) / GIB,
        host_s_per_iteration: seconds("host_ms_per_iteration")?.unwrap_or(0.0),
        host_s_per_token: seconds("host_ms_per_token")?.unwrap_or(0.0),
        step_time_spread: spread_field(v, what, "step_time_spread")?,
        prefill_time_spread: spread_field(v, what, "prefill_time_spread")?,
    })
}

/// The optional spread `key` of `v` (refused when present and not one).
fn spread_field(v: &Value, what: &str, key: &str) -> Result<Option<Vec<f64>>, ProfileError> {
    v.get(key)
        .map(|x| spread(x).ok_or_else(|| ProfileError::Field(format!("{what}.{key}"))))
        .transpose()
}

/// At least two positive ratios, in order.
fn spread(v: &Value) -> Option<Vec<f64>> {
    let q: Vec<f64> = v
        .as_array()?
        .iter()
        .map(Value::as_f64)
        .collect::<Option<_>>()?;
    let ok = q.len() >= 2
        && q.iter().all(|r| r.is_finite() && *r > 0.0)
        && q.windows(2).all(|w| w[0] <= w[1]);
    ok.then_some(q)
}

fn gib(x: f64) -> u64 {
    (x * GIB).round() as u64
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let v: Value = serde_json::from_str(text)?;
        let models_v = field(&v, &["models"])?
            .as_object()
            .ok_or_else(|| ProfileError::Field("models".into()))?;
        let mut models = Vec::new();
        let mut tables = Vec::new();
        for (name, m) in models_v {
            let slot = |kind: &str| -> u32 {
                field(
                    &v,
                    &[
                        "cluster_in_paper",
                        &format!("instance_slots_per_{kind}"),
                        name,
                    ],
                )
                .ok()
                .and_then(Value::as_u64)
                .unwrap_or(1) as u32
            };
            let mut dev: PerKind<Option<DeviceTables>> = PerKind::default();
            let mut excl = PerKind::default();
            let mut half = PerKind::default();
            for kind in DeviceKind::ALL {
                let k = kind.name();
                if let Ok(t) = field(&v, &["latency", name, k, k]) {
                    dev[kind] = Some(device_tables(t, &format!("latency.{name}.{k}"))?);
                    let cap = |f: &str| t.get(f).and_then(Value::as_u64).map(|c| c as u32);
                    excl[kind] = cap("exclusive_concurrency_cap");
                    half[kind] = cap("half_share_concurrency_cap");
                }
            }
            let lower = name.to_ascii_lowercase();
            let gpu_decode_quota = if lower.contains("3b") {
                4
            } else if lower.contains("13b") {
                1
            } else {
                2
            };
            models.push(ModelSpec {
                name: name.clone(),
                // The artifact's engines hold the same weights and KV
                // format on both kinds.
                weights_bytes: PerKind::splat(gib(num(m, &["weights_gb"])?)),
                kv_bytes_per_token: PerKind::splat((num(m, &["kv_kb_per_token"])? * 1024.0) as u64),
                block_tokens: PerKind::new(
                    num(m, &["block_tokens", "cpu"])? as u64,
                    num(m, &["block_tokens", "gpu"])? as u64,
                ),
                cpu_kv_bytes: gib(num(m, &["cpu_kv_gb"])?),
                // No latency table for a kind: the model never goes there.
                slots_per_node: dev
                    .as_ref()
                    .map(|kind, t| t.as_ref().map_or(0, |_| slot(kind.name()))),
                sllm_exclusive_cap: excl,
                sllm_half_share_cap: half,
                gpu_decode_quota,
            });
            tables.push(dev);
        }
        let sf = |k: &str| num(&v, &["safety_factors_used_by_artifact_scheduler", k]);
        let paper = PaperSettings {
            gpu_node_bytes: gib(num(&v, &["cluster_in_paper", "gpu_node_memory_gb"])?),
            cpu_node_bytes: gib(num(&v, &["cluster_in_paper", "cpu_node_memory_gb"])?),
            instance_overhead_bytes: gib(num(
                &v,
                &["cluster_in_paper", "per_instance_overhead_gb"],
            )?),
            tpot_slo_s: num(&v, &["slo_in_paper", "tpot_s"])?,
            scheduler_margin: num(&v, &["slo_in_paper", "scheduler_margin"])?,
            ttft_cap_s: num(&v, &["slo_in_paper", "ttft_cap_s"])?,
            safety_gpu: sf("gpu")?,
            safety_cpu: sf("cpu")?,
            ttft_tokens_per_s: num(&v, &["slo_in_paper", "ttft_tokens_per_s"]).ok(),
            ttft_min_s: num(&v, &["slo_in_paper", "ttft_min_s"]).ok(),
        };
        Ok(Profile {
            models,
            tables,
            load_bytes_per_s: PerKind::new(None, Some(8.0 * GIB)),
            kv_resize_s: 0.005,
            kv_swap_bytes_per_s: 16.0 * GIB,
            paper,
        })
    }

    pub fn model_type(&self, name: &str) -> Result<ModelTypeId, ProfileError> {
        self.models
            .iter()
            .position(|m| m.name == name)
            .map(|i| ModelTypeId(i as u16))
            .ok_or_else(|| {
                let known: Vec<_> = self.models.iter().map(|m| m.name.as_str()).collect();
                ProfileError::UnknownModel(name.to_string(), known.join(", "))
            })
    }

    /// A time the profile measured for `model` on `kind`, if it did.
    fn measured(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        field: impl Fn(&DeviceTables) -> Option<f64>,
    ) -> Option<f64> {
        self.tables[model.0 as usize][kind].as_ref().and_then(field)
    }

    /// Whether the profile has tables for `model` on `kind` (its costs are
    /// only asked there).
    pub fn covers(&self, model: ModelTypeId, kind: DeviceKind) -> bool {
        self.tables
            .get(model.0 as usize)
            .is_some_and(|t| t[kind].is_some())
    }

    /// The host's own work around one engine iteration of `sequences`
    /// sequences of `model` on `kind`.
    fn host_s(&self, model: ModelTypeId, kind: DeviceKind, sequences: u64) -> f64 {
        let t = self.tables(model, kind);
        t.host_s_per_iteration + t.host_s_per_token * sequences as f64
    }

    /// The ratio of a live run's time to the profile's at probability `u`
    /// (in [0, 1]) of the profile's `step_time_spread` for `model` on
    /// `kind` (its `prefill_time_spread`, where it has one, for a run that
    /// `prefills`), interpolated between its quantiles; 1 where it has none.
    pub fn step_time_ratio(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        prefills: bool,
        u: f64,
    ) -> f64 {
        let Some(q) = self.tables[model.0 as usize][kind].as_ref().and_then(|t| {
            let prefill = t.prefill_time_spread.as_deref().filter(|_| prefills);
            prefill.or(t.step_time_spread.as_deref())
        }) else {
            return 1.0;
        };
        let x = u.clamp(0.0, 1.0) * (q.len() - 1) as f64;
        let i = (x.floor() as usize).min(q.len() - 2);
        q[i] + (q[i + 1] - q[i]) * (x - i as f64)
    }

    /// Writing `bytes` of fresh memory (see `DeviceTables::kv_write_s_per_byte`).
    fn fresh_write_s(&self, model: ModelTypeId, kind: DeviceKind, bytes: u64) -> f64 {
        self.measured(model, kind, |t| Some(t.kv_write_s_per_byte))
            .map_or(0.0, |s| s * bytes as f64)
    }

    fn tables(&self, model: ModelTypeId, kind: DeviceKind) -> &DeviceTables {
        self.tables[model.0 as usize][kind]
            .as_ref()
            .expect("the scheduler only places models on kinds the profile supports")
    }
}

impl CostModel for Profile {
    fn prefill_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        self.tables(model, kind).prefill_ms.at(tokens as f64) / 1000.0 + self.host_s(model, kind, 1)
    }

    fn decode_s(
        &self,
        model: ModelTypeId,
        kind: DeviceKind,
        context_tokens: u64,
        batch: u64,
    ) -> f64 {
        self.tables(model, kind)
            .decode_ms(context_tokens as f64, batch as f64)
            / 1000.0
            + self.host_s(model, kind, batch)
    }

    /// The measured load time where the profile has one, else weights over
    /// the kind's load bandwidth (none: weights stay resident); plus
    /// writing the fresh memory.
    fn load_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64 {
        let weights_s = self.measured(model, kind, |t| t.load_s).unwrap_or_else(|| {
            self.load_bytes_per_s[kind].map_or(0.0, |bw| {
                self.models[model.0 as usize].weights_bytes[kind] as f64 / bw
            })
        });
        weights_s + self.fresh_write_s(model, kind, fresh_bytes)
    }

    fn kv_resize_s(&self, model: ModelTypeId, kind: DeviceKind, fresh_bytes: u64) -> f64 {
        self.measured(model, kind, |t| t.kv_resize_s)
            .unwrap_or(self.kv_resize_s)
            + self.fresh_write_s(model, kind, fresh_bytes)
    }

    fn unload_s(&self, model: ModelTypeId, kind: DeviceKind) -> f64 {
        self.measured(model, kind, |t| t.unload_s)
            .unwrap_or(self.kv_resize_s)
    }

    fn kv_swap_s(&self, model: ModelTypeId, kind: DeviceKind, tokens: u64) -> f64 {
        2.0 * (tokens * self.models[model.0 as usize].kv_bytes_per_token[kind]) as f64
            / self.kv_swap_bytes_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"{
      "safety_factors_used_by_artifact_scheduler": {"gpu": 1.05, "cpu": 1.1},
      "models": {"tiny-3b": {"weights_gb": 1.0, "kv_kb_per_token": 2,
                 "block_tokens": {"cpu": 32, "gpu": 16}, "cpu_kv_gb": 1}},
      "cluster_in_paper": {"gpu_node_memory_gb": 10, "cpu_node_memory_gb": 20,
        "instance_slots_per_gpu": {"tiny-3b": 3}, "per_instance_overhead_gb": 0.5},
      "slo_in_paper": {"tpot_s": 0.25, "scheduler_margin": 0.95, "ttft_cap_s": 8},
      "latency": {"tiny-3b": {"gpu": {"gpu": {
        "prefill_ms_by_input_tokens": [[1, 10], [100, 20]],
        "decode_ms_by_context_then_batch": [[512, [[1, 5], [8, 9]]]],
        "exclusive_concurrency_cap": 7}}}}
    }"#;

    #[test]
    fn parses_models_and_keeps_them_off_kinds_without_tables() {
        let p = Profile::parse(MINI).unwrap();
        let m = p.model_type("tiny-3b").unwrap();
        let spec = &p.models[m.0 as usize];
        assert_eq!(spec.slots_per_node, PerKind::new(0, 3));
        assert!(p.covers(m, DeviceKind::Gpu) && !p.covers(m, DeviceKind::Cpu));
        assert!(!p.covers(ModelTypeId(7), DeviceKind::Gpu));
        assert_eq!(spec.sllm_exclusive_cap, PerKind::new(None, Some(7)));
        assert_eq!(spec.gpu_decode_quota, 4);
        assert_eq!(spec.block_bytes(DeviceKind::Gpu), 16 * 2048);
        assert!((p.prefill_s(m, DeviceKind::Gpu, 50) - 0.014_949_49).abs() < 1e-6);
        assert!((p.load_s(m, DeviceKind::Gpu, 0) - 0.125).abs() < 1e-9);
        assert_eq!(p.load_s(m, DeviceKind::Cpu, 0), 0.0);
        // The artifact's file says nothing of writing a pool: free.
        assert!((p.load_s(m, DeviceKind::Gpu, 1 << 30) - 0.125).abs() < 1e-9);
        assert!(matches!(
            p.model_type("nope"),
            Err(ProfileError::UnknownModel(..))
        ));
        assert!(Profile::parse("{}").is_err());
    }

    #[test]
    fn measured_times_and_slo_numbers_replace_the_assumed_ones() {
        let measured = MINI
            .replace(
                r#""exclusive_concurrency_cap": 7}"#,
                r#""exclusive_concurrency_cap": 7, "load_ms": 1500, "unload_ms": 20, "kv_resize_ms": 4,
                   "kv_write_ms_per_gib": 2000, "host_ms_per_iteration": 3, "host_ms_per_token": 0.5}"#,
            )
            .replace(
                r#""ttft_cap_s": 8}"#,
                r#""ttft_cap_s": 8, "ttft_tokens_per_s": 600, "ttft_min_s": 0.4}"#,
            );
        let p = Profile::parse(&measured).unwrap();
        let m = p.model_type("tiny-3b").unwrap();
        assert_eq!(p.load_s(m, DeviceKind::Gpu, 0), 1.5);
        assert_eq!(p.unload_s(m, DeviceKind::Gpu), 0.02);
        assert_eq!(p.kv_resize_s(m, DeviceKind::Gpu, 0), 0.004);
        // A pool costs its writing, 2 s per GiB: a load with a 768 MiB
        // pool takes 1.5 s more, a resize to 256 MiB 0.5 s more.
        assert!((p.load_s(m, DeviceKind::Gpu, 768 << 20) - 3.0).abs() < 1e-9);
        assert!((p.kv_resize_s(m, DeviceKind::Gpu, 256 << 20) - 0.504).abs() < 1e-9);
        // The host's work is part of every step: 3 ms + 0.5 ms a sequence.
        let bare = Profile::parse(MINI).unwrap();
        let extra =
            p.decode_s(m, DeviceKind::Gpu, 512, 4) - bare.decode_s(m, DeviceKind::Gpu, 512, 4);
        assert!((extra - 0.005).abs() < 1e-12, "{extra}");
        let extra = p.prefill_s(m, DeviceKind::Gpu, 50) - bare.prefill_s(m, DeviceKind::Gpu, 50);
        assert!((extra - 0.0035).abs() < 1e-12, "{extra}");
        assert_eq!(p.paper.ttft_tokens_per_s, Some(600.0));
        assert_eq!(p.paper.ttft_min_s, Some(0.4));
        // The artifact's file has neither.
        let p = Profile::parse(MINI).unwrap();
        assert_eq!(p.step_time_ratio(m, DeviceKind::Gpu, false, 0.9), 1.0);
        assert_eq!(p.step_time_ratio(m, DeviceKind::Gpu, true, 0.9), 1.0);
        assert_eq!(
            (p.paper.ttft_tokens_per_s, p.paper.ttft_min_s),
            (None, None)
        );
        assert_eq!(p.kv_resize_s(m, DeviceKind::Gpu, 1 << 30), p.kv_resize_s);
        assert_eq!(p.host_s(m, DeviceKind::Gpu, 4), 0.0);
        // A measured time must be a number of milliseconds, 0 or more.
        for (key, value) in [
            ("load_ms", "-1"),
            ("host_ms_per_token", r#""x""#),
            ("kv_write_ms_per_gib", "-5"),
        ] {
            let bad = MINI.replace(
                r#""exclusive_concurrency_cap": 7}"#,
                &format!(r#""exclusive_concurrency_cap": 7, "{key}": {value}}}"#),
            );
            assert!(
                matches!(Profile::parse(&bad), Err(ProfileError::Field(ref f)) if f.ends_with(key)),
                "{key}"
            );
        }
    }

    #[test]
    fn step_time_spread_is_quantiles_drawn_by_probability_and_checked() {
        let with = |spread: &str| {
            MINI.replace(
                r#""exclusive_concurrency_cap": 7}"#,
                &format!(r#""exclusive_concurrency_cap": 7, "step_time_spread": {spread}}}"#),
            )
        };
        let p = Profile::parse(&with("[0.8, 1.0, 1.6]")).unwrap();
        let m = p.model_type("tiny-3b").unwrap();
        let r = |u| p.step_time_ratio(m, DeviceKind::Gpu, false, u);
        assert_eq!((r(0.0), r(0.5), r(1.0)), (0.8, 1.0, 1.6));
        assert!((r(0.25) - 0.9).abs() < 1e-12 && (r(0.75) - 1.3).abs() < 1e-12);
        // Probabilities outside [0, 1] clamp.
        assert_eq!((r(-1.0), r(2.0)), (0.8, 1.6));
        // Prefill runs draw from the same spread unless they have their own.
        assert_eq!(p.step_time_ratio(m, DeviceKind::Gpu, true, 1.0), 1.6);
        let both = with(r#"[0.8, 1.0, 1.6], "prefill_time_spread": [1.1, 1.3]"#);
        let p = Profile::parse(&both).unwrap();
        let r = |prefills, u| p.step_time_ratio(m, DeviceKind::Gpu, prefills, u);
        assert_eq!((r(false, 0.5), r(true, 0.0), r(true, 1.0)), (1.0, 1.1, 1.3));
        // Not a spread: too short, not positive, out of order, not numbers.
        for bad in ["[1.0]", "[0.0, 1.0]", "[1.2, 1.0]", r#"["x", 1]"#, "1.0"] {
            assert!(
                matches!(
                    Profile::parse(&with(bad)),
                    Err(ProfileError::Field(f)) if f.ends_with("step_time_spread")
                ),
                "{bad}"
            );
            let prefill_bad = with(&format!(r#"[1.0, 1.1], "prefill_time_spread": {bad}"#));
            assert!(
                matches!(
                    Profile::parse(&prefill_bad),
                    Err(ProfileError::Field(f)) if f.ends_with("prefill_time_spread")
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn curve_interpolates_clamps_and_scales() {
        let c = Curve(vec![(1.0, 10.0), (3.0, 30.0)]);
        assert_eq!(c.at(0.0), 10.0);
        assert_eq!(c.at(2.0), 20.0);
        assert_eq!(c.at(6.0), 60.0);
    }

    #[test]
    fn decode_interpolates_context_then_batch() {
        let t = DeviceTables {
            prefill_ms: Curve(vec![(1.0, 1.0)]),
            decode_ms: vec![
                (512.0, Curve(vec![(1.0, 10.0), (2.0, 20.0)])),
                (1024.0, Curve(vec![(1.0, 30.0), (2.0, 40.0)])),
            ],
            load_s: None,
            unload_s: None,
            kv_resize_s: None,
            kv_write_s_per_byte: 0.0,
            host_s_per_iteration: 0.0,
            host_s_per_token: 0.0,
            step_time_spread: None,
            prefill_time_spread: None,
        };
        assert_eq!(t.decode_ms(768.0, 1.0), 20.0);
        assert_eq!(t.decode_ms(768.0, 1.5), 25.0);
        assert_eq!(t.decode_ms(2048.0, 1.0), 60.0);
    }
}
