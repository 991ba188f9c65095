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
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    /// Arrivals at or after this many seconds (of the replay's time, after
    /// `start_s` and `time_scale`) are left out.
    pub duration_s: f64,
    /// Arrivals shift by up to ± this (0: the trace as is).
    pub jitter_s: f64,
    pub seed: u64,
    /// The trace functions served (indices), instead of the first K of
    /// each group.
    pub functions: Option<Vec<usize>>,
    /// The replay starts this far into the trace (earlier arrivals are left
    /// out; later ones move back by it).
    pub start_s: f64,
    /// Arrivals come this many times faster (2: twice the load).
    pub time_scale: f64,
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            duration_s: f64::INFINITY,
            jitter_s: 0.0,
            seed: 0,
            functions: None,
            start_s: 0.0,
            time_scale: 1.0,
        }
    }
}

impl Replay {
    /// The requests replayed with the first `k` functions of each group
    /// (or `functions`), in arrival order.
    pub fn requests(
        &self,
        fns: &[TraceFunction],
        k: usize,
    ) -> Result<Vec<trace::TraceRequest>, TraceError> {
        let mut reqs = match &self.functions {
            Some(list) => trace::select_functions(fns, list, f64::INFINITY)?,
            None => trace::select(fns, k, f64::INFINITY)?,
        };
        reqs.retain(|r| r.arrival_s >= self.start_s);
        for r in &mut reqs {
            r.arrival_s = (r.arrival_s - self.start_s) / self.time_scale;
        }
        if self.jitter_s > 0.0 {
            trace::jitter(&mut reqs, self.jitter_s, self.seed);
        }
        reqs.retain(|r| r.arrival_s < self.duration_s);
        Ok(reqs)
    }

    /// Models served: one per function.
    pub fn models(&self, fns: &[TraceFunction], k: usize) -> usize {
        match &self.functions {
            Some(list) => list.len(),
            None => trace::models_at(fns, k),
        }
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
    replay: &Replay,
    mut progress: impl FnMut(usize, usize, &Summary),
) -> Result<Vec<SimResult>, TraceError> {
    let total = policies.len() * ks.len();
    let mut out = Vec::with_capacity(total);
    for &k in ks {
        let reqs = replay.requests(fns, k)?;
        let models = replay.models(fns, k);
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

    #[test]
    fn a_replay_of_listed_functions_starts_late_runs_faster_and_stops_on_time() {
        // Function i arrives at 10, 20, ... 100 s.
        let fns: Vec<TraceFunction> = (0..16)
            .map(|_| TraceFunction {
                hash: String::new(),
                timestamps: (1..=10).map(|t| t as f64 * 10.0).collect(),
                input: vec![5; 10],
                output: vec![3; 10],
            })
            .collect();
        let replay = Replay {
            functions: Some(vec![3, 12]),
            start_s: 25.0,
            time_scale: 2.0,
            duration_s: 20.0,
            ..Replay::default()
        };
        let reqs = replay.requests(&fns, 8).unwrap();
        // Arrivals 30, 40, 50, 60, 70 s become 2.5, 7.5, 12.5, 17.5 (22.5
        // is past the duration), two functions each.
        let times: Vec<f64> = reqs.iter().map(|r| r.arrival_s).collect();
        assert_eq!(times, vec![2.5, 2.5, 7.5, 7.5, 12.5, 12.5, 17.5, 17.5]);
        assert!(reqs.iter().all(|r| [3, 12].contains(&r.function)));
        assert_eq!(replay.models(&fns, 8), 2);
        assert_eq!(Replay::default().models(&fns, 2), 4);
        // Listed wrong: a function the trace lacks, or one twice.
        for (list, says) in [
            (vec![16], "no function 16"),
            (vec![3, 3], "3 is listed twice"),
        ] {
            let bad = Replay {
                functions: Some(list),
                ..Replay::default()
            };
            let e = bad.requests(&fns, 8).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

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
            by_kind: Default::default(),
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
