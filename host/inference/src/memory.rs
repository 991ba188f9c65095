//! The host-wide memory budget: one figure that what functions hold (their
//! Wasm memories, and the tensors and graphs they hold through `wasi:nn`)
//! and the inference instances on the CPU draw from, so that neither can
//! take what the other has counted on.
//!
//! - The sandbox reserves each Wasm memory's growth, and each `wasi:nn`
//!   tensor, here before it happens
//!   ([`MemoryBudget::try_reserve_functions`]) and gives it back when freed
//!   or when the instance ends; a refused reservation fails the call with a
//!   clear error.
//! - The inference driver plans CPU instances (weights, measured overhead,
//!   KV) within [`MemoryBudget::engine_capacity`] and publishes what it has
//!   committed ([`MemoryBudget::set_engines`]).
//! - A thread of its own re-reads the host every second
//!   ([`MemoryBudget::refresh`]): the total follows
//!   `MemAvailable` (so a second server, or any other process, taking memory
//!   shrinks it), and what this process holds beyond both counts
//!   (allocator slack, engine workspaces, compiled code) is set aside as
//!   `untracked` rather than planned twice.
//!
//! The two sides check against one another's last published figure: a
//! function may reserve in the moment between the driver reading the room and
//! publishing its commitment, so the budget can be exceeded by that much
//! (bounded by one growth step per running call).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use slinfer_engine::HostMemory;

/// Host memory left to the rest of the machine when the budget follows
/// what the host has: `MemAvailable` less this.
pub const HOST_MEMORY_MARGIN_BYTES: u64 = 2 << 30;
/// Changes of the host's memory smaller than this do not move the budget.
const REFRESH_STEP_BYTES: u64 = 32 << 20;
/// How often a budget that follows the host re-reads it.
pub const MEMORY_REFRESH: Duration = Duration::from_secs(1);

/// The host-wide budget (see the module docs); share it as an `Arc`.
#[derive(Debug)]
pub struct MemoryBudget {
    /// The operator's bound (`serve --memory-budget`), if any.
    limit: Option<u64>,
    /// Whether it reads the host's and the process's memory (the total
    /// follows the host, and untracked memory is set aside).
    follows_host: bool,
    total: AtomicU64,
    functions: AtomicU64,
    engines: AtomicU64,
    untracked: AtomicU64,
    process: AtomicU64,
    /// The process's own memory when the budget was made.
    process_at_start: u64,
}

/// The budget's figures, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryUse {
    /// What functions and CPU instances may hold together.
    pub total_bytes: u64,
    /// Reserved by functions (Wasm memories, `wasi:nn` tensors).
    pub functions_bytes: u64,
    /// Committed by the scheduler to instances on the CPU.
    pub engines_bytes: u64,
    /// What the process holds beyond both and its size at start.
    pub untracked_bytes: u64,
    /// The process's memory at the last refresh (proportional set size).
    pub process_bytes: u64,
}

impl MemoryBudget {
    /// A budget of at most `limit` bytes (all of them when `None`), never
    /// more than the host has: `MemAvailable` less
    /// [`HOST_MEMORY_MARGIN_BYTES`], re-read every [`MEMORY_REFRESH`] by a
    /// thread that ends when the budget is dropped.
    pub fn new(limit: Option<u64>) -> std::io::Result<Arc<MemoryBudget>> {
        let b = MemoryBudget::with(limit, true);
        b.refresh();
        let b = Arc::new(b);
        let weak = Arc::downgrade(&b);
        std::thread::Builder::new()
            .name("slinfer-memory".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(MEMORY_REFRESH);
                    match weak.upgrade() {
                        Some(b) => b.refresh(),
                        None => return,
                    };
                }
            })?;
        Ok(b)
    }

    /// A fixed budget of `total_bytes` that counts only what is reserved and
    /// published, whatever the host and the process hold (tests, and tools
    /// that share no host).
    pub fn fixed(total_bytes: u64) -> Arc<MemoryBudget> {
        let b = MemoryBudget::with(Some(total_bytes), false);
        b.total.store(total_bytes, Ordering::Relaxed);
        Arc::new(b)
    }

    fn with(limit: Option<u64>, follows_host: bool) -> MemoryBudget {
        let process = HostMemory::process_bytes();
        MemoryBudget {
            limit,
            follows_host,
            total: AtomicU64::new(0),
            functions: AtomicU64::new(0),
            engines: AtomicU64::new(0),
            untracked: AtomicU64::new(0),
            process: AtomicU64::new(process),
            process_at_start: process,
        }
    }

    /// Re-reads the host's and the process's memory; returns the figures.
    pub fn refresh(&self) -> MemoryUse {
        if !self.follows_host {
            return self.usage();
        }
        let process = HostMemory::process_bytes();
        self.process.store(process, Ordering::Relaxed);
        let growth = process.saturating_sub(self.process_at_start);
        let counted = self.functions.load(Ordering::Relaxed) + self.engines.load(Ordering::Relaxed);
        self.untracked
            .store(growth.saturating_sub(counted), Ordering::Relaxed);
        // What others leave us: what is available plus what we took.
        let host =
            (HostMemory::read().available_bytes + growth).saturating_sub(HOST_MEMORY_MARGIN_BYTES);
        let total = self.limit.map_or(host, |l| l.min(host));
        let old = self.total.load(Ordering::Relaxed);
        if old.abs_diff(total) >= REFRESH_STEP_BYTES || old == 0 {
            // Other processes move it all the time: a debug line, not info.
            if old != 0 {
                tracing::debug!(
                    from = old,
                    to = total,
                    "the host's memory changed: memory budget re-read"
                );
            }
            self.total.store(total, Ordering::Relaxed);
        }
        self.usage()
    }

    /// The figures as last published and refreshed.
    pub fn usage(&self) -> MemoryUse {
        MemoryUse {
            total_bytes: self.total.load(Ordering::Relaxed),
            functions_bytes: self.functions.load(Ordering::Relaxed),
            engines_bytes: self.engines.load(Ordering::Relaxed),
            untracked_bytes: self.untracked.load(Ordering::Relaxed),
            process_bytes: self.process.load(Ordering::Relaxed),
        }
    }

    /// Reserves `bytes` for a function (a Wasm memory's growth, a tensor);
    /// false (nothing reserved) when the budget has no room for it.
    pub fn try_reserve_functions(&self, bytes: u64) -> bool {
        let others = self.engines.load(Ordering::Relaxed) + self.untracked.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        self.functions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes + others <= total).then_some(held + bytes)
            })
            .is_ok()
    }

    /// Gives back what [`MemoryBudget::try_reserve_functions`] reserved.
    pub fn release_functions(&self, bytes: u64) {
        let _ = self
            .functions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(w.saturating_sub(bytes))
            });
    }

    /// What the scheduler has committed to CPU instances now.
    pub fn set_engines(&self, bytes: u64) {
        self.engines.store(bytes, Ordering::Relaxed);
    }

    /// What CPU instances may hold together: the total less what functions
    /// reserved and the untracked memory.
    pub fn engine_capacity(&self) -> u64 {
        let u = self.usage();
        u.total_bytes
            .saturating_sub(u.functions_bytes)
            .saturating_sub(u.untracked_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_and_engines_draw_from_one_total() {
        let b = MemoryBudget::fixed(1000);
        assert!(b.try_reserve_functions(600));
        assert_eq!(b.engine_capacity(), 400);
        b.set_engines(300);
        assert!(!b.try_reserve_functions(200), "600 + 300 + 200 > 1000");
        assert_eq!(b.usage().functions_bytes, 600, "a refusal reserves nothing");
        assert!(b.try_reserve_functions(100));
        b.release_functions(700);
        assert_eq!(b.usage().functions_bytes, 0);
        assert_eq!(b.engine_capacity(), 1000);
        // Releasing more than is held never wraps.
        b.release_functions(5);
        assert_eq!(b.usage().functions_bytes, 0);
    }

    #[test]
    fn a_budget_following_the_host_is_bounded_by_its_limit_and_the_host() {
        let host = HostMemory::read().available_bytes;
        let b = MemoryBudget::new(Some(1 << 30)).unwrap();
        assert!(b.usage().total_bytes <= 1 << 30);
        let all = MemoryBudget::new(None).unwrap();
        let total = all.usage().total_bytes;
        assert!(total > 0 && total <= host, "{total} of {host}");
        assert!(all.usage().process_bytes > 0, "the process reads itself");
    }
}
