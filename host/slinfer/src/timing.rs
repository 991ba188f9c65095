//! Timing an engine's steps through the engine contract: `serve
//! --cpu-engine auto` compares two engines with it, `slinfer profile`
//! measures this machine's latency tables with it.

use std::time::Instant;

use slinfer_engine::{EngineError, LlmInstance, SeqId, StepEntry};

/// `n` prompt tokens valid in any vocabulary of `vocab` tokens (their
/// values do not matter to a step's time).
pub fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect()
}

/// Appends `n` tokens to each of `seqs` (prefills, or the extension of
/// sequences' contexts) in the steps the live runner prefills them in on a
/// device of the instance's kind: at most `chunk` tokens a step
/// ([`slinfer_inference::prefill_chunk_tokens`]), the sequences in order
/// ([`slinfer_inference::next_prefill_step`]); the steps' seconds.
pub fn extend(
    inst: &mut dyn LlmInstance,
    seqs: &[SeqId],
    n: usize,
    chunk: usize,
) -> Result<f64, EngineError> {
    let vocab = inst.config().vocab_size as u32;
    let all = tokens(n, vocab);
    let lens = vec![n; seqs.len()];
    let mut done = vec![0; seqs.len()];
    let t = Instant::now();
    loop {
        let step = slinfer_inference::next_prefill_step(&lens, &mut done, chunk);
        if step.is_empty() {
            break;
        }
        let batch: Vec<StepEntry> = step
            .into_iter()
            .map(|(i, r)| StepEntry {
                seq: seqs[i],
                tokens: all[r].to_vec(),
            })
            .collect();
        inst.step(&batch)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds per decode step of `seqs` together: the median of `steps` steps
/// after one untimed step (first-call allocations), so that a burst of
/// other work on a shared machine moves it less than a mean. Each step
/// appends a token to every sequence.
pub fn decode_step_s(
    inst: &mut dyn LlmInstance,
    seqs: &[SeqId],
    steps: usize,
) -> Result<f64, EngineError> {
    let vocab = inst.config().vocab_size as u32;
    let batch = |t: u32| -> Vec<StepEntry> {
        seqs.iter()
            .map(|&seq| StepEntry {
                seq,
                tokens: vec![t % vocab],
            })
            .collect()
    };
    inst.step(&batch(1))?;
    let mut times = Vec::with_capacity(steps.max(1));
    for k in 0..steps.max(1) as u32 {
        let t = Instant::now();
        inst.step(&batch(k + 2))?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// The median of `xs` (not empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
