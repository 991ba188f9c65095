//! Early refusal (`SchedulerConfig::refuse_early`): a request that cannot
//! be placed now is refused at once when, even at [`RATE_MARGIN`] times its
//! model's recent completion rate, the requests queued before it (and it)
//! will not have drained by its deadline, or (when cold starts count, so
//! deadlines stay put) when its next try would come after its deadline;
//! the time the queue needs at the rate itself is its
//! caller's retry hint. Otherwise it waits as before, until placed or
//! refused.

use super::*;

/// How far back completions count towards a model's rate.
const COMPLETION_WINDOW_S: f64 = 30.0;
/// Completions in the window needed before the rate is trusted.
const MIN_COMPLETIONS: usize = 3;
/// A request is refused only if it would miss its deadline even were the
/// rate this many times higher: room also appears as other models' instances
/// unload, which a model's own rate does not show. On the paper's experiment
/// (`slinfer simulate --refuse-early`, BENCHMARKS.md) a margin of 1 lost
/// 1.5–2.8% of SLO-met requests; 4 loses none.
const RATE_MARGIN: f64 = 4.0;

impl<C: CostModel> Scheduler<C> {
    pub(super) fn record_completion(&mut self, model: ModelId, now_s: f64) {
        let q = self.completions.entry(model).or_default();
        q.push_back(now_s);
        while q.front().is_some_and(|&t| now_s - t > COMPLETION_WINDOW_S) {
            q.pop_front();
        }
    }

    /// Completions per second of `model` lately, if enough are known.
    fn completion_rate(&self, model: ModelId, now_s: f64) -> Option<f64> {
        let q = self.completions.get(&model)?;
        let recent: Vec<f64> = q
            .iter()
            .copied()
            .filter(|&t| now_s - t <= COMPLETION_WINDOW_S)
            .collect();
        if recent.len() < MIN_COMPLETIONS {
            return None;
        }
        let span = (now_s - recent[0]).clamp(1.0, COMPLETION_WINDOW_S);
        Some(recent.len() as f64 / span)
    }

    /// Seconds until the requests of `rid`'s model waiting before it, and
    /// it, could be served at the model's recent completion rate.
    pub(super) fn queue_drain_s(&self, rid: RequestId, now_s: f64) -> Option<f64> {
        let model = self.requests[&rid].req.model;
        let rate = self.completion_rate(model, now_s)?;
        let ahead = self
            .pending
            .iter()
            .take_while(|&&p| p != rid)
            .filter(|p| self.requests[*p].req.model == model)
            .count();
        Some((ahead + 1) as f64 / rate)
    }

    /// Whether a request that could not be placed should be refused now,
    /// and the retry hint to give it: when the requests queued before it
    /// will not have drained by its deadline, or when its next try comes
    /// after its fixed deadline (it would be dropped then, unplaced).
    pub(super) fn hopeless(&self, rid: RequestId, now_s: f64) -> Option<Option<f64>> {
        if !self.cfg.refuse_early {
            return None;
        }
        let deadline_s = self.next_token_deadline_s(&self.requests[&rid]);
        let drain = self.queue_drain_s(rid, now_s);
        // Its deadline stays put only when cold starts count (otherwise a
        // load it joins may still extend it).
        let fixed_deadline = self.cfg.ttft_counts_load;
        let late = drain.is_some_and(|d| now_s + d / RATE_MARGIN > deadline_s)
            || (fixed_deadline && now_s + self.cfg.retry_interval_s > deadline_s);
        late.then_some(drain)
    }
}
