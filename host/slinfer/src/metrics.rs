//! Prometheus metrics, served as text at `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use slinfer_inference::recent::{Recent, Samples};
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub function: String,
    pub kind: String,
}

/// A generation sent to, or taken from, another member of a cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The other member's node name.
    pub peer: String,
    /// Sent: `started`, `overloaded`, `unavailable`, `model_not_found`,
    /// `failed`, and `lost` for a started one whose member was lost.
    /// Taken: `answered`.
    pub outcome: &'static str,
}

/// What happened to one function in one second (the dashboard's windows).
#[derive(Debug, Default)]
pub struct FunctionTally {
    pub invocations: u32,
    /// Failed invocations, per kind of error.
    pub errors: BTreeMap<String, u32>,
    /// Seconds from arrival to the end of the response body.
    pub latency: Samples,
}

/// One device's memory at the end of one second (the dashboard's timeline).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DeviceMemory {
    pub capacity_bytes: u64,
    pub committed_bytes: u64,
    pub planned_bytes: u64,
}

/// Every metric the host exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub invocations: Family<FunctionLabel, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<FunctionLabel, Histogram>,
    pub instances: Family<FunctionLabel, Gauge>,
    pub queued: Family<FunctionLabel, Gauge>,
    pub functions: Gauge,
    pub compiles: Counter,
    pub cache_hits: Counter,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    /// The host memory budget's figures, set when scraped.
    memory: Family<MemoryLabel, Gauge>,
    pub llm: std::sync::Arc<slinfer_inference::LlmMetrics>,
    /// Generations this member sent to others, per member and outcome.
    pub routed: Family<RouteLabels, Counter>,
    /// Generations other members sent here, per member.
    pub answered: Family<RouteLabels, Counter>,
    /// The last 15 minutes of invocations, per second and function.
    pub recent: Recent<BTreeMap<String, FunctionTally>>,
    /// The last 15 minutes of each device's memory (set by
    /// [`Metrics::sample_devices`]).
    pub device_memory: Recent<BTreeMap<String, DeviceMemory>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemoryLabel {
    /// `budget`, `functions`, `engines`, `untracked` or `process`.
    pub part: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// The metrics of one server; a cluster member's carry the label
    /// `node="NAME"` on every sample.
    pub fn new(node: Option<&str>) -> Metrics {
        let labels = node.map(|n| (Cow::Borrowed("node"), Cow::Owned(n.to_owned())));
        let mut registry = Registry::with_prefix_and_labels("slinfer", labels.into_iter());
        let invocations = Family::<FunctionLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<FunctionLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ])
        });
        let instances = Family::<FunctionLabel, Gauge>::default();
        let queued = Family::<FunctionLabel, Gauge>::default();
        let functions = Gauge::default();
        let compiles = Counter::default();
        let cache_hits = Counter::default();
        let connections_open = Gauge::default();
        let connections_refused = Counter::default();
        registry.register(
            "connections_open",
            "HTTP connections open now",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections answered 503 because as many were open as allowed",
            connections_refused.clone(),
        );
        registry.register(
            "invocations",
            "Invocations finished, per function",
            invocations.clone(),
        );
        registry.register(
            "invocation_errors",
            "Failed invocations, per function and kind of error",
            errors.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Invocation latency, from arrival to the end of the response body",
            duration.clone(),
        );
        registry.register(
            "instances",
            "Instances running now, per function",
            instances.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a free instance, per function",
            queued.clone(),
        );
        registry.register(
            "functions_deployed",
            "Functions deployed",
            functions.clone(),
        );
        registry.register(
            "component_compiles",
            "Components compiled to machine code",
            compiles.clone(),
        );
        registry.register(
            "component_cache_hits",
            "Components loaded from the compile cache",
            cache_hits.clone(),
        );
        let memory = Family::<MemoryLabel, Gauge>::default();
        registry.register(
            "memory_bytes",
            "The host memory budget (`budget`) and what draws on it: functions' Wasm memories and wasi:nn tensors (`functions`), inference instances on the CPU (`engines`), the rest of the process's growth (`untracked`); and the process's proportional set size (`process`)",
            memory.clone(),
        );
        let llm = std::sync::Arc::new(slinfer_inference::LlmMetrics::default());
        llm.register(&mut registry);
        let routed = Family::<RouteLabels, Counter>::default();
        registry.register(
            "routed_generations",
            "Generations sent to another cluster member, per member (peer) and outcome",
            routed.clone(),
        );
        let answered = Family::<RouteLabels, Counter>::default();
        registry.register(
            "answered_generations",
            "Generations other cluster members sent here, per member (peer)",
            answered.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            invocations,
            errors,
            duration,
            instances,
            queued,
            functions,
            compiles,
            cache_hits,
            connections_open,
            connections_refused,
            memory,
            llm,
            routed,
            answered,
            recent: Recent::default(),
            device_memory: Recent::default(),
        }
    }

    /// Count a generation sent to (`routed`) or taken from (`answered`)
    /// member `peer`.
    pub fn route(family: &Family<RouteLabels, Counter>, peer: &str, outcome: &'static str) {
        family
            .get_or_create(&RouteLabels {
                peer: peer.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Sets the memory gauges from the budget's figures.
    pub fn set_memory(&self, u: slinfer_inference::MemoryUse) {
        for (part, bytes) in [
            ("budget", u.total_bytes),
            ("functions", u.functions_bytes),
            ("engines", u.engines_bytes),
            ("untracked", u.untracked_bytes),
            ("process", u.process_bytes),
        ] {
            self.memory
                .get_or_create(&MemoryLabel { part })
                .set(bytes as i64);
        }
    }

    /// Record a finished invocation.
    pub fn record(&self, function: &str, seconds: f64, error: Option<&str>) {
        let label = FunctionLabel {
            function: function.to_owned(),
        };
        self.invocations.get_or_create(&label).inc();
        self.duration.get_or_create(&label).observe(seconds);
        if let Some(kind) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    function: function.to_owned(),
                    kind: kind.to_owned(),
                })
                .inc();
        }
        self.recent.record(|functions| {
            let t = match functions.get_mut(function) {
                Some(t) => t,
                None => functions.entry(function.to_owned()).or_default(),
            };
            t.invocations += 1;
            t.latency.add(seconds);
            if let Some(kind) = error {
                *t.errors.entry(kind.to_owned()).or_default() += 1;
            }
        });
    }

    /// Notes each device's memory for this second.
    pub fn sample_devices(&self, status: &slinfer_inference::InferenceStatus) {
        self.device_memory.record(|devices| {
            for d in &status.devices {
                let n = &d.scheduler;
                devices.insert(
                    d.name.clone(),
                    DeviceMemory {
                        capacity_bytes: n.capacity_bytes,
                        committed_bytes: n.committed_bytes,
                        planned_bytes: n.planned_bytes,
                    },
                );
            }
        });
    }

    /// Forget a removed function's per-function series.
    pub fn forget(&self, function: &str) {
        let label = FunctionLabel {
            function: function.to_owned(),
        };
        self.instances.remove(&label);
        self.queued.remove(&label);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics registry lock");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
