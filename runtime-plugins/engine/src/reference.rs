//! A slow, plain pure-Rust reference forward pass of the Llama-family decoder
//! over the same paged KV layout the device engines use. It exists to check
//! engines against (tests, the GPU check) and to exercise the contract without
//! a device; it is not a production backend.
//!
//! KV layout (shared with the CUDA engine): per layer, keys and values are
//! `[block][kv_head][slot in block][head_dim]`.

use crate::kv::{BatchPlan, KvManager};
use crate::package::ModelPackage;
use crate::weights::{LlamaWeights, WeightDType};
use crate::{
    Backend, DeviceInfo, DeviceKind, EngineError, Footprint, LlmInstance, LoadOptions,
    MemoryReport, ModelConfig, ModelSource, StepEntry,
};

/// Default tokens per KV block for the reference.
pub const DEFAULT_BLOCK_SIZE_TOKENS: usize = 16;

/// The reference backend: the host CPU, f32 arithmetic. By default one CPU
/// device of unknown size; [`ReferenceBackend::with_devices`] gives it
/// devices of a chosen kind and size, so tests can drive the host's
/// multi-device paths without native libraries (it computes on the host CPU
/// whatever the kind says).
#[derive(Debug, Clone)]
pub struct ReferenceBackend {
    kind: DeviceKind,
    /// Each device's size in bytes (0: unknown).
    devices: Vec<u64>,
}

impl Default for ReferenceBackend {
    fn default() -> Self {
        ReferenceBackend {
            kind: DeviceKind::Cpu,
            devices: vec![0],
        }
    }
}

impl ReferenceBackend {
    /// Devices of `kind`, one per size given.
    pub fn with_devices(kind: DeviceKind, sizes_bytes: &[u64]) -> Self {
        ReferenceBackend {
            kind,
            devices: sizes_bytes.to_vec(),
        }
    }
}

impl Backend for ReferenceBackend {
    fn name(&self) -> &str {
        "reference"
    }
    fn kind(&self) -> DeviceKind {
        self.kind
    }
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError> {
        Ok(self
            .devices
            .iter()
            .enumerate()
            .map(|(index, &bytes)| DeviceInfo {
                index,
                kind: self.kind,
                name: "pure-Rust reference".into(),
                total_bytes: bytes,
                free_bytes: bytes,
            })
            .collect())
    }
    /// f32 weights and KV.
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError> {
        package.weights_file()?;
        Ok(Footprint::of_config(&package.manifest.config, 4, 4))
    }
    fn load(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<Box<dyn LlmInstance>, EngineError> {
        if device >= self.devices.len() {
            return Err(EngineError::NoDevice(device));
        }
        let w = LlamaWeights::load(source, options.dtype.unwrap_or(WeightDType::F32))?;
        Ok(Box::new(ReferenceInstance::new(&w, options)))
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: Vec<f32>,
    w_up: Vec<f32>,
    w_down: Vec<f32>,
}

/// One model instance computed on the host.
pub struct ReferenceInstance {
    config: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    output: Vec<f32>,
    weight_bytes: u64,
    kv: KvManager,
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    /// The last step's final hidden states, one per entry.
    hidden: Vec<Vec<f32>>,
}

/// `y[t][n] = Σ_k x[t][k] · w[n][k]` (+ bias): PyTorch's `Linear`.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<f32> {
    let n = w.len() / k;
    let t = x.len() / k;
    let mut y = vec![0.0; t * n];
    for r in 0..t {
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let wr = &w[c * k..(c + 1) * k];
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += xr[i] * wr[i];
            }
            y[r * n + c] = acc + bias.map_or(0.0, |b| b[c]);
        }
    }
    y
}

/// RMSNorm of each row of `x` (width `weight.len()`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let h = weight.len();
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for i in 0..h {
            yr[i] = xr[i] * inv * weight[i];
        }
    }
    y
}

/// Rotary embedding, rotating halves (Hugging Face `rotate_half`), on one
/// head vector at position `pos`.
pub fn rope(v: &mut [f32], pos: usize, theta: f32) {
    let hd = v.len();
    let half = hd / 2;
    for i in 0..half {
        let inv_freq = 1.0 / theta.powf((2 * i) as f32 / hd as f32);
        let ang = pos as f32 * inv_freq;
        let (s, c) = ang.sin_cos();
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl ReferenceInstance {
    pub fn new(w: &LlamaWeights, options: &LoadOptions) -> Self {
        let c = w.config.clone();
        let layers = w
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: l.attn_norm.clone(),
                wq: l.wq.to_f32(),
                wk: l.wk.to_f32(),
                wv: l.wv.to_f32(),
                bq: l.bq.clone(),
                bk: l.bk.clone(),
                bv: l.bv.clone(),
                wo: l.wo.to_f32(),
                ffn_norm: l.ffn_norm.clone(),
                w_gate: l.w_gate.to_f32(),
                w_up: l.w_up.to_f32(),
                w_down: l.w_down.to_f32(),
            })
            .collect();
        let bs = options
            .block_size_tokens
            .unwrap_or(DEFAULT_BLOCK_SIZE_TOKENS);
        let blocks = options.initial_kv_blocks;
        let per_layer = blocks * bs * c.kv_dim();
        ReferenceInstance {
            embed: w.embed.to_f32(),
            final_norm: w.final_norm.clone(),
            output: w.output().to_f32(),
            weight_bytes: w.byte_len(),
            layers,
            kv: KvManager::new(bs, blocks, c.context_length_tokens),
            k_cache: vec![vec![0.0; per_layer]; c.num_layers],
            v_cache: vec![vec![0.0; per_layer]; c.num_layers],
            hidden: Vec::new(),
            config: c,
        }
    }

    fn block_elems(&self) -> usize {
        self.kv.block_size_tokens() * self.config.kv_dim()
    }

    /// Index of (slot, kv head) in a layer's cache.
    fn cache_index(&self, slot: usize, kvh: usize) -> usize {
        let bs = self.kv.block_size_tokens();
        let hd = self.config.head_dim;
        let (block, off) = (slot / bs, slot % bs);
        ((block * self.config.num_kv_heads + kvh) * bs + off) * hd
    }

    fn forward(&mut self, plan: &BatchPlan) -> Vec<Vec<f32>> {
        let c = self.config.clone();
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let t_count = plan.num_tokens();
        let bs = plan.block_size_tokens;
        let mut x = Vec::with_capacity(t_count * h);
        for &t in &plan.token_ids {
            x.extend_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
        }
        let scale = 1.0 / (hd as f32).sqrt();
        for li in 0..c.num_layers {
            let l = &self.layers[li];
            let hn = rms_norm(&x, &l.attn_norm, c.rms_norm_eps);
            let mut q = linear(&hn, &l.wq, l.bq.as_deref(), h);
            let mut k = linear(&hn, &l.wk, l.bk.as_deref(), h);
            let v = linear(&hn, &l.wv, l.bv.as_deref(), h);
            for t in 0..t_count {
                let pos = plan.positions[t] as usize;
                for head in 0..nh {
                    let o = (t * nh + head) * hd;
                    rope(&mut q[o..o + hd], pos, c.rope_theta);
                }
                for head in 0..nkv {
                    let o = (t * nkv + head) * hd;
                    rope(&mut k[o..o + hd], pos, c.rope_theta);
                    let ci = self.cache_index(plan.slot_mapping[t] as usize, head);
                    self.k_cache[li][ci..ci + hd].copy_from_slice(&k[o..o + hd]);
                    self.v_cache[li][ci..ci + hd].copy_from_slice(&v[o..o + hd]);
                }
            }
            let mut attn = vec![0.0f32; t_count * nh * hd];
            for t in 0..t_count {
                let e = plan.token_entry[t] as usize;
                let blocks = &plan.block_indices[plan.block_indices_begins[e] as usize
                    ..plan.block_indices_begins[e + 1] as usize];
                let ctx = plan.positions[t] as usize + 1;
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let qv = &q[(t * nh + head) * hd..(t * nh + head + 1) * hd];
                    let mut scores = Vec::with_capacity(ctx);
                    for j in 0..ctx {
                        let slot = blocks[j / bs] as usize * bs + j % bs;
                        let ci = self.cache_index(slot, kvh);
                        let kv = &self.k_cache[li][ci..ci + hd];
                        scores.push(qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale);
                    }
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in &mut scores {
                        *s = (*s - m).exp();
                        sum += *s;
                    }
                    let out = &mut attn[(t * nh + head) * hd..(t * nh + head + 1) * hd];
                    for (j, p) in scores.iter().enumerate() {
                        let slot = blocks[j / bs] as usize * bs + j % bs;
                        let ci = self.cache_index(slot, kvh);
                        let vv = &self.v_cache[li][ci..ci + hd];
                        for d in 0..hd {
                            out[d] += p / sum * vv[d];
                        }
                    }
                }
            }
            let o = linear(&attn, &l.wo, None, nh * hd);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms_norm(&x, &l.ffn_norm, c.rms_norm_eps);
            let g = linear(&hn, &l.w_gate, None, h);
            let u = linear(&hn, &l.w_up, None, h);
            let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
            let d = linear(&a, &l.w_down, None, c.intermediate_size);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        self.hidden = plan
            .last_token_rows
            .iter()
            .map(|&r| {
                let r = r as usize;
                rms_norm(&x[r * h..(r + 1) * h], &self.final_norm, c.rms_norm_eps)
            })
            .collect();
        self.hidden
            .iter()
            .map(|hn| linear(hn, &self.output, None, h))
            .collect()
    }
}

impl LlmInstance for ReferenceInstance {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn block_size_tokens(&self) -> usize {
        self.kv.block_size_tokens()
    }
    fn kv_bytes_per_block(&self) -> u64 {
        (2 * self.config.num_layers * self.block_elems() * 4) as u64
    }
    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
    crate::delegate_kv_bookkeeping!(kv);
    fn resize_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        let be = self.block_elems();
        if blocks >= self.kv.capacity_blocks() {
            self.kv.grow(blocks);
        } else {
            let moves = self.kv.shrink(blocks)?;
            for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
                for &(from, to) in &moves {
                    let (f, t) = (from as usize * be, to as usize * be);
                    cache.copy_within(f..f + be, t);
                }
            }
        }
        for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            cache.resize(blocks * be, 0.0);
        }
        Ok(())
    }
    fn step(&mut self, batch: &[StepEntry]) -> Result<Vec<Vec<f32>>, EngineError> {
        check_tokens(batch, self.config.vocab_size)?;
        let (plan, res) = self.kv.plan(batch)?;
        let out = self.forward(&plan);
        self.kv.commit(res);
        Ok(out)
    }
    fn fork_sequence(
        &mut self,
        src: crate::SeqId,
        dst: crate::SeqId,
        tokens: usize,
    ) -> Result<(), EngineError> {
        if let Some((from, to)) = self.kv.fork(src, dst, tokens)? {
            let be = self.block_elems();
            let (f, t) = (from as usize * be, to as usize * be);
            for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
                cache.copy_within(f..f + be, t);
            }
        }
        Ok(())
    }
    fn last_hidden(&mut self) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self.hidden.clone())
    }
    fn memory(&self) -> MemoryReport {
        MemoryReport {
            weight_bytes: self.weight_bytes,
            kv_bytes: self.kv_bytes_per_block() * self.kv.capacity_blocks() as u64,
            workspace_bytes: 0,
            kv_blocks_capacity: self.kv.capacity_blocks(),
            kv_blocks_in_use: self.kv.used_blocks(),
            device_free_bytes: 0,
            device_total_bytes: 0,
        }
    }
}

/// Every token id must index the vocabulary (checked before any state moves).
pub fn check_tokens(batch: &[StepEntry], vocab: usize) -> Result<(), EngineError> {
    for e in batch {
        if let Some(&t) = e.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { token: t, vocab });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeqId;
    use crate::sampler::argmax;

    fn instance(blocks: usize, bs: usize) -> ReferenceInstance {
        let w = LlamaWeights::random(ModelConfig::tiny_for_tests(), 11, 0.3, WeightDType::F32);
        ReferenceInstance::new(
            &w,
            &LoadOptions {
                initial_kv_blocks: blocks,
                block_size_tokens: Some(bs),
                dtype: None,
            },
        )
    }

    fn e(seq: SeqId, tokens: &[u32]) -> StepEntry {
        StepEntry {
            seq,
            tokens: tokens.to_vec(),
        }
    }

    fn close(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn rope_rotates_halves_and_keeps_norm() {
        let mut v = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut v, 0, 10_000.0);
        assert_eq!(v, [1.0, 0.0, 0.0, 0.0]);
        // pair (0, 2) at frequency 1: angle = pos
        let mut v = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut v, 1, 10_000.0);
        assert!(
            (v[0] - 1f32.cos()).abs() < 1e-6 && (v[2] - 1f32.sin()).abs() < 1e-6,
            "{v:?}"
        );
        let mut v = vec![0.3, -1.2, 2.0, 0.7];
        let n0: f32 = v.iter().map(|x| x * x).sum();
        rope(&mut v, 37, 10_000.0);
        let n1: f32 = v.iter().map(|x| x * x).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn rms_norm_and_linear_small_cases() {
        let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6);
        // x [1,2] · w [[1,0],[0,1],[1,1]]^T + b
        let y = linear(
            &[1.0, 2.0],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            Some(&[0.0, 0.0, 1.0]),
            2,
        );
        assert_eq!(y, [1.0, 2.0, 4.0]);
    }

    #[test]
    fn chunked_prefill_equals_token_by_token() {
        let prompt = [5u32, 17, 3, 42, 8, 9, 60, 1, 2, 33];
        let mut a = instance(16, 4);
        a.add_sequence(1).unwrap();
        let la = a.step(&[e(1, &prompt)]).unwrap();
        let mut b = instance(16, 4);
        b.add_sequence(1).unwrap();
        let mut lb = Vec::new();
        for chunk in prompt.chunks(3) {
            lb = b.step(&[e(1, chunk)]).unwrap();
        }
        assert!(close(&la[0], &lb[0]) < 1e-4, "{}", close(&la[0], &lb[0]));
        assert_eq!(a.sequence_len(1), Some(10));
        assert_eq!(a.kv_blocks_in_use(), 3);
    }

    #[test]
    fn ragged_batch_equals_separate_runs() {
        let (p1, p2) = ([1u32, 2, 3, 4, 5], [9u32, 8, 7]);
        let mut solo = instance(16, 4);
        solo.add_sequence(1).unwrap();
        let s1 = solo.step(&[e(1, &p1)]).unwrap();
        let s1b = solo.step(&[e(1, &[argmax(&s1[0])])]).unwrap();
        let mut solo2 = instance(16, 4);
        solo2.add_sequence(2).unwrap();
        let s2 = solo2.step(&[e(2, &p2)]).unwrap();

        let mut m = instance(16, 4);
        m.add_sequence(1).unwrap();
        m.add_sequence(2).unwrap();
        let r = m.step(&[e(1, &p1)]).unwrap();
        assert!(close(&r[0], &s1[0]) < 1e-5);
        // one iteration: seq 2 prefills while seq 1 decodes
        let r = m.step(&[e(2, &p2), e(1, &[argmax(&s1[0])])]).unwrap();
        assert!(close(&r[0], &s2[0]) < 1e-4, "{}", close(&r[0], &s2[0]));
        assert!(close(&r[1], &s1b[0]) < 1e-4, "{}", close(&r[1], &s1b[0]));
    }

    #[test]
    fn shrink_compacts_and_keeps_results() {
        let mut m = instance(8, 2);
        let mut solo = instance(8, 2);
        for s in [1, 2] {
            m.add_sequence(s).unwrap();
        }
        solo.add_sequence(2).unwrap();
        m.step(&[e(1, &[1, 2, 3, 4])]).unwrap(); // blocks 0,1
        m.step(&[e(2, &[5, 6, 7, 8])]).unwrap(); // blocks 2,3
        solo.step(&[e(2, &[5, 6, 7, 8])]).unwrap();
        m.free_sequence(1).unwrap();
        m.resize_kv(2).unwrap(); // seq 2 moves to blocks 0,1
        assert_eq!(m.kv.block_table(2).unwrap(), [0, 1]);
        assert!(matches!(
            m.resize_kv(1),
            Err(EngineError::ShrinkBelowUsage { .. })
        ));
        m.resize_kv(4).unwrap();
        let a = m.step(&[e(2, &[10])]).unwrap();
        let b = solo.step(&[e(2, &[10])]).unwrap();
        assert!(close(&a[0], &b[0]) < 1e-5);
    }

    #[test]
    fn exhaustion_is_an_error_and_nothing_moves() {
        let mut m = instance(2, 2);
        m.add_sequence(1).unwrap();
        let err = m.step(&[e(1, &[1, 2, 3, 4, 5])]).unwrap_err();
        assert!(
            matches!(err, EngineError::KvExhausted { needed: 3, free: 2 }),
            "{err}"
        );
        assert_eq!(m.sequence_len(1), Some(0));
        assert_eq!(m.kv_blocks_in_use(), 0);
        let err = m.step(&[e(1, &[64])]).unwrap_err();
        assert!(matches!(
            err,
            EngineError::TokenOutOfRange {
                token: 64,
                vocab: 64
            }
        ));
        assert!(m.step(&[e(1, &[1, 2, 3, 4])]).is_ok());
        assert_eq!(m.memory().kv_blocks_in_use, 2);
    }

    /// The default model end to end on the CPU, when `SLINFER_TEST_GGUF`
    /// names SmolLM2-135M-Instruct's GGUF: "The capital of France is" → " Paris".
    #[test]
    fn smollm2_gguf_says_paris() {
        let Ok(path) = std::env::var("SLINFER_TEST_GGUF") else {
            eprintln!("skipped: SLINFER_TEST_GGUF is not set (path to SmolLM2-135M-Instruct GGUF)");
            return;
        };
        let g = crate::gguf::GgufFile::open(std::path::Path::new(&path)).unwrap();
        let vocab = g.metadata_strings("tokenizer.ggml.tokens").unwrap();
        let id = |s: &str| {
            vocab
                .iter()
                .position(|t| *t == s)
                .unwrap_or_else(|| panic!("no token {s}")) as u32
        };
        let prompt: Vec<u32> = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
            .iter()
            .map(|s| id(s))
            .collect();
        let w = LlamaWeights::from_gguf_file(&g, WeightDType::F32).unwrap();
        let mut m = ReferenceInstance::new(&w, &LoadOptions::default());
        m.add_sequence(0).unwrap();
        let l = m.step(&[e(0, &prompt)]).unwrap();
        let next = argmax(&l[0]);
        assert_eq!(
            vocab[next as usize], "ĠParis",
            "got {:?}",
            vocab[next as usize]
        );
    }
}
