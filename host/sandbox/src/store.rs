//! Per-request store data: each interface's context (WASI, wasi-http with
//! the outbound policy, slinfer:llm, wasi:nn), the resource table they
//! share, and the memory limiter. It implements each interface's view; the
//! interface modules never import it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::http::OutboundPolicy;
use crate::llm::{LlmCtx, LlmCtxView, LlmView};
use crate::nn::{NnCtx, NnCtxView, NnView};
use slinfer_inference::MemoryBudget;

/// What one guest instance's store holds.
pub struct GuestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: GuestLimiter,
    pub(crate) outbound: OutboundPolicy,
    pub(crate) llm: LlmCtx,
    pub(crate) nn: NnCtx,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Which memory bound a failed call ran into, so the error can say so (a
/// Rust guest aborts on allocation failure, which otherwise looks like any
/// other trap).
#[derive(Debug, Default)]
pub struct MemoryHit {
    /// The function's own `limits.memory_bytes`.
    pub(crate) limit: AtomicBool,
    /// The host-wide memory budget.
    pub(crate) host: AtomicBool,
}

/// Caps linear memory and tables; reserves each memory's growth in the
/// host-wide budget and gives it back when the store is dropped.
pub struct GuestLimiter {
    pub(crate) memory_bytes: usize,
    pub(crate) table_elements: usize,
    pub(crate) hit: Arc<MemoryHit>,
    pub(crate) budget: Arc<MemoryBudget>,
    /// Bytes reserved in `budget` for this store's memories.
    pub(crate) reserved: u64,
}

impl wasmtime::ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit.limit.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        let grow = desired.saturating_sub(current) as u64;
        if !self.budget.try_reserve_functions(grow) {
            self.hit.host.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        self.reserved += grow;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }
}

impl Drop for GuestLimiter {
    fn drop(&mut self) {
        self.budget.release_functions(self.reserved);
    }
}

impl LlmView for GuestState {
    fn llm(&mut self) -> LlmCtxView<'_> {
        LlmCtxView {
            ctx: &mut self.llm,
            table: &mut self.table,
        }
    }
}

impl NnView for GuestState {
    fn nn(&mut self) -> NnCtxView<'_> {
        NnCtxView {
            ctx: &mut self.nn,
            table: &mut self.table,
        }
    }
}
