//! The forward pass of one iteration on the GPU: the per-layer kernels and
//! cuBLAS matmuls enqueued on the instance's stream, optionally captured and
//! replayed as CUDA graphs.

use super::*;

impl CudaInstance {
    /// `y[t][n] (+)= x[t][:] · w[n][:]` for row-major `x` [t, k], `w` [n, k],
    /// `y` [t, n] f32; `beta` 1 accumulates into `y` (the residual add).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        w: u64,
        x: u64,
        y: u64,
        n: usize,
        t: usize,
        k: usize,
        beta: f32,
    ) -> Result<(), EngineError> {
        let ty = match self.dtype {
            WeightDType::BF16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
            _ => blas_sys::cudaDataType_t::CUDA_R_16F,
        };
        let alpha = 1.0f32;
        // Column-major view: yᵀ [n, t] = wᵀᵀ · xᵀ, i.e. op(A) = Aᵀ with A the
        // column-major [k, n] view of row-major w.
        // SAFETY: w, x and y are live device buffers of at least n·k, t·k and
        // t·n elements (checked by the workspace sizing); alpha and beta are
        // host scalars read during the call (host pointer mode).
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                ty,
                k as i32,
                x as *const c_void,
                ty,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| dev_err("cublasGemmEx", e))
    }

    pub(super) fn ensure_workspace(
        &mut self,
        tokens: usize,
        entries: usize,
        blocks: usize,
    ) -> Result<(), EngineError> {
        let ws = &self.ws;
        if tokens <= ws.tokens && entries <= ws.entries && blocks <= ws.blocks {
            return Ok(());
        }
        let grow = |need: usize, have: usize| {
            if need <= have {
                have
            } else {
                need.next_power_of_two()
            }
        };
        let (t, e, b) = (
            grow(tokens, ws.tokens),
            grow(entries, ws.entries),
            grow(blocks, ws.blocks),
        );
        // Captured graphs point into the old buffers.
        self.graphs.by_batch.clear();
        // Free the old workspace first: the new one is the larger.
        let placeholder = Workspace::new(&self.stream, &self.config, 0, 0, 0)?;
        drop(std::mem::replace(&mut self.ws, placeholder));
        self.ws = Workspace::new(&self.stream, &self.config, t, e, b)?;
        Ok(())
    }

    pub(super) fn forward(&mut self, plan: &BatchPlan) -> Result<Vec<Vec<f32>>, EngineError> {
        // cuBLAS works on the calling thread's current context, and the host
        // may call from any thread.
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        let (t, b, nb) = (
            plan.num_tokens(),
            plan.num_entries(),
            plan.block_indices.len(),
        );
        self.ensure_workspace(t, b, nb)?;
        let mut ints: Vec<i32> = Vec::with_capacity(4 * t + 2 * b + 1 + nb);
        ints.extend(plan.token_ids.iter().map(|&x| x as i32));
        ints.extend(&plan.positions);
        ints.extend(&plan.slot_mapping);
        ints.extend(&plan.token_entry);
        ints.extend(&plan.last_token_rows);
        ints.extend(&plan.block_indices_begins);
        ints.extend(&plan.block_indices);
        let ws = &mut self.ws;
        self.stream
            .memcpy_htod(&ints, &mut ws.ints.slice)
            .map_err(|e| dev_err("upload batch", e))?;
        if self.graphs.enabled && t == b {
            self.run_graph(t, b)?;
        } else {
            self.enqueue(t, b)?;
        }
        let v = self.config.vocab_size;
        let host = self
            .stream
            .clone_dtoh(&self.ws.logits.slice.slice(0..b * v))
            .map_err(|e| dev_err("download logits", e))?;
        self.synchronize()?;
        Ok(host.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// Queue the whole forward pass for `t` new tokens of `b` entries, whose
    /// batch arrays are already in the workspace. Depends only on `(t, b)`
    /// and the buffers' addresses, so it can be captured as a CUDA graph.
    pub(super) fn enqueue(&self, t: usize, b: usize) -> Result<(), EngineError> {
        let c = &self.config;
        let base = self.ws.ints.ptr();
        let at = |off: usize| base + 4 * off as u64;
        let (p_ids, p_pos, p_slots, p_entry) = (at(0), at(t), at(2 * t), at(3 * t));
        let (p_last, p_btb, p_bi) = (at(4 * t), at(4 * t + b), at(4 * t + 2 * b + 1));
        let ws = &self.ws;
        let (x, hn, qkv, q, attn, gu, act) = (
            ws.x.ptr(),
            ws.hn.ptr(),
            ws.qkv.ptr(),
            ws.q.ptr(),
            ws.attn.ptr(),
            ws.gu.ptr(),
            ws.act.ptr(),
        );
        let (hfinal, logits) = (ws.hfinal.ptr(), ws.logits.ptr());
        let (h, qd, kvd, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let (nh, nkv, hd, bs) = (
            c.num_heads as i32,
            c.num_kv_heads as i32,
            c.head_dim as i32,
            self.kv.block_size_tokens() as i32,
        );
        let eps = c.rms_norm_eps;
        let tt = t as u32;
        let s = &self.stream;
        let k = &self.k;
        launch!(
            s,
            &k.embed,
            (tt, 1, 1),
            (256, 1, 1),
            self.embed.ptr(),
            p_ids,
            x,
            h as i32
        )?;
        for (li, l) in self.layers.iter().enumerate() {
            launch!(
                s,
                &k.rmsnorm,
                (tt, 1, 1),
                (256, 1, 1),
                x,
                l.attn_norm.ptr(),
                hn,
                0u64,
                0i32,
                h as i32,
                eps
            )?;
            self.gemm(l.wqkv.ptr(), hn, qkv, qd + 2 * kvd, t, h, 0.0)?;
            let (bias, has_bias) = l.bqkv.as_ref().map_or((0u64, 0i32), |bb| (bb.ptr(), 1));
            launch!(
                s,
                &k.rope_kv,
                (tt, 1, 1),
                (256, 1, 1),
                qkv,
                bias,
                has_bias,
                p_pos,
                p_slots,
                q,
                self.k_cache[li].ptr(),
                self.v_cache[li].ptr(),
                nh,
                nkv,
                hd,
                bs,
                c.rope_theta
            )?;
            launch!(
                s,
                &k.paged_attn,
                (tt, nh as u32, 1),
                (crate::kernels::ATTN_THREADS, 1, 1),
                q,
                self.k_cache[li].ptr(),
                self.v_cache[li].ptr(),
                p_entry,
                p_pos,
                p_btb,
                p_bi,
                attn,
                nh,
                nkv,
                hd,
                bs,
                1.0f32 / (hd as f32).sqrt()
            )?;
            self.gemm(l.wo.ptr(), attn, x, h, t, qd, 1.0)?;
            launch!(
                s,
                &k.rmsnorm,
                (tt, 1, 1),
                (256, 1, 1),
                x,
                l.ffn_norm.ptr(),
                hn,
                0u64,
                0i32,
                h as i32,
                eps
            )?;
            self.gemm(l.w_gu.ptr(), hn, gu, 2 * f, t, h, 0.0)?;
            let n = (t * f) as i64;
            let grid = ((n as usize).div_ceil(256) as u32).clamp(1, 65_535);
            launch!(
                s,
                &k.silu_mul,
                (grid, 1, 1),
                (256, 1, 1),
                gu,
                act,
                f as i32,
                n
            )?;
            self.gemm(l.w_down.ptr(), act, x, h, t, f, 1.0)?;
        }
        launch!(
            s,
            &k.rmsnorm,
            (b as u32, 1, 1),
            (256, 1, 1),
            x,
            self.final_norm.ptr(),
            hfinal,
            p_last,
            1i32,
            h as i32,
            eps
        )?;
        let out_w = self.lm_head.as_ref().unwrap_or(&self.embed).ptr();
        self.gemm(out_w, hfinal, logits, c.vocab_size, b, h, 0.0)
    }

    /// Decode-only iterations (one token per entry) replay a CUDA graph per
    /// batch size: the first one of a size runs eagerly (cuBLAS settles its
    /// kernels), the second is captured. A failed capture turns graphs off
    /// for this instance and runs eagerly.
    pub(super) fn run_graph(&mut self, t: usize, b: usize) -> Result<(), EngineError> {
        if let Some(g) = self.graphs.by_batch.get(&b) {
            return g.0.launch().map_err(|e| dev_err("graph launch", e));
        }
        if self.graphs.warm.insert(b) {
            return self.enqueue(t, b);
        }
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| dev_err("begin capture", e))?;
        let queued = self.enqueue(t, b);
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        match (queued, ended) {
            (Ok(()), Ok(Some(g))) => {
                g.launch().map_err(|e| dev_err("graph launch", e))?;
                self.graphs.by_batch.insert(b, SendGraph(g));
                Ok(())
            }
            (queued, ended) => {
                self.graphs.enabled = false;
                self.graphs.by_batch.clear();
                self.graphs.failure = Some(format!(
                    "capture failed: {:?} / {:?}",
                    queued.err(),
                    ended.err()
                ));
                self.enqueue(t, b)
            }
        }
    }

    /// Turn CUDA graphs for decode iterations on or off (off by default
    /// until measured on a GPU; `SLINFER_CUDA_GRAPHS=1` turns them on).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.enabled = on;
        self.graphs.by_batch.clear();
        self.graphs.warm.clear();
    }

    /// Why graph capture was given up, if it was.
    pub fn cuda_graph_failure(&self) -> Option<&str> {
        self.graphs.failure.as_deref()
    }
}
