//! CPU for guests: their own runtime, and fair shares between functions.
//!
//! Guests run on a runtime of their own, so a function that computes
//! without end cannot delay the server's HTTP work (accepting, `/healthz`,
//! streaming bodies): those stay on the I/O runtime. On the guest runtime a
//! busy guest gives its thread back at every epoch tick
//! ([`crate::limits::EPOCH_TICK_MS`]), and new invocations are picked up at
//! the next tick (the runtime looks at its queue of new tasks every poll).
//! While guests of several functions are busy, each function has an equal
//! share of the threads: at most that many of its guests run between two
//! ticks, and the rest wait for a turn, first come first — so functions
//! share the CPU, not instances. A guest counts as busy from its arrival,
//! so a short call (one that never reaches a tick) still makes the others
//! give way at once; one that stops ticking (it waits on I/O) soon holds
//! no turn.

use std::collections::{HashMap, HashSet, VecDeque};
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

/// Which guests of which functions have been busy lately, which are
/// running wasm now, and which wait for a turn.
pub(crate) struct Shares {
    threads: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per function: each busy guest's last tick (or arrival, or check for
    /// its turn).
    busy: HashMap<Arc<str>, HashMap<u64, Instant>>,
    /// Per function: the guests running between two of their ticks.
    running: HashMap<Arc<str>, HashSet<u64>>,
    /// Per function: the guests waiting for a turn, first come first.
    waiting: HashMap<Arc<str>, VecDeque<u64>>,
}

/// A guest is busy if it ticked (or checked for its turn) within this many
/// ticks; one that stopped ticking (it waits on I/O, or was dropped) holds
/// no turn and waits in no queue.
const BUSY_TICKS: u32 = 3;

impl State {
    /// Marks `guest` busy now and forgets guests that are no longer busy;
    /// returns how many functions are busy and `function`'s share of the
    /// threads.
    fn note(&mut self, function: &Arc<str>, guest: u64, threads: usize) -> (usize, usize) {
        let now = Instant::now();
        let recent = Duration::from_millis(EPOCH_TICK_MS) * BUSY_TICKS;
        self.busy
            .entry(function.clone())
            .or_default()
            .insert(guest, now);
        self.busy.retain(|_, guests| {
            guests.retain(|_, t| now.duration_since(*t) <= recent);
            !guests.is_empty()
        });
        let busy = &self.busy;
        let is_busy = |f: &Arc<str>, g: &u64| busy.get(f).is_some_and(|b| b.contains_key(g));
        self.running.retain(|f, guests| {
            guests.retain(|g| is_busy(f, g));
            !guests.is_empty()
        });
        self.waiting.retain(|f, guests| {
            guests.retain(|g| is_busy(f, g));
            !guests.is_empty()
        });
        let functions = self.busy.len();
        (functions, (threads / functions).max(1))
    }

    /// Ends `guest`'s run.
    fn forget_run(&mut self, function: &Arc<str>, guest: u64) {
        if let Some(g) = self.running.get_mut(function) {
            g.remove(&guest);
            if g.is_empty() {
                self.running.remove(function);
            }
        }
    }

    /// Forgets `guest` of `function` everywhere.
    fn forget(&mut self, function: &Arc<str>, guest: u64) {
        self.forget_run(function, guest);
        if let Some(g) = self.waiting.get_mut(function) {
            g.retain(|w| *w != guest);
            if g.is_empty() {
                self.waiting.remove(function);
            }
        }
        if let Some(g) = self.busy.get_mut(function) {
            g.remove(&guest);
            if g.is_empty() {
                self.busy.remove(function);
            }
        }
    }
}

impl Shares {
    pub fn new(threads: usize) -> Shares {
        Shares {
            threads: threads.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the arrival of guest `guest` of `function` (it is busy until
    /// it has not ticked for a while); the guest is forgotten when the
    /// returned guard drops.
    pub fn arrive(self: &Arc<Self>, function: &Arc<str>, guest: u64) -> Arrived {
        self.state().note(function, guest, self.threads);
        Arrived {
            shares: self.clone(),
            function: function.clone(),
            guest,
        }
    }

    /// At a tick of guest `guest` of `function`: whether it may go on at
    /// once (`None`: just yield), or must first wait for its turn (the
    /// future: while other functions are busy, at most its share of the
    /// threads run its guests, and its waiting guests take turns in order).
    pub fn tick(
        self: &Arc<Self>,
        function: &Arc<str>,
        guest: u64,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        if self.take_turn(function, guest, true) {
            return None;
        }
        let (shares, function) = (self.clone(), function.clone());
        Some(async move {
            while !shares.take_turn(&function, guest, false) {
                tokio::time::sleep(Duration::from_millis(EPOCH_TICK_MS)).await;
            }
        })
    }

    /// Ends `guest`'s run (at its tick) and starts its next if its function
    /// is within its share and no guest of it waits before this one; if
    /// not, queues it (once) and returns false.
    fn take_turn(&self, function: &Arc<str>, guest: u64, at_tick: bool) -> bool {
        let mut st = self.state();
        let (functions, share) = st.note(function, guest, self.threads);
        if at_tick {
            st.forget_run(function, guest);
        }
        let running = st.running.get(function).map_or(0, HashSet::len);
        let waiting = st.waiting.entry(function.clone()).or_default();
        let first = waiting.front().is_none_or(|w| *w == guest);
        let go = functions <= 1 || (running < share && first);
        if go {
            waiting.retain(|w| *w != guest);
            st.running
                .entry(function.clone())
                .or_default()
                .insert(guest);
        } else if !waiting.contains(&guest) {
            waiting.push_back(guest);
        }
        st.waiting.retain(|_, g| !g.is_empty());
        go
    }
}

/// A guest known to [`Shares`]; dropping it (the guest ended, or its task
/// was aborted) forgets it.
pub(crate) struct Arrived {
    shares: Arc<Shares>,
    function: Arc<str>,
    guest: u64,
}

impl Drop for Arrived {
    fn drop(&mut self) {
        self.shares.state().forget(&self.function, self.guest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_runs_at_most_its_share_while_another_is_busy() {
        let s = Arc::new(Shares::new(2));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        // Alone, busy guests of `a` go on at every tick.
        let a0 = s.arrive(&a, 0);
        let a1 = s.arrive(&a, 1);
        for _ in 0..3 {
            assert!(s.tick(&a, 0).is_none());
            assert!(s.tick(&a, 1).is_none());
        }
        // With `b` busy (from its arrival, before any tick of its own), each
        // function's share is one thread: one guest of `a` runs at a time,
        // its others wait in order, and `b`'s never waits.
        let b10 = s.arrive(&b, 10);
        assert!(s.tick(&a, 0).is_some(), "guest 1 still runs: 0 waits");
        assert!(
            s.tick(&a, 1).is_some(),
            "1 gives way to 0, who waited first"
        );
        assert!(s.take_turn(&a, 0, false), "the first waiter runs");
        assert!(!s.take_turn(&a, 1, false));
        assert!(s.tick(&b, 10).is_none());
        // At its next tick the runner gives way to the one that waits.
        assert!(s.tick(&a, 0).is_some(), "the runner waits its turn");
        assert!(s.take_turn(&a, 1, false), "the waiter runs");
        assert!(!s.take_turn(&a, 0, false));
        // With `b` gone, `a` has the threads again.
        drop(b10);
        assert!(s.take_turn(&a, 0, false));
        assert!(s.tick(&a, 1).is_none());
        drop((a0, a1));
        let st = s.state();
        assert!(st.busy.is_empty() && st.running.is_empty() && st.waiting.is_empty());
    }

    #[test]
    fn a_guest_that_stops_ticking_holds_no_turn() {
        let s = Arc::new(Shares::new(2));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let _a = (s.arrive(&a, 0), s.arrive(&a, 1));
        let _b = s.arrive(&b, 10);
        assert!(s.tick(&a, 0).is_none());
        assert!(s.tick(&a, 1).is_some());
        // Guest 0 now waits on I/O (no ticks) while `b` and guest 1 stay
        // busy: once guest 0 counts as idle, guest 1 gets the turn.
        let started = Instant::now();
        let mut turns = 0;
        while started.elapsed() < Duration::from_secs(1) {
            assert!(s.tick(&b, 10).is_none());
            if s.take_turn(&a, 1, false) {
                turns += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
        }
        assert_eq!(turns, 1, "the idle guest's turn is freed");
        assert!(
            started.elapsed() >= Duration::from_millis(EPOCH_TICK_MS) * BUSY_TICKS,
            "not before it counts as idle"
        );
    }
}
