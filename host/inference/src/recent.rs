//! What happened in the last 15 minutes, second by second: the figures a
//! dashboard shows over windows (rates, percentiles, SLO attainment), which
//! Prometheus counters and histograms cannot give without a Prometheus.
//!
//! [`Recent`] keeps one tally per wall-clock second for [`KEPT_SECONDS`];
//! [`Samples`] keeps a bounded, evenly drawn part of one second's latencies
//! and [`percentiles`] weights each second's part by what it stands for.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How far back [`Recent`] remembers.
pub const KEPT_SECONDS: u64 = 15 * 60;

/// Values [`Samples`] keeps of one second.
const KEPT_SAMPLES: usize = 64;

/// The current Unix second.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Per-second tallies `T` over the last [`KEPT_SECONDS`].
#[derive(Debug)]
pub struct Recent<T> {
    seconds: Mutex<VecDeque<(u64, T)>>,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            seconds: Mutex::new(VecDeque::new()),
        }
    }
}

impl<T: Default> Recent<T> {
    /// Adds to the current second's tally.
    pub fn record(&self, f: impl FnOnce(&mut T)) {
        self.record_at(unix_now(), f);
    }

    /// Adds to second `at`'s tally. A clock that went back adds to the
    /// newest second kept.
    pub fn record_at(&self, at: u64, f: impl FnOnce(&mut T)) {
        let mut seconds = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        if seconds.back().is_none_or(|(s, _)| *s < at) {
            seconds.push_back((at, T::default()));
            while seconds.front().is_some_and(|(s, _)| s + KEPT_SECONDS <= at) {
                seconds.pop_front();
            }
        }
        let (_, tally) = seconds.back_mut().expect("a second was just pushed");
        f(tally);
    }

    /// Reads the tallies of the seconds kept, oldest first.
    pub fn read<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = (u64, &T)>) -> R) -> R {
        let seconds = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut seconds.iter().map(|(s, t)| (*s, t)))
    }
}

/// Up to [`KEPT_SAMPLES`] values of one second, drawn evenly from all it saw
/// (reservoir sampling), and how many it saw.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    seen: u32,
    kept: Vec<f32>,
}

impl Samples {
    pub fn add(&mut self, value: f64) {
        self.seen += 1;
        if self.kept.len() < KEPT_SAMPLES {
            self.kept.push(value as f32);
        } else {
            let slot = (splitmix64(u64::from(self.seen)) % u64::from(self.seen)) as usize;
            if slot < KEPT_SAMPLES {
                self.kept[slot] = value as f32;
            }
        }
    }

    /// How many values it saw.
    pub fn seen(&self) -> u32 {
        self.seen
    }
}

/// A well-mixed hash of `x` (the reservoir's slot choice).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `qs` quantiles (0..=1) of the values of several seconds, each kept
/// value standing for `seen / kept` of its second's; `None` for no values.
pub fn percentiles<'a>(seconds: impl Iterator<Item = &'a Samples>, qs: &[f64]) -> Vec<Option<f64>> {
    let mut weighted: Vec<(f32, f64)> = Vec::new();
    for s in seconds.filter(|s| !s.kept.is_empty()) {
        let weight = f64::from(s.seen) / s.kept.len() as f64;
        weighted.extend(s.kept.iter().map(|v| (*v, weight)));
    }
    if weighted.is_empty() {
        return vec![None; qs.len()];
    }
    weighted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    qs.iter()
        .map(|q| {
            let goal = q * total;
            let mut sum = 0.0;
            let at = weighted
                .iter()
                .find(|(_, w)| {
                    sum += w;
                    sum >= goal
                })
                .unwrap_or(weighted.last().expect("not empty"));
            Some(f64::from(at.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_older_than_the_window_are_dropped_and_a_clock_going_back_adds_to_the_newest() {
        let r: Recent<u32> = Recent::default();
        r.record_at(1_000, |t| *t += 1);
        r.record_at(1_000, |t| *t += 1);
        r.record_at(1_001, |t| *t += 5);
        r.record_at(999, |t| *t += 1);
        assert_eq!(
            r.read(|it| it.map(|(s, t)| (s, *t)).collect::<Vec<_>>()),
            vec![(1_000, 2), (1_001, 6)]
        );
        r.record_at(1_000 + KEPT_SECONDS, |t| *t += 1);
        assert_eq!(
            r.read(|it| it.map(|(s, _)| s).collect::<Vec<_>>()),
            vec![1_001, 1_000 + KEPT_SECONDS]
        );
    }

    #[test]
    fn percentiles_weight_each_second_by_what_it_saw() {
        // One second saw 1,000 values of 1.0 (keeps 64); another saw one 9.0.
        let mut busy = Samples::default();
        for _ in 0..1_000 {
            busy.add(1.0);
        }
        let mut quiet = Samples::default();
        quiet.add(9.0);
        assert_eq!(busy.seen(), 1_000);
        let p = percentiles([&busy, &quiet].into_iter(), &[0.5, 0.99, 1.0]);
        assert_eq!(p, vec![Some(1.0), Some(1.0), Some(9.0)]);
        assert_eq!(percentiles(std::iter::empty(), &[0.5]), vec![None]);
    }

    #[test]
    fn a_reservoir_keeps_an_even_draw_of_a_long_second() {
        let mut s = Samples::default();
        for i in 0..10_000 {
            s.add(f64::from(i));
        }
        assert_eq!(s.kept.len(), KEPT_SAMPLES);
        let p50 = percentiles(std::iter::once(&s), &[0.5])[0].unwrap();
        assert!((2_500.0..7_500.0).contains(&p50), "median {p50}");
    }
}
