//! The sequences an instance holds, as its runner knows them: the tokens
//! in each one's KV and the function that asked, so that a later prompt of
//! that function that begins alike starts as a copy of them; and which of
//! them are retired.
//!
//! When a request ends, its sequence (its prompt and its answer) is not
//! freed at once but retired ([`LlmInstance::retire_sequence`]): kept in
//! the KV pool's free room as a source of copies for the next call of a
//! conversation or of an agent's loop, whose prompt begins with the last
//! one's prompt and answer, and so computes only what is new. Only for a
//! prompt that begins with a retired request's whole prompt and goes on:
//! the same prompt again is computed as it was the first time (a copy
//! would leave its last token to a step of its own, whose arithmetic can
//! differ in the last bits and so turn a near-tie the other way). The
//! scheduler does not count retired sequences: their blocks are free as far
//! as it knows, and the runner frees them, oldest first, whenever a step, a
//! copy or a shrink of the pool needs the blocks
//! ([`HeldSequences::make_room`], [`HeldSequences::shrink_to`]). So nothing
//! outlives the pool. An idle CPU instance's pool shrinks to the
//! scheduler's idle floor (`SchedulerConfig::idle_kv_tokens`, `serve
//! --idle-kv-tokens`), not to nothing: the retired sequences that fit stay
//! while the instance stays loaded, so a conversation's next call finds the
//! last one after its caller read the answer and typed. On an engine where
//! other sequences' steps read over a retired sequence's cells
//! ([`RetiredCost::EveryStep`], llama.cpp's unified cache), it is kept only
//! until the next step (an idle instance takes none).

use std::collections::{HashMap, VecDeque};

use slinfer_engine::{LlmInstance, RetiredCost};
use slinfer_scheduler::RequestId;

/// An engine's instance as the runner owns it (boxed).
type Instance = dyn LlmInstance + 'static;

#[derive(Default)]
pub(crate) struct HeldSequences {
    /// Every token in each sequence's KV (its prompt, what a preempted
    /// request had generated, then each token a decode step fed).
    contexts: HashMap<RequestId, Context>,
    /// The retired sequences, oldest first, and what each costs the steps
    /// of the others.
    retired: VecDeque<(RequestId, RetiredCost)>,
}

struct Context {
    /// The function that asked.
    owner: u32,
    tokens: Vec<u32>,
    /// How many of them it was prefilled with.
    prefilled: usize,
}

/// A sequence a prompt may start as a copy of: its id, the function that
/// asked for it, the tokens in its KV, and the fewest of them a copy must
/// take (a retired sequence's whole prompt, see the module docs).
pub(crate) type Source<'a> = (RequestId, u32, &'a [u32], usize);

impl HeldSequences {
    /// `id` was prefilled with `tokens` for function `owner`.
    pub fn insert(&mut self, id: RequestId, owner: u32, tokens: Vec<u32>) {
        let context = Context {
            owner,
            prefilled: tokens.len(),
            tokens,
        };
        self.contexts.insert(id, context);
    }

    /// A decode step fed `token` to `id`.
    pub fn fed(&mut self, id: RequestId, token: u32) {
        if let Some(c) = self.contexts.get_mut(&id) {
            c.tokens.push(token);
        }
    }

    /// Each sequence a prompt may start as a copy of (all of whose tokens
    /// are in its KV).
    pub fn sources(&self, inst: &dyn LlmInstance) -> Vec<Source<'_>> {
        self.contexts
            .iter()
            .filter(|(id, c)| inst.sequence_len(**id).is_some_and(|n| n >= c.tokens.len()))
            .map(|(id, c)| {
                let retired = self.retired.iter().any(|&(r, _)| r == *id);
                let least = if retired { c.prefilled } else { 1 };
                (*id, c.owner, c.tokens.as_slice(), least)
            })
            .collect()
    }

    /// The retired sequences, oldest first.
    pub fn retired(&self) -> Vec<RequestId> {
        self.retired.iter().map(|&(id, _)| id).collect()
    }

    /// Frees `id`'s sequence, if the instance holds it.
    pub fn free(&mut self, inst: Option<&mut Instance>, id: RequestId) {
        self.contexts.remove(&id);
        self.retired.retain(|&(r, _)| r != id);
        if let Some(i) = inst
            && i.sequence_len(id).is_some()
        {
            let _ = i.free_sequence(id);
        }
    }

    /// `id`'s request ended: its sequence is kept as a source of copies,
    /// when the runner knows every token in it; else freed.
    pub fn retire(&mut self, inst: Option<&mut Instance>, id: RequestId) {
        let Some(i) = inst else {
            return self.free(None, id);
        };
        let whole = self
            .contexts
            .get(&id)
            .is_some_and(|c| i.sequence_len(id) == Some(c.tokens.len()) && !c.tokens.is_empty());
        match whole.then(|| i.retire_sequence(id)) {
            Some(Ok(cost)) => self.retired.push_back((id, cost)),
            _ => self.free(Some(i), id),
        }
    }

    /// Frees the retired sequences that would slow the next step.
    pub fn free_costly(&mut self, inst: &mut Instance) {
        let costly: Vec<RequestId> = self
            .retired
            .iter()
            .filter(|(_, c)| *c == RetiredCost::EveryStep)
            .map(|&(id, _)| id)
            .collect();
        for id in costly {
            self.free(Some(&mut *inst), id);
        }
    }

    /// Frees retired sequences, oldest first, until the pool has `blocks`
    /// free blocks (`blocks` asks the instance as it is then) or none is
    /// left.
    pub fn make_room(&mut self, inst: &mut Instance, blocks: impl Fn(&dyn LlmInstance) -> usize) {
        self.free_oldest_while(inst, |i| {
            i.kv_capacity_blocks().saturating_sub(i.kv_blocks_in_use()) < blocks(i)
        });
    }

    /// Frees retired sequences, oldest first, until the blocks in use fit
    /// a pool of `blocks`, or none is left.
    pub fn shrink_to(&mut self, inst: &mut Instance, blocks: usize) {
        self.free_oldest_while(inst, |i| i.kv_blocks_in_use() > blocks);
    }

    fn free_oldest_while(&mut self, inst: &mut Instance, short: impl Fn(&dyn LlmInstance) -> bool) {
        while let Some(&(id, _)) = self.retired.front()
            && short(inst)
        {
            self.free(Some(&mut *inst), id);
        }
    }

    /// The instance is gone (or new): it holds nothing.
    pub fn clear(&mut self) {
        self.contexts.clear();
        self.retired.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slinfer_engine::reference::ReferenceBackend;
    use slinfer_engine::{
        Backend, EngineError, LoadOptions, MemoryReport, ModelConfig, ModelSource, SeqId, StepEntry,
    };

    /// A reference instance with a pool of `blocks` blocks of 4 tokens.
    fn instance(blocks: usize) -> Box<dyn LlmInstance> {
        let source = ModelSource::Random {
            config: ModelConfig::tiny_for_tests(),
            seed: 1,
            scale: 0.5,
        };
        let opts = LoadOptions {
            initial_kv_blocks: blocks,
            block_size_tokens: Some(4),
            ..Default::default()
        };
        ReferenceBackend::default().load(&source, 0, &opts).unwrap()
    }

    /// Test double: a reference instance whose retired sequences cost
    /// every step, as llama.cpp's do.
    struct EveryStepDouble(Box<dyn LlmInstance>);

    impl LlmInstance for EveryStepDouble {
        fn config(&self) -> &ModelConfig {
            self.0.config()
        }
        fn block_size_tokens(&self) -> usize {
            self.0.block_size_tokens()
        }
        fn kv_bytes_per_block(&self) -> u64 {
            self.0.kv_bytes_per_block()
        }
        fn weight_bytes(&self) -> u64 {
            self.0.weight_bytes()
        }
        fn kv_capacity_blocks(&self) -> usize {
            self.0.kv_capacity_blocks()
        }
        fn kv_blocks_in_use(&self) -> usize {
            self.0.kv_blocks_in_use()
        }
        fn kv_blocks_held_only_by(&self, seqs: &[SeqId]) -> usize {
            self.0.kv_blocks_held_only_by(seqs)
        }
        fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
            self.0.resize_kv(blocks)
        }
        fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
            self.0.add_sequence(seq)
        }
        fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
            self.0.free_sequence(seq)
        }
        fn fork_sequence(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), EngineError> {
            self.0.fork_sequence(src, dst, n)
        }
        fn retire_sequence(&mut self, seq: SeqId) -> Result<RetiredCost, EngineError> {
            self.0.retire_sequence(seq).map(|_| RetiredCost::EveryStep)
        }
        fn sequence_len(&self, seq: SeqId) -> Option<usize> {
            self.0.sequence_len(seq)
        }
        fn blocks_needed(&self, batch: &[StepEntry]) -> Result<usize, EngineError> {
            self.0.blocks_needed(batch)
        }
        fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
            self.0.step(batch)
        }
        fn memory(&self) -> MemoryReport {
            self.0.memory()
        }
    }

    fn prefill(inst: &mut Instance, held: &mut HeldSequences, id: u64, tokens: &[u32]) {
        inst.add_sequence(id).unwrap();
        inst.step(&[StepEntry {
            seq: id,
            tokens: tokens.to_vec(),
        }])
        .unwrap();
        held.insert(id, 0, tokens.to_vec());
    }

    #[test]
    fn retired_sequences_give_their_blocks_back_oldest_first() {
        let mut inst = instance(6);
        let mut held = HeldSequences::default();
        let inst = inst.as_mut();
        prefill(inst, &mut held, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        prefill(inst, &mut held, 2, &[1, 2, 3, 4, 9, 9, 9, 9]);
        held.retire(Some(&mut *inst), 1);
        held.retire(Some(&mut *inst), 2);
        // Both kept, as sources of copies.
        assert_eq!(held.sources(inst).len(), 2);
        assert_eq!(inst.kv_blocks_in_use(), 4);
        // Room for three blocks: the oldest goes.
        held.make_room(inst, |_| 3);
        assert_eq!(inst.sequence_len(1), None);
        assert_eq!(inst.sequence_len(2), Some(8));
        assert_eq!(held.sources(inst).len(), 1);
        // A shrink to one block frees the rest.
        held.shrink_to(inst, 1);
        assert_eq!(inst.kv_blocks_in_use(), 0);
        assert!(held.sources(inst).is_empty());
    }

    #[test]
    fn retired_sequences_that_cost_every_step_go_before_the_next_one() {
        let mut costly = EveryStepDouble(instance(8));
        let mut paged = instance(8);
        for inst in [&mut costly as &mut Instance, paged.as_mut()] {
            let mut held = HeldSequences::default();
            prefill(inst, &mut held, 1, &[1, 2, 3, 4, 5]);
            held.retire(Some(&mut *inst), 1);
            assert_eq!(held.sources(inst).len(), 1, "kept until the next step");
            held.free_costly(inst);
            let kept = inst.sequence_len(1).is_some();
            assert_eq!(held.sources(inst).len(), usize::from(kept));
        }
        assert_eq!(costly.sequence_len(1), None, "freed before the next step");
        assert_eq!(paged.sequence_len(1), Some(5), "kept: it costs nothing");
    }

    #[test]
    fn a_sequence_whose_tokens_are_not_all_known_is_freed_not_retired() {
        let mut inst = instance(8);
        let inst = inst.as_mut();
        let mut held = HeldSequences::default();
        prefill(inst, &mut held, 1, &[1, 2, 3]);
        // A step the runner did not record: its tokens are behind the KV.
        let one = |seq| StepEntry {
            seq,
            tokens: vec![4],
        };
        inst.step(&[one(1)]).unwrap();
        held.retire(Some(&mut *inst), 1);
        assert_eq!(inst.sequence_len(1), None);
        // A fed token keeps it whole.
        prefill(inst, &mut held, 2, &[1, 2, 3]);
        inst.step(&[one(2)]).unwrap();
        held.fed(2, 4);
        held.retire(Some(&mut *inst), 2);
        assert_eq!(held.sources(inst), vec![(2, 0, &[1, 2, 3, 4][..], 3)]);
    }
}
