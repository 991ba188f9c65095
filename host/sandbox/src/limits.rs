//! Every limit the host enforces, with its default, in one place.

use serde::{Deserialize, Serialize};

/// A function's resource limits, after the manifest's values and the defaults
/// are merged. Units are in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionLimits {
    /// Linear memory a single instance may grow to.
    pub memory_bytes: u64,
    /// Wall-clock time for one request, from instantiation to the end of the
    /// response body.
    pub timeout_ms: u64,
    /// Instances of this function running at once.
    pub max_concurrency: u32,
    /// Requests waiting for a free instance; beyond it the answer is 429.
    pub max_queue: u32,
    /// Largest request body accepted (413 beyond).
    pub max_request_body_bytes: u64,
    /// Largest response body a guest may send; the response is cut beyond it.
    pub max_response_body_bytes: u64,
}

impl Default for FunctionLimits {
    fn default() -> Self {
        FunctionLimits {
            memory_bytes: 64 << 20,
            timeout_ms: 30_000,
            max_concurrency: 64,
            max_queue: 1024,
            max_request_body_bytes: 8 << 20,
            max_response_body_bytes: 64 << 20,
        }
    }
}

/// Ceilings a manifest may not exceed, and host-wide sizes.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// The most memory any function may ask for (also the pooling
    /// allocator's slot size).
    pub max_function_memory_bytes: u64,
    /// Largest request timeout a manifest may set.
    pub max_timeout_ms: u64,
    /// Largest uploaded package archive.
    pub max_package_bytes: u64,
    /// Most entries (files and directories) a package archive may hold.
    pub max_package_entries: u32,
    /// Instances alive at once across all functions (pooling allocator slots).
    pub total_instances: u32,
    /// Table elements per table.
    pub max_table_elements: usize,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            max_function_memory_bytes: 1 << 30,
            max_timeout_ms: 15 * 60 * 1000,
            max_package_bytes: 64 << 20,
            max_package_entries: 4096,
            total_instances: 1000,
            max_table_elements: 100_000,
        }
    }
}

/// How often the epoch ticks; the wall-clock timeout is checked and a busy
/// guest yields its thread at this granularity (so a new invocation waits
/// at most about this long for one).
pub const EPOCH_TICK_MS: u64 = 1;

/// How long a client is told to wait before retrying a refused request.
pub const RETRY_AFTER_S: u64 = 1;
