//! Token sampling on the host, the same for every backend: greedy,
//! temperature, top-k, top-p, the repetition, presence and frequency
//! penalties, a logit bias and banned tokens, with a seeded generator so a
//! seeded request repeats exactly; and the log-probabilities of a sampled
//! token and its most likely alternatives ([`logprobs`]).

use serde::{Deserialize, Serialize};

/// Sampling parameters of one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 (or below) means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Hugging Face's rule: divide positive logits of tokens seen so far by
    /// this, multiply negative ones; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token the output
    /// already holds; 0 is off.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time the output
    /// holds it; 0 is off.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

/// What a sampler reads of the sequence besides its logits.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen<'a> {
    /// The prompt's tokens (the repetition penalty counts them).
    pub prompt: &'a [u32],
    /// The tokens generated so far (every penalty counts them).
    pub output: &'a [u32],
    /// Tokens that may not be sampled now (an end of sequence before the
    /// request's minimum length).
    pub banned: &'a [u32],
    /// When set, only these tokens may be sampled: a bitset, token `t` is
    /// bit `t % 32` of word `t / 32` (a constraint's mask); tokens past its
    /// end may not be sampled.
    pub allowed: Option<&'a [u32]>,
}

/// SplitMix64: tiny, fast, good enough to draw tokens, and stable across
/// platforms and releases (unlike a dependency's default generator).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-scale, scale).
    pub fn next_f32_sym(&mut self, scale: f32) -> f32 {
        ((self.next_f64() * 2.0 - 1.0) as f32) * scale
    }
}

/// Samples tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Added to these tokens' logits before anything else.
    logit_bias: Vec<(u32, f32)>,
}

/// Index of the largest value (the first one on ties); NaNs never win.
///
/// Two passes the compiler vectorises (a running maximum per lane, then the
/// first position of the maximum): ~10× faster than one index-tracking loop
/// over a 49k vocabulary (40 µs → 4 µs), and greedy decoding calls it once
/// per sequence per step.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = lane_max(logits, |v| v);
    if max == f32::NEG_INFINITY {
        // Nothing beats -inf: the first index, as the plain loop gives.
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// The largest of `map(v)` over `logits` (NaN never wins), with a running
/// maximum per lane the compiler vectorises.
fn lane_max(logits: &[f32], map: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            let v = map(v);
            *m = if v > *m { v } else { *m };
        }
    }
    lanes
        .iter()
        .copied()
        .chain(tail.iter().map(|&v| map(v)))
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// The position where `r` times the sum of `w` falls in its running sum
/// (the last positive weight if rounding leaves it past the end); `None`
/// when every weight is 0.
///
/// Blocks of 256 are summed once (a loop that vectorises): their total
/// places the target, whole blocks before it are skipped, and only the one
/// holding it is walked one by one.
fn pick(w: &[f32], r: f64) -> Option<u32> {
    const BLOCK: usize = 256;
    let sums: Vec<f64> = w
        .chunks(BLOCK)
        .map(|b| f64::from(b.iter().sum::<f32>()))
        .collect();
    let target = r * sums.iter().sum::<f64>();
    let mut acc = 0.0;
    let mut last = None;
    for ((b, block), &sum) in w.chunks(BLOCK).enumerate().zip(&sums) {
        if sum <= 0.0 {
            continue;
        }
        if target >= acc + sum {
            acc += sum;
            last = block.iter().rposition(|&x| x > 0.0).map(|i| b * BLOCK + i);
            continue;
        }
        for (i, &x) in block.iter().enumerate() {
            if x > 0.0 {
                acc += f64::from(x);
                last = Some(b * BLOCK + i);
                if target < acc {
                    break;
                }
            }
        }
        break;
    }
    last.map(|i| i as u32)
}

/// `v`, or -inf for NaN and ±inf (what a softmax leaves out).
fn finite(v: f32) -> f32 {
    if v.is_finite() { v } else { f32::NEG_INFINITY }
}

/// The tokens of `l` that can be in the top-`top_p` nucleus, most likely
/// first, and the total weight of `l`: every token of the buckets of
/// likelihood (1/16 nat wide, from the maximum down) whose mass first
/// reaches `top_p` of the total, found in one pass and sorted only among
/// themselves (the nucleus and the rest of its last bucket), not over the
/// whole vocabulary.
fn nucleus_head(
    l: &[f32],
    (max, inv_t): (f32, f32),
    top_p: f32,
    order: &impl Fn(&u32, &u32) -> std::cmp::Ordering,
    weight: &impl Fn(f32) -> f32,
) -> (Vec<u32>, f64) {
    const PER_NAT: f32 = 16.0;
    const BUCKETS: usize = 512;
    let bucket = |v: f32| (((max - v) * inv_t * PER_NAT) as usize).min(BUCKETS - 1);
    let mut mass = [0f64; BUCKETS];
    let mut total = 0.0;
    for &v in l.iter().filter(|v| v.is_finite()) {
        let w = f64::from(weight(v));
        mass[bucket(v)] += w;
        total += w;
    }
    let mut acc = 0.0;
    let last = mass
        .iter()
        .position(|&m| {
            acc += m;
            acc >= f64::from(top_p) * total
        })
        .unwrap_or(BUCKETS - 1);
    let mut head: Vec<u32> = (0..l.len() as u32)
        .filter(|&i| l[i as usize].is_finite() && bucket(l[i as usize]) <= last)
        .collect();
    head.sort_unstable_by(order);
    (head, total)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: Rng::new(params.seed),
            logit_bias: Vec::new(),
        }
    }

    /// Adds `bias` to the logits of its tokens before sampling (OpenAI's
    /// `logit_bias`: -100 in effect bans a token, 100 forces it).
    pub fn with_logit_bias(mut self, bias: Vec<(u32, f32)>) -> Self {
        self.logit_bias = bias;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits`, given what the sequence holds.
    pub fn sample(&mut self, logits: &[f32], seen: Seen<'_>) -> u32 {
        let p = self.params;
        let greedy = p.temperature <= 0.0 || p.top_k == 1;
        let repetition = p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0;
        let adjusted = repetition
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
            || !seen.banned.is_empty()
            || seen.allowed.is_some();
        if !adjusted {
            return match greedy {
                true => argmax(logits),
                false => self.draw(logits),
            };
        }
        let mut l = logits.to_vec();
        self.adjust(&mut l, seen, repetition);
        match greedy {
            true => argmax(&l),
            false => self.draw(&l),
        }
    }

    /// A token drawn from the softmax of `l / temperature`, cut to the
    /// `top_k` most likely and then to the `top_p` nucleus. No step sorts
    /// the whole vocabulary (a sort of 49k logits took ~5 ms a token): plain
    /// temperature sampling is one pass in index order; top-k selects its
    /// `k` first; top-p sorts only the tokens that can be in the nucleus
    /// ([`nucleus_head`]).
    fn draw(&mut self, l: &[f32]) -> u32 {
        let p = self.params;
        let max = lane_max(l, finite);
        if max == f32::NEG_INFINITY {
            return 0;
        }
        let inv_t = 1.0 / p.temperature;
        // Unnormalised probabilities; exactly 0 for banned (-inf) tokens.
        // (A select, not a branch, so that loops over it vectorise.)
        let weight = |v: f32| {
            let w = exp_nonpositive((v - max) * inv_t);
            if v > f32::NEG_INFINITY { w } else { 0.0 }
        };
        let nucleus = p.top_p > 0.0 && p.top_p < 1.0;
        if p.top_k == 0 && !nucleus {
            let w: Vec<f32> = l.iter().map(|&v| weight(v)).collect();
            return pick(&w, self.rng.next_f64()).unwrap_or(0);
        }
        // Most likely first; ties to the lower id.
        let order = |a: &u32, b: &u32| {
            l[*b as usize]
                .partial_cmp(&l[*a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        };
        let (mut idx, total) = if p.top_k > 0 {
            let mut idx: Vec<u32> = (0..l.len() as u32)
                .filter(|&i| l[i as usize].is_finite())
                .collect();
            if p.top_k < idx.len() {
                idx.select_nth_unstable_by(p.top_k - 1, order);
                idx.truncate(p.top_k);
            }
            idx.sort_unstable_by(order);
            let total = idx.iter().map(|&i| f64::from(weight(l[i as usize]))).sum();
            (idx, total)
        } else {
            nucleus_head(l, (max, inv_t), p.top_p, &order, &weight)
        };
        let mut w: Vec<f32> = idx.iter().map(|&i| weight(l[i as usize])).collect();
        if nucleus {
            // The smallest head whose share of `total` reaches top_p.
            let mut acc = 0.0;
            let mut keep = w.len();
            for (k, &x) in w.iter().enumerate() {
                acc += f64::from(x);
                if acc >= f64::from(p.top_p) * total {
                    keep = k + 1;
                    break;
                }
            }
            w.truncate(keep);
            idx.truncate(keep);
        }
        let k = pick(&w, self.rng.next_f64()).unwrap_or(0);
        idx[k as usize]
    }

    /// The logit bias, the penalties, the bans and the allowed set, in
    /// that order.
    fn adjust(&self, l: &mut [f32], seen: Seen<'_>, repetition: bool) {
        let p = &self.params;
        for &(t, b) in &self.logit_bias {
            if let Some(v) = l.get_mut(t as usize) {
                *v += b;
            }
        }
        if repetition {
            // Hugging Face's rule, once per distinct token of prompt and output.
            let mut done = vec![false; l.len()];
            for &t in seen.prompt.iter().chain(seen.output) {
                if let Some(d) = done.get_mut(t as usize)
                    && !*d
                {
                    *d = true;
                    let v = &mut l[t as usize];
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut output = seen.output.to_vec();
            output.sort_unstable();
            for run in output.chunk_by(|a, b| a == b) {
                if let Some(v) = l.get_mut(run[0] as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }
        for &t in seen.banned {
            if let Some(v) = l.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        if let Some(allowed) = seen.allowed {
            for (i, chunk) in l.chunks_mut(32).enumerate() {
                let word = allowed.get(i).copied().unwrap_or(0);
                if word != u32::MAX {
                    for (b, v) in chunk.iter_mut().enumerate() {
                        if word >> b & 1 == 0 {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }
}

/// A sampled token's log-probability and the `top` most likely tokens with
/// theirs, most likely first, in the model's own distribution: the
/// log-softmax of the raw logits, before bias, penalties and temperature
/// (what vLLM reports by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// [`Logprobs`] of `token` in `logits`, with the `top` best alternatives.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> Logprobs {
    let log_z = log_sum_exp(logits);
    let of = |v: f32| (f64::from(v) - log_z) as f32;
    // The `top` largest, kept sorted in a short list (top <= 20).
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() || (best.len() == top && v <= best[top - 1].1) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= v);
            best.insert(at, (i as u32, v));
            best.truncate(top);
        }
    }
    Logprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&v| of(v)),
        top: best.into_iter().map(|(i, v)| (i, of(v))).collect(),
    }
}

/// `ln Σ e^v` over the finite logits, in lanes the compiler vectorises
/// with [`exp_nonpositive`]: ~10× faster than `f64::exp` per value, which
/// cost ~9% of decode throughput at 8 streams with logprobs on.
fn log_sum_exp(logits: &[f32]) -> f64 {
    const LANES: usize = 16;
    let max = lane_max(logits, finite);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let mut sums = [0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += exp_nonpositive(finite(v) - max);
        }
    }
    let sum: f64 = sums.iter().map(|&s| f64::from(s)).sum::<f64>()
        + tail
            .iter()
            .map(|&v| f64::from(exp_nonpositive(finite(v) - max)))
            .sum::<f64>();
    f64::from(max) + sum.ln()
}

/// `e^x` for `x <= 0` (a softmax's terms once the maximum is taken off),
/// within 5e-6 relative: `2^n` from the exponent bits times a degree-7
/// polynomial for `2^f`, `|f| < 1`. Plain arithmetic, so loops over it
/// vectorise. Below -87 (and for -inf, NaN) it is 0 or a subnormal.
fn exp_nonpositive(x: f32) -> f32 {
    const C: [f32; 8] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_73,
    ];
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    // Truncation (SSE2's cvttps2dq; `floor` would be a call without
    // SSE4.1): `f` is in (-1, 0], where the polynomial is as good.
    let n = t as i32;
    let f = t - n as f32;
    let p = C[0]
        + f * (C[1] + f * (C[2] + f * (C[3] + f * (C[4] + f * (C[5] + f * (C[6] + f * C[7]))))));
    p * f32::from_bits(((n + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_exp_and_log_sum_exp_agree_with_f64() {
        for i in 0..=20_000 {
            let x = -87.0 * i as f32 / 20_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            assert!((got - want).abs() <= 5e-6 * want, "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        let mut rng = Rng::new(11);
        for len in [1, 17, 49152, 49155] {
            let mut v: Vec<f32> = (0..len).map(|_| rng.next_f32_sym(20.0)).collect();
            if len > 1 {
                v[0] = f32::NEG_INFINITY;
            }
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want = f64::from(max)
                + v.iter()
                    .map(|&x| f64::from(x - max).exp())
                    .sum::<f64>()
                    .ln();
            assert!((log_sum_exp(&v) - want).abs() < 1e-5, "len {len}");
        }
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY]), f64::NEG_INFINITY);
    }

    /// The plain definition `argmax` must agree with.
    fn argmax_reference(logits: &[f32]) -> u32 {
        let mut best = 0;
        let mut best_v = f32::NEG_INFINITY;
        for (i, &v) in logits.iter().enumerate() {
            if v > best_v {
                best_v = v;
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn argmax_agrees_with_the_plain_loop() {
        let mut rng = Rng::new(7);
        for len in [0, 1, 15, 16, 17, 49152, 49155] {
            let mut v: Vec<f32> = (0..len).map(|_| rng.next_f32_sym(3.0)).collect();
            assert_eq!(argmax(&v), argmax_reference(&v), "len {len}");
            if len > 20 {
                // Ties go to the first; NaNs never win; a maximum in the tail.
                v[3] = 9.0;
                v[len - 2] = 9.0;
                v[1] = f32::NAN;
                assert_eq!(argmax(&v), 3);
                v[len - 1] = 10.0;
                assert_eq!(argmax(&v), len as u32 - 1);
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0]), 2);
    }

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, Seen::default()) as usize] += 1;
        }
        c
    }

    #[test]
    fn sampling_without_a_full_sort_follows_the_softmax_and_its_nucleus() {
        // 3,000 tokens: enough that the nucleus outgrows the first head of
        // 64 and top-k selects rather than sorts everything.
        let mut rng = Rng::new(11);
        let logits: Vec<f32> = (0..3000).map(|_| rng.next_f32_sym(3.0)).collect();
        let softmax = |t: f32| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = logits
                .iter()
                .map(|&v| f64::from((v - max) / t).exp())
                .collect();
            let z: f64 = w.iter().sum();
            w.into_iter().map(|x| x / z).collect::<Vec<f64>>()
        };
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let base = SamplingParams {
            temperature: 0.7,
            seed: 5,
            ..Default::default()
        };
        // Plain temperature: each of the five likeliest tokens is drawn as
        // often as its probability says (within 15% over 40,000 draws).
        let n = 40_000;
        let c = counts(base, &logits, n);
        let probs = softmax(0.7);
        for &t in &order[..5] {
            let want = probs[t] * n as f64;
            assert!(
                (c[t] as f64 - want).abs() < 0.15 * want + 20.0,
                "{t}: {} vs {want}",
                c[t]
            );
        }
        // The nucleus: only tokens of the smallest head holding top_p.
        let top_p = 0.9;
        let (mut acc, mut nucleus) = (0.0, 0);
        while acc < f64::from(top_p) {
            acc += probs[order[nucleus]];
            nucleus += 1;
        }
        assert!(nucleus > 64, "the test needs a nucleus past the first head");
        let c = counts(SamplingParams { top_p, ..base }, &logits, 20_000);
        let outside: usize = order[nucleus + 1..].iter().map(|&t| c[t]).sum();
        assert_eq!(
            outside, 0,
            "a token outside the nucleus of {nucleus} was drawn"
        );
        assert!(order[..nucleus].iter().filter(|&&t| c[t] > 0).count() > nucleus / 2);
        // top-k: only the k likeliest.
        let c = counts(SamplingParams { top_k: 40, ..base }, &logits, 20_000);
        assert_eq!(order[40..].iter().map(|&t| c[t]).sum::<usize>(), 0);
        assert!(order[..40].iter().all(|&t| c[t] > 0));
    }

    #[test]
    fn greedy_picks_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], Seen::default()), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_seeds_differ() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..64)
                .map(|_| s.sample(&logits, Seen::default()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(p), run(p));
        assert_ne!(run(p), run(SamplingParams { seed: 43, ..p }));
    }

    #[test]
    fn temperature_follows_softmax() {
        // logits ln(1), ln(3): probabilities 1/4, 3/4 at temperature 1.
        let logits = [0.0f32, 3f32.ln()];
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let c = counts(p, &logits, 20_000);
        let frac = c[1] as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
        // A low temperature sharpens towards the argmax.
        let c = counts(
            SamplingParams {
                temperature: 0.1,
                ..p
            },
            &logits,
            2_000,
        );
        assert!(c[1] > 1_990, "{c:?}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [5.0f32, 4.0, 3.0, 2.0, 1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 1,
            ..Default::default()
        };
        let c = counts(p, &logits, 5_000);
        assert!(c[2..].iter().all(|&x| x == 0), "{c:?}");
        assert!(c[0] > 0 && c[1] > 0);
        // softmax of [5,4,3,2,1] ≈ [.636,.234,.086,.032,.012]: top_p 0.8
        // keeps the first two (0.87).
        let p = SamplingParams {
            top_k: 0,
            top_p: 0.8,
            ..p
        };
        let c = counts(p, &logits, 5_000);
        assert!(c[2..].iter().all(|&x| x == 0), "{c:?}");
        // top_p 0.5 keeps only the first.
        let c = counts(SamplingParams { top_p: 0.5, ..p }, &logits, 500);
        assert_eq!(c[0], 500);
    }

    #[test]
    fn repetition_penalty_hf_rule() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        let prompt = |t: &'static [u32]| Seen {
            prompt: t,
            ..Default::default()
        };
        // token 0 (3.0 → 1.5) loses to token 1 (2.0)
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], prompt(&[0])), 1);
        // negative logits get more negative: -1 → -2 keeps token 2 last
        assert_eq!(s.sample(&[-1.0, -1.5, -3.0], prompt(&[0, 0])), 1);
        // repeated history counts once, prompt and output alike
        assert_eq!(s.sample(&[3.0, 1.4, 0.0], prompt(&[0, 0, 0])), 0);
        let both = Seen {
            prompt: &[0],
            output: &[0],
            ..Default::default()
        };
        assert_eq!(s.sample(&[3.0, 1.4, 0.0], both), 0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_output_only() {
        let logits = [3.0, 2.5, 0.0];
        let output = |t: &'static [u32]| Seen {
            output: t,
            ..Default::default()
        };
        let presence = SamplingParams {
            presence_penalty: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(presence);
        // 3.0 - 1 < 2.5, however often token 0 appeared.
        assert_eq!(s.sample(&logits, output(&[0])), 1);
        assert_eq!(s.sample(&logits, output(&[0, 0, 0])), 1);
        // The prompt does not count.
        let in_prompt = Seen {
            prompt: &[0],
            ..Default::default()
        };
        assert_eq!(s.sample(&logits, in_prompt), 0);
        let frequency = SamplingParams {
            frequency_penalty: 0.4,
            ..Default::default()
        };
        let mut s = Sampler::new(frequency);
        // Once: 2.6 > 2.5; twice: 2.2 < 2.5.
        assert_eq!(s.sample(&logits, output(&[0])), 0);
        assert_eq!(s.sample(&logits, output(&[0, 2, 0])), 1);
        // A negative penalty favours repeats.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[1.0, 1.5, 0.0], output(&[2])), 2);
    }

    #[test]
    fn logit_bias_and_bans_apply_before_sampling() {
        let logits = [3.0, 2.0, 0.0];
        let mut s = Sampler::new(SamplingParams::default()).with_logit_bias(vec![(2, 100.0)]);
        assert_eq!(s.sample(&logits, Seen::default()), 2);
        let mut s = Sampler::new(SamplingParams::default()).with_logit_bias(vec![(0, -100.0)]);
        assert_eq!(s.sample(&logits, Seen::default()), 1);
        // A ban wins over any bias; an id past the vocabulary is ignored.
        let mut s =
            Sampler::new(SamplingParams::default()).with_logit_bias(vec![(2, 100.0), (99, 5.0)]);
        let banned = Seen {
            banned: &[2],
            ..Default::default()
        };
        assert_eq!(s.sample(&logits, banned), 0);
        // Sampling at a temperature never draws a banned token.
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            seed: 3,
            ..Default::default()
        });
        for _ in 0..500 {
            assert_ne!(s.sample(&logits, banned), 2);
        }
    }

    #[test]
    fn only_allowed_tokens_are_sampled() {
        // 40 logits, the best first; the mask allows tokens 3 and 33 (the
        // second word), and nothing past its one-and-a-bit words.
        let logits: Vec<f32> = (0..70).map(|i| -(i as f32) / 10.0).collect();
        let mask = [1u32 << 3, 1 << 1];
        let seen = Seen {
            allowed: Some(&mask),
            ..Default::default()
        };
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, seen), 3);
        let mut s = Sampler::new(SamplingParams {
            temperature: 10.0,
            seed: 9,
            ..Default::default()
        });
        let mut drawn = std::collections::BTreeSet::new();
        for _ in 0..500 {
            drawn.insert(s.sample(&logits, seen));
        }
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), [3, 33]);
        // A bias cannot bring back a masked token.
        let mut s = Sampler::new(SamplingParams::default()).with_logit_bias(vec![(0, 100.0)]);
        assert_eq!(s.sample(&logits, seen), 3);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_best_first() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY, 0.5];
        let z: f64 = logits
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| f64::from(v).exp())
            .sum();
        let lp = |v: f32| (f64::from(v) - z.ln()) as f32;
        let got = logprobs(&logits, 2, 3);
        assert!((got.logprob - lp(2.0)).abs() < 1e-6);
        let ids: Vec<u32> = got.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0]);
        assert!((got.top[0].1 - lp(3.0)).abs() < 1e-6);
        // Probabilities sum to one; none asked, none given; -inf stays -inf.
        let all = logprobs(&logits, 1, 5);
        assert_eq!(all.top.len(), 4);
        let total: f32 = all.top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        // A large vocabulary: the top agree with a full sort.
        let mut rng = Rng::new(5);
        let big: Vec<f32> = (0..49152).map(|_| rng.next_f32_sym(10.0)).collect();
        let mut order: Vec<u32> = (0..big.len() as u32).collect();
        order.sort_by(|&a, &b| big[b as usize].total_cmp(&big[a as usize]));
        let top: Vec<u32> = logprobs(&big, 0, 20).top.iter().map(|t| t.0).collect();
        assert_eq!(top, order[..20]);
    }
}
