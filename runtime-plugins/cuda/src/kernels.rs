//! Our CUDA kernels, as CUDA C source compiled at run time by NVRTC to a
//! CUBIN for the device's own `sm_XY` (a newer NVRTC's PTX can be refused by
//! an older driver's JIT). NVRTC 13 has no `cuda_fp16.h` built in, so half and
//! bfloat16 values travel as `unsigned short` bits, converted with PTX `cvt`
//! (f16) or bit arithmetic (bf16). Every kernel comes in an `_f16` and a
//! `_bf16` flavour for the weight/activation type.
//!
//! KV cache layout, per layer: `[block][kv_head][slot in block][head_dim]`
//! (the same as `slinfer_engine::reference`).

use std::ffi::CString;

use cudarc::nvrtc;

/// Threads per block of the attention kernel (4 warps).
pub const ATTN_THREADS: u32 = 128;
/// Largest head dimension the attention kernel handles (8 values per lane).
pub const MAX_HEAD_DIM: usize = 256;

/// Kernel names (without the `_f16` / `_bf16` suffix).
pub const KERNELS: &[&str] = &["embed", "rmsnorm", "rope_kv", "paged_attn", "silu_mul"];

pub const SOURCE: &str = r#"
typedef unsigned short u16;
#define NEG_INF (-__int_as_float(0x7f800000))
#define ATTN_WARPS 4
#define MAX_HD 256

__device__ __forceinline__ float h2f(u16 h) { float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float b2f(u16 h) { return __int_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ u16 f2b(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
struct F16 {
    __device__ static float ld(u16 x) { return h2f(x); }
    __device__ static u16 st(float x) { return f2h(x); }
};
struct BF16 {
    __device__ static float ld(u16 x) { return b2f(x); }
    __device__ static u16 st(float x) { return f2b(x); }
};

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float s[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) s[w] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? s[threadIdx.x] : 0.f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) s[0] = v;
    __syncthreads();
    float r = s[0];
    __syncthreads();
    return r;
}

// x[t] = table[ids[t]] (f32 residual stream). Grid: tokens.
template <class T>
__device__ void embed(const u16* table, const int* ids, float* x, int hidden) {
    int t = blockIdx.x;
    const u16* row = table + (long long)ids[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(long long)t * hidden + i] = T::ld(row[i]);
}

// out[b] = rmsnorm(x[rows[b]] or x[b]) * w. Grid: output rows.
template <class T>
__device__ void rmsnorm(const float* x, const float* w, u16* out, const int* rows, int use_rows, int hidden, float eps) {
    int b = blockIdx.x;
    int src = use_rows ? rows[b] : b;
    const float* xr = x + (long long)src * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[(long long)b * hidden + i] = T::st(xr[i] * inv * w[i]);
}

// Bias, rotary embedding (rotating halves), q to q_out (f32), k and v into
// the paged cache at each token's slot. qkv rows: [q heads | k heads | v heads].
template <class T>
__device__ void rope_kv(const float* qkv, const float* bias, int has_bias, const int* positions, const int* slots,
                        float* q_out, u16* k_cache, u16* v_cache, int nh, int nkv, int hd, int bs, float theta) {
    int t = blockIdx.x;
    int pos = positions[t];
    int slot = slots[t];
    int blk = slot / bs, off = slot % bs;
    int half = hd / 2;
    int width = (nh + 2 * nkv) * hd;
    const float* row = qkv + (long long)t * width;
    int npairs = (nh + nkv) * half;
    for (int p = threadIdx.x; p < npairs; p += blockDim.x) {
        int head = p / half, i = p % half;
        int c0 = head * hd + i, c1 = c0 + half;
        float a = row[c0], b = row[c1];
        if (has_bias) { a += bias[c0]; b += bias[c1]; }
        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        float ang = (float)pos * inv;
        float s, c;
        sincosf(ang, &s, &c);
        float ra = a * c - b * s, rb = b * c + a * s;
        if (head < nh) {
            float* q = q_out + ((long long)t * nh + head) * hd;
            q[i] = ra;
            q[i + half] = rb;
        } else {
            int kh = head - nh;
            u16* k = k_cache + (((long long)blk * nkv + kh) * bs + off) * hd;
            k[i] = T::st(ra);
            k[i + half] = T::st(rb);
        }
    }
    for (int e = threadIdx.x; e < nkv * hd; e += blockDim.x) {
        int kh = e / hd, d = e % hd;
        int c = (nh + nkv) * hd + e;
        float v = row[c] + (has_bias ? bias[c] : 0.f);
        v_cache[(((long long)blk * nkv + kh) * bs + off) * hd + d] = T::st(v);
    }
}

// Causal attention of each new token over its own sequence's paged cache
// (positions 0..=pos), grouped-query heads. Grid: (tokens, heads); block:
// ATTN_WARPS warps, each an online softmax over every ATTN_WARPS-th key,
// lanes splitting the head dimension; warps merge through shared memory.
template <class T>
__device__ void paged_attn(const float* q, const u16* k_cache, const u16* v_cache, const int* token_entry,
                           const int* positions, const int* bt_begins, const int* block_indices, u16* out,
                           int nh, int nkv, int hd, int bs, float scale) {
    int t = blockIdx.x, h = blockIdx.y;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int kvh = h / (nh / nkv);
    const int* bt = block_indices + bt_begins[token_entry[t]];
    int ctx = positions[t] + 1;
    const float* qv = q + ((long long)t * nh + h) * hd;
    int R = hd >> 5;
    float qr[8], acc[8];
#pragma unroll
    for (int r = 0; r < 8; r++) {
        qr[r] = (r < R) ? qv[lane + 32 * r] * scale : 0.f;
        acc[r] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int j = w; j < ctx; j += ATTN_WARPS) {
        long long base = (((long long)bt[j / bs] * nkv + kvh) * bs + (j % bs)) * hd + lane;
        float s = 0.f;
#pragma unroll
        for (int r = 0; r < 8; r++)
            if (r < R) s += qr[r] * T::ld(k_cache[base + 32 * r]);
        s = warp_sum(s);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn);
        float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < 8; r++)
            if (r < R) acc[r] = acc[r] * corr + p * T::ld(v_cache[base + 32 * r]);
        m = mn;
    }
    __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS];
    __shared__ float sacc[ATTN_WARPS][MAX_HD];
    if (lane == 0) { sm[w] = m; sl[w] = l; }
#pragma unroll
    for (int r = 0; r < 8; r++)
        if (r < R) sacc[w][lane + 32 * r] = acc[r];
    __syncthreads();
    float M = NEG_INF;
    for (int i = 0; i < ATTN_WARPS; i++) M = fmaxf(M, sm[i]);
    float L = 0.f;
    for (int i = 0; i < ATTN_WARPS; i++)
        if (sl[i] > 0.f) L += sl[i] * expf(sm[i] - M);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.f;
        for (int i = 0; i < ATTN_WARPS; i++)
            if (sl[i] > 0.f) o += sacc[i][d] * expf(sm[i] - M);
        out[((long long)t * nh + h) * hd + d] = T::st(o / L);
    }
}

// out[t][c] = silu(gate) * up, gu rows: [gate | up].
template <class T>
__device__ void silu_mul(const float* gu, u16* out, int inter, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long t = i / inter;
        int c = (int)(i % inter);
        float g = gu[t * 2 * inter + c], u = gu[t * 2 * inter + inter + c];
        out[i] = T::st(g / (1.f + expf(-g)) * u);
    }
}

#define INSTANTIATE(T, sfx) \
extern "C" __global__ void embed_##sfx(const u16* table, const int* ids, float* x, int hidden) { \
    embed<T>(table, ids, x, hidden); } \
extern "C" __global__ void rmsnorm_##sfx(const float* x, const float* w, u16* out, const int* rows, int use_rows, \
                                         int hidden, float eps) { \
    rmsnorm<T>(x, w, out, rows, use_rows, hidden, eps); } \
extern "C" __global__ void rope_kv_##sfx(const float* qkv, const float* bias, int has_bias, const int* positions, \
                                         const int* slots, float* q_out, u16* k_cache, u16* v_cache, int nh, \
                                         int nkv, int hd, int bs, float theta) { \
    rope_kv<T>(qkv, bias, has_bias, positions, slots, q_out, k_cache, v_cache, nh, nkv, hd, bs, theta); } \
extern "C" __global__ void paged_attn_##sfx(const float* q, const u16* k_cache, const u16* v_cache, \
                                            const int* token_entry, const int* positions, const int* bt_begins, \
                                            const int* block_indices, u16* out, int nh, int nkv, int hd, int bs, \
                                            float scale) { \
    paged_attn<T>(q, k_cache, v_cache, token_entry, positions, bt_begins, block_indices, out, nh, nkv, hd, bs, \
                  scale); } \
extern "C" __global__ void silu_mul_##sfx(const float* gu, u16* out, int inter, long long n) { \
    silu_mul<T>(gu, out, inter, n); }

INSTANTIATE(F16, f16)
INSTANTIATE(BF16, bf16)

// Random weights drawn on the device (benchmarks): SplitMix64 of (seed, i),
// uniform in [-scale, scale).
extern "C" __global__ void fill_uniform_u16(u16* out, long long n, unsigned long long seed, float scale, int bf16) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        float v = (u * 2.f - 1.f) * scale;
        out[i] = bf16 ? f2b(v) : f2h(v);
    }
}
"#;

/// Why compilation failed.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("NVRTC library not found: {0}")]
    NoNvrtc(String),
    #[error("NVRTC failed: {0}")]
    Nvrtc(String),
    #[error("NVRTC compile error for {arch}:\n{log}")]
    Compile { arch: String, log: String },
}

/// Whether libnvrtc can be opened (after [`crate::libs::preload`]); never
/// panics.
pub fn nvrtc_present() -> bool {
    crate::libs::preload();
    // SAFETY: only tries to dlopen candidate names; catch_unwind guards
    // against cudarc panicking inside.
    std::panic::catch_unwind(|| unsafe { nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32), CompileError> {
    if !nvrtc_present() {
        return Err(CompileError::NoNvrtc(searched()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain FFI call writing two ints we own.
    let r = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CompileError::Nvrtc(format!("nvrtcVersion: {r:?}")));
    }
    Ok((major, minor))
}

fn searched() -> String {
    let dirs: Vec<String> = crate::libs::search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    format!(
        "searched {} and the system loader path; set {} or {}",
        dirs.join(", "),
        crate::libs::LIB_DIRS_ENV,
        crate::libs::VENV_ENV
    )
}

/// Compile [`SOURCE`] to a CUBIN for `arch` (e.g. `"sm_90"`).
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, CompileError> {
    if !nvrtc_present() {
        return Err(CompileError::NoNvrtc(searched()));
    }
    let src = CString::new(SOURCE).expect("no NUL in source");
    let name = CString::new("slinfer_kernels.cu").expect("no NUL");
    let prog = nvrtc::result::create_program(&src, Some(&name))
        .map_err(|e| CompileError::Nvrtc(format!("{e:?}")))?;
    let opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
    ];
    // SAFETY: `prog` is a live program created above; it is destroyed below on
    // every path. The log/CUBIN buffers are sized by NVRTC's own size calls.
    unsafe {
        let compiled = nvrtc::result::compile_program(prog, &opts);
        let result = match compiled {
            Err(_) => {
                let log = nvrtc::result::get_program_log(prog)
                    .map(|raw| {
                        let bytes: Vec<u8> = raw
                            .iter()
                            .map(|&c| c as u8)
                            .take_while(|&c| c != 0)
                            .collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(CompileError::Compile {
                    arch: arch.to_string(),
                    log,
                })
            }
            Ok(()) => {
                let mut size = 0usize;
                let r = nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size);
                if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(CompileError::Nvrtc(format!("nvrtcGetCUBINSize: {r:?}")))
                } else {
                    let mut buf = vec![0u8; size];
                    let r = nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _);
                    if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(CompileError::Nvrtc(format!("nvrtcGetCUBIN: {r:?}")))
                    } else {
                        Ok(buf)
                    }
                }
            }
        };
        let _ = nvrtc::result::destroy_program(prog);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_both_flavours() {
        for k in KERNELS {
            for sfx in ["f16", "bf16"] {
                assert!(
                    SOURCE.contains(&format!("void {k}_##sfx(")),
                    "{k}_{sfx} not instantiated"
                );
            }
        }
    }

    /// The kernels compile through NVRTC for several architectures when the
    /// `nvidia-cuda-nvrtc` wheel (or a CUDA install) is present.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !nvrtc_present() {
            eprintln!("skipped: libnvrtc not found ({})", searched());
            return;
        }
        let (major, minor) = nvrtc_version().unwrap();
        eprintln!("NVRTC {major}.{minor}");
        for arch in ["sm_80", "sm_89", "sm_90"] {
            let cubin = compile_cubin(arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "{arch}: not an ELF cubin");
            // Every entry point the engine loads is in the image.
            let mut names: Vec<String> = KERNELS
                .iter()
                .flat_map(|k| [format!("{k}_f16"), format!("{k}_bf16")])
                .collect();
            names.push("fill_uniform_u16".into());
            for n in names {
                let needle = format!("{n}\0");
                assert!(
                    cubin.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{arch}: {n} missing from the CUBIN"
                );
            }
        }
    }

    /// The attention kernel's arithmetic, mirrored in Rust: each of four
    /// "warps" runs an online softmax over every fourth key, then the warps
    /// merge. It must equal a plain softmax, including warps that saw no key.
    fn online_softmax_attention(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        warps: usize,
    ) -> Vec<f32> {
        let hd = q.len();
        let mut ms = vec![f32::NEG_INFINITY; warps];
        let mut ls = vec![0f32; warps];
        let mut accs = vec![vec![0f32; hd]; warps];
        for w in 0..warps {
            let (mut m, mut l, acc) = (f32::NEG_INFINITY, 0f32, &mut accs[w]);
            let mut j = w;
            while j < keys.len() {
                let s: f32 = q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum();
                let mn = m.max(s);
                let corr = (m - mn).exp();
                let p = (s - mn).exp();
                l = l * corr + p;
                for d in 0..hd {
                    acc[d] = acc[d] * corr + p * values[j][d];
                }
                m = mn;
                j += warps;
            }
            ms[w] = m;
            ls[w] = l;
        }
        let big_m = ms.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let big_l: f32 = (0..warps)
            .filter(|&i| ls[i] > 0.0)
            .map(|i| ls[i] * (ms[i] - big_m).exp())
            .sum();
        (0..hd)
            .map(|d| {
                (0..warps)
                    .filter(|&i| ls[i] > 0.0)
                    .map(|i| accs[i][d] * (ms[i] - big_m).exp())
                    .sum::<f32>()
                    / big_l
            })
            .collect()
    }

    #[test]
    fn online_softmax_merge_equals_softmax() {
        let mut rng = slinfer_engine::sampler::Rng::new(3);
        let hd = 8;
        for ctx in [1usize, 2, 3, 5, 17, 64] {
            let q: Vec<f32> = (0..hd).map(|_| rng.next_f32_sym(2.0)).collect();
            let keys: Vec<Vec<f32>> = (0..ctx)
                .map(|_| (0..hd).map(|_| rng.next_f32_sym(2.0)).collect())
                .collect();
            let values: Vec<Vec<f32>> = (0..ctx)
                .map(|_| (0..hd).map(|_| rng.next_f32_sym(1.0)).collect())
                .collect();
            let scores: Vec<f32> = keys
                .iter()
                .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum())
                .collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = scores.iter().map(|s| (s - m).exp()).sum();
            let want: Vec<f32> = (0..hd)
                .map(|d| {
                    scores
                        .iter()
                        .zip(&values)
                        .map(|(s, v)| (s - m).exp() / z * v[d])
                        .sum()
                })
                .collect();
            let got = online_softmax_attention(&q, &keys, &values, 4);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "ctx {ctx}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn compile_errors_carry_the_log() {
        if !nvrtc_present() {
            eprintln!("skipped: libnvrtc not found ({})", searched());
            return;
        }
        match compile_cubin("sm_1") {
            Err(CompileError::Compile { .. }) | Err(CompileError::Nvrtc(_)) => {}
            other => panic!("expected an error, got {:?}", other.map(|b| b.len())),
        }
    }
}
