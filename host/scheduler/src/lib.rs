//! slinfer's scheduler room: the slice scheduler (token-level time slicing
//! by least headroom, shadow-validated admission, forward-looking KV
//! scaling, CPU-first bin-packing with proactive preemption), the paper's
//! baselines, and the simulator that replays traces through them on a
//! virtual clock with profiled costs. It is pure, deterministic logic: it
//! must never read the wall clock, spawn threads or tasks, touch Wasm,
//! HTTP or an engine library, or learn a request's output length before a
//! driver reports the request finished. The live host and the simulator
//! drive the very same [`Scheduler`].

pub mod model;
pub mod predict;
pub mod profile;
pub mod report;
pub mod scheduler;
pub mod sim;
pub mod svg;
pub mod sweep;
pub mod trace;

pub use model::{CostModel, DeviceKind, ModelSpec, ModelTypeId, NodeSpec, PerKind};
pub use profile::{Profile, ProfileError};
pub use scheduler::{
    ActionId, ActionOp, Command, DropReason, InstanceId, InstanceSnapshot, ModelId, NodeId,
    NodeSnapshot, Policy, Probe, Request, RequestId, RequestOutcome, Scheduler, SchedulerConfig,
    Snapshot, bin_packing_order, routing_order,
};
pub use sim::{
    ClusterSim, KindSummary, RequestRecord, SimResult, SimSetup, Slo, Summary, simulate,
};
pub use trace::{TraceError, TraceFunction, TraceRequest, load_trace, select};
