//! Sweeps: every policy at every load, goodput per run, and capacity (the
//! most models a policy serves at an SLO attainment threshold).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::profile::Profile;
use crate::scheduler::Policy;
use crate::sim::{SimResult, SimSetup, Summary, simulate};
use crate::trace::{self, TraceError, TraceFunction};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepReport {
    pub runs: Vec<Summary>,
    /// Policy name → the most models served with attainment ≥ threshold
    /// (0 when no load met it).
    pub capacity: BTreeMap<String, usize>,
    pub capacity_threshold: f64,
}

/// Which slice of a trace to replay, and how to perturb it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Replay {
    pub duration_s: f64,
    /// Arrivals shift by up to ± this (0: the trace as is).
    pub jitter_s: f64,
    pub seed: u64,
}

impl Replay {
    pub fn requests(
        &self,
        fns: &[TraceFunction],
        k: usize,
    ) -> Result<Vec<trace::TraceRequest>, TraceError> {
        let mut reqs = trace::select(fns, k, self.duration_s)?;
        if self.jitter_s > 0.0 {
            trace::jitter(&mut reqs, self.jitter_s, self.seed);
        }
        Ok(reqs)
    }
}

/// Runs `policies` × `ks` (models per group) on the trace; `progress` hears
/// about each finished run (done, total, its summary).
pub fn sweep(
    profile: &Profile,
    base: &SimSetup,
    fns: &[TraceFunction],
    policies: &[Policy],
    ks: &[usize],
    replay: Replay,
    mut progress: impl FnMut(usize, usize, &Summary),
) -> Result<Vec<SimResult>, TraceError> {
    let total = policies.len() * ks.len();
    let mut out = Vec::with_capacity(total);
    for &k in ks {
        let reqs = replay.requests(fns, k)?;
        let models = trace::models_at(fns, k);
        for &policy in policies {
            let mut setup = base.clone();
            setup.scheduler.policy = policy;
            let r = simulate(profile, &setup, &reqs, models);
            progress(out.len() + 1, total, &r.summary);
            out.push(r);
        }
    }
    Ok(out)
}

pub fn capacity(runs: &[Summary], threshold: f64) -> BTreeMap<String, usize> {
    let mut cap = BTreeMap::new();
    for r in runs {
        let e = cap.entry(r.policy.name().to_string()).or_insert(0);
        if r.slo_attainment >= threshold {
            *e = (*e).max(r.models);
        }
    }
    cap
}

pub fn report(results: &[SimResult], threshold: f64) -> SweepReport {
    let runs: Vec<Summary> = results.iter().map(|r| r.summary.clone()).collect();
    SweepReport {
        capacity: capacity(&runs, threshold),
        capacity_threshold: threshold,
        runs,
    }
}

/// A fixed-width table of runs for people (the JSON is for scripts).
/// The summary table's column headers ([`table_row`] gives the cells).
pub const TABLE_HEADERS: [&str; 13] = [
    "policy", "models", "gpus", "cpus", "requests", "slo_met", "attain", "dropped", "ttft_p99",
    "tpot_p99", "nodes", "cold", "preem",
];

/// One run's cells of the summary table, under [`TABLE_HEADERS`].
pub fn table_row(r: &Summary) -> [String; 13] {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    [
        r.policy.name().to_string(),
        r.models.to_string(),
        r.gpus.to_string(),
        r.cpus.to_string(),
        r.requests.to_string(),
        r.slo_met.to_string(),
        format!("{:.3}", r.slo_attainment),
        r.dropped.to_string(),
        opt(r.ttft_p99_s),
        opt(r.tpot_p99_s),
        format!("{:.2}", r.avg_nodes_in_use),
        r.cold_starts.to_string(),
        r.preemptions.to_string(),
    ]
}

/// The summary table as text: the policy left-aligned, numbers right.
pub fn render_table(runs: &[Summary]) -> String {
    const WIDTHS: [usize; 13] = [10, 6, 5, 4, 8, 8, 7, 7, 9, 9, 6, 6, 5];
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(WIDTHS).enumerate() {
            if i == 0 {
                s.push_str(&format!("{c:<w$}"));
            } else {
                s.push_str(&format!(" {c:>w$}"));
            }
        }
        s.push('\n');
        s
    };
    let mut s = line(&TABLE_HEADERS.map(String::from));
    for r in runs {
        s.push_str(&line(&table_row(r)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::NodeSummary;

    fn summary(policy: Policy, models: usize, attainment: f64) -> Summary {
        Summary {
            policy,
            preempt_keeps_kv: false,
            model: "m".into(),
            models,
            gpus: 1,
            cpus: 0,
            requests: 10,
            completed: 10,
            slo_met: (attainment * 10.0) as usize,
            slo_attainment: attainment,
            dropped: 0,
            dropped_by_reason: BTreeMap::new(),
            ttft_p50_s: None,
            ttft_p99_s: None,
            tpot_p50_s: None,
            tpot_p99_s: None,
            decode_tokens_per_node_s: 0.0,
            avg_nodes_in_use: 0.0,
            cold_starts: 0,
            preemptions: 0,
            preempted_requests: 0,
            memory_violations: 0,
            end_violations: 0,
            held_bytes_at_end: 0,
            makespan_s: 0.0,
            cluster: None,
            routing_retries: 0,
            nodes: vec![NodeSummary {
                kind: crate::DeviceKind::Gpu,
                capacity_bytes: 1,
                peak_committed_bytes: 0,
            }],
        }
    }

    #[test]
    fn capacity_is_the_largest_load_meeting_the_threshold() {
        let runs = [
            summary(Policy::Sllm, 16, 0.95),
            summary(Policy::Sllm, 32, 0.85),
            summary(Policy::Slinfer, 16, 0.99),
            summary(Policy::Slinfer, 32, 0.91),
            summary(Policy::Slinfer, 48, 0.7),
            summary(Policy::SllmC, 16, 0.5),
        ];
        let cap = capacity(&runs, 0.9);
        assert_eq!(cap["sllm"], 16);
        assert_eq!(cap["slinfer"], 32);
        assert_eq!(cap["sllm+c"], 0);
    }
}
