//! What the dashboard shows, computed from the live service's status and
//! the last 15 minutes of tallies ([`slinfer_inference::recent`]).
//!
//! Windows: rates over the last 10 whole seconds, latency percentiles over
//! the last 5 minutes, SLO attainment over 1, 5 and 15 minutes, counts over
//! 15 minutes; the timeline has one point per 5 seconds.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use slinfer_inference::recent::{KEPT_SECONDS, Recent, Samples, percentiles, unix_now};
use slinfer_inference::{InferenceStatus, ModelTally};

use crate::api::AppState;
use crate::metrics::{DeviceMemory, FunctionLabel, Metrics};

/// Seconds a rate is averaged over.
const RATE_SECONDS: u64 = 10;
/// Seconds latency percentiles are taken over.
const PERCENTILE_SECONDS: u64 = 5 * 60;
/// Seconds per point of the timeline.
const STEP_SECONDS: u64 = 5;

#[derive(Serialize)]
pub struct UiState {
    /// This member's node name in a cluster.
    node: Option<String>,
    now_unix_s: u64,
    started_unix_s: u64,
    /// Whether this server serves models at all.
    inference: bool,
    /// Every node's devices and instances: this server's, and in a cluster
    /// each member's as it last published them.
    nodes: Vec<NodeView>,
    models: Vec<ModelView>,
    functions: Vec<FunctionView>,
    timeline: Timeline,
}

#[derive(Serialize)]
struct NodeView {
    /// The member's node name (empty for a server alone).
    node: String,
    here: bool,
    alive: bool,
    /// Its [`InferenceStatus`] (null without inference).
    status: serde_json::Value,
}

#[derive(Serialize)]
struct ModelView {
    name: String,
    queued: usize,
    instances: usize,
    tokens_per_s: f64,
    /// p50 and p99 over the last 5 minutes, in seconds.
    ttft_s: [Option<f64>; 2],
    tpot_s: [Option<f64>; 2],
    /// Share of requests that met their SLO over 1, 5 and 15 minutes.
    slo: [Option<f64>; 3],
    /// Requests ended in the last 15 minutes, per outcome.
    ended: BTreeMap<&'static str, u32>,
    cold_starts: u32,
    preemptions: u32,
}

#[derive(Serialize)]
struct FunctionView {
    name: String,
    invocations_per_s: f64,
    /// In the last 15 minutes.
    invocations: u32,
    errors: BTreeMap<String, u32>,
    /// p50 and p99 over the last 5 minutes, in seconds.
    latency_s: [Option<f64>; 2],
    instances: i64,
    queued: i64,
}

#[derive(Serialize, Default)]
struct Timeline {
    step_s: u64,
    /// The Unix second the first point starts at.
    start_unix_s: u64,
    invocations_per_s: Vec<f64>,
    generations_per_s: Vec<f64>,
    tokens_per_s: Vec<f64>,
    slo_met: Vec<u32>,
    slo_missed: Vec<u32>,
    /// Per device: its memory at the end of each point (null before it was
    /// sampled).
    memory: BTreeMap<String, Vec<Option<DeviceMemory>>>,
}

impl UiState {
    pub fn now(app: &AppState) -> UiState {
        let now = unix_now();
        let status = app.models.inference().map(|i| i.status());
        let node = app
            .member
            .as_ref()
            .map(|m| m.cluster.identity().node.clone());
        let mut nodes = vec![NodeView {
            node: node.clone().unwrap_or_default(),
            here: true,
            alive: true,
            status: serde_json::to_value(&status).unwrap_or_default(),
        }];
        if let Some(m) = &app.member {
            nodes.extend(
                m.cluster
                    .members()
                    .into_iter()
                    .filter(|o| Some(&o.state.node) != node.as_ref())
                    .map(|o| NodeView {
                        node: o.state.node,
                        here: false,
                        alive: o.alive,
                        status: o.state.report.inference,
                    }),
            );
        }
        UiState {
            node,
            now_unix_s: now,
            started_unix_s: app.started_unix_s,
            inference: status.is_some(),
            models: models(&app.metrics.llm.recent, status.as_ref(), now),
            functions: functions(app, now),
            timeline: timeline(&app.metrics, now),
            nodes,
        }
    }
}

/// `part / whole`, none of nothing.
fn share(part: u32, whole: u32) -> Option<f64> {
    (whole > 0).then(|| f64::from(part) / f64::from(whole))
}

fn p50_p99<'a>(samples: impl Iterator<Item = &'a Samples>) -> [Option<f64>; 2] {
    let p = percentiles(samples, &[0.5, 0.99]);
    [p[0], p[1]]
}

/// Whether second `s` is among the last `back` seconds at `now`, the
/// current one included.
fn within(s: u64, now: u64, back: u64) -> bool {
    s + back >= now
}

/// Whether second `s` counts towards a rate at `now`: the last
/// [`RATE_SECONDS`] whole seconds.
fn in_rate(s: u64, now: u64) -> bool {
    within(s, now, RATE_SECONDS) && s < now
}

/// One model's seconds, added up in one pass over the tallies.
#[derive(Default)]
struct ModelSums<'a> {
    tokens: u64,
    met: [u32; 3],
    missed: [u32; 3],
    ttft: Vec<&'a Samples>,
    tpot: Vec<&'a Samples>,
    ended: BTreeMap<&'static str, u32>,
    cold_starts: u32,
    preemptions: u32,
}

fn models(
    recent: &Recent<BTreeMap<String, ModelTally>>,
    status: Option<&InferenceStatus>,
    now: u64,
) -> Vec<ModelView> {
    recent.read(|seconds| {
        let mut sums: BTreeMap<&str, ModelSums> = status
            .iter()
            .flat_map(|s| s.models.iter())
            .map(|m| (m.info.name.as_str(), ModelSums::default()))
            .collect();
        for (s, second) in seconds {
            for (name, t) in second {
                let m = sums.entry(name.as_str()).or_default();
                if in_rate(s, now) {
                    m.tokens += t.tokens;
                }
                for (i, minutes) in [1, 5, 15].into_iter().enumerate() {
                    if within(s, now, minutes * 60) {
                        m.met[i] += t.slo_met;
                        m.missed[i] += t.slo_missed;
                    }
                }
                if within(s, now, PERCENTILE_SECONDS) {
                    m.ttft.push(&t.ttft);
                    m.tpot.push(&t.tpot);
                }
                for (outcome, n) in &t.ended {
                    *m.ended.entry(outcome).or_default() += n;
                }
                m.cold_starts += t.cold_starts;
                m.preemptions += t.preemptions;
            }
        }
        sums.into_iter()
            .map(|(name, m)| {
                let here = status.and_then(|s| s.models.iter().find(|x| x.info.name == name));
                ModelView {
                    name: name.to_owned(),
                    queued: here.map_or(0, |x| x.queued_requests),
                    instances: here.map_or(0, |x| x.instances.len()),
                    tokens_per_s: m.tokens as f64 / RATE_SECONDS as f64,
                    ttft_s: p50_p99(m.ttft.into_iter()),
                    tpot_s: p50_p99(m.tpot.into_iter()),
                    slo: [0, 1, 2].map(|i| share(m.met[i], m.met[i] + m.missed[i])),
                    ended: m.ended,
                    cold_starts: m.cold_starts,
                    preemptions: m.preemptions,
                }
            })
            .collect()
    })
}

/// One function's seconds, added up in one pass over the tallies.
#[derive(Default)]
struct FunctionSums<'a> {
    last: u32,
    invocations: u32,
    errors: BTreeMap<String, u32>,
    latency: Vec<&'a Samples>,
}

fn functions(app: &AppState, now: u64) -> Vec<FunctionView> {
    type Gauges = prometheus_client::metrics::family::Family<
        FunctionLabel,
        prometheus_client::metrics::gauge::Gauge,
    >;
    let gauge = |family: &Gauges, name: &str| {
        family
            .get(&FunctionLabel {
                function: name.to_owned(),
            })
            .map_or(0, |g| g.get())
    };
    let deployed = app.functions.list();
    app.metrics.recent.read(|seconds| {
        let mut sums: HashMap<&str, FunctionSums> = HashMap::new();
        for (s, second) in seconds {
            for (name, t) in second {
                let f = sums.entry(name.as_str()).or_default();
                if in_rate(s, now) {
                    f.last += t.invocations;
                }
                f.invocations += t.invocations;
                for (kind, n) in &t.errors {
                    *f.errors.entry(kind.clone()).or_default() += n;
                }
                if within(s, now, PERCENTILE_SECONDS) {
                    f.latency.push(&t.latency);
                }
            }
        }
        deployed
            .iter()
            .map(|d| {
                let name = d.manifest.name.as_str();
                let f = sums.remove(name).unwrap_or_default();
                FunctionView {
                    name: name.to_owned(),
                    invocations_per_s: f64::from(f.last) / RATE_SECONDS as f64,
                    invocations: f.invocations,
                    errors: f.errors,
                    latency_s: p50_p99(f.latency.into_iter()),
                    instances: gauge(&app.metrics.instances, name),
                    queued: gauge(&app.metrics.queued, name),
                }
            })
            .collect()
    })
}

fn timeline(metrics: &Metrics, now: u64) -> Timeline {
    let points = (KEPT_SECONDS / STEP_SECONDS) as usize;
    let start = (now / STEP_SECONDS + 1) * STEP_SECONDS - KEPT_SECONDS;
    let slot = |s: u64| (s >= start).then(|| ((s - start) / STEP_SECONDS) as usize);
    let per_s = 1.0 / STEP_SECONDS as f64;
    let mut t = Timeline {
        step_s: STEP_SECONDS,
        start_unix_s: start,
        invocations_per_s: vec![0.0; points],
        generations_per_s: vec![0.0; points],
        tokens_per_s: vec![0.0; points],
        slo_met: vec![0; points],
        slo_missed: vec![0; points],
        memory: BTreeMap::new(),
    };
    metrics.recent.read(|seconds| {
        for (s, functions) in seconds {
            if let Some(i) = slot(s) {
                let n: u32 = functions.values().map(|f| f.invocations).sum();
                t.invocations_per_s[i] += f64::from(n) * per_s;
            }
        }
    });
    metrics.llm.recent.read(|seconds| {
        for (s, models) in seconds {
            let Some(i) = slot(s) else { continue };
            for m in models.values() {
                let ended: u32 = m.ended.values().sum();
                t.generations_per_s[i] += f64::from(ended) * per_s;
                t.tokens_per_s[i] += m.tokens as f64 * per_s;
                t.slo_met[i] += m.slo_met;
                t.slo_missed[i] += m.slo_missed;
            }
        }
    });
    metrics.device_memory.read(|seconds| {
        for (s, devices) in seconds {
            let Some(i) = slot(s) else { continue };
            for (name, m) in devices {
                t.memory
                    .entry(name.clone())
                    .or_insert_with(|| vec![None; points])[i] = Some(*m);
            }
        }
    });
    t
}
