//! An LLM instance on llama.cpp: the package's GGUF loaded by llama.cpp,
//! one context whose KV cache is one pool shared by every sequence
//! (`kv_unified`), and the host's [`KvManager`] as the accounting of it.
//!
//! llama.cpp places each token's K and V in cells of its own choosing; the
//! [`KvManager`] decides whether a step fits (blocks of
//! [`LlmInstance::block_size_tokens`] tokens, the same admission as every
//! engine) and the context holds at least as many cells as the manager has
//! blocks × block size, so a step the manager admits always finds its cells.
//! Resizing the pool makes a new context of the new size and moves every
//! sequence's KV into it (`llama_state_seq_get_data` / `_set_data`).
//!
//! A context has room for a number of sequences ([`MIN_SEQ_ROOM`] to begin
//! with); a sequence that needs more makes a new context with twice the
//! room, of the same size, and a resize fits the room to the sequences
//! held.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use slinfer_engine::reference::check_tokens;
use slinfer_engine::{
    BatchPlan, EngineError, HostMemory, KvManager, LlmInstance, MemoryReport, ModelConfig,
    RetiredCost, SeqId, StepEntry,
};

use crate::ffi::{self, Api};

/// Tokens one `llama_decode` call takes; a larger step is several calls.
const DECODE_TOKENS: usize = 512;
/// llama.cpp rounds a context's cells up to a multiple of this.
const CTX_PAD: usize = 256;
/// Sequences a new context has room for, at least. llama.cpp keeps a row
/// of logits for each sequence a context has room for and clears them
/// when it makes the context (at every resize of the pool): for this
/// project's default model (49,152 tokens) room for its most, 256, is
/// 50 MB and 26 ms of each resize on the Intel Xeon measured; for 16,
/// 3 MB and 6 ms (BENCHMARKS.md).
const MIN_SEQ_ROOM: usize = 16;

/// A loaded model (freed on drop).
pub(crate) struct ModelHandle {
    pub api: Arc<Api>,
    pub ptr: *mut ffi::Model,
}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `llama_model_load_from_file` and every
        // context made from it is freed first (fields drop in order).
        unsafe { (self.api.model_free)(self.ptr) }
    }
}

/// One context (freed on drop).
struct ContextHandle {
    api: Arc<Api>,
    ptr: *mut ffi::Context,
}

impl Drop for ContextHandle {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `llama_init_from_model`.
        unsafe { (self.api.free)(self.ptr) }
    }
}

/// A `llama_batch` of [`DECODE_TOKENS`] tokens (freed on drop).
struct BatchBuf {
    api: Arc<Api>,
    raw: ffi::Batch,
}

impl BatchBuf {
    /// Token `i` of the batch: `token` at `pos` of llama.cpp sequence
    /// `slot`, its logits (or hidden state) read after the call if `output`.
    fn set(&mut self, i: usize, token: i32, pos: i32, slot: i32, output: bool) {
        assert!(i < DECODE_TOKENS, "batch index {i}");
        let b = &mut self.raw;
        // SAFETY: `i` < DECODE_TOKENS, the capacity `llama_batch_init` gave
        // each array (and one sequence id per token).
        unsafe {
            *b.token.add(i) = token;
            *b.pos.add(i) = pos;
            *b.n_seq_id.add(i) = 1;
            **b.seq_id.add(i) = slot;
            *b.logits.add(i) = output as i8;
        }
    }
}

impl Drop for BatchBuf {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `llama_batch_init` and is freed once.
        unsafe { (self.api.batch_free)(self.raw) }
    }
}

pub struct LlamaCppInstance {
    // Drop order: the batch and the context before the model.
    batch: BatchBuf,
    ctx: ContextHandle,
    model: ModelHandle,
    api: Arc<Api>,
    /// Threads of each step.
    threads: i32,
    config: ModelConfig,
    kv: KvManager,
    block_size: usize,
    kv_bytes_per_token: u64,
    weight_bytes: u64,
    /// llama.cpp's sequence id of each of ours, and the ids not in use
    /// (the lowest is taken first, so that ids stay below the room).
    slots: HashMap<SeqId, i32>,
    free_slots: BTreeSet<i32>,
    /// Sequences the context has room for: its ids are below this.
    seq_room: usize,
    /// Each entry of the last step: its llama.cpp sequence, and the
    /// position and id of its last token (what [`LlmInstance::last_hidden`]
    /// decodes again).
    last_rows: Vec<(i32, i32, i32)>,
}

// SAFETY: a llama.cpp model and context may be used from any thread, one
// at a time; the instance is owned by one runner thread and `&mut self`
// serialises every call.
unsafe impl Send for LlamaCppInstance {}

impl LlamaCppInstance {
    pub(crate) fn new(
        api: Arc<Api>,
        model: ModelHandle,
        config: ModelConfig,
        threads: i32,
        block_size: usize,
        initial_blocks: usize,
    ) -> Result<Self, EngineError> {
        let kv_bytes_per_token = config.kv_bytes_per_token(2);
        let ctx = new_context(
            &api,
            &model,
            threads,
            initial_blocks * block_size,
            MIN_SEQ_ROOM,
        )?;
        // SAFETY: plain allocation of the batch arrays.
        let raw = unsafe { (api.batch_init)(DECODE_TOKENS as i32, 0, 1) };
        if raw.token.is_null() {
            return Err(EngineError::OutOfMemory {
                requested_bytes: (DECODE_TOKENS * 32) as u64,
                detail: "llama_batch_init".into(),
            });
        }
        // SAFETY: `model.ptr` is a loaded model.
        let weight_bytes = unsafe { (api.model_size)(model.ptr) };
        Ok(LlamaCppInstance {
            batch: BatchBuf {
                api: api.clone(),
                raw,
            },
            ctx,
            model,
            api,
            threads,
            kv: KvManager::new(block_size, initial_blocks, config.context_length_tokens),
            config,
            block_size,
            kv_bytes_per_token,
            weight_bytes,
            slots: HashMap::new(),
            free_slots: (0..ffi::MAX_SEQ as i32).collect(),
            seq_room: MIN_SEQ_ROOM,
            last_rows: Vec::new(),
        })
    }

    fn memory_handle(&self) -> *mut ffi::Memory {
        // SAFETY: the context is live.
        unsafe { (self.api.get_memory)(self.ctx.ptr) }
    }

    fn slot(&self, seq: SeqId) -> Result<i32, EngineError> {
        self.slots
            .get(&seq)
            .copied()
            .ok_or(EngineError::UnknownSequence(seq))
    }

    /// The lowest free llama.cpp sequence id, for `seq`; a context with
    /// twice the room first if the id is beyond the room.
    fn take_slot(&mut self, seq: SeqId) -> Result<i32, EngineError> {
        let slot = *self.free_slots.first().ok_or_else(|| {
            EngineError::Unsupported(format!(
                "more than {} sequences in one llama.cpp instance",
                ffi::MAX_SEQ
            ))
        })?;
        if slot as usize >= self.seq_room {
            // SAFETY: the context is live.
            let now = unsafe { (self.api.n_ctx)(self.ctx.ptr) } as usize;
            self.rebuild(self.cells_for(&self.kv).max(now), room_for(slot))?;
        }
        self.free_slots.remove(&slot);
        self.slots.insert(seq, slot);
        Ok(slot)
    }

    /// Cells a new context needs for the pool of `kv`: forked sequences
    /// share cells in a context but not after a move into a new one, which
    /// holds every sequence's tokens on its own, so it gets the cells the
    /// manager counts as shared on top of the pool's.
    fn cells_for(&self, kv: &KvManager) -> usize {
        let held: usize = self
            .slots
            .keys()
            .filter_map(|&s| self.kv.sequence_len(s))
            .sum();
        let shared = held.saturating_sub(kv.used_blocks() * self.block_size);
        kv.capacity_blocks() * self.block_size + shared
    }

    /// Makes a new context of `cells` cells with room for `room` sequences
    /// and moves every sequence's KV into it; on an error the old one stays.
    fn rebuild(&mut self, cells: usize, room: usize) -> Result<(), EngineError> {
        let fresh = new_context(&self.api, &self.model, self.threads, cells, room)?;
        for &slot in self.slots.values() {
            // SAFETY: both contexts are live; the buffer is as large as
            // llama.cpp says the sequence's state is; `slot` is below both
            // contexts' room.
            let moved = unsafe {
                let size = (self.api.state_seq_get_size)(self.ctx.ptr, slot);
                let mut buf = vec![0u8; size];
                let got = (self.api.state_seq_get_data)(self.ctx.ptr, buf.as_mut_ptr(), size, slot);
                got == size
                    && (self.api.state_seq_set_data)(fresh.ptr, buf.as_ptr(), size, slot) == size
            };
            if !moved {
                return Err(EngineError::OutOfMemory {
                    requested_bytes: cells as u64 * self.kv_bytes_per_token,
                    detail: format!(
                        "moving sequence {slot}'s KV into a context of {cells} tokens for {room} sequences"
                    ),
                });
            }
        }
        self.ctx = fresh;
        self.seq_room = room;
        Ok(())
    }

    fn release_slot(&mut self, seq: SeqId) {
        if let Some(slot) = self.slots.remove(&seq) {
            // SAFETY: the context is live; removing a whole sequence never fails.
            unsafe { (self.api.memory_seq_rm)(self.memory_handle(), slot, -1, -1) };
            self.free_slots.insert(slot);
        }
    }

    /// `llama_decode` of the batch buffer as filled.
    fn decode(&mut self) -> Result<(), EngineError> {
        // SAFETY: the batch is filled up to `n_tokens`; the context is live.
        let rc = unsafe { (self.api.decode)(self.ctx.ptr, self.batch.raw) };
        if rc == 0 {
            Ok(())
        } else {
            Err(EngineError::Device(format!("llama_decode returned {rc}")))
        }
    }

    /// Decodes the plan in calls of at most [`DECODE_TOKENS`] tokens and
    /// returns each entry's logits.
    fn run(&mut self, plan: &BatchPlan, slots: &[i32]) -> Result<Vec<Vec<f32>>, EngineError> {
        let vocab = self.config.vocab_size;
        let mut out = vec![Vec::new(); plan.num_entries()];
        let is_last: HashMap<usize, usize> = plan
            .last_token_rows
            .iter()
            .enumerate()
            .map(|(entry, &row)| (row as usize, entry))
            .collect();
        self.last_rows.clear();
        for start in (0..plan.num_tokens()).step_by(DECODE_TOKENS) {
            let end = (start + DECODE_TOKENS).min(plan.num_tokens());
            self.batch.raw.n_tokens = (end - start) as i32;
            for (i, row) in (start..end).enumerate() {
                self.batch.set(
                    i,
                    plan.token_ids[row] as i32,
                    plan.positions[row],
                    slots[plan.token_entry[row] as usize],
                    is_last.contains_key(&row),
                );
            }
            self.decode()?;
            for (i, row) in (start..end).enumerate() {
                let Some(&entry) = is_last.get(&row) else {
                    continue;
                };
                // SAFETY: token `i` of this call was marked as an output.
                let p = unsafe { (self.api.get_logits_ith)(self.ctx.ptr, i as i32) };
                if p.is_null() {
                    return Err(EngineError::Device(format!("no logits for row {row}")));
                }
                // SAFETY: llama.cpp holds `vocab` logits per output.
                out[entry] = unsafe { std::slice::from_raw_parts(p, vocab) }.to_vec();
                self.last_rows.push((
                    slots[entry],
                    plan.positions[row],
                    plan.token_ids[row] as i32,
                ));
            }
        }
        Ok(out)
    }
}

/// The room a context needs for sequence ids up to `slot`: a power of two,
/// at least [`MIN_SEQ_ROOM`], at most llama.cpp's maximum.
fn room_for(slot: i32) -> usize {
    (slot.max(0) as usize + 1)
        .next_power_of_two()
        .clamp(MIN_SEQ_ROOM, ffi::MAX_SEQ)
}

/// A context of `tokens` cells (rounded up) with room for `seqs` sequences.
fn new_context(
    api: &Arc<Api>,
    model: &ModelHandle,
    threads: i32,
    tokens: usize,
    seqs: usize,
) -> Result<ContextHandle, EngineError> {
    // SAFETY: returns a plain struct.
    let mut p = unsafe { (api.context_default_params)() };
    // n_ctx 0 would mean "the model's training context".
    p.n_ctx = tokens.max(1).next_multiple_of(CTX_PAD) as u32;
    p.n_batch = DECODE_TOKENS as u32;
    p.n_ubatch = DECODE_TOKENS as u32;
    p.n_seq_max = seqs as u32;
    p.n_outputs_max_per_seq = DECODE_TOKENS as u32;
    p.n_threads = threads;
    p.n_threads_batch = threads;
    p.pooling_type = ffi::POOLING_NONE;
    // Faster at every batch size measured (BENCHMARKS.md).
    p.flash_attn_type = ffi::FLASH_ATTN_ENABLED;
    p.kv_unified = true;
    p.no_perf = true;
    // SAFETY: `model.ptr` is a loaded model; the params are this release's.
    let ptr = unsafe { (api.init_from_model)(model.ptr, p) };
    if ptr.is_null() {
        return Err(EngineError::OutOfMemory {
            requested_bytes: 0,
            detail: format!(
                "llama.cpp could not make a context of {} tokens for {seqs} sequences",
                p.n_ctx
            ),
        });
    }
    Ok(ContextHandle {
        api: api.clone(),
        ptr,
    })
}

impl LlmInstance for LlamaCppInstance {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn block_size_tokens(&self) -> usize {
        self.block_size
    }
    fn kv_bytes_per_block(&self) -> u64 {
        self.kv_bytes_per_token * self.block_size as u64
    }
    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
    slinfer_engine::delegate_kv_reads!(kv);

    fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.kv.add_sequence(seq)?;
        if let Err(e) = self.take_slot(seq) {
            self.kv.free_sequence(seq)?;
            return Err(e);
        }
        Ok(())
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.kv.free_sequence(seq)?;
        self.release_slot(seq);
        Ok(())
    }

    /// The unified cache's attention spans every sequence's cells: a
    /// retired one slows each step of the others.
    fn retire_sequence(&mut self, seq: SeqId) -> Result<RetiredCost, EngineError> {
        self.slot(seq).map(|_| RetiredCost::EveryStep)
    }

    /// llama.cpp shares the cells of `src`'s first `tokens` positions with
    /// `dst` (`llama_memory_seq_cp` in a unified cache copies nothing).
    fn fork_sequence(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), EngineError> {
        let from = self.slot(src)?;
        self.kv.fork(src, dst, tokens)?;
        let to = match self.take_slot(dst) {
            Ok(to) => to,
            Err(e) => {
                self.kv.free_sequence(dst)?;
                return Err(e);
            }
        };
        // SAFETY: the context is live; both ids are below its room.
        unsafe { (self.api.memory_seq_cp)(self.memory_handle(), from, to, 0, tokens as i32) };
        Ok(())
    }

    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        let mut kv = self.kv.clone();
        if blocks >= kv.capacity_blocks() {
            kv.grow(blocks);
        } else {
            kv.shrink(blocks)?;
        }
        let cells = self.cells_for(&kv);
        // SAFETY: the context is live.
        let now = unsafe { (self.api.n_ctx)(self.ctx.ptr) } as usize;
        if cells.max(1).next_multiple_of(CTX_PAD) != now {
            // The new context's room fits the sequences held.
            let top = self.slots.values().copied().max().unwrap_or(0);
            self.rebuild(cells, room_for(top))?;
        }
        self.kv = kv;
        Ok(())
    }

    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
        check_tokens(batch, self.config.vocab_size)?;
        let slots = batch
            .iter()
            .map(|e| self.slot(e.seq))
            .collect::<Result<Vec<_>, _>>()?;
        let (plan, reservation) = self.kv.plan(batch)?;
        match self.run(&plan, &slots) {
            Ok(logits) => {
                self.kv.commit(reservation);
                Ok(logits)
            }
            Err(e) => {
                // Drop whatever cells the failed call left behind.
                let mem = self.memory_handle();
                for (i, &slot) in slots.iter().enumerate() {
                    // SAFETY: the context is live; removing a sequence's tail
                    // from its old length on never fails.
                    unsafe { (self.api.memory_seq_rm)(mem, slot, plan.past_lens[i], -1) };
                }
                self.kv.rollback(reservation);
                Err(e)
            }
        }
    }

    /// llama.cpp gives final hidden states only from a context that outputs
    /// them for every token, so the last step's final tokens are decoded
    /// again (their KV removed and recomputed, on the same prefix) with
    /// that switched on, and off again after.
    fn last_hidden(&mut self) -> Result<Vec<Vec<f32>>, EngineError> {
        let rows = self.last_rows.clone();
        if rows.is_empty() || rows.len() > DECODE_TOKENS {
            return Err(EngineError::InvalidBatch(
                "final hidden states follow a successful step".into(),
            ));
        }
        let mem = self.memory_handle();
        self.batch.raw.n_tokens = rows.len() as i32;
        for (i, &(slot, pos, token)) in rows.iter().enumerate() {
            // SAFETY: the context is live. The token's cell is removed so
            // that it is decoded again in its place.
            unsafe { (self.api.memory_seq_rm)(mem, slot, pos, -1) };
            self.batch.set(i, token, pos, slot, true);
        }
        // SAFETY: the context is live.
        unsafe { (self.api.set_embeddings)(self.ctx.ptr, true) };
        let decoded = self.decode();
        let width = self.config.hidden_size;
        let hidden = decoded.and_then(|()| {
            (0..rows.len())
                .map(|i| {
                    // SAFETY: output `i` of the call just made.
                    let p = unsafe { (self.api.get_embeddings_ith)(self.ctx.ptr, i as i32) };
                    if p.is_null() {
                        return Err(EngineError::Device(format!("no hidden state for row {i}")));
                    }
                    // SAFETY: llama.cpp holds `n_embd` values per output.
                    Ok(unsafe { std::slice::from_raw_parts(p, width) }.to_vec())
                })
                .collect()
        });
        // SAFETY: the context is live.
        unsafe { (self.api.set_embeddings)(self.ctx.ptr, false) };
        hidden
    }

    fn memory(&self) -> MemoryReport {
        let host = HostMemory::read();
        // SAFETY: the context is live.
        let cells = unsafe { (self.api.n_ctx)(self.ctx.ptr) } as u64;
        MemoryReport {
            weight_bytes: self.weight_bytes,
            kv_bytes: cells * self.kv_bytes_per_token,
            // The rows of logits llama.cpp keeps, one per sequence of room.
            workspace_bytes: (self.seq_room * self.config.vocab_size * 4) as u64,
            kv_blocks_capacity: self.kv.capacity_blocks(),
            kv_blocks_in_use: self.kv.used_blocks(),
            device_free_bytes: host.available_bytes,
            device_total_bytes: host.total_bytes,
        }
    }
}
