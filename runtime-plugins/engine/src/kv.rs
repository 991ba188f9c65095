//! Paged KV cache bookkeeping shared by every engine: a block allocator over a
//! pool that grows and shrinks, per-sequence block tables, and the flattened
//! [`BatchPlan`] of one iteration (the same arrays OpenVINO's paged-attention
//! IR takes: `past_lens`, `subsequence_begins`, `block_indices`,
//! `block_indices_begins`).
//!
//! Only indices live here; the engines own the memory the indices point into.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::{EngineError, SeqId, StepEntry};

/// Hands out block indices `0..capacity`, lowest first, so that shrinking
/// moves as few blocks as possible.
#[derive(Debug, Clone, Default)]
pub struct BlockAllocator {
    capacity: usize,
    free: BTreeSet<u32>,
}

impl BlockAllocator {
    pub fn new(capacity: usize) -> Self {
        BlockAllocator {
            capacity,
            free: (0..capacity as u32).collect(),
        }
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn free_count(&self) -> usize {
        self.free.len()
    }
    pub fn used_count(&self) -> usize {
        self.capacity - self.free.len()
    }
    pub fn is_free(&self, block: u32) -> bool {
        self.free.contains(&block)
    }
    /// Take `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, EngineError> {
        if n > self.free.len() {
            return Err(EngineError::KvExhausted {
                needed: n,
                free: self.free.len(),
            });
        }
        Ok((0..n)
            .map(|_| self.free.pop_first().expect("counted"))
            .collect())
    }
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            debug_assert!((b as usize) < self.capacity && !self.free.contains(&b));
            self.free.insert(b);
        }
    }
    pub fn grow(&mut self, new_capacity: usize) {
        assert!(new_capacity >= self.capacity);
        self.free.extend(self.capacity as u32..new_capacity as u32);
        self.capacity = new_capacity;
    }
    /// Shrink to `new_capacity`. Blocks in use at or above it move to free
    /// blocks below it; the returned `(from, to)` moves say which, so the
    /// engine can copy their contents before releasing memory.
    pub fn shrink(&mut self, new_capacity: usize) -> Result<Vec<(u32, u32)>, EngineError> {
        if new_capacity >= self.capacity {
            self.grow(new_capacity);
            return Ok(Vec::new());
        }
        let in_use = self.used_count();
        if in_use > new_capacity {
            return Err(EngineError::ShrinkBelowUsage {
                requested: new_capacity,
                in_use,
            });
        }
        let cut = new_capacity as u32;
        let used_high: Vec<u32> = (cut..self.capacity as u32)
            .filter(|b| !self.free.contains(b))
            .collect();
        let mut moves = Vec::with_capacity(used_high.len());
        for from in used_high {
            let to = self
                .free
                .pop_first()
                .expect("enough free blocks below the cut");
            debug_assert!(to < cut);
            moves.push((from, to));
        }
        self.free.retain(|&b| b < cut);
        self.capacity = new_capacity;
        Ok(moves)
    }
}

#[derive(Debug, Clone, Default)]
struct SeqState {
    blocks: Vec<u32>,
    len_tokens: usize,
}

/// The flattened layout of one iteration's ragged batch. Entry `i` of the
/// batch owns tokens `subsequence_begins[i]..subsequence_begins[i+1]` and
/// blocks `block_indices[block_indices_begins[i]..block_indices_begins[i+1]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchPlan {
    pub block_size_tokens: usize,
    /// All new tokens, entry after entry.
    pub token_ids: Vec<u32>,
    /// Absolute position of each new token in its sequence.
    pub positions: Vec<i32>,
    /// Batch entry each new token belongs to.
    pub token_entry: Vec<i32>,
    /// KV slot (`block * block_size + offset`) each new token's K and V go to.
    pub slot_mapping: Vec<i32>,
    /// Tokens each entry held before this step.
    pub past_lens: Vec<i32>,
    /// Prefix sums of new tokens per entry (entries + 1 values).
    pub subsequence_begins: Vec<i32>,
    /// Block tables of all entries, concatenated.
    pub block_indices: Vec<i32>,
    /// Prefix sums into `block_indices` (entries + 1 values).
    pub block_indices_begins: Vec<i32>,
    /// Row of each entry's last new token (where its logits come from).
    pub last_token_rows: Vec<i32>,
    /// Longest context in the batch after this step.
    pub max_context_len: i32,
}

impl BatchPlan {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
    pub fn num_entries(&self) -> usize {
        self.past_lens.len()
    }
}

/// Block tables of every sequence of one instance over one pool.
///
/// A sequence may be forked ([`KvManager::fork`]): the copy shares its full
/// blocks (copy-on-write: sequences only append, so a full block is never
/// written again) and gets its own copy of a partly filled last block. A
/// shared block goes back to the pool when its last holder is freed.
#[derive(Debug, Clone)]
pub struct KvManager {
    block_size_tokens: usize,
    max_len_tokens: usize,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, SeqState>,
    /// Holders beyond the first of each shared block.
    shared: HashMap<u32, u32>,
}

impl KvManager {
    pub fn new(block_size_tokens: usize, capacity_blocks: usize, max_len_tokens: usize) -> Self {
        assert!(block_size_tokens > 0);
        KvManager {
            block_size_tokens,
            max_len_tokens,
            alloc: BlockAllocator::new(capacity_blocks),
            seqs: HashMap::new(),
            shared: HashMap::new(),
        }
    }
    pub fn block_size_tokens(&self) -> usize {
        self.block_size_tokens
    }
    pub fn capacity_blocks(&self) -> usize {
        self.alloc.capacity()
    }
    pub fn used_blocks(&self) -> usize {
        self.alloc.used_count()
    }
    pub fn free_blocks(&self) -> usize {
        self.alloc.free_count()
    }
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }
    pub fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len_tokens)
    }
    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice())
    }

    pub fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        if self.seqs.contains_key(&seq) {
            return Err(EngineError::SequenceExists(seq));
        }
        self.seqs.insert(seq, SeqState::default());
        Ok(())
    }

    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        for b in s.blocks {
            match self.shared.get_mut(&b) {
                Some(1) => {
                    self.shared.remove(&b);
                }
                Some(n) => *n -= 1,
                None => self.alloc.release(&[b]),
            }
        }
        Ok(())
    }

    /// Makes `dst` a copy of the first `tokens` of `src`'s tokens (all of
    /// them, or a prefix: a prompt that begins as a running sequence did):
    /// it shares `src`'s full blocks among them and takes a fresh block for
    /// a partly filled last one, whose contents the engine must copy: the
    /// returned `(from, to)`. Needs at most one free block; nothing changes
    /// on an error.
    pub fn fork(
        &mut self,
        src: SeqId,
        dst: SeqId,
        tokens: usize,
    ) -> Result<Option<(u32, u32)>, EngineError> {
        if self.seqs.contains_key(&dst) {
            return Err(EngineError::SequenceExists(dst));
        }
        let s = self
            .seqs
            .get(&src)
            .ok_or(EngineError::UnknownSequence(src))?;
        if tokens > s.len_tokens {
            return Err(EngineError::ForkBeyondSequence {
                seq: src,
                tokens,
                len: s.len_tokens,
            });
        }
        let full = tokens / self.block_size_tokens;
        let mut blocks = s.blocks[..full].to_vec();
        let copy = match tokens.is_multiple_of(self.block_size_tokens) {
            true => None,
            false => {
                let to = self.alloc.allocate(1)?[0];
                blocks.push(to);
                Some((s.blocks[full], to))
            }
        };
        for b in &blocks[..full] {
            *self.shared.entry(*b).or_insert(0) += 1;
        }
        self.seqs.insert(
            dst,
            SeqState {
                blocks,
                len_tokens: tokens,
            },
        );
        Ok(copy)
    }

    /// Blocks that freeing every sequence in `seqs` would give back to the
    /// pool: those of theirs no other sequence shares.
    pub fn blocks_held_only_by(&self, seqs: &[SeqId]) -> usize {
        let mut holders: HashMap<u32, u32> = HashMap::new();
        for s in seqs.iter().filter_map(|s| self.seqs.get(s)) {
            for &b in &s.blocks {
                *holders.entry(b).or_insert(0) += 1;
            }
        }
        holders
            .iter()
            .filter(|&(b, &n)| self.shared.get(b).map_or(1, |extra| extra + 1) == n)
            .count()
    }

    /// Grow the pool; returns nothing to move.
    pub fn grow(&mut self, new_capacity: usize) {
        self.alloc.grow(new_capacity);
    }

    /// Shrink the pool, rewriting block tables for blocks that move; the
    /// engine must copy each `(from, to)` block's contents.
    pub fn shrink(&mut self, new_capacity: usize) -> Result<Vec<(u32, u32)>, EngineError> {
        let moves = self.alloc.shrink(new_capacity)?;
        if !moves.is_empty() {
            let map: HashMap<u32, u32> = moves.iter().copied().collect();
            for s in self.seqs.values_mut() {
                for b in &mut s.blocks {
                    if let Some(&to) = map.get(b) {
                        *b = to;
                    }
                }
            }
            self.shared = std::mem::take(&mut self.shared)
                .into_iter()
                .map(|(b, n)| (map.get(&b).copied().unwrap_or(b), n))
                .collect();
        }
        Ok(moves)
    }

    fn check_batch(&self, batch: &[StepEntry]) -> Result<(), EngineError> {
        if batch.is_empty() {
            return Err(EngineError::InvalidBatch("empty batch".into()));
        }
        let mut seen = HashSet::with_capacity(batch.len());
        for e in batch {
            if e.tokens.is_empty() {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence {} has no new tokens",
                    e.seq
                )));
            }
            if !seen.insert(e.seq) {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence {} twice in one batch",
                    e.seq
                )));
            }
            let s = self
                .seqs
                .get(&e.seq)
                .ok_or(EngineError::UnknownSequence(e.seq))?;
            let len = s.len_tokens + e.tokens.len();
            if len > self.max_len_tokens {
                return Err(EngineError::ContextOverflow {
                    seq: e.seq,
                    len,
                    max: self.max_len_tokens,
                });
            }
        }
        Ok(())
    }

    fn blocks_for(&self, s: &SeqState, new_tokens: usize) -> usize {
        (s.len_tokens + new_tokens)
            .div_ceil(self.block_size_tokens)
            .saturating_sub(s.blocks.len())
    }

    /// Blocks the batch would take from the pool.
    pub fn blocks_needed(&self, batch: &[StepEntry]) -> Result<usize, EngineError> {
        self.check_batch(batch)?;
        Ok(batch
            .iter()
            .map(|e| self.blocks_for(&self.seqs[&e.seq], e.tokens.len()))
            .sum())
    }

    /// Take the blocks the batch needs and lay it out. Sequences do not
    /// advance until [`KvManager::commit`]; [`KvManager::rollback`] returns the
    /// blocks taken here if the device step fails.
    pub fn plan(&mut self, batch: &[StepEntry]) -> Result<(BatchPlan, Reservation), EngineError> {
        let needed = self.blocks_needed(batch)?;
        if needed > self.alloc.free_count() {
            return Err(EngineError::KvExhausted {
                needed,
                free: self.alloc.free_count(),
            });
        }
        let bs = self.block_size_tokens;
        let mut plan = BatchPlan {
            block_size_tokens: bs,
            subsequence_begins: vec![0],
            block_indices_begins: vec![0],
            ..Default::default()
        };
        let mut taken = Vec::new();
        for (i, e) in batch.iter().enumerate() {
            let n_new = self.blocks_for(&self.seqs[&e.seq], e.tokens.len());
            let new_blocks = self.alloc.allocate(n_new)?;
            taken.push((e.seq, new_blocks.len()));
            let s = self.seqs.get_mut(&e.seq).expect("checked");
            s.blocks.extend(&new_blocks);
            let past = s.len_tokens;
            for (j, &t) in e.tokens.iter().enumerate() {
                let pos = past + j;
                plan.token_ids.push(t);
                plan.positions.push(pos as i32);
                plan.token_entry.push(i as i32);
                plan.slot_mapping
                    .push((s.blocks[pos / bs] as usize * bs + pos % bs) as i32);
            }
            plan.past_lens.push(past as i32);
            plan.subsequence_begins.push(plan.token_ids.len() as i32);
            plan.last_token_rows.push(plan.token_ids.len() as i32 - 1);
            plan.block_indices
                .extend(s.blocks.iter().map(|&b| b as i32));
            plan.block_indices_begins
                .push(plan.block_indices.len() as i32);
            plan.max_context_len = plan.max_context_len.max((past + e.tokens.len()) as i32);
        }
        Ok((
            plan,
            Reservation {
                taken,
                lens: batch.iter().map(|e| (e.seq, e.tokens.len())).collect(),
            },
        ))
    }

    /// The step ran: advance every sequence of the batch.
    pub fn commit(&mut self, r: Reservation) {
        for (seq, n) in r.lens {
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.len_tokens += n;
            }
        }
    }

    /// The step failed: give back the blocks [`KvManager::plan`] took.
    pub fn rollback(&mut self, r: Reservation) {
        for (seq, n) in r.taken {
            if let Some(s) = self.seqs.get_mut(&seq) {
                let keep = s.blocks.len() - n;
                let back: Vec<u32> = s.blocks.drain(keep..).collect();
                self.alloc.release(&back);
            }
        }
    }
}

/// Blocks taken by [`KvManager::plan`] and tokens to commit.
#[derive(Debug)]
#[must_use = "commit or roll back"]
pub struct Reservation {
    taken: Vec<(SeqId, usize)>,
    lens: Vec<(SeqId, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: SeqId, n: usize) -> StepEntry {
        StepEntry {
            seq,
            tokens: (0..n as u32).collect(),
        }
    }

    #[test]
    fn allocator_lowest_first_all_or_nothing() {
        let mut a = BlockAllocator::new(4);
        assert_eq!(a.allocate(2).unwrap(), [0, 1]);
        let e = a.allocate(3).unwrap_err();
        assert!(matches!(e, EngineError::KvExhausted { needed: 3, free: 2 }));
        assert_eq!(a.free_count(), 2);
        a.release(&[0]);
        assert_eq!(a.allocate(1).unwrap(), [0]);
    }

    #[test]
    fn allocator_shrink_moves_high_blocks_down() {
        let mut a = BlockAllocator::new(8);
        let b = a.allocate(6).unwrap();
        a.release(&b[0..3]); // 0,1,2 free; 3,4,5 used
        let e = a.shrink(2).unwrap_err();
        assert!(matches!(
            e,
            EngineError::ShrinkBelowUsage {
                requested: 2,
                in_use: 3
            }
        ));
        let moves = a.shrink(4).unwrap();
        assert_eq!(moves, [(4, 0), (5, 1)]);
        assert_eq!(a.capacity(), 4);
        assert_eq!(a.free_count(), 1);
        assert!(a.is_free(2));
        a.grow(6);
        assert_eq!(a.free_count(), 3);
    }

    #[test]
    fn plan_layout_ragged_batch() {
        let mut kv = KvManager::new(4, 16, 100);
        kv.add_sequence(7).unwrap();
        kv.add_sequence(9).unwrap();
        // Prefill 6 tokens of seq 7 → 2 blocks.
        let (p, r) = kv.plan(&[entry(7, 6)]).unwrap();
        kv.commit(r);
        assert_eq!(p.positions, [0, 1, 2, 3, 4, 5]);
        assert_eq!(p.slot_mapping, [0, 1, 2, 3, 4, 5]);
        // Ragged: seq 9 prefill 3, seq 7 decode 1.
        let (p, r) = kv.plan(&[entry(9, 3), entry(7, 1)]).unwrap();
        assert_eq!(p.past_lens, [0, 6]);
        assert_eq!(p.subsequence_begins, [0, 3, 4]);
        assert_eq!(p.positions, [0, 1, 2, 6]);
        assert_eq!(p.token_entry, [0, 0, 0, 1]);
        assert_eq!(p.block_indices, [2, 0, 1]);
        assert_eq!(p.block_indices_begins, [0, 1, 3]);
        assert_eq!(p.slot_mapping, [8, 9, 10, 6]);
        assert_eq!(p.last_token_rows, [2, 3]);
        assert_eq!(p.max_context_len, 7);
        kv.commit(r);
        assert_eq!(kv.sequence_len(7), Some(7));
        assert_eq!(kv.used_blocks(), 3);
        kv.free_sequence(7).unwrap();
        assert_eq!(kv.used_blocks(), 1);
        assert!(matches!(
            kv.free_sequence(7),
            Err(EngineError::UnknownSequence(7))
        ));
    }

    #[test]
    fn exhaustion_and_rollback_leave_state_unchanged() {
        let mut kv = KvManager::new(4, 3, 100);
        kv.add_sequence(1).unwrap();
        kv.add_sequence(2).unwrap();
        let e = kv.plan(&[entry(1, 8), entry(2, 5)]).unwrap_err();
        assert!(
            matches!(e, EngineError::KvExhausted { needed: 4, free: 3 }),
            "{e}"
        );
        assert_eq!(kv.used_blocks(), 0);
        let (_, r) = kv.plan(&[entry(1, 8)]).unwrap();
        assert_eq!(kv.used_blocks(), 2);
        kv.rollback(r);
        assert_eq!(kv.used_blocks(), 0);
        assert_eq!(kv.sequence_len(1), Some(0));
        assert_eq!(kv.block_table(1).unwrap(), &[] as &[u32]);
    }

    #[test]
    fn batch_validation() {
        let mut kv = KvManager::new(4, 8, 10);
        kv.add_sequence(1).unwrap();
        assert!(matches!(
            kv.add_sequence(1),
            Err(EngineError::SequenceExists(1))
        ));
        assert!(matches!(kv.plan(&[]), Err(EngineError::InvalidBatch(_))));
        assert!(matches!(
            kv.plan(&[entry(1, 0)]),
            Err(EngineError::InvalidBatch(_))
        ));
        assert!(matches!(
            kv.plan(&[entry(1, 1), entry(1, 1)]),
            Err(EngineError::InvalidBatch(_))
        ));
        assert!(matches!(
            kv.plan(&[entry(5, 1)]),
            Err(EngineError::UnknownSequence(5))
        ));
        assert!(matches!(
            kv.plan(&[entry(1, 11)]),
            Err(EngineError::ContextOverflow {
                seq: 1,
                len: 11,
                max: 10
            })
        ));
        assert_eq!(kv.blocks_needed(&[entry(1, 9)]).unwrap(), 3);
    }

    #[test]
    fn a_fork_shares_full_blocks_copies_the_partial_one_and_frees_each_once() {
        let mut kv = KvManager::new(4, 8, 100);
        kv.add_sequence(1).unwrap();
        let (_, r) = kv.plan(&[entry(1, 10)]).unwrap(); // blocks 0, 1 full; 2 holds 2 tokens
        kv.commit(r);
        assert_eq!(kv.fork(1, 2, 10).unwrap(), Some((2, 3)));
        assert_eq!(kv.block_table(2).unwrap(), [0, 1, 3]);
        assert_eq!(kv.sequence_len(2), Some(10));
        assert_eq!(kv.used_blocks(), 4);
        // A fork at a block boundary copies nothing.
        kv.add_sequence(5).unwrap();
        let (_, r) = kv.plan(&[entry(5, 4)]).unwrap();
        kv.commit(r);
        assert_eq!(kv.fork(5, 6, 4).unwrap(), None);
        assert_eq!(kv.block_table(6).unwrap(), kv.block_table(5).unwrap());
        // Appends write only the sequence's own blocks.
        let (p, r) = kv.plan(&[entry(1, 1), entry(2, 3)]).unwrap();
        kv.commit(r);
        assert_eq!(p.slot_mapping, [2 * 4 + 2, 3 * 4 + 2, 3 * 4 + 3, 5 * 4]);
        assert!(matches!(
            kv.fork(1, 2, 1),
            Err(EngineError::SequenceExists(2))
        ));
        assert!(matches!(
            kv.fork(9, 10, 1),
            Err(EngineError::UnknownSequence(9))
        ));
        // Shared blocks go back with their last holder.
        let before = kv.used_blocks();
        kv.free_sequence(1).unwrap();
        assert_eq!(kv.used_blocks(), before - 1, "only block 2 was 1's alone");
        kv.free_sequence(2).unwrap();
        kv.free_sequence(5).unwrap();
        assert_eq!(kv.used_blocks(), 1, "6 still holds 5's block");
        kv.free_sequence(6).unwrap();
        assert_eq!(kv.used_blocks(), 0);
        assert!(kv.shared.is_empty());
    }

    #[test]
    fn blocks_held_only_by_a_set_are_what_freeing_the_set_gives_back() {
        let mut kv = KvManager::new(4, 16, 100);
        kv.add_sequence(1).unwrap();
        let (_, r) = kv.plan(&[entry(1, 10)]).unwrap(); // blocks 0, 1 full; 2 partial
        kv.commit(r);
        kv.fork(1, 2, 8).unwrap(); // shares 0 and 1
        kv.fork(1, 3, 4).unwrap(); // shares 0
        assert_eq!(kv.blocks_held_only_by(&[1]), 1, "block 2 only");
        assert_eq!(
            kv.blocks_held_only_by(&[1, 2]),
            2,
            "blocks 1 and 2; 3 holds 0"
        );
        assert_eq!(kv.blocks_held_only_by(&[1, 2, 3]), 3);
        assert_eq!(kv.blocks_held_only_by(&[2, 3]), 0, "1 holds both");
        assert_eq!(kv.blocks_held_only_by(&[]), 0);
        assert_eq!(
            kv.blocks_held_only_by(&[9]),
            0,
            "an unknown sequence holds none"
        );
        let used = kv.used_blocks();
        kv.free_sequence(1).unwrap();
        kv.free_sequence(2).unwrap();
        assert_eq!(kv.used_blocks(), used - 2);
    }

    #[test]
    fn a_fork_of_a_prefix_shares_its_full_blocks_and_copies_its_partial_one() {
        let mut kv = KvManager::new(4, 8, 100);
        kv.add_sequence(1).unwrap();
        let (_, r) = kv.plan(&[entry(1, 11)]).unwrap(); // blocks 0, 1 full; 2 holds 3 tokens
        kv.commit(r);
        // The first 6 tokens: block 0 shared, block 1's first two copied.
        assert_eq!(kv.fork(1, 2, 6).unwrap(), Some((1, 3)));
        assert_eq!(kv.block_table(2).unwrap(), [0, 3]);
        assert_eq!(kv.sequence_len(2), Some(6));
        // At a block boundary nothing is copied.
        assert_eq!(kv.fork(1, 3, 8).unwrap(), None);
        assert_eq!(kv.block_table(3).unwrap(), [0, 1]);
        assert_eq!(kv.fork(1, 4, 0).unwrap(), None);
        assert_eq!(kv.sequence_len(4), Some(0));
        // Each writes on in blocks of its own; the source's own tokens stay.
        let (p, r) = kv.plan(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        kv.commit(r);
        assert_eq!(p.slot_mapping, [2 * 4 + 3, 3 * 4 + 2, 4 * 4]);
        assert_eq!(kv.sequence_len(1), Some(12));
        // More tokens than the source holds: an error, and nothing changes.
        let used = kv.used_blocks();
        assert!(matches!(
            kv.fork(1, 5, 13),
            Err(EngineError::ForkBeyondSequence {
                seq: 1,
                tokens: 13,
                len: 12
            })
        ));
        assert_eq!((kv.used_blocks(), kv.sequence_len(5)), (used, None));
        for s in 1..=4 {
            kv.free_sequence(s).unwrap();
        }
        assert_eq!(kv.used_blocks(), 0);
        assert!(kv.shared.is_empty());
    }

    #[test]
    fn shrink_moves_shared_blocks_for_every_holder() {
        let mut kv = KvManager::new(2, 8, 100);
        kv.add_sequence(0).unwrap();
        kv.add_sequence(1).unwrap();
        let (_, r) = kv.plan(&[entry(0, 4), entry(1, 4)]).unwrap(); // 0: [0,1]; 1: [2,3]
        kv.commit(r);
        kv.fork(1, 2, 4).unwrap(); // shares 2, 3
        kv.free_sequence(0).unwrap();
        let moves = kv.shrink(2).unwrap();
        assert_eq!(moves, [(2, 0), (3, 1)]);
        assert_eq!(kv.block_table(1).unwrap(), [0, 1]);
        assert_eq!(kv.block_table(2).unwrap(), [0, 1]);
        kv.free_sequence(1).unwrap();
        assert_eq!(kv.used_blocks(), 2);
        kv.free_sequence(2).unwrap();
        assert_eq!(kv.used_blocks(), 0);
    }

    #[test]
    fn shrink_rewrites_block_tables() {
        let mut kv = KvManager::new(2, 6, 100);
        for s in 0..3 {
            kv.add_sequence(s).unwrap();
            let (_, r) = kv.plan(&[entry(s, 4)]).unwrap();
            kv.commit(r);
        }
        // seq0: [0,1], seq1: [2,3], seq2: [4,5]
        kv.free_sequence(0).unwrap();
        let moves = kv.shrink(4).unwrap();
        assert_eq!(moves, [(4, 0), (5, 1)]);
        assert_eq!(kv.block_table(2).unwrap(), [0, 1]);
        assert_eq!(kv.block_table(1).unwrap(), [2, 3]);
        assert_eq!(kv.capacity_blocks(), 4);
        assert!(matches!(
            kv.shrink(3),
            Err(EngineError::ShrinkBelowUsage { .. })
        ));
    }
}
