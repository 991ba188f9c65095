//! What drawing one token costs on a 49,152-token vocabulary (SmolLM2's),
//! the sampler against a baseline that sorts the whole vocabulary first (how
//! it drew tokens before), interleaved, in one run.
//!
//!     cargo run --release -p slinfer-engine --example sampler

use std::time::Instant;

use slinfer_engine::sampler::{Rng, Sampler, SamplingParams, Seen};

const VOCAB: usize = 49_152;
const DRAWS: usize = 400;

/// The baseline: every finite logit sorted, then top-k, softmax, top-p and a
/// walk down the sorted list.
fn full_sort_baseline(l: &[f32], p: SamplingParams, rng: &mut Rng) -> u32 {
    let mut idx: Vec<u32> = (0..l.len() as u32)
        .filter(|&i| l[i as usize].is_finite())
        .collect();
    idx.sort_unstable_by(|&a, &b| {
        l[b as usize]
            .partial_cmp(&l[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.truncate(p.top_k);
    }
    let max = l[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((l[i as usize] - max) / p.temperature) as f64).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|&x| {
                acc += x;
                acc >= f64::from(p.top_p)
            })
            .map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= s);
    }
    let r = rng.next_f64();
    let mut acc = 0.0;
    for (k, &x) in probs.iter().enumerate() {
        acc += x;
        if r < acc {
            return idx[k];
        }
    }
    idx[probs.len() - 1]
}

fn main() {
    let mut rng = Rng::new(1);
    // Logits shaped like a language model's: a few dozen candidates well
    // above a long tail spread around 0.
    let logits: Vec<Vec<f32>> = (0..8)
        .map(|_| {
            let mut l: Vec<f32> = (0..VOCAB).map(|_| rng.next_f32_sym(3.0)).collect();
            for _ in 0..40 {
                let t = (rng.next_u64() % VOCAB as u64) as usize;
                l[t] = 9.0 + rng.next_f32_sym(4.0);
            }
            l
        })
        .collect();
    println!(
        "draws of one token from {VOCAB} logits, µs per token (median of 5 rounds of {DRAWS})"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "mode", "sampler", "full sort", "speed-up"
    );
    let modes = [
        ("temperature 1", 1.0, 0, 1.0),
        ("temperature 0.7, top_p 0.9", 0.7, 0, 0.9),
        ("temperature 1, top_p 0.95", 1.0, 0, 0.95),
        ("temperature 0.8, top_k 40", 0.8, 40, 1.0),
    ];
    for (name, temperature, top_k, top_p) in modes {
        let p = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 7,
            ..Default::default()
        };
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        let mut sampler = Sampler::new(p);
        let mut brng = Rng::new(7);
        for _ in 0..5 {
            let t = Instant::now();
            for i in 0..DRAWS {
                std::hint::black_box(sampler.sample(&logits[i % 8], Seen::default()));
            }
            ours.push(t.elapsed().as_secs_f64() / DRAWS as f64);
            let t = Instant::now();
            for i in 0..DRAWS {
                std::hint::black_box(full_sort_baseline(&logits[i % 8], p, &mut brng));
            }
            base.push(t.elapsed().as_secs_f64() / DRAWS as f64);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] * 1e6
        };
        let (o, b) = (median(&mut ours), median(&mut base));
        println!("{name:<28} {o:>9.1} {b:>9.1} {:>8.1}x", b / o);
    }
}
