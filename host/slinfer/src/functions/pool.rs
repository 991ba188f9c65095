//! The host-wide pool of instance slots, shared fairly between functions.
//!
//! Every running instance holds one of `total` slots (the pooling
//! allocator's size). A function may take a free slot unless that would eat
//! into what others are owed:
//!
//! - a standing reserve of `total / 8` (at least 1) is kept for functions
//!   that hold nothing yet, so a newcomer is served at once however busy the
//!   rest is;
//! - each function waiting for a slot is owed its fair share (the rest,
//!   divided by the functions active) less what it holds: a function at or
//!   above its share takes only what nobody below theirs is owed, so slots
//!   freed go to the ones below.
//!
//! A function alone on the host still gets `total − total/8` slots; one that
//! saturates its share cannot starve another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[cfg(test)]
use std::time::Duration;

#[derive(Default)]
struct State {
    in_use: u32,
    /// Per function: slots held, and requests waiting for one.
    held: HashMap<Arc<str>, u32>,
    waiting: HashMap<Arc<str>, u32>,
}

impl State {
    fn active(&self) -> u32 {
        let mut names: Vec<&Arc<str>> = self.held.keys().collect();
        names.extend(self.waiting.keys().filter(|k| !self.held.contains_key(*k)));
        names.len() as u32
    }
}

/// The pool; share it as `Arc<SlotPool>`.
pub struct SlotPool {
    total: u32,
    state: Mutex<State>,
    freed: Notify,
}

/// One slot, returned to the pool when dropped.
pub struct Slot {
    pool: Arc<SlotPool>,
    function: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.pool.lock();
        s.in_use -= 1;
        if let Some(h) = s.held.get_mut(&self.function) {
            *h -= 1;
            if *h == 0 {
                s.held.remove(&self.function);
            }
        }
        drop(s);
        self.pool.freed.notify_waiters();
    }
}

impl SlotPool {
    pub fn new(total: u32) -> Arc<SlotPool> {
        Arc::new(SlotPool {
            total: total.max(1),
            state: Mutex::new(State::default()),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots kept for functions that hold none.
    fn standing_reserve(&self) -> u32 {
        (self.total / 8).max(1)
    }

    /// Whether `function` may take a slot now.
    fn may_take(&self, s: &State, function: &Arc<str>) -> bool {
        if s.in_use >= self.total {
            return false;
        }
        let held = s.held.get(function).copied().unwrap_or(0);
        if held == 0 {
            // A newcomer may take from the standing reserve.
            return true;
        }
        let reserve = self.standing_reserve();
        let share = (self.total - reserve) / s.active().max(1);
        let owed: u32 = if held < share {
            0
        } else {
            s.waiting
                .keys()
                .filter(|g| *g != function)
                .map(|g| share.saturating_sub(s.held.get(g).copied().unwrap_or(0)))
                .sum()
        };
        s.in_use + 1 + reserve + owed <= self.total
    }

    fn take(self: &Arc<Self>, s: &mut State, function: &Arc<str>) -> Slot {
        s.in_use += 1;
        *s.held.entry(function.clone()).or_insert(0) += 1;
        Slot {
            pool: self.clone(),
            function: function.clone(),
        }
    }

    /// A slot for `function` if it may take one now.
    pub fn try_acquire(self: &Arc<Self>, function: &Arc<str>) -> Option<Slot> {
        let mut s = self.lock();
        self.may_take(&s, function)
            .then(|| self.take(&mut s, function))
    }

    /// Takes a slot for `function`, waiting while it may not.
    pub async fn acquire(self: &Arc<Self>, function: &Arc<str>) -> Slot {
        let mut waiting = Waiting {
            pool: self,
            function,
            queued: false,
        };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if self.may_take(&s, function) {
                    if waiting.queued {
                        leave_queue(&mut s, function);
                        waiting.queued = false;
                    }
                    return self.take(&mut s, function);
                }
                if !waiting.queued {
                    *s.waiting.entry(function.clone()).or_insert(0) += 1;
                    waiting.queued = true;
                }
            }
            // Re-checked on every change (a waiter's share changes others').
            freed.await;
        }
    }

    /// Slots in use, and held by `function`.
    pub fn usage(&self, function: &str) -> (u32, u32) {
        let s = self.lock();
        (s.in_use, s.held.get(function).copied().unwrap_or(0))
    }
}

fn leave_queue(s: &mut State, function: &Arc<str>) {
    if let Some(w) = s.waiting.get_mut(function) {
        *w -= 1;
        if *w == 0 {
            s.waiting.remove(function);
        }
    }
}

/// A request queued for a slot; taken off the queue if its wait is
/// abandoned (its caller left, or its queue time ran out).
struct Waiting<'a> {
    pool: &'a Arc<SlotPool>,
    function: &'a Arc<str>,
    queued: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.queued {
            leave_queue(&mut self.pool.lock(), self.function);
            self.pool.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Arc<str> {
        s.into()
    }

    #[tokio::test]
    async fn a_function_alone_leaves_the_standing_reserve() {
        let pool = SlotPool::new(16);
        let a = name("a");
        let mut slots = Vec::new();
        for _ in 0..14 {
            slots.push(pool.acquire(&a).await);
        }
        // 16 − 16/8 = 14: the 15th waits.
        let more = tokio::time::timeout(Duration::from_millis(50), pool.acquire(&a)).await;
        assert!(more.is_err());
        // A newcomer is served at once from the reserve.
        let b = pool.acquire(&name("b")).await;
        assert_eq!(pool.usage("b"), (15, 1));
        drop(b);
        drop(slots);
        assert_eq!(pool.usage("a"), (0, 0));
    }

    #[tokio::test]
    async fn slots_freed_above_a_share_go_to_the_function_below_its_share() {
        let pool = SlotPool::new(8);
        let (a, b) = (name("a"), name("b"));
        let mut held_a = Vec::new();
        for _ in 0..7 {
            held_a.push(pool.acquire(&a).await);
        }
        let b1 = pool.acquire(&b).await; // the reserve
        // b waits for more; a frees two (the reserve is refilled first):
        // the second goes to b (share 3), not to a's own waiter.
        let pool2 = pool.clone();
        let b_more = tokio::spawn(async move { pool2.acquire(&name("b")).await });
        let pool3 = pool.clone();
        let a_more = tokio::spawn(async move { pool3.acquire(&name("a")).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        held_a.pop();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!b_more.is_finished() && !a_more.is_finished());
        held_a.pop();
        let b2 = tokio::time::timeout(Duration::from_secs(1), b_more)
            .await
            .expect("b waits")
            .unwrap();
        assert_eq!(pool.usage("b"), (7, 2));
        assert!(!a_more.is_finished());
        // An abandoned wait leaves the queue.
        a_more.abort();
        assert!(a_more.await.is_err_and(|e| e.is_cancelled()));
        drop((b1, b2, held_a));
        assert_eq!(pool.usage("a"), (0, 0));
        assert!(pool.lock().waiting.is_empty());
    }
}
