//! slinfer's CPU inference engine on OpenVINO.
//!
//! It runs a model package's IR (see [`slinfer_engine::package`];
//! `scripts/models/import.py` writes it) in its paged-attention form and
//! implements [`slinfer_engine::Backend`] / [`slinfer_engine::LlmInstance`]:
//!
//! - `libopenvino_c` is loaded at run time from the `openvino` Python wheel in
//!   the project's virtualenv ([`find_library`]); without it the backend
//!   reports [`EngineError::Unavailable`] ("OpenVINO unavailable: …") and
//!   nothing panics.
//! - The C API has no paged-attention transformation and a transformed IR
//!   cannot be saved and read back, so the stateful IR is transformed at load
//!   time by `shim/paged_attention.cpp` (built by build.rs against the wheel's
//!   headers, loaded at run time) — the same pass GenAI runs — which also
//!   gathers the sampled rows before the LM head (`sampled_tokens_indices`),
//!   so a prefill computes one vocab-sized row per sequence, not per token,
//!   and merges each layer's Q, K and V projections into one matrix product
//!   ([`OpenVinoInstance::merged_projections`]).
//! - Instances compute in f32 by default ([`Precision`]), not in OpenVINO's
//!   own default of bf16 on CPUs that have it.
//! - The instance owns the `key_cache.N` / `value_cache.N` block tensors. Their
//!   per-block shape and element type are read from the compiled model (on an
//!   AVX2 CPU: u8 blocks of 32 tokens with quantisation parameters); the block
//!   size is the value cache's token dimension. [`LlmInstance::resize_kv`]
//!   allocates new tensors and copies the used blocks (compacting on shrink,
//!   via [`slinfer_engine::KvManager::shrink`]'s moves) — never
//!   `Tensor::set_shape`, which double-frees in the `openvino` crate 0.11.
//! - One `infer()` per [`LlmInstance::step`] for the whole ragged batch, laid
//!   out by [`slinfer_engine::KvManager::plan`] into the IR's `input_ids`,
//!   `position_ids`, `past_lens`, `subsequence_begins`, `block_indices`,
//!   `block_indices_begins`, `max_context_len`.
//! - Several instances (of the same or different models) may be loaded at once;
//!   they share one `Core` (and its compiled-model cache dir).
//! - [`tensor`]: tensor models (what the host's `wasi:nn` runs) — an IR
//!   compiled once, shared, and run from many infer requests.

mod instance;
pub mod tensor;

pub use instance::OpenVinoInstance;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use openvino::{Core, DeviceType, RwPropertyKey};
use slinfer_engine::package::ModelPackage;
use slinfer_engine::{
    Backend, DeviceInfo, DeviceKind, EngineError, Footprint, HostMemory, LlmInstance, LoadOptions,
    ModelSource,
};

/// Environment variable naming `libopenvino_c` (the file, or its folder).
pub const LIB_ENV: &str = "SLINFER_OPENVINO_LIB";

/// Find `libopenvino_c.so.*` in `<venv>/lib/python3*/site-packages/openvino/libs`.
/// `explicit` (a file or a folder) wins; then [`LIB_ENV`]; then `venv`, then
/// `$SLINFER_VENV`, then `$VIRTUAL_ENV`.
pub fn find_library(explicit: Option<&Path>, venv: Option<&Path>) -> Result<PathBuf, String> {
    let env_path = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = explicit
        .map(Path::to_path_buf)
        .or_else(|| env_path(LIB_ENV))
    {
        return if p.is_file() {
            Ok(p)
        } else if p.is_dir() {
            lib_in(&p).ok_or_else(|| format!("no libopenvino_c in {}", p.display()))
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let venvs: Vec<PathBuf> = venv
        .map(Path::to_path_buf)
        .into_iter()
        .chain(env_path("SLINFER_VENV"))
        .chain(env_path("VIRTUAL_ENV"))
        .collect();
    if venvs.is_empty() {
        return Err(format!(
            "no virtualenv to look in: set SLINFER_VENV (./dev does) or {LIB_ENV}"
        ));
    }
    for v in &venvs {
        for lib in ["lib", "lib64"] {
            let Ok(rd) = std::fs::read_dir(v.join(lib)) else {
                continue;
            };
            for py in rd.flatten() {
                let libs = py.path().join("site-packages/openvino/libs");
                if let Some(p) = lib_in(&libs) {
                    return Ok(p);
                }
            }
        }
    }
    Err(format!(
        "the openvino wheel is not installed in {} (pip install -r requirements.txt)",
        venvs
            .iter()
            .map(|v| v.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn lib_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libopenvino_c.so"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The `libopenvino_c` this process loaded (only a success is remembered).
static LOADED: Mutex<Option<PathBuf>> = Mutex::new(None);

type PagedFn = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    *mut std::ffi::c_int,
    *mut std::ffi::c_char,
    usize,
) -> i32;

/// The paged-attention transformation from `shim/paged_attention.cpp`
/// (built by build.rs against the wheel's headers), loaded after
/// `libopenvino_c` so that it binds to the same `libopenvino`.
fn paged_shim() -> Result<PagedFn, EngineError> {
    static SHIM: OnceLock<Result<(libloading::Library, PagedFn), String>> = OnceLock::new();
    SHIM.get_or_init(|| {
        let path = env!("SLINFER_OV_SHIM");
        if path.is_empty() {
            return Err(format!(
                "slinfer-openvino was built without its paged-attention shim ({}); \
                 install the requirements (./dev test does) and rebuild",
                option_env!("SLINFER_OV_SHIM_ERROR").unwrap_or("unknown reason")
            ));
        }
        // SAFETY: the shim has no initialisers beyond the C++ runtime's, and
        // the symbol's signature is the one shim/paged_attention.cpp defines.
        unsafe {
            let lib = libloading::Library::new(path).map_err(|e| format!("{path}: {e}"))?;
            let f: PagedFn = *lib
                .get::<PagedFn>(b"slinfer_ov_paged_attention\0")
                .map_err(|e| format!("{path}: {e}"))?;
            Ok((lib, f))
        }
    })
    .as_ref()
    .map(|(_, f)| *f)
    .map_err(|e| EngineError::Unavailable(format!("OpenVINO unavailable: {e}")))
}

/// Apply SDPA -> PagedAttention to `model` in place, and merge the
/// projections that read the same input (Q, K, V); returns how many groups
/// were merged.
fn to_paged_attention(model: &mut openvino::Model) -> Result<usize, EngineError> {
    let f = paged_shim()?;
    // `openvino::Model` is a single `*mut ov_model_t` field and exposes no
    // accessor for it; check the layout assumption before reading it.
    const _: () = assert!(
        std::mem::size_of::<openvino::Model>() == std::mem::size_of::<*mut std::ffi::c_void>()
    );
    let mut err = vec![0 as std::ffi::c_char; 1024];
    let mut merged: std::ffi::c_int = 0;
    // SAFETY: the pointer is the live handle `model` owns; the shim only
    // rewrites the ov::Model it points to.
    let rc = unsafe {
        let raw = *(std::ptr::from_mut(model) as *const *mut std::ffi::c_void);
        f(raw, &mut merged, err.as_mut_ptr(), err.len())
    };
    if rc != 0 {
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        return Err(EngineError::Model(format!(
            "paged-attention transformation failed: {}",
            msg.to_string_lossy()
        )));
    }
    Ok(usize::try_from(merged).unwrap_or(0))
}

/// Load `libopenvino_c` once per process (the first successful path wins; a
/// failure can be retried with another path).
fn load_library(explicit: Option<&Path>, venv: Option<&Path>) -> Result<PathBuf, EngineError> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = loaded.as_ref() {
        return Ok(p.clone());
    }
    let unavailable = |e: String| EngineError::Unavailable(format!("OpenVINO unavailable: {e}"));
    let p = find_library(explicit, venv).map_err(unavailable)?;
    openvino_sys::library::load_from(&p)
        .map_err(|e| unavailable(format!("{}: {e}", p.display())))?;
    *loaded = Some(p.clone());
    Ok(p)
}

fn dev(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Device(format!("OpenVINO: {context}: {e}"))
}

/// How the backend is set up.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// `libopenvino_c` (file or folder); default: [`find_library`].
    pub library: Option<PathBuf>,
    /// The virtualenv holding the `openvino` wheel; default `$SLINFER_VENV`.
    pub venv: Option<PathBuf>,
    /// Compiled-model cache folder (`CACHE_DIR`); none by default. Measured
    /// with OpenVINO 2026.4.1: the CPU plugin exports a paged-attention model
    /// (135 MB for SmolLM2-135M) but cannot import it back (the
    /// PagedAttention nodes' rt_info is not serialised), so it recompiles
    /// every time and the first compile is slower (6.3 s vs 2.1 s). Useful
    /// only once OpenVINO fixes that.
    pub cache_dir: Option<PathBuf>,
    /// `INFERENCE_NUM_THREADS`; 0 lets OpenVINO use every core.
    pub num_threads: usize,
    /// The precision LLM instances compute in.
    pub precision: Precision,
}

/// The CPU plugin's `INFERENCE_PRECISION_HINT` for LLM instances: what
/// activations and matrix products compute in (weights stay as the IR
/// stores them, the KV cache as the plugin picks: u8 blocks).
///
/// OpenVINO's own default is bf16 on CPUs with bf16 instructions (AMX,
/// AVX512_BF16), f32 elsewhere. Measured on an Intel Xeon with AMX
/// (BENCHMARKS.md, "CPU decode speed"): for SmolLM2-135M, f32 decodes one
/// sequence 1.4x and eight 1.6x faster than bf16, whose kernels win only
/// on long prefills (1.6x on 580 tokens). Decode steps are most of a
/// generation's time, so f32 is the default. (f16, on CPUs with AVX512_FP16,
/// overflows in this model: GenAI produced no text with it.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The property's value.
    pub fn hint(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?} (f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hint())
    }
}

/// The OpenVINO CPU backend.
pub struct OpenVinoBackend {
    core: Mutex<Core>,
    library: PathBuf,
}

impl OpenVinoBackend {
    pub fn new(options: &BackendOptions) -> Result<Self, EngineError> {
        let library = load_library(options.library.as_deref(), options.venv.as_deref())?;
        let mut core = Core::new()
            .map_err(|e| EngineError::Unavailable(format!("OpenVINO unavailable: {e}")))?;
        // `compile_model` passes no per-model properties: set them on the Core.
        let cpu = DeviceType::CPU;
        core.set_property(&cpu, &RwPropertyKey::HintPerformanceMode, "LATENCY")
            .map_err(|e| dev("PERFORMANCE_HINT", e))?;
        core.set_property(&cpu, &RwPropertyKey::NumStreams, "1")
            .map_err(|e| dev("NUM_STREAMS", e))?;
        core.set_property(
            &cpu,
            &RwPropertyKey::HintInferencePrecision,
            options.precision.hint(),
        )
        .map_err(|e| dev("INFERENCE_PRECISION_HINT", e))?;
        if options.num_threads > 0 {
            core.set_property(
                &cpu,
                &RwPropertyKey::InferenceNumThreads,
                &options.num_threads.to_string(),
            )
            .map_err(|e| dev("INFERENCE_NUM_THREADS", e))?;
        }
        if let Some(dir) = &options.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| EngineError::Io {
                path: dir.clone(),
                source: e,
            })?;
            core.set_property(
                &DeviceType::Other("".into()),
                &RwPropertyKey::CacheDir,
                &dir.to_string_lossy(),
            )
            .or_else(|_| core.set_property(&cpu, &RwPropertyKey::CacheDir, &dir.to_string_lossy()))
            .map_err(|e| dev("CACHE_DIR", e))?;
        }
        Ok(OpenVinoBackend {
            core: Mutex::new(core),
            library,
        })
    }

    /// The `libopenvino_c` this process loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Load an instance from a package folder (what [`Backend::load`] does
    /// for [`ModelSource::Package`]), returning the concrete type.
    pub fn load_package(
        &self,
        dir: &Path,
        options: &LoadOptions,
    ) -> Result<OpenVinoInstance, EngineError> {
        let pkg = ModelPackage::open(dir)?;
        let (xml, bin) = ir_files(&pkg)?;
        let weight_bytes = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        let (mut compiled, merged) = {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let mut model = core
                .read_model_from_file(&xml.to_string_lossy(), &bin.to_string_lossy())
                .map_err(|e| EngineError::Model(format!("{}: {e}", xml.display())))?;
            let merged = to_paged_attention(&mut model)?;
            // A model the plugin cannot compile is the model's problem,
            // not the device's.
            let compiled = core.compile_model(&model, DeviceType::CPU).map_err(|e| {
                EngineError::Model(format!("{}: compile_model: {e}", xml.display()))
            })?;
            (compiled, merged)
        };
        let request = compiled
            .create_infer_request()
            .map_err(|e| dev("create_infer_request", e))?;
        OpenVinoInstance::new(pkg, compiled, request, weight_bytes, merged, options)
    }
}

/// The package's stateful IR: its xml and weights files, both present.
fn ir_files(pkg: &ModelPackage) -> Result<(PathBuf, PathBuf), EngineError> {
    let xml = pkg.openvino_ir_path().ok_or_else(|| {
        EngineError::Model(format!(
            "{}: the package has no OpenVINO IR; re-import it",
            pkg.dir.display()
        ))
    })?;
    let bin = xml.with_extension("bin");
    for f in [&xml, &bin] {
        if !f.is_file() {
            return Err(EngineError::Model(format!("{} is missing", f.display())));
        }
    }
    Ok((xml, bin))
}

impl Backend for OpenVinoBackend {
    fn name(&self) -> &str {
        "openvino"
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError> {
        Ok(vec![DeviceInfo::host_cpu()])
    }
    /// The IR's weights file, and the package's f16 KV figure: the compiled
    /// u8 cache with its quantisation parameters is smaller (the instance
    /// reports it once loaded), so planning with f16 errs on the safe side.
    /// The process's own memory (see [`HostMemory::process_bytes`]): the
    /// CPU plugin allocates on the heap, so what an instance holds shows
    /// only there.
    fn used_bytes(&self, device: usize) -> Option<u64> {
        (device == 0).then(HostMemory::process_bytes)
    }
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError> {
        Footprint::of_file(&ir_files(package)?.1, package.manifest.kv_bytes_per_token)
    }
    fn load(
        &self,
        source: &ModelSource,
        device: usize,
        options: &LoadOptions,
    ) -> Result<Box<dyn LlmInstance>, EngineError> {
        if device != 0 {
            return Err(EngineError::NoDevice(device));
        }
        match source {
            ModelSource::Package(dir) => Ok(Box::new(self.load_package(dir, options)?)),
            _ => Err(EngineError::Model(
                "the OpenVINO engine loads model packages (scripts/models/import.py)".into(),
            )),
        }
    }
}
