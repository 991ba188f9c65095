//! Multi-function traces in the format of `azure-functions-128fn-30min.json`,
//! and the paper's load selection (first k functions of each group of 8).

use std::path::Path;

use serde::Deserialize;

/// Functions per popularity group in the paper's trace.
pub const GROUP_SIZE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading trace {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing trace: {0}")]
    Json(#[from] serde_json::Error),
    #[error("function {index}: timestamps, input and output have different lengths")]
    Ragged { index: usize },
    #[error("--models-per-group must be 1..={GROUP_SIZE}, got {0}")]
    BadK(usize),
    #[error("the trace has {len} functions: there is no function {index}")]
    NoFunction { index: usize, len: usize },
    #[error("list each function once: {0} is listed twice")]
    FunctionTwice(usize),
}

#[derive(Clone, Debug, Deserialize)]
pub struct TraceFunction {
    #[serde(rename = "HashFunction", default)]
    pub hash: String,
    pub timestamps: Vec<f64>,
    pub input: Vec<u64>,
    pub output: Vec<u64>,
}

/// One request as the simulator replays it; only the driver side ever sees
/// `output_tokens`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TraceRequest {
    pub function: u32,
    pub arrival_s: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

pub fn load_trace(path: &Path) -> Result<Vec<TraceFunction>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_trace(&text)
}

pub fn parse_trace(text: &str) -> Result<Vec<TraceFunction>, TraceError> {
    let fns: Vec<TraceFunction> = serde_json::from_str(text)?;
    for (index, f) in fns.iter().enumerate() {
        if f.timestamps.len() != f.input.len() || f.timestamps.len() != f.output.len() {
            return Err(TraceError::Ragged { index });
        }
    }
    Ok(fns)
}

/// The requests of the first `k` functions of every group of 8, arriving
/// before `duration_s`, ordered by arrival (ties by function, then position).
/// Function ids are trace indices, so a function keeps its id at every k.
pub fn select(
    fns: &[TraceFunction],
    k: usize,
    duration_s: f64,
) -> Result<Vec<TraceRequest>, TraceError> {
    if !(1..=GROUP_SIZE).contains(&k) {
        return Err(TraceError::BadK(k));
    }
    Ok(select_where(fns, |i| i % GROUP_SIZE < k, duration_s))
}

/// The requests of the listed functions (trace indices) before
/// `duration_s`, in arrival order.
pub fn select_functions(
    fns: &[TraceFunction],
    list: &[usize],
    duration_s: f64,
) -> Result<Vec<TraceRequest>, TraceError> {
    let mut seen = std::collections::HashSet::new();
    for &index in list {
        if index >= fns.len() {
            return Err(TraceError::NoFunction {
                index,
                len: fns.len(),
            });
        }
        if !seen.insert(index) {
            return Err(TraceError::FunctionTwice(index));
        }
    }
    Ok(select_where(fns, |i| seen.contains(&i), duration_s))
}

fn select_where(
    fns: &[TraceFunction],
    keep: impl Fn(usize) -> bool,
    duration_s: f64,
) -> Vec<TraceRequest> {
    let mut out: Vec<TraceRequest> = fns
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .flat_map(|(i, f)| {
            (0..f.timestamps.len()).map(move |j| TraceRequest {
                function: i as u32,
                arrival_s: f.timestamps[j],
                input_tokens: f.input[j].max(1),
                output_tokens: f.output[j].max(1),
            })
        })
        .filter(|r| r.arrival_s < duration_s)
        .collect();
    out.sort_by(|a, b| {
        a.arrival_s
            .total_cmp(&b.arrival_s)
            .then(a.function.cmp(&b.function))
    });
    out
}

/// SplitMix64: tiny, seedable, and plenty for perturbing timestamps and
/// step times in a simulation.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    /// Uniform in [0, 1].
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }
}

/// Shifts every arrival by a uniform offset in [-max_s, max_s] (clamped at
/// 0) drawn from a seeded generator, then restores arrival order: replicas
/// of one trace for measuring how sensitive a result is to timing alone.
pub fn jitter(reqs: &mut [TraceRequest], max_s: f64, seed: u64) {
    let mut rng = SplitMix64(seed);
    for r in reqs.iter_mut() {
        r.arrival_s = (r.arrival_s + (2.0 * rng.next_f64() - 1.0) * max_s).max(0.0);
    }
    reqs.sort_by(|a, b| {
        a.arrival_s
            .total_cmp(&b.arrival_s)
            .then(a.function.cmp(&b.function))
    });
}

/// Number of models (functions) served at selection `k`.
pub fn models_at(fns: &[TraceFunction], k: usize) -> usize {
    (0..fns.len()).filter(|i| i % GROUP_SIZE < k).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_first_k_of_each_group_in_arrival_order() {
        let f = |t: f64| TraceFunction {
            hash: String::new(),
            timestamps: vec![t],
            input: vec![10],
            output: vec![0],
        };
        let fns: Vec<_> = (0..16).map(|i| f(100.0 - i as f64)).collect();
        let sel = select(&fns, 2, f64::INFINITY).unwrap();
        let ids: Vec<u32> = sel.iter().map(|r| r.function).collect();
        assert_eq!(ids, vec![9, 8, 1, 0]);
        assert_eq!(sel[0].output_tokens, 1);
        assert_eq!(models_at(&fns, 2), 4);
        assert!(select(&fns, 0, 1.0).is_err());
        assert_eq!(select(&fns, 8, 90.0).unwrap().len(), 5);
    }

    #[test]
    fn jitter_is_seeded_bounded_and_keeps_arrival_order() {
        let reqs: Vec<TraceRequest> = (0..50)
            .map(|i| TraceRequest {
                function: i % 3,
                arrival_s: i as f64,
                input_tokens: 1,
                output_tokens: 1,
            })
            .collect();
        let mut a = reqs.clone();
        let mut b = reqs.clone();
        let mut c = reqs.clone();
        jitter(&mut a, 0.5, 7);
        jitter(&mut b, 0.5, 7);
        jitter(&mut c, 0.5, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
        let mut moved: Vec<f64> = a.iter().map(|r| r.arrival_s).collect();
        moved.sort_by(f64::total_cmp);
        for (i, t) in moved.iter().enumerate() {
            assert!((t - i as f64).abs() <= 1.0 + 1e-9);
        }
    }
}
