//! One model instance on one GPU: weights in device memory, a paged KV pool
//! that grows and shrinks, and the forward pass of one iteration for a ragged
//! batch (cuBLAS matmuls, our NVRTC kernels for everything else).
//!
//! Data flow per layer (T new tokens; residual stream `x` in f32, matmul
//! inputs in the weight type, matmul outputs in f32):
//! `rmsnorm → [q|k|v] = h·Wqkvᵀ → rope + write K,V to their slots → paged
//! attention → x += a·Woᵀ → rmsnorm → [gate|up] = h·Wguᵀ → silu·up → x += m·Wdownᵀ`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use slinfer_engine::kv::{BatchPlan, KvManager};
use slinfer_engine::reference::check_tokens;
use slinfer_engine::weights::{HostData, HostTensor, LlamaWeights, WeightDType};
use slinfer_engine::{EngineError, LlmInstance, MemoryReport, ModelConfig, SeqId, StepEntry};

/// Launch a kernel with scalar and raw-address arguments.
macro_rules! launch {
    ($stream:expr, $func:expr, $grid:expr, $block:expr, $($arg:expr),* $(,)?) => {{
        let cfg = LaunchConfig { grid_dim: $grid, block_dim: $block, shared_mem_bytes: 0 };
        let mut b = $stream.launch_builder($func);
        $( let a = $arg; b.arg(&a); )*
        // SAFETY: every pointer argument is the address of a live device
        // buffer sized by this module for the launch's grid; scalars are
        // passed by value; the kernel signatures in kernels.rs match the
        // argument order and types here.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| dev_err("kernel launch", e))
    }};
}

mod forward;

/// Default tokens per KV block on the GPU.
pub const DEFAULT_BLOCK_SIZE_TOKENS: usize = 16;

fn dev_err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Device(format!("{what}: {e:?}"))
}

/// A device buffer and its raw address (kernels and cuBLAS take addresses).
pub(crate) struct Buf<T> {
    slice: CudaSlice<T>,
    ptr: u64,
    len: usize,
}

impl<T: DeviceRepr + ValidAsZeroBits> Buf<T> {
    pub(crate) fn zeros(stream: &Arc<CudaStream>, len: usize) -> Result<Self, EngineError> {
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        let slice = stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| EngineError::OutOfMemory {
                requested_bytes: bytes,
                detail: format!("{e:?}"),
            })?;
        Ok(Self::wrap(stream, slice, len))
    }
    pub(crate) fn from_host(stream: &Arc<CudaStream>, data: &[T]) -> Result<Self, EngineError> {
        let mut b = Self::zeros(stream, data.len())?;
        if !data.is_empty() {
            stream
                .memcpy_htod(data, &mut b.slice)
                .map_err(|e| dev_err("upload", e))?;
        }
        Ok(b)
    }
    fn wrap(stream: &Arc<CudaStream>, slice: CudaSlice<T>, len: usize) -> Self {
        let ptr = {
            let (p, _sync) = slice.device_ptr(stream);
            p
        };
        Buf { slice, ptr, len }
    }
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> u64 {
        (self.len * std::mem::size_of::<T>()) as u64
    }
}

/// The compiled kernels for one weight type.
#[derive(Clone)]
pub(crate) struct Kernels {
    pub embed: CudaFunction,
    pub rmsnorm: CudaFunction,
    pub rope_kv: CudaFunction,
    pub paged_attn: CudaFunction,
    pub silu_mul: CudaFunction,
    pub fill_uniform: CudaFunction,
}

struct Layer {
    attn_norm: Buf<f32>,
    wqkv: Buf<u16>,
    bqkv: Option<Buf<f32>>,
    wo: Buf<u16>,
    ffn_norm: Buf<f32>,
    w_gu: Buf<u16>,
    w_down: Buf<u16>,
}

/// Activation buffers, sized for the largest batch seen so far.
struct Workspace {
    tokens: usize,
    entries: usize,
    blocks: usize,
    ints: Buf<i32>,
    x: Buf<f32>,
    hn: Buf<u16>,
    qkv: Buf<f32>,
    q: Buf<f32>,
    attn: Buf<u16>,
    gu: Buf<f32>,
    act: Buf<u16>,
    hfinal: Buf<u16>,
    logits: Buf<f32>,
}

impl Workspace {
    fn new(
        stream: &Arc<CudaStream>,
        c: &ModelConfig,
        tokens: usize,
        entries: usize,
        blocks: usize,
    ) -> Result<Self, EngineError> {
        let (h, qd, kvd, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        Ok(Workspace {
            tokens,
            entries,
            blocks,
            ints: Buf::zeros(stream, 4 * tokens + 2 * entries + 1 + blocks)?,
            x: Buf::zeros(stream, tokens * h)?,
            hn: Buf::zeros(stream, tokens * h.max(qd))?,
            qkv: Buf::zeros(stream, tokens * (qd + 2 * kvd))?,
            q: Buf::zeros(stream, tokens * qd)?,
            attn: Buf::zeros(stream, tokens * qd)?,
            gu: Buf::zeros(stream, tokens * 2 * f)?,
            act: Buf::zeros(stream, tokens * f)?,
            hfinal: Buf::zeros(stream, entries * h)?,
            logits: Buf::zeros(stream, entries * c.vocab_size)?,
        })
    }
    fn bytes(&self) -> u64 {
        self.ints.bytes()
            + self.x.bytes()
            + self.hn.bytes()
            + self.qkv.bytes()
            + self.q.bytes()
            + self.attn.bytes()
            + self.gu.bytes()
            + self.act.bytes()
            + self.hfinal.bytes()
            + self.logits.bytes()
    }
}

/// A captured graph. cudarc's `CudaGraph` is not `Send`; the instance that
/// owns it is used by one thread at a time (`&mut self`), which is all the
/// CUDA graph API asks.
struct SendGraph(cudarc::driver::CudaGraph);
// SAFETY: see above — every use goes through `&mut CudaInstance`, so calls on
// one graph are serialized; nothing is shared between threads.
unsafe impl Send for SendGraph {}

#[derive(Default)]
struct Graphs {
    enabled: bool,
    by_batch: std::collections::HashMap<usize, SendGraph>,
    warm: std::collections::HashSet<usize>,
    failure: Option<String>,
}

/// What every instance has before its weights arrive.
struct Base {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kv: KvManager,
    k_cache: Vec<Buf<u16>>,
    v_cache: Vec<Buf<u16>>,
    ws: Workspace,
}

/// The model's tensors once on the device (however they got there).
struct DeviceWeights {
    embed: Buf<u16>,
    layers: Vec<Layer>,
    final_norm: Buf<f32>,
    lm_head: Option<Buf<u16>>,
}

/// A Llama-family model resident on one GPU.
pub struct CudaInstance {
    config: ModelConfig,
    dtype: WeightDType,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    embed: Buf<u16>,
    layers: Vec<Layer>,
    final_norm: Buf<f32>,
    lm_head: Option<Buf<u16>>,
    weight_bytes: u64,
    kv: KvManager,
    k_cache: Vec<Buf<u16>>,
    v_cache: Vec<Buf<u16>>,
    ws: Workspace,
    graphs: Graphs,
    /// Entries of the last successful step (rows of `ws.hfinal` it wrote).
    last_entries: usize,
}

fn bits(t: &HostTensor, dtype: WeightDType) -> Result<Vec<u16>, EngineError> {
    Ok(match (&t.data, dtype) {
        (HostData::F16(v), WeightDType::F16) => v.iter().map(|x| x.to_bits()).collect(),
        (HostData::BF16(v), WeightDType::BF16) => v.iter().map(|x| x.to_bits()).collect(),
        (_, WeightDType::F16) => t
            .to_f32()
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect(),
        (_, WeightDType::BF16) => t
            .to_f32()
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect(),
        (_, WeightDType::F32) => return Err(unsupported_f32()),
    })
}

pub(crate) fn unsupported_f32() -> EngineError {
    EngineError::UnsupportedType("f32 weights on the GPU (the CUDA engine runs f16 or bf16)".into())
}

fn concat(parts: &[&HostTensor], dtype: WeightDType) -> Result<Vec<u16>, EngineError> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend(bits(p, dtype)?);
    }
    Ok(out)
}

impl CudaInstance {
    #[allow(clippy::too_many_arguments)]
    fn empty(
        ctx: Arc<CudaContext>,
        k: Kernels,
        config: ModelConfig,
        dtype: WeightDType,
        block_size: usize,
        initial_blocks: usize,
    ) -> Result<Base, EngineError> {
        if dtype == WeightDType::F32 {
            return Err(unsupported_f32());
        }
        if !config.head_dim.is_multiple_of(32) || config.head_dim > crate::kernels::MAX_HEAD_DIM {
            return Err(EngineError::UnsupportedArchitecture(format!(
                "head dim {} (the CUDA attention kernel takes multiples of 32 up to {})",
                config.head_dim,
                crate::kernels::MAX_HEAD_DIM
            )));
        }
        let _ = k;
        let stream = ctx.new_stream().map_err(|e| dev_err("new stream", e))?;
        let blas = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            CudaBlas::new(stream.clone())
        }))
        .map_err(|_| EngineError::Unavailable("cuBLAS (libcublas.so.13) not found".into()))?
        .map_err(|e| dev_err("cublasCreate", e))?;
        let kv = KvManager::new(block_size, initial_blocks, config.context_length_tokens);
        let per_layer = initial_blocks * block_size * config.kv_dim();
        let mut kc = Vec::with_capacity(config.num_layers);
        let mut vc = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            kc.push(Buf::zeros(&stream, per_layer)?);
            vc.push(Buf::zeros(&stream, per_layer)?);
        }
        let ws = Workspace::new(&stream, &config, 16, 4, 16)?;
        Ok(Base {
            stream,
            blas,
            kv,
            k_cache: kc,
            v_cache: vc,
            ws,
        })
    }

    /// Upload host weights (converted to `dtype`).
    pub(crate) fn from_weights(
        ctx: Arc<CudaContext>,
        k: Kernels,
        w: &LlamaWeights,
        dtype: WeightDType,
        block_size: usize,
        initial_blocks: usize,
    ) -> Result<Self, EngineError> {
        let c = w.config.clone();
        let base = Self::empty(
            ctx.clone(),
            k.clone(),
            c.clone(),
            dtype,
            block_size,
            initial_blocks,
        )?;
        let stream = base.stream.clone();
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in &w.layers {
            let bqkv = match (&l.bq, &l.bk, &l.bv) {
                (None, None, None) => None,
                (bq, bk, bv) => {
                    let mut b = bq.clone().unwrap_or_else(|| vec![0.0; c.q_dim()]);
                    b.extend(bk.clone().unwrap_or_else(|| vec![0.0; c.kv_dim()]));
                    b.extend(bv.clone().unwrap_or_else(|| vec![0.0; c.kv_dim()]));
                    Some(Buf::from_host(&stream, &b)?)
                }
            };
            layers.push(Layer {
                attn_norm: Buf::from_host(&stream, &l.attn_norm)?,
                wqkv: Buf::from_host(&stream, &concat(&[&l.wq, &l.wk, &l.wv], dtype)?)?,
                bqkv,
                wo: Buf::from_host(&stream, &bits(&l.wo, dtype)?)?,
                ffn_norm: Buf::from_host(&stream, &l.ffn_norm)?,
                w_gu: Buf::from_host(&stream, &concat(&[&l.w_gate, &l.w_up], dtype)?)?,
                w_down: Buf::from_host(&stream, &bits(&l.w_down, dtype)?)?,
            });
        }
        let embed = Buf::from_host(&stream, &bits(&w.embed, dtype)?)?;
        let lm_head = match &w.lm_head {
            Some(t) => Some(Buf::from_host(&stream, &bits(t, dtype)?)?),
            None => None,
        };
        let final_norm = Buf::from_host(&stream, &w.final_norm)?;
        Self::assemble(
            ctx,
            k,
            c,
            dtype,
            base,
            DeviceWeights {
                embed,
                layers,
                final_norm,
                lm_head,
            },
            "upload",
        )
    }

    /// Random weights drawn on the device (uniform ±`scale`, norms 1): fast
    /// set-up for benchmarks of large shapes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn random_on_device(
        ctx: Arc<CudaContext>,
        k: Kernels,
        config: ModelConfig,
        seed: u64,
        scale: f32,
        dtype: WeightDType,
        block_size: usize,
        initial_blocks: usize,
    ) -> Result<Self, EngineError> {
        let c = config;
        let base = Self::empty(
            ctx.clone(),
            k.clone(),
            c.clone(),
            dtype,
            block_size,
            initial_blocks,
        )?;
        let stream = base.stream.clone();
        let mut counter = seed;
        let mut rand = |len: usize| -> Result<Buf<u16>, EngineError> {
            let b = Buf::<u16>::zeros(&stream, len)?;
            counter = counter.wrapping_add(0x1234_5678_9abc_def1);
            let grid = (len.div_ceil(256) as u32).clamp(1, 65_535);
            launch!(
                stream,
                &k.fill_uniform,
                (grid, 1, 1),
                (256, 1, 1),
                b.ptr(),
                len as i64,
                counter,
                scale,
                (dtype == WeightDType::BF16) as i32
            )?;
            Ok(b)
        };
        let (h, qd, kvd, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let ones = vec![1.0f32; h];
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            layers.push(Layer {
                attn_norm: Buf::from_host(&stream, &ones)?,
                wqkv: rand((qd + 2 * kvd) * h)?,
                bqkv: None,
                wo: rand(h * qd)?,
                ffn_norm: Buf::from_host(&stream, &ones)?,
                w_gu: rand(2 * f * h)?,
                w_down: rand(h * f)?,
            });
        }
        let embed = rand(c.vocab_size * h)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(rand(c.vocab_size * h)?)
        };
        let final_norm = Buf::from_host(&stream, &ones)?;
        Self::assemble(
            ctx,
            k,
            c,
            dtype,
            base,
            DeviceWeights {
                embed,
                layers,
                final_norm,
                lm_head,
            },
            "random fill",
        )
    }

    /// The one place a `CudaInstance` is put together, whichever way its
    /// weights reached the device; waits for the uploads so that `what` names
    /// a failure of them here rather than at the first step.
    fn assemble(
        ctx: Arc<CudaContext>,
        k: Kernels,
        config: ModelConfig,
        dtype: WeightDType,
        base: Base,
        weights: DeviceWeights,
        what: &str,
    ) -> Result<Self, EngineError> {
        let Base {
            stream,
            blas,
            kv,
            k_cache,
            v_cache,
            ws,
        } = base;
        let DeviceWeights {
            embed,
            layers,
            final_norm,
            lm_head,
        } = weights;
        let mut inst = CudaInstance {
            config,
            dtype,
            ctx,
            stream,
            blas,
            k,
            embed,
            layers,
            final_norm,
            lm_head,
            weight_bytes: 0,
            kv,
            k_cache,
            v_cache,
            ws,
            graphs: Graphs {
                enabled: std::env::var("SLINFER_CUDA_GRAPHS").is_ok_and(|v| v == "1"),
                ..Default::default()
            },
            last_entries: 0,
        };
        inst.weight_bytes = inst.count_weight_bytes();
        inst.stream.synchronize().map_err(|e| dev_err(what, e))?;
        Ok(inst)
    }

    fn count_weight_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.bytes()
                    + l.wqkv.bytes()
                    + l.bqkv.as_ref().map_or(0, |b| b.bytes())
                    + l.wo.bytes()
                    + l.ffn_norm.bytes()
                    + l.w_gu.bytes()
                    + l.w_down.bytes()
            })
            .sum();
        layers
            + self.embed.bytes()
            + self.final_norm.bytes()
            + self.lm_head.as_ref().map_or(0, |b| b.bytes())
    }

    /// The weight type on the device.
    pub fn dtype(&self) -> WeightDType {
        self.dtype
    }

    /// Wait for all queued work of this instance.
    pub fn synchronize(&self) -> Result<(), EngineError> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    fn block_elems(&self) -> usize {
        self.kv.block_size_tokens() * self.config.kv_dim()
    }

    /// Copy `blocks` whole blocks inside or between cache buffers.
    fn copy_block(
        &self,
        src: u64,
        src_block: usize,
        dst: u64,
        dst_block: usize,
        blocks: usize,
    ) -> Result<(), EngineError> {
        let be = (self.block_elems() * 2) as u64;
        // SAFETY: both ranges lie inside live cache buffers of at least
        // (block + blocks) × block bytes, checked by the callers; same-buffer
        // moves never overlap (distinct blocks).
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst + dst_block as u64 * be,
                src + src_block as u64 * be,
                (blocks as u64 * be) as usize,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| dev_err("copy KV blocks", e))
    }
}

impl LlmInstance for CudaInstance {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn block_size_tokens(&self) -> usize {
        self.kv.block_size_tokens()
    }
    fn kv_bytes_per_block(&self) -> u64 {
        (2 * self.config.num_layers * self.block_elems() * 2) as u64
    }
    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
    slinfer_engine::delegate_kv_bookkeeping!(kv);
    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        let cur = self.kv.capacity_blocks();
        let be = self.block_elems();
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        if blocks == cur {
            return Ok(());
        }
        // Captured graphs point into the cache buffers about to change.
        self.graphs.by_batch.clear();
        if blocks > cur {
            // All or nothing: allocate every layer's new buffers before
            // touching the old ones.
            let mut nk = Vec::with_capacity(self.k_cache.len());
            let mut nv = Vec::with_capacity(self.v_cache.len());
            for _ in 0..self.k_cache.len() {
                nk.push(Buf::<u16>::zeros(&self.stream, blocks * be)?);
                nv.push(Buf::<u16>::zeros(&self.stream, blocks * be)?);
            }
            for (old, new) in self
                .k_cache
                .iter()
                .zip(&nk)
                .chain(self.v_cache.iter().zip(&nv))
            {
                self.copy_block(old.ptr(), 0, new.ptr(), 0, cur)?;
            }
            self.k_cache = nk;
            self.v_cache = nv;
            self.kv.grow(blocks);
        } else {
            let moves = self.kv.shrink(blocks)?;
            for buf in self.k_cache.iter().chain(&self.v_cache) {
                for &(from, to) in &moves {
                    self.copy_block(buf.ptr(), from as usize, buf.ptr(), to as usize, 1)?;
                }
            }
            // Release memory by moving to smaller buffers; if that allocation
            // fails the larger buffers stay (correct, just not smaller).
            let mut nk = Vec::with_capacity(self.k_cache.len());
            let mut nv = Vec::with_capacity(self.v_cache.len());
            let mut ok = true;
            for _ in 0..self.k_cache.len() {
                match (
                    Buf::<u16>::zeros(&self.stream, blocks * be),
                    Buf::<u16>::zeros(&self.stream, blocks * be),
                ) {
                    (Ok(a), Ok(b)) => {
                        nk.push(a);
                        nv.push(b);
                    }
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                for (old, new) in self
                    .k_cache
                    .iter()
                    .zip(&nk)
                    .chain(self.v_cache.iter().zip(&nv))
                {
                    self.copy_block(old.ptr(), 0, new.ptr(), 0, blocks)?;
                }
                self.k_cache = nk;
                self.v_cache = nv;
            }
        }
        self.synchronize()
    }
    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
        check_tokens(batch, self.config.vocab_size)?;
        let (plan, res) = self.kv.plan(batch)?;
        match self.forward(&plan) {
            Ok(l) => {
                self.kv.commit(res);
                self.last_entries = l.len();
                Ok(l)
            }
            Err(e) => {
                self.kv.rollback(res);
                Err(e)
            }
        }
    }
    fn fork_sequence(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), EngineError> {
        let Some((from, to)) = self.kv.fork(src, dst, tokens)? else {
            return Ok(());
        };
        let copied = self
            .k_cache
            .iter()
            .chain(&self.v_cache)
            .try_for_each(|c| self.copy_block(c.ptr(), from as usize, c.ptr(), to as usize, 1))
            .and_then(|()| self.synchronize());
        if copied.is_err() {
            // Undo the fork: nothing changes on an error.
            self.kv.free_sequence(dst)?;
        }
        copied
    }
    fn last_hidden(&mut self) -> Result<Vec<Vec<f32>>, EngineError> {
        let h = self.config.hidden_size;
        let bits = self
            .stream
            .clone_dtoh(&self.ws.hfinal.slice.slice(0..self.last_entries * h))
            .map_err(|e| dev_err("download hidden states", e))?;
        self.synchronize()?;
        let value = |b: u16| match self.dtype {
            WeightDType::BF16 => half::bf16::from_bits(b).to_f32(),
            _ => half::f16::from_bits(b).to_f32(),
        };
        Ok(bits
            .chunks_exact(h.max(1))
            .map(|row| row.iter().map(|&b| value(b)).collect())
            .collect())
    }
    fn memory(&self) -> MemoryReport {
        let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
        let kv_bytes = self
            .k_cache
            .iter()
            .chain(&self.v_cache)
            .map(|b| b.bytes())
            .sum();
        MemoryReport {
            weight_bytes: self.weight_bytes,
            kv_bytes,
            workspace_bytes: self.ws.bytes(),
            kv_blocks_capacity: self.kv.capacity_blocks(),
            kv_blocks_in_use: self.kv.used_blocks(),
            device_free_bytes: free as u64,
            device_total_bytes: total as u64,
        }
    }
}
