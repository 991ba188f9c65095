//! CPU for guests: their own runtime, and fair shares between functions.
//!
//! Guests run on a runtime of their own, so a function that computes
//! without end cannot delay the server's HTTP work (accepting, `/healthz`,
//! streaming bodies): those stay on the I/O runtime. On the guest runtime a
//! busy guest gives its thread back at every epoch tick
//! ([`crate::limits::EPOCH_TICK_MS`]), new invocations are picked up at the
//! next tick (the runtime looks at its queue of new tasks every poll), and
//! while guests of several functions are busy, a function holding more
//! busy guests than its share of the threads sleeps a tick at each of its
//! ticks — so functions share the CPU, not instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::limits::EPOCH_TICK_MS;

/// The runtime guests run on; shut down in the background when dropped
/// (the sandbox may be dropped inside the I/O runtime).
pub(crate) struct GuestRuntime(Option<tokio::runtime::Runtime>);

impl GuestRuntime {
    pub fn new(threads: usize) -> std::io::Result<GuestRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("slinfer-guest")
            // New invocations wait at most a tick for a thread, and the
            // guests' own I/O (outbound HTTP, timers) is polled often.
            .global_queue_interval(1)
            .event_interval(4)
            .enable_all()
            .build()?;
        Ok(GuestRuntime(Some(rt)))
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running").handle()
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Which guests of which functions have been busy lately.
pub(crate) struct Shares {
    threads: usize,
    /// Per function: each busy guest's last tick.
    busy: Mutex<HashMap<Arc<str>, HashMap<u64, Instant>>>,
}

/// A guest is busy if it ticked within this many ticks.
const BUSY_TICKS: u32 = 3;

impl Shares {
    pub fn new(threads: usize) -> Shares {
        Shares {
            threads: threads.max(1),
            busy: Mutex::new(HashMap::new()),
        }
    }

    /// Records a tick of guest `guest` of `function`; returns how long it
    /// should sleep before going on (zero: just yield).
    pub fn tick(&self, function: &Arc<str>, guest: u64) -> Duration {
        let now = Instant::now();
        let recent = Duration::from_millis(EPOCH_TICK_MS) * BUSY_TICKS;
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.entry(function.clone()).or_default().insert(guest, now);
        busy.retain(|_, guests| {
            guests.retain(|_, t| now.duration_since(*t) <= recent);
            !guests.is_empty()
        });
        let functions = busy.len();
        let mine = busy.get(function).map_or(0, HashMap::len);
        let share = (self.threads / functions).max(1);
        if functions > 1 && mine > share {
            Duration::from_millis(EPOCH_TICK_MS)
        } else {
            Duration::ZERO
        }
    }

    /// Forgets a guest that ended.
    pub fn done(&self, function: &Arc<str>, guest: u64) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(guests) = busy.get_mut(function) {
            guests.remove(&guest);
            if guests.is_empty() {
                busy.remove(function);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_over_its_share_sleeps_only_while_another_is_busy() {
        let s = Shares::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        // Alone, four busy guests of `a` just yield.
        for g in 0..4 {
            assert_eq!(s.tick(&a, g), Duration::ZERO);
        }
        // With `b` busy, each function's share is one thread: `a`'s guests
        // sleep, `b`'s one does not.
        assert_eq!(s.tick(&b, 10), Duration::ZERO);
        assert!(s.tick(&a, 0) > Duration::ZERO);
        s.done(&b, 10);
        assert_eq!(s.tick(&a, 1), Duration::ZERO);
    }
}
