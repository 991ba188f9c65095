//! The inference metrics (the `slinfer_llm_*` family at `/metrics`): what
//! happened to requests, recorded where a generation ends and where the
//! driver loads or preempts; and the scheduler's state, set from the
//! status at each scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use crate::api::InferenceStatus;
use crate::recent::{Recent, Samples};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub model: String,
    /// The device's name (`cpu:0`, `cuda:1`).
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// The device's name (`cpu:0`, `cuda:1`).
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    /// `finished`, `cancelled`, `overloaded`, `deadline_missed`,
    /// `unavailable`, `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SloLabels {
    pub model: String,
    /// `met` or `missed`.
    pub result: String,
}

/// What happened to one model in one second (the dashboard's windows).
#[derive(Debug, Default)]
pub struct ModelTally {
    /// Requests ended, per outcome (as in `slinfer_llm_requests`).
    pub ended: BTreeMap<&'static str, u32>,
    pub slo_met: u32,
    pub slo_missed: u32,
    /// Tokens sampled.
    pub tokens: u64,
    /// Seconds to first token and per output token of finished requests.
    pub ttft: Samples,
    pub tpot: Samples,
    pub cold_starts: u32,
    pub preemptions: u32,
}

/// The inference room's metrics: the live scheduler's state per model and
/// device (gauges set from its snapshot at each scrape) and what happened
/// to requests (counters and histograms the driver records, and the same
/// second by second in [`LlmMetrics::recent`]).
pub struct LlmMetrics {
    pub requests: Family<OutcomeLabels, Counter>,
    pub tokens: Family<ModelLabel, Counter>,
    pub ttft: Family<ModelLabel, Histogram>,
    pub tpot: Family<ModelLabel, Histogram>,
    pub slo: Family<SloLabels, Counter>,
    pub cold_starts: Family<DeviceLabels, Counter>,
    pub preemptions: Family<DeviceLabels, Counter>,
    /// Prompt tokens copied from another prompt (of the same prefill, or a
    /// sequence the instance holds) rather than computed.
    pub prompt_tokens_shared: Family<DeviceLabels, Counter>,
    /// Seconds the model's instances spent in engine runs, per device.
    pub busy: Family<DeviceLabels, Counter<f64, AtomicU64>>,
    pub instances: Family<DeviceLabels, Gauge>,
    pub batch: Family<DeviceLabels, Gauge>,
    pub kv_blocks_committed: Family<DeviceLabels, Gauge>,
    pub kv_blocks_planned: Family<DeviceLabels, Gauge>,
    pub kv_blocks_in_use: Family<DeviceLabels, Gauge>,
    pub kv_blocks_kept: Family<DeviceLabels, Gauge>,
    pub queued: Family<ModelLabel, Gauge>,
    pub device_capacity: Family<DeviceLabel, Gauge>,
    pub device_committed: Family<DeviceLabel, Gauge>,
    pub device_planned: Family<DeviceLabel, Gauge>,
    pub device_failed: Family<DeviceLabel, Gauge>,
    /// The last 15 minutes, per second and model.
    pub recent: Recent<BTreeMap<String, ModelTally>>,
}

impl Default for LlmMetrics {
    fn default() -> Self {
        LlmMetrics {
            requests: Family::default(),
            tokens: Family::default(),
            ttft: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            }),
            tpot: Family::new_with_constructor(|| {
                Histogram::new([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
            }),
            slo: Family::default(),
            cold_starts: Family::default(),
            preemptions: Family::default(),
            prompt_tokens_shared: Family::default(),
            busy: Family::default(),
            instances: Family::default(),
            batch: Family::default(),
            kv_blocks_committed: Family::default(),
            kv_blocks_planned: Family::default(),
            kv_blocks_in_use: Family::default(),
            kv_blocks_kept: Family::default(),
            queued: Family::default(),
            device_capacity: Family::default(),
            device_committed: Family::default(),
            device_planned: Family::default(),
            device_failed: Family::default(),
            recent: Recent::default(),
        }
    }
}

impl LlmMetrics {
    /// Adds the family to `registry` under the `llm_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("llm");
        r.register(
            "requests",
            "Generation requests ended, per model and outcome",
            self.requests.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens sampled, per model",
            self.tokens.clone(),
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
            "prompt_tokens_shared",
            "Prompt tokens an instance copied from another prompt (of the same prefill, or a sequence it holds) rather than computed, per device",
            self.prompt_tokens_shared.clone(),
        );
        r.register(
            "busy_seconds",
            "Seconds the model's instances spent in engine runs (iterations), per device",
            self.busy.clone(),
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
            "kv_blocks_kept",
            "KV blocks only ended requests' sequences hold, kept as sources of copies (a conversation's next call) until the blocks are needed",
            self.kv_blocks_kept.clone(),
        );
        r.register(
            "queued_requests",
            "Requests waiting for an instance, per model",
            self.queued.clone(),
        );
        r.register(
            "device_capacity_bytes",
            "Bytes the scheduler may fill on each device",
            self.device_capacity.clone(),
        );
        r.register(
            "device_committed_bytes",
            "Bytes each device may hold now (weights and KV, actions started)",
            self.device_committed.clone(),
        );
        r.register(
            "device_planned_bytes",
            "Bytes each device will hold once queued actions finish",
            self.device_planned.clone(),
        );
        r.register(
            "device_failed",
            "1 for a device that failed and left placement",
            self.device_failed.clone(),
        );
    }

    /// Adds to `model`'s tally of the current second.
    fn tally(&self, model: &str, f: impl FnOnce(&mut ModelTally)) {
        self.recent.record(|models| match models.get_mut(model) {
            Some(t) => f(t),
            None => f(models.entry(model.to_string()).or_default()),
        });
    }

    /// The counter of `model`'s sampled tokens (a generation holds it, so
    /// counting a token does not look the model up).
    pub(crate) fn tokens_of(&self, model: &str) -> Counter {
        self.tokens
            .get_or_create(&ModelLabel {
                model: model.to_string(),
            })
            .clone()
    }

    /// A token was sampled for `model`; `counter` is [`Self::tokens_of`] it.
    pub(crate) fn token(&self, counter: &Counter, model: &str) {
        counter.inc();
        self.tally(model, |t| t.tokens += 1);
    }

    /// How a request ended: its outcome (`finished`, `cancelled`,
    /// `overloaded`, `deadline_missed`, `unavailable`, `failed`), and for the
    /// ones that count towards the SLO whether it was met.
    pub(crate) fn ended(&self, model: &str, outcome: &'static str, slo_met: Option<bool>) {
        self.requests
            .get_or_create(&OutcomeLabels {
                model: model.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(met) = slo_met {
            self.slo
                .get_or_create(&SloLabels {
                    model: model.to_string(),
                    result: if met { "met" } else { "missed" }.to_string(),
                })
                .inc();
        }
        self.tally(model, |t| {
            *t.ended.entry(outcome).or_default() += 1;
            match slo_met {
                Some(true) => t.slo_met += 1,
                Some(false) => t.slo_missed += 1,
                None => {}
            }
        });
    }

    /// A finished request's latencies.
    pub(crate) fn latency(&self, model: &str, ttft_s: f64, tpot_s: Option<f64>) {
        let label = ModelLabel {
            model: model.to_string(),
        };
        self.ttft.get_or_create(&label).observe(ttft_s);
        if let Some(t) = tpot_s {
            self.tpot.get_or_create(&label).observe(t);
        }
        self.tally(model, |t| {
            t.ttft.add(ttft_s);
            if let Some(s) = tpot_s {
                t.tpot.add(s);
            }
        });
    }

    /// An instance of `labels.model` was loaded on `labels.device`.
    pub(crate) fn cold_start(&self, labels: &DeviceLabels) {
        self.cold_starts.get_or_create(labels).inc();
        self.tally(&labels.model, |t| t.cold_starts += 1);
    }

    /// `n` requests were preempted off an instance of `labels.model`.
    pub(crate) fn preempted(&self, labels: &DeviceLabels, n: usize) {
        self.preemptions.get_or_create(labels).inc_by(n as u64);
        self.tally(&labels.model, |t| t.preemptions += n as u32);
    }

    /// An instance of `labels.model` ran on its device for `seconds`,
    /// copying `shared_tokens` prompt tokens rather than computing them.
    pub(crate) fn ran(&self, labels: &DeviceLabels, seconds: f64, shared_tokens: u64) {
        self.busy.get_or_create(labels).inc_by(seconds);
        if shared_tokens > 0 {
            self.prompt_tokens_shared
                .get_or_create(labels)
                .inc_by(shared_tokens);
        }
    }

    /// Sets the scheduler-state gauges from the service's status.
    pub(crate) fn refresh(&self, status: &InferenceStatus) {
        self.instances.clear();
        self.batch.clear();
        self.kv_blocks_committed.clear();
        self.kv_blocks_planned.clear();
        self.kv_blocks_in_use.clear();
        self.kv_blocks_kept.clear();
        self.queued.clear();
        for d in &status.devices {
            let l = DeviceLabel {
                device: d.name.clone(),
            };
            let n = &d.scheduler;
            self.device_capacity
                .get_or_create(&l)
                .set(n.capacity_bytes as i64);
            self.device_committed
                .get_or_create(&l)
                .set(n.committed_bytes as i64);
            self.device_planned
                .get_or_create(&l)
                .set(n.planned_bytes as i64);
            self.device_failed
                .get_or_create(&l)
                .set(i64::from(n.failed));
        }
        for model in &status.models {
            let name = &model.info.name;
            self.queued
                .get_or_create(&ModelLabel {
                    model: name.clone(),
                })
                .set(model.queued_requests as i64);
            for i in &model.instances {
                let l = DeviceLabels {
                    model: name.clone(),
                    device: i.device.clone(),
                };
                self.instances.get_or_create(&l).inc();
                self.batch
                    .get_or_create(&l)
                    .inc_by(i.scheduler.batch as i64);
                self.kv_blocks_committed
                    .get_or_create(&l)
                    .inc_by(i.scheduler.kv_blocks_committed as i64);
                self.kv_blocks_planned
                    .get_or_create(&l)
                    .inc_by(i.scheduler.kv_blocks_planned as i64);
                self.kv_blocks_in_use
                    .get_or_create(&l)
                    .inc_by(i.kv_blocks_in_use.unwrap_or(0) as i64);
                self.kv_blocks_kept
                    .get_or_create(&l)
                    .inc_by(i.kv_blocks_kept.unwrap_or(0) as i64);
            }
        }
    }
}
