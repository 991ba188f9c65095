//! An LLM instance on the OpenVINO CPU plugin: the paged-attention form of
//! the package's IR, host-owned KV block tensors, and one infer request per
//! ragged batch.

use openvino::{CompiledModel, ElementType, InferRequest, Shape, Tensor};
use slinfer_engine::package::ModelPackage;
use slinfer_engine::reference::check_tokens;
use slinfer_engine::{
    EngineError, HostMemory, KvManager, LlmInstance, LoadOptions, MemoryReport, ModelConfig, SeqId,
    StepEntry,
};

use crate::dev;

/// One `key_cache.N` / `value_cache.N` input of the compiled model.
struct CacheInput {
    name: String,
    ty: ElementType,
    /// Dimensions after the block dimension.
    block_dims: Vec<i64>,
    block_bytes: usize,
}

fn element_bytes(ty: ElementType) -> Option<usize> {
    Some(match ty {
        ElementType::U8 | ElementType::I8 => 1,
        ElementType::F16 | ElementType::Bf16 => 2,
        ElementType::F32 => 4,
        _ => return None,
    })
}

/// One loaded model: compiled paged-attention IR, its request, and the KV
/// block tensors.
pub struct OpenVinoInstance {
    name: String,
    config: ModelConfig,
    request: InferRequest,
    _compiled: CompiledModel,
    caches: Vec<CacheInput>,
    /// The IR takes `sampled_tokens_indices` (logits only for those rows).
    sampled_rows: bool,
    /// One tensor per cache input, `physical_blocks` blocks each.
    tensors: Vec<Tensor>,
    physical_blocks: usize,
    kv: KvManager,
    block_size: usize,
    kv_bytes_per_block: u64,
    weight_bytes: u64,
    workspace_bytes: u64,
    /// Projection groups the shim merged (one per layer: Q, K and V).
    merged_projections: usize,
}

const BATCH_INPUTS: &[&str] = &[
    "input_ids",
    "position_ids",
    "max_context_len",
    "past_lens",
    "subsequence_begins",
    "block_indices_begins",
    "block_indices",
    SAMPLED_ROWS,
];

/// Rows of the batch whose logits are computed (added by the shim).
const SAMPLED_ROWS: &str = "sampled_tokens_indices";
/// The scratch sequence [`OpenVinoInstance::warm_up`] runs at load (freed
/// before any caller's sequence exists).
const WARM_UP_SEQ: SeqId = SeqId::MAX;

impl OpenVinoInstance {
    pub(crate) fn new(
        pkg: ModelPackage,
        compiled: CompiledModel,
        request: InferRequest,
        weight_bytes: u64,
        merged_projections: usize,
        options: &LoadOptions,
    ) -> Result<Self, EngineError> {
        let config = pkg.manifest.config.clone();
        let n = compiled.get_input_size().map_err(|e| dev("inputs", e))?;
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for i in 0..n {
            let node = compiled
                .get_input_by_index(i)
                .map_err(|e| dev("input", e))?;
            let name = node.get_name().map_err(|e| dev("input name", e))?;
            let layer = |prefix: &str| {
                name.strip_prefix(prefix)
                    .and_then(|s| s.parse::<usize>().ok())
            };
            let slot = if let Some(l) = layer("key_cache.") {
                Some((&mut keys, l))
            } else if let Some(l) = layer("value_cache.") {
                Some((&mut values, l))
            } else if BATCH_INPUTS.contains(&name.as_str()) {
                None
            } else {
                return Err(EngineError::Model(format!(
                    "{}: the IR has an input {name:?} this engine does not feed",
                    pkg.dir.display()
                )));
            };
            let Some((list, l)) = slot else { continue };
            let ty = node.get_element_type().map_err(|e| dev("cache type", e))?;
            let ps = node
                .get_partial_shape()
                .map_err(|e| dev("cache shape", e))?;
            let dims = ps.get_dimensions();
            if dims.len() < 2 || dims[1..].iter().any(|d| d.is_dynamic()) {
                return Err(EngineError::Model(format!(
                    "{name}: cache shape {dims:?} is not [blocks, static...]"
                )));
            }
            let block_dims: Vec<i64> = dims[1..].iter().map(|d| d.get_min()).collect();
            let eb = element_bytes(ty)
                .ok_or_else(|| EngineError::UnsupportedType(format!("{name}: {ty:?}")))?;
            let block_bytes = block_dims.iter().product::<i64>() as usize * eb;
            list.push((
                l,
                CacheInput {
                    name,
                    ty,
                    block_dims,
                    block_bytes,
                },
            ));
        }
        keys.sort_by_key(|(l, _)| *l);
        values.sort_by_key(|(l, _)| *l);
        if keys.len() != config.num_layers || values.len() != config.num_layers {
            return Err(EngineError::Model(format!(
                "the IR has {} key and {} value caches for {} layers",
                keys.len(),
                values.len(),
                config.num_layers
            )));
        }
        // [blocks, kv_heads, block_size, head_size(+params)]
        let vd = &values[0].1.block_dims;
        if vd.len() != 3 || vd[0] as usize != config.num_kv_heads {
            return Err(EngineError::Model(format!(
                "value cache block shape {vd:?} is not [kv_heads={}, block, head]",
                config.num_kv_heads
            )));
        }
        let block_size = vd[1] as usize;
        if let Some(want) = options.block_size_tokens
            && want != block_size
        {
            return Err(EngineError::Model(format!(
                "the compiled model's KV blocks hold {block_size} tokens, not {want}"
            )));
        }
        let caches: Vec<CacheInput> = keys
            .into_iter()
            .zip(values)
            .flat_map(|((_, k), (_, v))| [k, v])
            .collect();
        let kv_bytes_per_block = caches.iter().map(|c| c.block_bytes as u64).sum();
        let sampled_rows = (0..n).any(|i| {
            compiled
                .get_input_by_index(i)
                .and_then(|p| p.get_name())
                .is_ok_and(|name| name == SAMPLED_ROWS)
        });
        let mut inst = OpenVinoInstance {
            name: pkg.manifest.name.clone(),
            kv: KvManager::new(block_size, 0, config.context_length_tokens),
            config,
            _compiled: compiled,
            caches,
            sampled_rows,
            tensors: Vec::new(),
            physical_blocks: 0,
            block_size,
            kv_bytes_per_block,
            weight_bytes,
            workspace_bytes: 0,
            merged_projections,
            request,
        };
        inst.resize_kv(options.initial_kv_blocks)?;
        inst.warm_up()?;
        Ok(inst)
    }

    /// Runs one token through a scratch sequence and frees it. The CPU
    /// plugin sets itself up on a compiled model's first inference (memory,
    /// kernels): for SmolLM2-135M on 2 cores that first call took ~250 ms
    /// more than the next (`examples/coldstart.rs`), which the first prompt
    /// would otherwise pay beyond its prefill. Taken here it is part of the
    /// load, which the scheduler plans and `slinfer profile` measures.
    fn warm_up(&mut self) -> Result<(), EngineError> {
        let blocks = self.kv.capacity_blocks();
        if blocks == 0 {
            self.resize_kv(1)?;
        }
        self.add_sequence(WARM_UP_SEQ)?;
        let stepped = self.step(&[StepEntry {
            seq: WARM_UP_SEQ,
            tokens: vec![self.config.bos_token_id.unwrap_or(0)],
        }]);
        self.free_sequence(WARM_UP_SEQ)?;
        if blocks == 0 {
            self.resize_kv(0)?;
        }
        stepped.map(drop)
    }

    /// The package's model name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many groups of projections reading the same input (a layer's Q,
    /// K and V) were merged into one matrix product at load time.
    pub fn merged_projections(&self) -> usize {
        self.merged_projections
    }

    fn alloc_tensors(&self, blocks: usize) -> Result<Vec<Tensor>, EngineError> {
        let phys = blocks.max(1);
        self.caches
            .iter()
            .map(|c| {
                let mut dims = vec![phys as i64];
                dims.extend(&c.block_dims);
                let shape = Shape::new(&dims).map_err(|e| dev("shape", e))?;
                // The crate writes zeros into a new tensor, so the pool is
                // resident from the start: the process holds what the
                // scheduler counted, and a short host shows here rather than
                // at some later first touch.
                Tensor::new(c.ty, &shape).map_err(|e| EngineError::OutOfMemory {
                    requested_bytes: (phys * c.block_bytes) as u64,
                    detail: format!("{}: {e}", c.name),
                })
            })
            .collect()
    }

    fn bind_caches(&mut self) -> Result<(), EngineError> {
        for (c, t) in self.caches.iter().zip(&self.tensors) {
            self.request
                .set_tensor(&c.name, t)
                .map_err(|e| dev(&c.name, e))?;
        }
        Ok(())
    }
}

fn tensor_i64(vals: impl ExactSizeIterator<Item = i64>) -> Result<Tensor, EngineError> {
    let n = vals.len();
    let mut t = Tensor::new(
        ElementType::I64,
        &Shape::new(&[n as i64]).map_err(|e| dev("shape", e))?,
    )
    .map_err(|e| dev("tensor", e))?;
    let d = t.get_data_mut::<i64>().map_err(|e| dev("tensor data", e))?;
    for (o, v) in d.iter_mut().zip(vals) {
        *o = v;
    }
    Ok(t)
}

fn tensor_i32(vals: &[i32]) -> Result<Tensor, EngineError> {
    let mut t = Tensor::new(
        ElementType::I32,
        &Shape::new(&[vals.len() as i64]).map_err(|e| dev("shape", e))?,
    )
    .map_err(|e| dev("tensor", e))?;
    t.get_data_mut::<i32>()
        .map_err(|e| dev("tensor data", e))?
        .copy_from_slice(vals);
    Ok(t)
}

impl OpenVinoInstance {
    fn run(&mut self, plan: &slinfer_engine::BatchPlan) -> Result<Vec<Vec<f32>>, EngineError> {
        let inputs = [
            (
                "input_ids",
                tensor_i64(plan.token_ids.iter().map(|&t| t as i64))?,
            ),
            (
                "position_ids",
                tensor_i64(plan.positions.iter().map(|&p| p as i64))?,
            ),
            ("past_lens", tensor_i32(&plan.past_lens)?),
            ("subsequence_begins", tensor_i32(&plan.subsequence_begins)?),
            ("block_indices", tensor_i32(&plan.block_indices)?),
            (
                "block_indices_begins",
                tensor_i32(&plan.block_indices_begins)?,
            ),
        ];
        for (name, t) in &inputs {
            self.request.set_tensor(name, t).map_err(|e| dev(name, e))?;
        }
        if self.sampled_rows {
            let rows = tensor_i64(plan.last_token_rows.iter().map(|&r| r as i64))?;
            self.request
                .set_tensor(SAMPLED_ROWS, &rows)
                .map_err(|e| dev(SAMPLED_ROWS, e))?;
        }
        // A rank-0 shape can't be made through the crate (`Shape::new(&[])` is
        // rejected): write into the request's own scalar tensor instead.
        let mut mcl = self
            .request
            .get_tensor("max_context_len")
            .map_err(|e| dev("max_context_len", e))?;
        mcl.get_data_mut::<i32>()
            .map_err(|e| dev("max_context_len", e))?
            .copy_from_slice(&[plan.max_context_len]);
        self.request.infer().map_err(|e| dev("infer", e))?;
        let out = self
            .request
            .get_tensor("logits")
            .map_err(|e| dev("logits", e))?;
        let shape = out.get_shape().map_err(|e| dev("logits shape", e))?;
        let dims = shape.get_dimensions();
        let vocab = *dims.last().unwrap_or(&0) as usize;
        if vocab == 0 {
            return Err(dev("logits", format!("shape {dims:?}")));
        }
        let data: &[f32] = match out.get_element_type().map_err(|e| dev("logits type", e))? {
            ElementType::F32 => out.get_data::<f32>().map_err(|e| dev("logits data", e))?,
            other => return Err(EngineError::UnsupportedType(format!("logits {other:?}"))),
        };
        let rows = data.len() / vocab;
        self.workspace_bytes = self.workspace_bytes.max((data.len() * 4) as u64);
        let row_of = |i: usize| -> Result<usize, EngineError> {
            if self.sampled_rows && rows == plan.num_entries() {
                Ok(i)
            } else if !self.sampled_rows && rows == plan.num_tokens() {
                Ok(plan.last_token_rows[i] as usize)
            } else {
                Err(dev(
                    "logits",
                    format!("{rows} rows for {} tokens", plan.num_tokens()),
                ))
            }
        };
        (0..plan.num_entries())
            .map(|i| {
                let r = row_of(i)?;
                Ok(data[r * vocab..(r + 1) * vocab].to_vec())
            })
            .collect()
    }
}

impl LlmInstance for OpenVinoInstance {
    fn fork_sequence(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), EngineError> {
        let Some((from, to)) = self.kv.fork(src, dst, tokens)? else {
            return Ok(());
        };
        for (c, t) in self.caches.iter().zip(&mut self.tensors) {
            let copied = t.get_raw_data_mut().map(|data| {
                let (bb, f, to) = (c.block_bytes, from as usize, to as usize);
                data.copy_within(f * bb..(f + 1) * bb, to * bb);
            });
            if let Err(e) = copied {
                // Undo the fork: nothing changes on an error.
                self.kv.free_sequence(dst)?;
                return Err(dev("cache data", e));
            }
        }
        Ok(())
    }

    fn last_hidden(&mut self) -> Result<Vec<Vec<f32>>, EngineError> {
        if !self.sampled_rows {
            return Err(EngineError::Unsupported(
                "final hidden states: the load-time shim did not apply to this IR".into(),
            ));
        }
        let out = self
            .request
            .get_tensor("hidden_states")
            .map_err(|e| dev("hidden_states", e))?;
        let width = self.config.hidden_size;
        let data: &[f32] = match out
            .get_element_type()
            .map_err(|e| dev("hidden_states type", e))?
        {
            ElementType::F32 => out
                .get_data::<f32>()
                .map_err(|e| dev("hidden_states data", e))?,
            other => {
                return Err(EngineError::UnsupportedType(format!(
                    "hidden_states {other:?}"
                )));
            }
        };
        if width == 0 || !data.len().is_multiple_of(width) {
            return Err(dev(
                "hidden_states",
                format!("{} values for rows of {width}", data.len()),
            ));
        }
        Ok(data.chunks(width).map(<[f32]>::to_vec).collect())
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn block_size_tokens(&self) -> usize {
        self.block_size
    }
    fn kv_bytes_per_block(&self) -> u64 {
        self.kv_bytes_per_block
    }
    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
    slinfer_engine::delegate_kv_bookkeeping!(kv);

    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        let old_cap = self.kv.capacity_blocks();
        if blocks == old_cap && !self.tensors.is_empty() {
            return Ok(());
        }
        // Plan on a copy so that a failed allocation leaves everything as it was.
        let mut kv = self.kv.clone();
        let moves = if blocks >= old_cap {
            kv.grow(blocks);
            Vec::new()
        } else {
            kv.shrink(blocks)?
        };
        let mut fresh = self.alloc_tensors(blocks)?;
        let keep = old_cap.min(blocks).min(self.physical_blocks);
        for ((c, old), new) in self.caches.iter().zip(&self.tensors).zip(&mut fresh) {
            let src = old.get_raw_data().map_err(|e| dev("cache data", e))?;
            let dst = new.get_raw_data_mut().map_err(|e| dev("cache data", e))?;
            let bb = c.block_bytes;
            // Blocks below the new capacity stay where they are (one copy of
            // the prefix); blocks in use above it move to the free slots the
            // allocator chose.
            dst[..keep * bb].copy_from_slice(&src[..keep * bb]);
            for &(from, to) in &moves {
                let (f, t) = (from as usize, to as usize);
                dst[t * bb..(t + 1) * bb].copy_from_slice(&src[f * bb..(f + 1) * bb]);
            }
        }
        self.tensors = fresh;
        self.physical_blocks = blocks.max(1);
        self.kv = kv;
        self.bind_caches()
    }

    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
        check_tokens(batch, self.config.vocab_size)?;
        let (plan, reservation) = self.kv.plan(batch)?;
        match self.run(&plan) {
            Ok(logits) => {
                self.kv.commit(reservation);
                Ok(logits)
            }
            Err(e) => {
                self.kv.rollback(reservation);
                Err(e)
            }
        }
    }

    fn memory(&self) -> MemoryReport {
        let host = HostMemory::read();
        MemoryReport {
            weight_bytes: self.weight_bytes,
            kv_bytes: self.kv_bytes_per_block * self.physical_blocks as u64,
            workspace_bytes: self.workspace_bytes,
            kv_blocks_capacity: self.kv.capacity_blocks(),
            kv_blocks_in_use: self.kv.used_blocks(),
            device_free_bytes: host.available_bytes,
            device_total_bytes: host.total_bytes,
        }
    }
}
