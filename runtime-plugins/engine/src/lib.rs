//! The engine contract: what every slinfer inference backend (OpenVINO on the
//! CPU, CUDA on the GPU, the pure-Rust reference used by tests) implements, and
//! the backend-neutral pieces they all share — model configuration, GGUF and
//! safetensors readers with dequantisation, the paged KV block allocator and
//! block tables, the sampler, and a slow pure-Rust reference forward pass.
//!
//! This room must never know about functions, Wasm, HTTP or the scheduler's
//! policy: it sees models, devices, sequences of token ids, KV blocks and
//! logits. It loads no native library itself and has no `unsafe` code; the
//! backends do that at their own FFI borders.
//!
//! # Shape of the contract
//!
//! - A [`Backend`] enumerates its [`DeviceInfo`]s (memory as the driver reports
//!   it) and loads an [`LlmInstance`] of a model ([`ModelSource`]) on one device
//!   with an initial KV pool ([`LoadOptions`]).
//! - An [`LlmInstance`] owns its weights and a pool of KV blocks of
//!   [`LlmInstance::block_size_tokens`] tokens. The pool grows and shrinks on the
//!   scheduler's word ([`LlmInstance::resize_kv`]); shrinking may compact (move
//!   blocks in use below the new capacity) but never below the blocks in use.
//! - Sequences are named by the caller ([`SeqId`]); blocks are taken from the
//!   pool as tokens are appended. Pool exhaustion is an error
//!   ([`EngineError::KvExhausted`]) that leaves every sequence as it was.
//! - [`LlmInstance::step`] runs ONE iteration for a ragged batch: each
//!   [`StepEntry`] is a sequence and its new tokens (a prefill chunk, or the one
//!   token sampled last), and the result holds the last position's logits
//!   (f32, vocab) for each entry, in order. The flattened layout handed to the
//!   device ([`kv::BatchPlan`]) is the one OpenVINO's paged-attention IR takes
//!   (`past_lens`, `subsequence_begins`, `block_indices`,
//!   `block_indices_begins`), so both engines share it.
//! - Sampling happens on the host with [`sampler::Sampler`], whatever the
//!   backend.
//! - A backend tells what an instance of a package would hold on its devices
//!   ([`Backend::footprint`]) before loading it, so the scheduler can plan.
//! - Tensor models (`wasi:nn` graphs) have their own neutral contract in
//!   [`tensor`]: [`tensor::TensorBackend`] compiles, a
//!   [`tensor::TensorGraph`] is shared, a [`tensor::TensorContext`] computes.

pub mod config;
pub mod gguf;
pub mod kv;
pub mod package;
pub mod paired;
pub mod quant;
pub mod reference;
pub mod safetensors;
pub mod sampler;
pub mod tensor;
pub mod weights;

use std::path::PathBuf;

pub use config::ModelConfig;
pub use kv::{BatchPlan, BlockAllocator, KvManager};
pub use package::{ModelPackage, PackageManifest};
pub use sampler::{Logprobs, Sampler, SamplingParams, Seen, logprobs};
pub use slinfer_device::{DeviceKind, PerKind};
pub use weights::{LlamaWeights, WeightDType};

/// A sequence's name, chosen by the caller (the scheduler's request id).
pub type SeqId = u64;

/// The host's memory as `/proc/meminfo` reports it now (zeros where it
/// cannot be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl HostMemory {
    pub fn read() -> HostMemory {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let get = |k: &str| {
            text.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        HostMemory {
            total_bytes: get("MemTotal:"),
            available_bytes: get("MemAvailable:"),
        }
    }

    /// Host memory this process holds now: its proportional set size
    /// (`Pss` of `/proc/self/smaps_rollup`), so a file mapped twice, as a
    /// model's weights are by two instances, counts once; the resident set
    /// where that file is missing; 0 where neither can be read.
    pub fn process_bytes() -> u64 {
        let kb = |text: &str, key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let Some(kb) = std::fs::read_to_string("/proc/self/smaps_rollup")
            .ok()
            .and_then(|t| kb(&t, "Pss:"))
        {
            return kb * 1024;
        }
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|t| kb(&t, "VmRSS:"))
            .map_or(0, |kb| kb * 1024)
    }
}

/// What one instance of a model holds on a backend's device, known before
/// it is loaded (the scheduler plans with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    pub weights_bytes: u64,
    /// KV cache bytes per token over all layers (keys and values).
    pub kv_bytes_per_token: u64,
}

impl Footprint {
    /// Weights as large as `file` on disk (an engine that holds the file's
    /// contents as they are) and the given KV bytes per token.
    pub fn of_file(
        file: &std::path::Path,
        kv_bytes_per_token: u64,
    ) -> Result<Footprint, EngineError> {
        let weights_bytes = std::fs::metadata(file)
            .map_err(|e| EngineError::io(file, e))?
            .len();
        Ok(Footprint {
            weights_bytes,
            kv_bytes_per_token,
        })
    }

    /// Weights and KV at the given bytes per element, from the model's shape.
    pub fn of_config(config: &ModelConfig, weight_bytes: u64, kv_bytes: usize) -> Footprint {
        Footprint {
            weights_bytes: config.parameter_count() * weight_bytes,
            kv_bytes_per_token: config.kv_bytes_per_token(kv_bytes),
        }
    }
}

/// One device a backend can place instances on, with memory as its driver
/// reports it at the time of the call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// Index within the backend (CUDA ordinal for the GPU engine).
    pub index: usize,
    pub kind: DeviceKind,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

impl DeviceInfo {
    /// The host's CPU as a CPU engine's one device, with memory as
    /// `/proc/meminfo` reports it now.
    pub fn host_cpu() -> DeviceInfo {
        let m = HostMemory::read();
        DeviceInfo {
            index: 0,
            kind: DeviceKind::Cpu,
            name: "CPU".into(),
            total_bytes: m.total_bytes,
            free_bytes: m.available_bytes,
        }
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face folder: `config.json`, `model.safetensors` (or shards
    /// with `model.safetensors.index.json`).
    SafetensorsDir(PathBuf),
    /// A GGUF file (supported quantisations are dequantised on load).
    Gguf(PathBuf),
    /// A slinfer model package folder (`model.toml`, `model.gguf`, the
    /// stateful OpenVINO IR, `tokenizer.json`), as `scripts/models/import.py` writes
    /// it; see [`package`].
    Package(PathBuf),
    /// Random weights of the given shape (benchmarks, tests). Values are
    /// drawn uniformly from ±`scale` with a seeded generator.
    Random {
        config: ModelConfig,
        seed: u64,
        scale: f32,
    },
}

/// How to load an instance.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// KV blocks allocated at load time (the pool may grow and shrink later).
    pub initial_kv_blocks: usize,
    /// Tokens per KV block; `None` lets the backend choose its default.
    pub block_size_tokens: Option<usize>,
    /// Weight precision on the device; `None` lets the backend choose.
    pub dtype: Option<WeightDType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            initial_kv_blocks: 64,
            block_size_tokens: None,
            dtype: None,
        }
    }
}

/// One entry of a ragged batch: a sequence and the tokens it appends this
/// iteration (a prefill chunk, or the token sampled last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepEntry {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
}

/// Memory an instance holds, in bytes, plus the device's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MemoryReport {
    pub weight_bytes: u64,
    /// Bytes of the KV pool (capacity, not just blocks in use).
    pub kv_bytes: u64,
    /// Scratch buffers for activations, sized for the largest batch seen.
    pub workspace_bytes: u64,
    pub kv_blocks_capacity: usize,
    pub kv_blocks_in_use: usize,
    /// The device's free memory as its driver reports it (0 if unknown).
    pub device_free_bytes: u64,
    pub device_total_bytes: u64,
}

/// Errors of every backend. Each one is recoverable for the caller: nothing
/// here means the process must stop.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backend's native libraries or devices are absent.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("no device {0}")]
    NoDevice(usize),
    #[error("device error: {0}")]
    Device(String),
    /// A device allocation failed; the instance is unchanged.
    #[error("out of device memory allocating {requested_bytes} bytes: {detail}")]
    OutOfMemory {
        requested_bytes: u64,
        detail: String,
    },
    #[error("KV pool exhausted: need {needed} more blocks, {free} free")]
    KvExhausted { needed: usize, free: usize },
    #[error("cannot shrink KV pool to {requested} blocks: {in_use} in use")]
    ShrinkBelowUsage { requested: usize, in_use: usize },
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists")]
    SequenceExists(SeqId),
    /// A fork asked for more of a sequence's tokens than it holds.
    #[error("sequence {seq} holds {len} tokens, fewer than the {tokens} a fork would copy")]
    ForkBeyondSequence {
        seq: SeqId,
        tokens: usize,
        len: usize,
    },
    #[error("sequence {seq} would reach {len} tokens, beyond the context length {max}")]
    ContextOverflow { seq: SeqId, len: usize, max: usize },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("token id {token} out of the vocabulary ({vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    /// The model file or folder is malformed or inconsistent.
    #[error("bad model: {0}")]
    Model(String),
    /// A tensor type this build cannot read (named).
    #[error("unsupported tensor type {0}")]
    UnsupportedType(String),
    #[error("unsupported architecture {0:?}")]
    UnsupportedArchitecture(String),
    /// Something this backend does not do (named).
    #[error("not supported by this engine: {0}")]
    Unsupported(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

/// An inference backend: enumerates its devices and loads instances on them.
pub trait Backend: Send + Sync {
    /// Short name for logs and metrics ("cuda", "openvino", "reference").
    fn name(&self) -> &str;
    fn kind(&self) -> DeviceKind;
    /// Devices with memory as the driver reports it now. An empty list (not an
    /// error) when the backend works but has no device.
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError>;
    /// What an instance of `package` would hold on this backend's devices,
    /// or why the backend cannot load it (e.g. the package lacks the format
    /// it reads: [`EngineError::Model`]).
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError>;
    /// Bytes in use on `device` now, as this backend can measure them: the
    /// host memory of this process for a CPU engine, the device's used
    /// memory for a GPU; `None` where it cannot. The host measures each load
    /// against it (loads one at a time), so that what it plans with is what
    /// an instance really holds rather than [`Backend::footprint`]'s estimate.
    fn used_bytes(&self, device: usize) -> Option<u64> {
        let _ = device;
        None
    }
    /// Load one instance of a model on `device`.
    fn load(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<Box<dyn LlmInstance>, EngineError>;
}

/// The [`LlmInstance`] methods that only read the sequence bookkeeping,
/// for a backend whose instance keeps a [`KvManager`] in the named field
/// but adds and frees sequences itself (the llama.cpp engine names them in
/// its own cache too). Invoke it inside the `impl LlmInstance` block:
/// `slinfer_engine::delegate_kv_reads!(kv);`.
#[macro_export]
macro_rules! delegate_kv_reads {
    ($kv:ident) => {
        fn kv_capacity_blocks(&self) -> usize {
            self.$kv.capacity_blocks()
        }
        fn kv_blocks_in_use(&self) -> usize {
            self.$kv.used_blocks()
        }
        fn kv_blocks_held_only_by(&self, seqs: &[$crate::SeqId]) -> usize {
            self.$kv.blocks_held_only_by(seqs)
        }
        fn sequence_len(&self, seq: $crate::SeqId) -> Option<usize> {
            self.$kv.sequence_len(seq)
        }
        fn blocks_needed(&self, batch: &[$crate::StepEntry]) -> Result<usize, $crate::EngineError> {
            self.$kv.blocks_needed(batch)
        }
    };
}

/// The [`LlmInstance`] methods that only read or update the sequence
/// bookkeeping, written once for every backend whose instance keeps a
/// [`KvManager`] in the named field: [`delegate_kv_reads!`] and adding and
/// freeing sequences. Invoke it inside the `impl LlmInstance` block:
/// `slinfer_engine::delegate_kv_bookkeeping!(kv);`.
///
/// A macro rather than provided trait methods over a `kv_mut()` accessor: the
/// trait is what the host holds, and a public `&mut KvManager` would let a
/// caller grow the block tables past the device caches behind them.
#[macro_export]
macro_rules! delegate_kv_bookkeeping {
    ($kv:ident) => {
        $crate::delegate_kv_reads!($kv);
        fn add_sequence(&mut self, seq: $crate::SeqId) -> Result<(), $crate::EngineError> {
            self.$kv.add_sequence(seq)
        }
        fn free_sequence(&mut self, seq: $crate::SeqId) -> Result<(), $crate::EngineError> {
            self.$kv.free_sequence(seq)
        }
    };
}

/// What a retired sequence ([`LlmInstance::retire_sequence`]) costs the
/// steps of the sequences that go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetiredCost {
    /// Nothing: each sequence attends over its own blocks only.
    Nothing,
    /// Every step reads over its cells as well (llama.cpp's unified cache
    /// spans the cells of every sequence it holds), so it is worth keeping
    /// only until the next step.
    EveryStep,
}

/// One loaded model on one device, with its own KV pool and sequences.
pub trait LlmInstance: Send {
    fn config(&self) -> &ModelConfig;
    fn block_size_tokens(&self) -> usize;
    /// Bytes of one KV block over all layers (keys and values).
    fn kv_bytes_per_block(&self) -> u64;
    fn weight_bytes(&self) -> u64;
    fn kv_capacity_blocks(&self) -> usize;
    fn kv_blocks_in_use(&self) -> usize;
    /// Blocks that freeing every sequence in `seqs` would give back: those
    /// of theirs no other sequence shares (what the retired sequences a
    /// caller keeps hold beyond the live ones).
    fn kv_blocks_held_only_by(&self, seqs: &[SeqId]) -> usize;
    /// Grow or shrink the pool to exactly `blocks`. Shrinking below the blocks
    /// in use is [`EngineError::ShrinkBelowUsage`]; a failed allocation is
    /// [`EngineError::OutOfMemory`] and leaves the pool as it was.
    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError>;
    fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError>;
    /// Free a sequence and return its blocks to the pool (a block it shares
    /// with a fork goes back with its last holder).
    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError>;
    /// Make `dst` a copy of the first `tokens` of sequence `src` (all it
    /// holds, or fewer: a prompt that begins as `src` did) without
    /// recomputing them: `dst` shares `src`'s full KV blocks among them and
    /// gets a copy of a partly filled last one ([`KvManager::fork`]).
    /// Several continuations of one prompt cost its KV once. More tokens
    /// than `src` holds is [`EngineError::ForkBeyondSequence`]; nothing
    /// changes on an error.
    fn fork_sequence(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), EngineError>;
    /// Marks a sequence that will take no more steps but is kept as a
    /// source of copies ([`Self::fork_sequence`]) until it is freed: a
    /// finished request's prompt and answer, which the next prompt of a
    /// conversation begins with. Says what keeping it costs the other
    /// sequences' steps. The caller frees it when it needs its blocks.
    /// Paged engines keep each sequence's KV apart:
    /// [`RetiredCost::Nothing`], the default.
    fn retire_sequence(&mut self, seq: SeqId) -> Result<RetiredCost, EngineError> {
        self.sequence_len(seq)
            .map(|_| RetiredCost::Nothing)
            .ok_or(EngineError::UnknownSequence(seq))
    }
    /// Tokens the sequence holds in the KV cache.
    fn sequence_len(&self, seq: SeqId) -> Option<usize>;
    /// Blocks this batch would take from the pool (for admission).
    fn blocks_needed(&self, batch: &[StepEntry]) -> Result<usize, EngineError>;
    /// Run one iteration; see the crate docs. On error no sequence advances.
    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError>;
    /// The final hidden state (after the model's last norm) that the last
    /// successful [`Self::step`]'s logits were computed from: one row per
    /// batch entry, of its last token, `hidden_size` wide (what embeddings
    /// are pooled from). [`EngineError::Unsupported`] where a backend cannot
    /// give it.
    fn last_hidden(&mut self) -> Result<Vec<Vec<f32>>, EngineError> {
        Err(EngineError::Unsupported(
            "final hidden states (embeddings)".into(),
        ))
    }
    fn memory(&self) -> MemoryReport;
}
