//! Two engines for one device, each serving the batches it is faster at.
//!
//! A [`PairedBackend`] loads every model twice, on a `few` engine (fast
//! with one or a few sequences: llama.cpp on most CPUs) and a `many` engine
//! (fast with many: OpenVINO's paged attention), and its
//! [`PairedInstance`] runs each step on one of them: on `many` once the
//! instance holds `switch_up` sequences or more, back on
//! `few` when it holds one or none. Moving costs a prefill of every
//! sequence moved: a count hovering at the threshold must not move them
//! back and forth, and back on `few` only a lone sequence's faster steps
//! repay it soon (on the Intel Xeon measured, 4.9 against 10.3 ms a token
//! at one sequence, 12.8 against 14.6 ms a step at four).
//!
//! A lone sequence (the instance holds no other) runs where it costs least
//! when the engines' costs are known ([`EngineCosts`], measured at start):
//! the tokens that engine must prefill (the step's, and the ones it holds
//! elsewhere when it would move) at that engine's prompt rate, plus
//! [`LONE_ANSWER_STEPS`] decode steps at its one-sequence step. `few`
//! decodes a lone sequence faster, but may prefill much slower (llama.cpp
//! on the default model's Q4_1 on an AMD EPYC Zen 4: 306 against OpenVINO's
//! 1,383 prompt tok/s), so a long prompt of its own goes to `many`, and
//! stays there while moving back would cost more than its faster steps
//! repay. Two or more sequences follow the count above. Without costs a
//! lone sequence runs on `few`.
//!
//! A retired sequence ([`LlmInstance::retire_sequence`]: an ended
//! request's, kept as a source of copies) stays where it is and counts for
//! neither rule.
//!
//! A sequence lives on one engine at a time. When a step runs on the other
//! one, the sequence moves there in that step: its tokens so far (the pair
//! keeps them) are prefilled on the new engine ahead of the step's own
//! tokens, and after the step its KV on the old engine is freed. If the step
//! fails, nothing moved. So a sequence's greedy tokens are the `few`
//! engine's up to its move and the `many` engine's (on that prefix) after.
//!
//! KV accounting: both engines have pools of blocks of the same size, and
//! the pair's pool is a number of blocks either engine can hold at once, so
//! that either can hold every sequence; the pair reports that number as its
//! capacity, the blocks its sequences hold on both as in use, and the sum of
//! both engines' bytes per block as the cost of a block (what the scheduler
//! reserves). A shrink applies to both engines at once (the memory goes back
//! then); a grow applies to each engine before its next step, so a burst
//! after idle grows only the engine it runs on, once, however many grows the
//! scheduler asked for on the way.

use std::collections::HashMap;
use std::sync::Arc;

use crate::package::ModelPackage;
use crate::{
    Backend, DeviceInfo, DeviceKind, EngineError, Footprint, LlmInstance, LoadOptions,
    MemoryReport, ModelConfig, ModelSource, RetiredCost, SeqId, StepEntry,
};

/// The engine of few sequences (index 0) and of many (index 1).
const FEW: usize = 0;
const MANY: usize = 1;

/// Decode steps a lone sequence's engine is chosen for: a chat answer, as
/// `serve` measures the engines.
pub const LONE_ANSWER_STEPS: usize = 128;

/// What one engine of a pair costs, as measured at start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineCosts {
    /// Seconds per prompt token of a prefill.
    pub prompt_token_s: f64,
    /// Seconds of a decode step of one sequence.
    pub step_s: f64,
}

/// A backend that loads each model on two engines of the same device.
pub struct PairedBackend {
    engines: [Arc<dyn Backend>; 2],
    switch_up: usize,
    costs: Option<[EngineCosts; 2]>,
    name: String,
}

impl PairedBackend {
    /// `few` serves while an instance holds fewer than `switch_up`
    /// sequences, `many` from then on. Both must drive the same kind of
    /// device.
    pub fn new(
        few: Arc<dyn Backend>,
        many: Arc<dyn Backend>,
        switch_up: usize,
    ) -> Result<Self, EngineError> {
        if few.kind() != many.kind() {
            return Err(EngineError::Unsupported(format!(
                "pairing a {:?} engine ({}) with a {:?} one ({})",
                few.kind(),
                few.name(),
                many.kind(),
                many.name()
            )));
        }
        let name = format!("{}+{}", few.name(), many.name());
        Ok(PairedBackend {
            engines: [few, many],
            switch_up: switch_up.max(2),
            costs: None,
            name,
        })
    }

    /// Places each instance's lone sequences by the engines' costs (see
    /// the module docs).
    pub fn with_costs(mut self, few: EngineCosts, many: EngineCosts) -> Self {
        self.costs = Some([few, many]);
        self
    }
}

impl Backend for PairedBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> DeviceKind {
        self.engines[FEW].kind()
    }
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError> {
        self.engines[FEW].devices()
    }
    /// Both engines' weights and KV bytes.
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError> {
        let [a, b] = [
            self.engines[FEW].footprint(package)?,
            self.engines[MANY].footprint(package)?,
        ];
        Ok(Footprint {
            weights_bytes: a.weights_bytes + b.weights_bytes,
            kv_bytes_per_token: a.kv_bytes_per_token + b.kv_bytes_per_token,
        })
    }
    fn used_bytes(&self, device: usize) -> Option<u64> {
        self.engines[FEW].used_bytes(device)
    }
    /// Loads on `many` first, then on `few` with `many`'s block size.
    fn load(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<Box<dyn LlmInstance>, EngineError> {
        let many = self.engines[MANY].load(source, device, options)?;
        let few = self.engines[FEW].load(
            source,
            device,
            &LoadOptions {
                block_size_tokens: Some(many.block_size_tokens()),
                initial_kv_blocks: many.kv_capacity_blocks(),
                ..options.clone()
            },
        )?;
        let names = [self.engines[FEW].name(), self.engines[MANY].name()];
        let mut pair = PairedInstance::new(few, many, self.switch_up)?.named(names);
        pair.costs = self.costs;
        Ok(Box::new(pair))
    }
}

/// One model on two engines; see the module docs.
pub struct PairedInstance {
    engines: [Box<dyn LlmInstance>; 2],
    /// The engines' names, for the log.
    names: [String; 2],
    switch_up: usize,
    /// The engines' costs, to place a lone sequence.
    costs: Option<[EngineCosts; 2]>,
    /// The engine the next step runs on.
    active: usize,
    /// The engine of the last successful step (what `last_hidden` asks).
    last: usize,
    held: HashMap<SeqId, Held>,
    /// The pool, in blocks: each engine holds at most this many, and grows
    /// to it before its next step.
    pool: usize,
}

/// A sequence of the pair: the engine it lives on, every token it holds,
/// and whether it is retired (kept only as a source of copies: it counts
/// for neither engine's choice).
#[derive(Clone)]
struct Held {
    engine: usize,
    tokens: Vec<u32>,
    retired: bool,
}

/// One step as the pair runs it (see [`PairedInstance::plan`]).
struct Plan {
    engine: usize,
    /// The batch as `engine` runs it.
    run: Vec<StepEntry>,
    /// The sequences that move to `engine` in this step.
    moving: Vec<SeqId>,
    /// Blocks the step takes from the pool, net of those freed behind.
    needed: usize,
}

impl PairedInstance {
    /// Pairs two instances of one model with the same block size and pool.
    pub fn new(
        few: Box<dyn LlmInstance>,
        many: Box<dyn LlmInstance>,
        switch_up: usize,
    ) -> Result<Self, EngineError> {
        let (a, b) = (few.config(), many.config());
        if (a.vocab_size, a.num_layers, a.hidden_size)
            != (b.vocab_size, b.num_layers, b.hidden_size)
        {
            return Err(EngineError::Model(
                "the two engines loaded different models".into(),
            ));
        }
        if few.block_size_tokens() != many.block_size_tokens() {
            return Err(EngineError::Unsupported(format!(
                "KV blocks of {} and {} tokens",
                few.block_size_tokens(),
                many.block_size_tokens()
            )));
        }
        let mut pair = PairedInstance {
            engines: [few, many],
            names: ["few".into(), "many".into()],
            switch_up: switch_up.max(2),
            costs: None,
            active: FEW,
            last: FEW,
            held: HashMap::new(),
            pool: 0,
        };
        pair.pool = pair.engines[MANY].kv_capacity_blocks();
        if pair.engines[FEW].kv_capacity_blocks() != pair.pool {
            pair.engines[FEW].resize_kv(pair.pool)?;
        }
        Ok(pair)
    }

    /// Names the two engines in the log line of each switch.
    pub fn named(mut self, [few, many]: [&str; 2]) -> Self {
        self.names = [few.into(), many.into()];
        self
    }

    /// The sequences that still take steps.
    fn live(&self) -> usize {
        self.held.values().filter(|h| !h.retired).count()
    }

    /// The engine a step runs on while the instance holds `held` live
    /// sequences: `many` from `switch_up`, `few` again at one or none.
    fn engine_by_count(&self, held: usize) -> usize {
        match self.active {
            FEW if held >= self.switch_up => MANY,
            MANY if held <= 1 => FEW,
            e => e,
        }
    }

    /// The engine `batch` runs on: a lone sequence's where it costs least,
    /// when the costs are known; else as the count of sequences says.
    fn engine_for(&self, batch: &[StepEntry]) -> usize {
        if let (1, [e], Some(costs)) = (self.live(), batch, self.costs)
            && let Some(h) = self.held.get(&e.seq)
        {
            let cost = |engine: usize| {
                let moved = if engine == h.engine {
                    0
                } else {
                    h.tokens.len()
                };
                let c = costs[engine];
                (moved + e.tokens.len()) as f64 * c.prompt_token_s
                    + LONE_ANSWER_STEPS as f64 * c.step_s
            };
            let other = 1 - h.engine;
            return if cost(other) < cost(h.engine) {
                other
            } else {
                h.engine
            };
        }
        self.engine_by_count(self.live())
    }

    /// Grows `engine` to the pool, if a grow is pending for it.
    fn fit(&mut self, engine: usize) -> Result<(), EngineError> {
        if self.engines[engine].kv_capacity_blocks() < self.pool {
            self.engines[engine].resize_kv(self.pool)?;
        }
        Ok(())
    }

    fn held(&self, seq: SeqId) -> Result<&Held, EngineError> {
        self.held.get(&seq).ok_or(EngineError::UnknownSequence(seq))
    }

    /// How a step of `batch` runs: on the engine the held count says; a
    /// sequence that lives on the other engine brings its tokens so far
    /// ahead of the step's, and is counted as a new sequence there less
    /// the blocks it frees behind (all the other engine holds when every
    /// sequence there moves, else its own: a block shared with a fork that
    /// stays is not freed, and counting it errs toward admitting the step).
    fn plan(&self, batch: &[StepEntry]) -> Result<Plan, EngineError> {
        let engine = self.engine_for(batch);
        let bs = self.block_size_tokens();
        let (mut run, mut staying, mut moving) = (Vec::new(), Vec::new(), Vec::new());
        let (mut moved_blocks, mut own_behind) = (0, 0);
        for e in batch {
            let h = self.held(e.seq)?;
            if h.engine == engine {
                staying.push(e.clone());
                run.push(e.clone());
                continue;
            }
            let mut tokens = h.tokens.clone();
            tokens.extend_from_slice(&e.tokens);
            moved_blocks += tokens.len().div_ceil(bs);
            own_behind += h.tokens.len().div_ceil(bs);
            moving.push(e.seq);
            run.push(StepEntry { seq: e.seq, tokens });
        }
        let here = if staying.is_empty() {
            0
        } else {
            self.engines[engine].blocks_needed(&staying)?
        };
        let other = 1 - engine;
        let there = self.held.values().filter(|h| h.engine == other).count();
        let held_there = self.engines[other].kv_blocks_in_use();
        let behind = if moving.len() == there {
            held_there
        } else {
            own_behind.min(held_there)
        };
        Ok(Plan {
            engine,
            run,
            moving,
            needed: (here + moved_blocks).saturating_sub(behind),
        })
    }
}

impl LlmInstance for PairedInstance {
    fn config(&self) -> &ModelConfig {
        self.engines[FEW].config()
    }
    fn block_size_tokens(&self) -> usize {
        self.engines[FEW].block_size_tokens()
    }
    /// A block of the pool exists on both engines.
    fn kv_bytes_per_block(&self) -> u64 {
        self.engines.iter().map(|e| e.kv_bytes_per_block()).sum()
    }
    fn weight_bytes(&self) -> u64 {
        self.engines.iter().map(|e| e.weight_bytes()).sum()
    }
    fn kv_capacity_blocks(&self) -> usize {
        self.pool
    }
    /// A sequence holds blocks on one engine only.
    fn kv_blocks_in_use(&self) -> usize {
        self.engines.iter().map(|e| e.kv_blocks_in_use()).sum()
    }
    /// Each engine counts the sequences that live on it.
    fn kv_blocks_held_only_by(&self, seqs: &[SeqId]) -> usize {
        (0..2)
            .map(|engine| {
                let here: Vec<SeqId> = seqs
                    .iter()
                    .copied()
                    .filter(|s| self.held.get(s).is_some_and(|h| h.engine == engine))
                    .collect();
                self.engines[engine].kv_blocks_held_only_by(&here)
            })
            .sum()
    }

    /// Shrinks the engines holding more than `blocks` now; a grow waits for
    /// each engine's next step (see the module docs).
    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        // Every sequence may move to one engine: all of them must fit.
        let in_use = self.kv_blocks_in_use();
        if blocks < in_use {
            return Err(EngineError::ShrinkBelowUsage {
                requested: blocks,
                in_use,
            });
        }
        let before = self.engines[FEW].kv_capacity_blocks();
        if before > blocks {
            self.engines[FEW].resize_kv(blocks)?;
        }
        if self.engines[MANY].kv_capacity_blocks() > blocks
            && let Err(e) = self.engines[MANY].resize_kv(blocks)
        {
            // Leave the pair as it was; growing back what was just shrunk fits.
            let _ = self.engines[FEW].resize_kv(before);
            return Err(e);
        }
        self.pool = blocks;
        Ok(())
    }

    fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        if self.held.contains_key(&seq) {
            return Err(EngineError::SequenceExists(seq));
        }
        // Where the next step will run with this sequence held.
        let engine = self.engine_by_count(self.live() + 1);
        self.engines[engine].add_sequence(seq)?;
        self.held.insert(
            seq,
            Held {
                engine,
                tokens: Vec::new(),
                retired: false,
            },
        );
        Ok(())
    }

    /// Costs what it costs on the engine it lives on; it no longer counts
    /// for the choice of engine.
    fn retire_sequence(&mut self, seq: SeqId) -> Result<RetiredCost, EngineError> {
        let engine = self.held(seq)?.engine;
        let cost = self.engines[engine].retire_sequence(seq)?;
        self.held.get_mut(&seq).expect("held").retired = true;
        Ok(cost)
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let engine = self.held(seq)?.engine;
        self.engines[engine].free_sequence(seq)?;
        self.held.remove(&seq);
        Ok(())
    }

    /// The copy lives where `src` does.
    fn fork_sequence(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), EngineError> {
        let held = self.held(src)?;
        let copy = Held {
            engine: held.engine,
            tokens: held
                .tokens
                .get(..tokens)
                .ok_or(EngineError::ForkBeyondSequence {
                    seq: src,
                    tokens,
                    len: held.tokens.len(),
                })?
                .to_vec(),
            retired: false,
        };
        if self.held.contains_key(&dst) {
            return Err(EngineError::SequenceExists(dst));
        }
        self.engines[copy.engine].fork_sequence(src, dst, tokens)?;
        self.held.insert(dst, copy);
        Ok(())
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.engines[self.held.get(&seq)?.engine].sequence_len(seq)
    }

    fn blocks_needed(&self, batch: &[StepEntry]) -> Result<usize, EngineError> {
        Ok(self.plan(batch)?.needed)
    }

    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
        let Plan {
            engine,
            run,
            moving,
            needed,
        } = self.plan(batch)?;
        // The tokens the moving sequences held, computed again on `engine`.
        let recomputed: usize = moving.iter().map(|s| self.held[s].tokens.len()).sum();
        let free = self
            .kv_capacity_blocks()
            .saturating_sub(self.kv_blocks_in_use());
        if needed > free {
            return Err(EngineError::KvExhausted { needed, free });
        }
        self.fit(engine)?;
        let undo = |pair: &mut Self, added: &[SeqId]| {
            for &seq in added {
                // Freeing a sequence just added (and not advanced) cannot fail.
                let _ = pair.engines[engine].free_sequence(seq);
            }
        };
        for (i, &seq) in moving.iter().enumerate() {
            if let Err(e) = self.engines[engine].add_sequence(seq) {
                undo(self, &moving[..i]);
                return Err(e);
            }
        }
        let logits = match self.engines[engine].step(&run) {
            Ok(l) => l,
            Err(e) => {
                undo(self, &moving);
                return Err(e);
            }
        };
        for &seq in &moving {
            self.engines[1 - engine].free_sequence(seq)?;
        }
        for e in batch {
            let h = self.held.get_mut(&e.seq).expect("checked by plan");
            h.engine = engine;
            h.tokens.extend_from_slice(&e.tokens);
        }
        if engine != self.active {
            tracing::info!(
                sequences = self.live(),
                moved = moving.len(),
                recomputed_tokens = recomputed,
                "paired instance: steps move to {}",
                self.names[engine]
            );
            self.active = engine;
        }
        self.last = engine;
        Ok(logits)
    }

    fn last_hidden(&mut self) -> Result<Vec<Vec<f32>>, EngineError> {
        self.engines[self.last].last_hidden()
    }

    /// Both engines' memory; the pool as the pair counts it.
    fn memory(&self) -> MemoryReport {
        let [a, b] = [self.engines[FEW].memory(), self.engines[MANY].memory()];
        MemoryReport {
            weight_bytes: a.weight_bytes + b.weight_bytes,
            kv_bytes: a.kv_bytes + b.kv_bytes,
            workspace_bytes: a.workspace_bytes + b.workspace_bytes,
            kv_blocks_capacity: self.kv_capacity_blocks(),
            kv_blocks_in_use: self.kv_blocks_in_use(),
            ..a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ReferenceBackend;

    fn load(seed: u64, blocks: usize) -> Box<dyn LlmInstance> {
        ReferenceBackend::default()
            .load(
                &ModelSource::Random {
                    config: ModelConfig::tiny_for_tests(),
                    seed,
                    scale: 0.5,
                },
                0,
                &LoadOptions {
                    initial_kv_blocks: blocks,
                    ..Default::default()
                },
            )
            .unwrap()
    }

    /// `few` and `many` have different weights, so each step's logits say
    /// which one computed them.
    fn pair(switch_up: usize) -> PairedInstance {
        PairedInstance::new(load(1, 32), load(2, 32), switch_up).unwrap()
    }

    fn entry(seq: SeqId, tokens: &[u32]) -> StepEntry {
        StepEntry {
            seq,
            tokens: tokens.to_vec(),
        }
    }

    /// The logits of `seq` after `tokens` on a fresh instance of `seed`.
    fn alone(seed: u64, tokens: &[u32]) -> Vec<f32> {
        let mut inst = load(seed, 32);
        inst.add_sequence(0).unwrap();
        inst.step(&[entry(0, tokens)]).unwrap().remove(0)
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
    }

    #[test]
    fn few_sequences_run_on_few_and_many_move_with_their_tokens() {
        let mut p = pair(3);
        p.add_sequence(10).unwrap();
        p.add_sequence(11).unwrap();
        let out = p
            .step(&[entry(10, &[1, 2, 3]), entry(11, &[4, 5])])
            .unwrap();
        assert!(
            close(&out[0], &alone(1, &[1, 2, 3])),
            "below switch_up: few"
        );
        assert!(close(&out[1], &alone(1, &[4, 5])));
        assert_eq!(p.engines[FEW].kv_blocks_in_use(), 2);

        // The third sequence takes the pair to `many`: the two held move
        // there with their tokens, in the same step.
        p.add_sequence(12).unwrap();
        let out = p
            .step(&[entry(10, &[6]), entry(11, &[7]), entry(12, &[8, 9])])
            .unwrap();
        assert!(close(&out[0], &alone(2, &[1, 2, 3, 6])), "moved to many");
        assert!(close(&out[1], &alone(2, &[4, 5, 7])));
        assert!(close(&out[2], &alone(2, &[8, 9])));
        assert_eq!(p.engines[FEW].kv_blocks_in_use(), 0, "freed behind");
        assert_eq!(p.kv_blocks_in_use(), 3);
        assert_eq!(p.sequence_len(10), Some(4));

        // Two held: still `many`; down to one: back to `few`.
        p.free_sequence(12).unwrap();
        let out = p.step(&[entry(10, &[5]), entry(11, &[6])]).unwrap();
        assert!(close(&out[0], &alone(2, &[1, 2, 3, 6, 5])), "still many");
        assert!(close(&out[1], &alone(2, &[4, 5, 7, 6])));
        p.free_sequence(11).unwrap();
        let out = p.step(&[entry(10, &[4])]).unwrap();
        assert!(
            close(&out[0], &alone(1, &[1, 2, 3, 6, 5, 4])),
            "back on few"
        );
        assert_eq!(p.engines[MANY].kv_blocks_in_use(), 0);
        assert_eq!(p.sequence_len(10), Some(6));
    }

    /// A retired sequence stays where it is, as a source of copies, and
    /// counts for neither engine's choice: the one that goes on alone is
    /// back on `few`, and so is a new one that copies the retired one.
    #[test]
    fn retired_sequences_count_for_no_choice_of_engine() {
        let mut p = pair(2);
        p.add_sequence(10).unwrap();
        p.add_sequence(11).unwrap();
        p.step(&[entry(10, &[1, 2, 3]), entry(11, &[4, 5])])
            .unwrap();
        assert_eq!(p.held[&10].engine, MANY);
        assert_eq!(p.retire_sequence(11).unwrap(), RetiredCost::Nothing);
        assert!(matches!(
            p.retire_sequence(12),
            Err(EngineError::UnknownSequence(12))
        ));
        let out = p.step(&[entry(10, &[6])]).unwrap();
        assert!(close(&out[0], &alone(1, &[1, 2, 3, 6])), "alone: few");
        assert_eq!(p.held[&11].engine, MANY, "the retired one stays");
        assert_eq!(p.sequence_len(11), Some(2));
        // A copy of it lives where it does and moves to `few` with its step.
        p.fork_sequence(11, 12, 2).unwrap();
        p.free_sequence(10).unwrap();
        let out = p.step(&[entry(12, &[7])]).unwrap();
        assert!(close(&out[0], &alone(1, &[4, 5, 7])), "the copy: few");
        assert_eq!(p.kv_blocks_in_use(), 2);
    }

    /// Costs under which `few` decodes 2 ms a step faster and prefills
    /// 3 ms a token slower: over [`LONE_ANSWER_STEPS`] (0.256 s) a new
    /// prompt of more than 85 tokens is cheaper on `many`, and a lone
    /// sequence there moves back to `few` only with at most 63 tokens held.
    fn costed(switch_up: usize) -> PairedInstance {
        let mut p = pair(switch_up);
        p.costs = Some([
            EngineCosts {
                prompt_token_s: 0.004,
                step_s: 0.009,
            },
            EngineCosts {
                prompt_token_s: 0.001,
                step_s: 0.011,
            },
        ]);
        p
    }

    fn prompt(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| 3 + i % 50).collect()
    }

    #[test]
    fn a_lone_sequence_runs_where_its_prompt_and_answer_cost_least() {
        let mut p = costed(8);
        // A short prompt of its own: `few`, as without costs.
        p.add_sequence(1).unwrap();
        let out = p.step(&[entry(1, &prompt(40))]).unwrap();
        assert!(close(&out[0], &alone(1, &prompt(40))), "short: few");
        p.free_sequence(1).unwrap();

        // A long one: `many` prefills it, and decodes it after, since
        // prefilling its 90 tokens again on `few` costs more than `few`'s
        // faster steps repay.
        p.add_sequence(2).unwrap();
        let out = p.step(&[entry(2, &prompt(90))]).unwrap();
        assert!(close(&out[0], &alone(2, &prompt(90))), "long: many");
        assert_eq!(p.engines[FEW].kv_blocks_in_use(), 0);
        let out = p.step(&[entry(2, &[7])]).unwrap();
        let mut held = prompt(90);
        held.push(7);
        assert!(close(&out[0], &alone(2, &held)), "stays on many");
        assert_eq!(p.held[&2].engine, MANY);

        // A second sequence below `switch_up` joins it there (the count
        // rule holds for two or more), and a new lone short prompt after
        // both end goes back to `few`.
        p.add_sequence(3).unwrap();
        let out = p.step(&[entry(2, &[8]), entry(3, &[4, 5])]).unwrap();
        assert!(close(&out[1], &alone(2, &[4, 5])), "joins many");
        p.free_sequence(2).unwrap();
        p.free_sequence(3).unwrap();
        p.add_sequence(4).unwrap();
        let out = p.step(&[entry(4, &[4, 5])]).unwrap();
        assert!(close(&out[0], &alone(1, &[4, 5])), "back on few");
    }

    #[test]
    fn a_lone_sequence_moves_back_to_few_only_when_that_repays() {
        let mut p = costed(2);
        // Two short sequences take the pair to `many`; when one ends, the
        // other (4 tokens held) moves back: recomputing them costs less.
        p.add_sequence(1).unwrap();
        p.add_sequence(2).unwrap();
        p.step(&[entry(1, &[3, 4, 5]), entry(2, &[6])]).unwrap();
        assert_eq!(p.held[&1].engine, MANY);
        p.free_sequence(2).unwrap();
        let out = p.step(&[entry(1, &[7])]).unwrap();
        assert!(close(&out[0], &alone(1, &[3, 4, 5, 7])), "moved back");
        assert_eq!(p.engines[MANY].kv_blocks_in_use(), 0);
        p.free_sequence(1).unwrap();

        // The same with 70 tokens held stays on `many`.
        p.add_sequence(3).unwrap();
        p.add_sequence(4).unwrap();
        p.step(&[entry(3, &prompt(70)), entry(4, &[6])]).unwrap();
        p.free_sequence(4).unwrap();
        let out = p.step(&[entry(3, &[7])]).unwrap();
        let mut held = prompt(70);
        held.push(7);
        assert!(close(&out[0], &alone(2, &held)), "stays on many");
        assert_eq!(p.held[&3].engine, MANY);
    }

    #[test]
    fn a_refused_step_moves_nothing() {
        let mut p = pair(2);
        p.add_sequence(1).unwrap();
        p.step(&[entry(1, &[1, 2])]).unwrap();
        p.add_sequence(2).unwrap();
        let vocab = p.config().vocab_size as u32;
        // The step would move sequence 1 to `many`; a bad token fails it there.
        let err = p.step(&[entry(1, &[3]), entry(2, &[vocab])]).unwrap_err();
        assert!(matches!(err, EngineError::TokenOutOfRange { .. }), "{err}");
        assert_eq!(p.held[&1].engine, FEW);
        assert_eq!(p.engines[MANY].kv_blocks_in_use(), 0);
        assert_eq!(p.sequence_len(1), Some(2));
        assert!(matches!(
            p.step(&[entry(9, &[1])]),
            Err(EngineError::UnknownSequence(9))
        ));
        // And the same step with a good token goes through.
        let out = p.step(&[entry(1, &[3]), entry(2, &[4])]).unwrap();
        assert!(close(&out[0], &alone(2, &[1, 2, 3])));
    }

    #[test]
    fn the_pool_is_counted_once_and_resized_on_both() {
        let mut p = pair(2);
        let bs = p.block_size_tokens();
        assert_eq!(p.kv_capacity_blocks(), 32);
        assert_eq!(
            p.kv_bytes_per_block(),
            2 * load(1, 1).kv_bytes_per_block(),
            "a block exists on both engines"
        );
        p.add_sequence(1).unwrap();
        p.step(&[entry(1, &vec![1; 3 * bs])]).unwrap();
        p.add_sequence(2).unwrap();
        // Moving sequence 1 frees its 3 blocks behind: the step takes 1 + 1.
        let step = [entry(1, &[1]), entry(2, &[2])];
        assert_eq!(p.blocks_needed(&step).unwrap(), 2);
        p.resize_kv(8).unwrap();
        assert_eq!(p.engines[FEW].kv_capacity_blocks(), 8);
        assert_eq!(p.engines[MANY].kv_capacity_blocks(), 8);
        assert!(matches!(
            p.resize_kv(2),
            Err(EngineError::ShrinkBelowUsage { .. })
        ));
        assert_eq!(
            p.kv_capacity_blocks(),
            8,
            "a refused shrink changes nothing"
        );
        p.step(&step).unwrap();
        assert_eq!(p.kv_blocks_in_use(), 5);
        assert_eq!(p.memory().kv_blocks_in_use, 5);
        // More than the pool holds is refused before either engine runs.
        p.add_sequence(3).unwrap();
        assert!(matches!(
            p.step(&[entry(3, &vec![1; 4 * bs])]),
            Err(EngineError::KvExhausted { needed: 4, free: 3 })
        ));
    }

    #[test]
    fn a_grow_waits_for_each_engines_next_step_and_a_shrink_does_not() {
        let mut p = pair(2);
        let caps = |p: &PairedInstance| {
            [
                p.engines[FEW].kv_capacity_blocks(),
                p.engines[MANY].kv_capacity_blocks(),
            ]
        };
        // Two grows in a row (a burst's first request, then the rest).
        p.resize_kv(48).unwrap();
        p.resize_kv(64).unwrap();
        assert_eq!(p.kv_capacity_blocks(), 64);
        assert_eq!(caps(&p), [32, 32], "nothing allocated yet");
        assert_eq!(p.memory().kv_blocks_capacity, 64);
        assert_eq!(
            p.memory().kv_bytes,
            64 * load(1, 1).kv_bytes_per_block(),
            "the engines' memory as it is: 32 blocks on each"
        );
        p.add_sequence(1).unwrap();
        p.step(&[entry(1, &[1, 2])]).unwrap();
        assert_eq!(caps(&p), [64, 32], "few grew for its step, many did not");
        // A step that needs more than the lagging engine has now, but no
        // more than the pool: `many` grows first and takes it.
        let bs = p.block_size_tokens();
        let mut step = vec![entry(1, &[3])];
        for seq in 2..7 {
            p.add_sequence(seq).unwrap();
            step.push(entry(seq, &vec![4; 7 * bs]));
        }
        let out = p.step(&step).unwrap();
        assert!(close(&out[0], &alone(2, &[1, 2, 3])));
        assert_eq!(caps(&p), [64, 64]);
        assert_eq!(p.kv_blocks_in_use(), 36);
        // A shrink applies to both at once, and not below what is held.
        for seq in 2..7 {
            p.free_sequence(seq).unwrap();
        }
        p.resize_kv(16).unwrap();
        assert_eq!(caps(&p), [16, 16]);
        p.resize_kv(40).unwrap();
        p.free_sequence(1).unwrap();
        p.add_sequence(3).unwrap();
        p.step(&[entry(3, &[5])]).unwrap();
        assert_eq!(caps(&p), [40, 16], "back on few: only few grew");
        p.resize_kv(24).unwrap();
        assert_eq!(
            caps(&p),
            [24, 16],
            "a shrink leaves a smaller engine as it is"
        );
        assert!(matches!(
            p.resize_kv(0),
            Err(EngineError::ShrinkBelowUsage {
                requested: 0,
                in_use: 1
            })
        ));
        assert_eq!(caps(&p), [24, 16], "a refused shrink changes nothing");
    }

    #[test]
    fn a_fork_lives_with_its_source_and_moves_with_its_own_tokens() {
        let mut p = pair(3);
        p.add_sequence(1).unwrap();
        p.step(&[entry(1, &[1, 2, 3])]).unwrap();
        p.fork_sequence(1, 2, 3).unwrap();
        assert_eq!(p.held[&2].engine, FEW);
        p.add_sequence(3).unwrap();
        let out = p
            .step(&[entry(1, &[4]), entry(2, &[5]), entry(3, &[6])])
            .unwrap();
        assert!(close(&out[0], &alone(2, &[1, 2, 3, 4])));
        assert!(close(&out[1], &alone(2, &[1, 2, 3, 5])));
        assert!(matches!(
            p.fork_sequence(1, 3, 1),
            Err(EngineError::SequenceExists(3))
        ));
    }

    #[test]
    fn a_fork_of_a_prefix_holds_only_those_tokens_and_moves_with_them() {
        let mut p = pair(3);
        p.add_sequence(1).unwrap();
        p.step(&[entry(1, &[1, 2, 3, 4])]).unwrap();
        p.fork_sequence(1, 2, 2).unwrap();
        assert_eq!(p.held[&2].tokens, [1, 2]);
        assert_eq!(p.sequence_len(2), Some(2));
        assert!(matches!(
            p.fork_sequence(1, 3, 5),
            Err(EngineError::ForkBeyondSequence {
                seq: 1,
                tokens: 5,
                ..
            })
        ));
        assert!(!p.held.contains_key(&3), "a refused fork holds nothing");
        // Three sequences move to `many`, each with its own tokens.
        p.add_sequence(3).unwrap();
        let out = p
            .step(&[entry(1, &[5]), entry(2, &[6]), entry(3, &[7])])
            .unwrap();
        assert!(close(&out[0], &alone(2, &[1, 2, 3, 4, 5])));
        assert!(close(&out[1], &alone(2, &[1, 2, 6])));
        assert!(close(&out[2], &alone(2, &[7])));
    }

    #[test]
    fn engines_of_different_models_or_blocks_are_not_paired() {
        let mut other = ModelConfig::tiny_for_tests();
        other.num_layers += 1;
        let odd = ReferenceBackend::default()
            .load(
                &ModelSource::Random {
                    config: other,
                    seed: 3,
                    scale: 0.5,
                },
                0,
                &LoadOptions::default(),
            )
            .unwrap();
        assert!(matches!(
            PairedInstance::new(load(1, 4), odd, 4),
            Err(EngineError::Model(_))
        ));
        let gpu: Arc<dyn Backend> = Arc::new(ReferenceBackend::with_devices(DeviceKind::Gpu, &[0]));
        let cpu: Arc<dyn Backend> = Arc::new(ReferenceBackend::default());
        assert!(matches!(
            PairedBackend::new(cpu, gpu, 4),
            Err(EngineError::Unsupported(_))
        ));
    }
}
