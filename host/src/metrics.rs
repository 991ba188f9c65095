//! Prometheus metrics, served as text at `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub function: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub model: String,
    /// `cpu:0`, `gpu:1`: device kind and scheduler node.
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    /// `finished`, `cancelled`, `overloaded`, `deadline_missed`, `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SloLabels {
    pub model: String,
    /// `met` or `missed`.
    pub result: String,
}

/// The inference room's metrics: the live scheduler's state per model and
/// device (gauges set from its snapshot at each scrape) and what happened
/// to requests (counters and histograms the driver records).
pub struct LlmMetrics {
    pub requests: Family<OutcomeLabels, Counter>,
    pub ttft: Family<ModelLabel, Histogram>,
    pub tpot: Family<ModelLabel, Histogram>,
    pub slo: Family<SloLabels, Counter>,
    pub cold_starts: Family<DeviceLabels, Counter>,
    pub preemptions: Family<DeviceLabels, Counter>,
    pub instances: Family<DeviceLabels, Gauge>,
    pub batch: Family<DeviceLabels, Gauge>,
    pub kv_blocks_committed: Family<DeviceLabels, Gauge>,
    pub kv_blocks_planned: Family<DeviceLabels, Gauge>,
    pub kv_blocks_in_use: Family<DeviceLabels, Gauge>,
    pub queued: Family<ModelLabel, Gauge>,
}

impl Default for LlmMetrics {
    fn default() -> Self {
        LlmMetrics {
            requests: Family::default(),
            ttft: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            }),
            tpot: Family::new_with_constructor(|| {
                Histogram::new([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
            }),
            slo: Family::default(),
            cold_starts: Family::default(),
            preemptions: Family::default(),
            instances: Family::default(),
            batch: Family::default(),
            kv_blocks_committed: Family::default(),
            kv_blocks_planned: Family::default(),
            kv_blocks_in_use: Family::default(),
            queued: Family::default(),
        }
    }
}

impl LlmMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("llm");
        r.register(
            "requests",
            "Generation requests ended, per model and outcome",
            self.requests.clone(),
        );
        r.register(
            "ttft_seconds",
            "Time to first token of finished requests",
            self.ttft.clone(),
        );
        r.register(
            "tpot_seconds",
            "Mean time per output token after the first, of finished requests",
            self.tpot.clone(),
        );
        r.register(
            "slo",
            "Requests that met or missed their TTFT/TPOT SLO (overloaded and deadline-missed ones missed it)",
            self.slo.clone(),
        );
        r.register(
            "cold_starts",
            "Instances loaded, per model and device",
            self.cold_starts.clone(),
        );
        r.register(
            "preemptions",
            "Requests preempted off an instance, per model and device",
            self.preemptions.clone(),
        );
        r.register(
            "instances",
            "Instances placed, per model and device (loading, loaded or unloading)",
            self.instances.clone(),
        );
        r.register(
            "batch_size",
            "Requests placed on the model's instances, per device",
            self.batch.clone(),
        );
        r.register(
            "kv_blocks_committed",
            "KV blocks the device may hold now for the model (actions started)",
            self.kv_blocks_committed.clone(),
        );
        r.register(
            "kv_blocks_planned",
            "KV blocks planned for the model once queued actions finish",
            self.kv_blocks_planned.clone(),
        );
        r.register(
            "kv_blocks_in_use",
            "KV blocks the engine holds for live sequences",
            self.kv_blocks_in_use.clone(),
        );
        r.register(
            "queued_requests",
            "Requests waiting for an instance, per model",
            self.queued.clone(),
        );
    }

    /// Clears the scheduler-state gauges before they are set afresh.
    pub fn clear_gauges(&self) {
        self.instances.clear();
        self.batch.clear();
        self.kv_blocks_committed.clear();
        self.kv_blocks_planned.clear();
        self.kv_blocks_in_use.clear();
        self.queued.clear();
    }
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
    pub llm: std::sync::Arc<LlmMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("slinfer");
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
        let llm = std::sync::Arc::new(LlmMetrics::default());
        llm.register(&mut registry);
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
            llm,
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
