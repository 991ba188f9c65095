//! slinfer's GPU engine: Llama-family decoders on NVIDIA GPUs through
//! `cudarc` — the CUDA driver API, cuBLAS for matmuls, and our own kernels
//! compiled at run time by NVRTC for the device's architecture. Each loaded
//! model is a [`CudaInstance`] with its weights and its own paged KV pool in
//! device memory; several instances (different models) share one GPU, and the
//! scheduler's per-device arbiter decides which one runs the next iteration.
//!
//! Every native library is opened at run time (see [`libs`]); on a machine
//! without CUDA this crate builds, its tests pass, and [`CudaBackend::new`]
//! answers [`EngineError::Unavailable`] with the reason instead of panicking.
//! This room implements the `slinfer-engine` contract and must never know
//! about functions, Wasm or scheduling policy. `unsafe` appears only at the
//! FFI border (library preloading, NVRTC, cuBLAS, kernel launches, raw
//! device copies), each block with its `// SAFETY:` reason.

pub mod instance;
pub mod kernels;
pub mod libs;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use cudarc::nvrtc::Ptx;
pub use instance::CudaInstance;
use instance::Kernels;
use slinfer_engine::package::ModelPackage;
use slinfer_engine::weights::{LlamaWeights, WeightDType};
use slinfer_engine::{
    Backend, DeviceInfo, DeviceKind, EngineError, Footprint, LlmInstance, LoadOptions, ModelSource,
};

struct Device {
    ctx: Arc<CudaContext>,
    name: String,
    arch: String,
    kernels: Mutex<HashMap<WeightDType, Kernels>>,
}

/// The CUDA backend: the GPUs of this machine.
pub struct CudaBackend {
    devices: Vec<Device>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .devices
            .iter()
            .map(|d| format!("{} ({})", d.name, d.arch))
            .collect();
        f.debug_struct("CudaBackend")
            .field("devices", &names)
            .finish()
    }
}

fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        EngineError::Unavailable(format!("{what}: {msg}"))
    })
}

impl CudaBackend {
    /// Find the CUDA libraries and the GPUs. Never panics: a machine without
    /// a driver, a GPU, cuBLAS or NVRTC gets [`EngineError::Unavailable`] with
    /// the reason, which the host reports before carrying on with the CPU.
    pub fn new() -> Result<Self, EngineError> {
        libs::preload();
        // SAFETY: only tries to dlopen candidate names of libcuda.
        let driver = guarded("probing libcuda", || unsafe {
            cudarc::driver::sys::is_culib_present()
        })?;
        if !driver {
            return Err(EngineError::Unavailable(
                "no CUDA driver (libcuda.so.1 not found): no GPU on this machine".into(),
            ));
        }
        // SAFETY: as above, for libcublas.
        let cublas = guarded("probing libcublas", || unsafe {
            cudarc::cublas::sys::is_culib_present()
        })?;
        if !cublas {
            return Err(EngineError::Unavailable(format!(
                "cuBLAS (libcublas.so.13) not found; searched {:?}",
                libs::search_dirs()
            )));
        }
        if !kernels::nvrtc_present() {
            return Err(EngineError::Unavailable(format!(
                "NVRTC (libnvrtc.so.13) not found; searched {:?}",
                libs::search_dirs()
            )));
        }
        let count = guarded("cuDeviceGetCount", CudaContext::device_count)?
            .map_err(|e| EngineError::Unavailable(format!("CUDA driver: {e:?}")))?;
        if count <= 0 {
            return Err(EngineError::Unavailable(
                "the CUDA driver reports no device".into(),
            ));
        }
        let mut devices = Vec::new();
        for i in 0..count as usize {
            let ctx = guarded("cuCtx", || CudaContext::new(i))?
                .map_err(|e| EngineError::Unavailable(format!("device {i}: {e:?}")))?;
            // SAFETY: each instance works on its own stream and no buffer is
            // shared between streams, so cudarc's per-buffer event tracking
            // (an event record per launch argument) is pure overhead.
            unsafe { ctx.disable_event_tracking() };
            let name = ctx.name().unwrap_or_else(|_| format!("CUDA device {i}"));
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| EngineError::Device(format!("{e:?}")))?;
            devices.push(Device {
                ctx,
                name,
                arch: format!("sm_{major}{minor}"),
                kernels: Mutex::new(HashMap::new()),
            });
        }
        Ok(CudaBackend { devices })
    }

    fn device(&self, index: usize) -> Result<&Device, EngineError> {
        self.devices.get(index).ok_or(EngineError::NoDevice(index))
    }

    /// The device's architecture, e.g. `sm_90`.
    pub fn arch(&self, device: usize) -> Result<String, EngineError> {
        Ok(self.device(device)?.arch.clone())
    }

    fn kernels(&self, device: usize, dtype: WeightDType) -> Result<Kernels, EngineError> {
        let d = self.device(device)?;
        let mut cache = d.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(&dtype) {
            return Ok(k.clone());
        }
        let cubin =
            kernels::compile_cubin(&d.arch).map_err(|e| EngineError::Device(e.to_string()))?;
        let module = d
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| EngineError::Device(format!("loading kernels: {e:?}")))?;
        let sfx = match dtype {
            WeightDType::BF16 => "bf16",
            WeightDType::F16 => "f16",
            WeightDType::F32 => return Err(instance::unsupported_f32()),
        };
        let f = |n: &str| {
            module
                .load_function(n)
                .map_err(|e| EngineError::Device(format!("kernel {n}: {e:?}")))
        };
        let k = Kernels {
            embed: f(&format!("embed_{sfx}"))?,
            rmsnorm: f(&format!("rmsnorm_{sfx}"))?,
            rope_kv: f(&format!("rope_kv_{sfx}"))?,
            paged_attn: f(&format!("paged_attn_{sfx}"))?,
            silu_mul: f(&format!("silu_mul_{sfx}"))?,
            fill_uniform: f("fill_uniform_u16")?,
        };
        cache.insert(dtype, k.clone());
        Ok(k)
    }

    /// Load host weights onto `device` (tests compare this against the
    /// pure-Rust reference on the same weights).
    pub fn load_weights(
        &self,
        weights: &LlamaWeights,
        device: usize,
        options: &LoadOptions,
    ) -> Result<CudaInstance, EngineError> {
        let dtype = options.dtype.unwrap_or(WeightDType::F16);
        let k = self.kernels(device, dtype)?;
        CudaInstance::from_weights(
            self.device(device)?.ctx.clone(),
            k,
            weights,
            dtype,
            options
                .block_size_tokens
                .unwrap_or(instance::DEFAULT_BLOCK_SIZE_TOKENS),
            options.initial_kv_blocks,
        )
    }
}

impl CudaBackend {
    /// Device-to-device copy bandwidth in bytes per second (read + write),
    /// the yardstick for the decode benchmark's achieved bandwidth.
    pub fn measure_copy_bandwidth(
        &self,
        device: usize,
        bytes: usize,
        repeats: usize,
    ) -> Result<f64, EngineError> {
        let ctx = &self.device(device)?.ctx;
        let err = |e: cudarc::driver::DriverError| EngineError::Device(format!("{e:?}"));
        let stream = ctx.new_stream().map_err(err)?;
        let oom = |e: cudarc::driver::DriverError| EngineError::OutOfMemory {
            requested_bytes: bytes as u64,
            detail: format!("{e:?}"),
        };
        let a = stream.alloc_zeros::<u8>(bytes).map_err(oom)?;
        let mut b = stream.alloc_zeros::<u8>(bytes).map_err(oom)?;
        stream.memcpy_dtod(&a, &mut b).map_err(err)?;
        stream.synchronize().map_err(err)?;
        let start = std::time::Instant::now();
        for _ in 0..repeats {
            stream.memcpy_dtod(&a, &mut b).map_err(err)?;
        }
        stream.synchronize().map_err(err)?;
        Ok(2.0 * (bytes * repeats) as f64 / start.elapsed().as_secs_f64())
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Gpu
    }
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (free, total) = d
                    .ctx
                    .mem_get_info()
                    .map_err(|e| EngineError::Device(format!("{e:?}")))?;
                Ok(DeviceInfo {
                    index: i,
                    kind: DeviceKind::Gpu,
                    name: d.name.clone(),
                    total_bytes: total as u64,
                    free_bytes: free as u64,
                })
            })
            .collect()
    }
    /// The device's used memory as the driver reports it (every process's).
    fn used_bytes(&self, device: usize) -> Option<u64> {
        let (free, total) = self.devices.get(device)?.ctx.mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }
    /// f16 weights (the default load precision) and an f16 KV cache.
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError> {
        package.weights_file()?;
        Ok(Footprint::of_config(&package.manifest.config, 2, 2))
    }
    fn load(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<Box<dyn LlmInstance>, EngineError> {
        Ok(Box::new(self.load_cuda(source, device, options)?))
    }
}

impl CudaBackend {
    /// [`Backend::load`] with the concrete instance type (for its extra
    /// knobs, such as [`CudaInstance::set_cuda_graphs`]).
    pub fn load_cuda(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<CudaInstance, EngineError> {
        let dtype = options.dtype.unwrap_or(WeightDType::F16);
        let bs = options
            .block_size_tokens
            .unwrap_or(instance::DEFAULT_BLOCK_SIZE_TOKENS);
        match source {
            ModelSource::Random {
                config,
                seed,
                scale,
            } => {
                config.validate()?;
                let k = self.kernels(device, dtype)?;
                let inst = CudaInstance::random_on_device(
                    self.device(device)?.ctx.clone(),
                    k,
                    config.clone(),
                    *seed,
                    *scale,
                    dtype,
                    bs,
                    options.initial_kv_blocks,
                )?;
                Ok(inst)
            }
            other => {
                let w = LlamaWeights::load(other, dtype)?;
                self.load_weights(&w, device, options)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU the backend says why, without panicking.
    #[test]
    fn probe_never_panics() {
        match CudaBackend::new() {
            Ok(b) => eprintln!("GPU present: {b:?}"),
            Err(EngineError::Unavailable(why)) => eprintln!("no GPU (expected here): {why}"),
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
}
