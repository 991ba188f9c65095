//! What goes in and out of the scheduler: requests, the policy and its
//! settings, the commands for the driver, and what the driver reports.

use serde::Serialize;

use super::{ActionId, InstanceId, ModelId, NodeId, RequestId};
use crate::model::{ModelTypeId, PerKind};
use crate::predict::PredictorConfig;

/// What the scheduler is told about a request on arrival.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: RequestId,
    pub model: ModelId,
    pub model_type: ModelTypeId,
    pub function: u32,
    pub input_tokens: u64,
    /// The most tokens it may generate, where the caller said so: its KV
    /// look-ahead never plans past them. `None` in the paper's setup, where
    /// the scheduler knows nothing of output lengths.
    pub max_output_tokens: Option<u64>,
    /// The evaluation's SLOs; the scheduler plans against a margin of them.
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    pub arrival_s: f64,
}

impl Request {
    /// `lookahead` tokens, once it has generated `generated`, within what
    /// it may still generate (`max_output_tokens`).
    pub(super) fn bounded_lookahead(&self, lookahead: u64, generated: u64) -> u64 {
        self.max_output_tokens
            .map_or(lookahead, |m| lookahead.min(m.saturating_sub(generated)))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Policy {
    /// Exclusive instances on the GPUs (on the CPUs of a setup without a
    /// GPU, such as a CPU-only live host).
    #[serde(rename = "sllm")]
    Sllm,
    #[serde(rename = "sllm+c")]
    SllmC,
    #[serde(rename = "sllm+c+s")]
    SllmCS,
    #[serde(rename = "slinfer")]
    #[default]
    Slinfer,
    /// `slinfer` with the predictive look-ahead (beyond the paper).
    #[serde(rename = "slinfer+p")]
    SlinferPredictive,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Sllm,
        Policy::SllmC,
        Policy::SllmCS,
        Policy::Slinfer,
        Policy::SlinferPredictive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Sllm => "sllm",
            Policy::SllmC => "sllm+c",
            Policy::SllmCS => "sllm+c+s",
            Policy::Slinfer => "slinfer",
            Policy::SlinferPredictive => "slinfer+p",
        }
    }

    pub fn parse(name: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == name)
    }

    /// One of the ServerlessLLM-style baselines (exclusive or half-shared
    /// instances, a concurrency cap each).
    pub fn is_sllm(self) -> bool {
        matches!(self, Policy::Sllm | Policy::SllmC | Policy::SllmCS)
    }

    /// Whether the policy places on CPUs beside GPUs (`sllm` does not; it
    /// still uses the CPUs of a setup that has no GPU).
    pub(super) fn uses_cpu_beside_gpus(self) -> bool {
        self != Policy::Sllm
    }

    /// Instances one device may hold under the `sllm` baselines.
    pub(super) fn sllm_shares(self) -> u32 {
        if self == Policy::SllmCS { 2 } else { 1 }
    }
}

/// Every tunable of the policy, defaulting to the paper's published settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub policy: Policy,
    pub lookahead_tokens: u64,
    pub min_instance_tokens: u64,
    pub kv_watermark: f64,
    pub retry_interval_s: f64,
    /// Idle time before an instance is unloaded.
    pub keep_alive_s: PerKind<f64>,
    /// The scheduler plans against `margin ×` the evaluation SLOs.
    pub slo_margin: f64,
    pub ttft_cap_s: f64,
    /// Estimates are profile × safety factor.
    pub safety: PerKind<f64>,
    pub instance_overhead_bytes: u64,
    pub predictor: PredictorConfig,
    /// Preempted requests keep their KV (swapped to host memory and back)
    /// instead of recomputing it. Beyond the paper; off by default.
    pub preempt_keeps_kv: bool,
    /// CPU instances scale their KV pool like GPU ones instead of keeping
    /// `ModelSpec::cpu_kv_bytes` (the paper's artifact keeps it fixed; the
    /// live host's CPU engine owns resizable block tensors). Off by default;
    /// the sllm baselines keep the fixed pool either way.
    pub cpu_kv_scales: bool,
    /// Refuse a waiting request as soon as the model's recent completion
    /// rate says the requests queued before it will not have drained by its
    /// deadline (`DropReason::WouldMissDeadline`, with the time they need as
    /// the retry hint), instead of holding it until the deadline passes.
    /// Beyond the paper; off by default.
    pub refuse_early: bool,
    /// The time-to-first-token SLO counts a cold start: admission starts a
    /// loading instance's prefills only once its load is done (a request
    /// goes to a new or still-loading instance only if load and prefill fit
    /// its deadline), a finished load does not extend deadlines, and a
    /// request is refused a node only for the prefills it would make late
    /// (not for those late without it). A model's first instance (none
    /// anywhere) still loads for a request it cannot serve in time: a cold
    /// start cannot be avoided. The paper excludes load delay (TTFT ≤ … +
    /// load delay); off by default.
    pub ttft_counts_load: bool,
    /// How long a KV pool stays oversized before it shrinks, per kind of
    /// device: a pool that would grow straight back (the next burst of a
    /// bursty model) is kept. 0 in the paper; the live host's CPU engine
    /// reallocates and copies a pool to grow it, which holds the device for
    /// hundreds of ms per GiB.
    pub kv_shrink_delay_s: PerKind<f64>,
    /// A pool that must grow grows to at least this many times its size
    /// (within half the room its target leaves on the node), so that a
    /// burst arriving one request at a time grows it a few times rather
    /// than at every arrival. 1 in the paper; the live host's CPU engines
    /// hold the device for each resize (100-750 ms measured on llama.cpp).
    pub kv_grow_factor: PerKind<f64>,
    /// A loaded instance's pool shrinks no lower than this many tokens'
    /// blocks, per kind of device (it never grows for it): an idle
    /// instance keeps that much KV while it stays loaded, counted as its
    /// planned blocks, so that the ended requests' sequences its engine
    /// keeps as sources of copies (a conversation's last call, which the
    /// next one begins with) outlive the gap between calls. 0 in the paper
    /// (an idle pool shrinks to nothing).
    pub idle_kv_tokens: PerKind<u64>,
    /// An instance with nothing to decode starts its first prefill only
    /// once no request has joined it for this long (at most
    /// `GATHER_MAX_GAPS` (4) times this after the first joined), per kind of
    /// device: the requests of a burst reach the scheduler a millisecond
    /// or so apart, and a run granted at the first would leave the rest
    /// to wait out its whole prefill, then prefill them in a second. 0 in
    /// the paper.
    pub prefill_gather_s: PerKind<f64>,
}

/// How many [`SchedulerConfig::prefill_gather_s`] gaps a first prefill
/// waits at most for a burst to gather.
pub(super) const GATHER_MAX_GAPS: f64 = 4.0;

impl SchedulerConfig {
    pub fn paper(policy: Policy) -> Self {
        SchedulerConfig {
            policy,
            lookahead_tokens: 512,
            min_instance_tokens: 4096,
            kv_watermark: 0.25,
            retry_interval_s: 0.25,
            keep_alive_s: PerKind::new(0.0, 1.0),
            slo_margin: 0.95,
            ttft_cap_s: 8.0,
            safety: PerKind::new(1.1, 1.05),
            instance_overhead_bytes: 1536 * 1024 * 1024,
            predictor: PredictorConfig::default(),
            preempt_keeps_kv: false,
            cpu_kv_scales: false,
            refuse_early: false,
            ttft_counts_load: false,
            kv_shrink_delay_s: PerKind::splat(0.0),
            kv_grow_factor: PerKind::splat(1.0),
            idle_kv_tokens: PerKind::splat(0),
            prefill_gather_s: PerKind::splat(0.0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Never placed before its first-token deadline passed.
    DeadlinePassedWaiting,
    /// Evicted by a preemption and not re-placed before its next-token deadline.
    DeadlinePassedAfterPreemption,
    Cancelled,
    /// No node this policy may use can ever host it.
    Unservable,
    /// Refused while waiting: at the model's recent completion rate, the
    /// requests ahead of it would not drain before its deadline
    /// (`SchedulerConfig::refuse_early`).
    WouldMissDeadline,
    /// The device it was placed on failed (`fail_node`).
    DeviceFailed,
}

impl DropReason {
    pub fn name(self) -> &'static str {
        match self {
            DropReason::DeadlinePassedWaiting => "deadline_passed_waiting",
            DropReason::DeadlinePassedAfterPreemption => "deadline_passed_after_preemption",
            DropReason::Cancelled => "cancelled",
            DropReason::Unservable => "unservable",
            DropReason::WouldMissDeadline => "would_miss_deadline",
            DropReason::DeviceFailed => "device_failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ActionOp {
    /// Bring weights in and allocate the KV pool.
    Load { weights_bytes: u64, kv_bytes: u64 },
    /// Set the KV pool to `kv_bytes` (grow or shrink).
    ResizeKv { kv_bytes: u64 },
    /// Free weights and KV.
    Unload,
}

/// What the driver must do. Actions and runs end with `action_done` and
/// `iteration_done`; the rest are notices.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Action {
        node: NodeId,
        action: ActionId,
        instance: InstanceId,
        model: ModelId,
        model_type: ModelTypeId,
        op: ActionOp,
    },
    /// Run up to `iterations` iterations of the instance's batch: one
    /// prefill iteration over `prefill` (tokens to (re)compute) and
    /// `restore` (tokens of KV to bring back from host memory), each
    /// yielding its next token; or decode iterations over `decode`
    /// (current context).
    Run {
        node: NodeId,
        instance: InstanceId,
        model_type: ModelTypeId,
        iterations: u32,
        prefill: Vec<(RequestId, u64)>,
        restore: Vec<(RequestId, u64)>,
        decode: Vec<(RequestId, u64)>,
    },
    /// The instance gave these requests up; they will be re-placed, their KV
    /// recomputed (or, with `preempt_keeps_kv`, swapped out to host memory
    /// and restored).
    Preempt {
        instance: InstanceId,
        requests: Vec<RequestId>,
    },
    Completed {
        request: RequestId,
        load_delay_s: f64,
    },
    Dropped {
        request: RequestId,
        reason: DropReason,
        /// For a request refused as overloaded: when a retry may be served,
        /// from the model's recent completion rate (`None`: no estimate).
        retry_after_s: Option<f64>,
    },
}

/// Per-request result of a `Run`, reported by the driver.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestOutcome {
    pub request: RequestId,
    pub tokens: u64,
    pub finished: bool,
}
