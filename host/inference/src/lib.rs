//! # slinfer-inference
//!
//! The live inference path: "request → scheduler (wall clock) → engines on
//! every device → token stream". [`Inference::start`] opens the models dir
//! and starts one driver thread that owns the [`slinfer_scheduler::Scheduler`]
//! (policy `slinfer`); every [`Device`] handed in is one scheduler node, and
//! every loaded instance has its own runner thread (loads, KV resizes,
//! unloads and iterations run there, never on an async worker). A runner
//! runs an iteration's ragged batch and hands each request's logits to its
//! [`GenerationStream`]'s generation, which samples, detokenizes, decides
//! the stop, and sends the text straight to the caller. `wasi:nn` graphs
//! ([`graphs`]) compile and compute on a [`tensor::TensorBackend`] handed in
//! the same way.
//!
//! This crate never imports wasmtime or an engine crate: engines arrive as
//! [`slinfer_engine::Backend`]s inside [`Device`]s, so its tests run on the
//! pure-Rust reference engine. Defaults are in [`api`].

mod api;
mod catalog;
mod constraint;
mod cost;
mod devices;
mod driver;
mod generation;
pub mod graphs;
mod held;
mod memory;
mod metrics;
pub mod recent;
mod runner;
mod service;
mod stats;
mod text;

pub use api::*;
pub use cost::PlanProfile;
pub use devices::{
    Device, GPU_MEMORY_MARGIN_BYTES, GPU_MEMORY_MARGIN_FRACTION, gpu_capacity_bytes,
};
pub use driver::live_scheduler_config;
pub use generation::{GenerationStream, Relay};
pub use memory::{HOST_MEMORY_MARGIN_BYTES, MemoryBudget, MemoryUse};
pub use metrics::{
    DeviceLabel, DeviceLabels, LlmMetrics, ModelLabel, ModelTally, OutcomeLabels, SloLabels,
};
pub use runner::{next_prefill_step, prefill_chunk_tokens};
pub use service::{Inference, InferenceConfig, Remote};
/// The neutral tensor types `wasi:nn` carries (from the engine contract).
pub use slinfer_engine::tensor;
