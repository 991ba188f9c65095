//! slinfer's GGML CPU engine: llama.cpp behind the engine contract.
//!
//! llama.cpp is not built here: the engine loads the prebuilt shared
//! library of the npm package `@node-llama-cpp/linux-x64` 3.22.1
//! (`./dev` installs it into `scripts/llama-cpp/node_modules`), whose CPU
//! backend comes in one library per x86 microarchitecture
//! (`libggml-cpu-sapphirerapids.so`, `-zen4`, `-haswell`, ...); ggml picks the
//! best one this CPU runs. An instance reads the package's GGUF
//! (`model.gguf`, as imported) and computes in the GGUF's own formats.
//!
//! The contract is kept as the other engines keep it: the host's
//! [`KvManager`](slinfer_engine::KvManager) admits every step and counts
//! blocks, the sampler runs on the host over the logits this engine
//! returns, and sequences are named by the caller (see [`instance`]).
//!
//! This crate must never know about functions, Wasm, HTTP or the
//! scheduler; it loads no library until [`LlamaCppBackend::new`] is called.

mod ffi;
pub mod instance;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use slinfer_engine::package::ModelPackage;
use slinfer_engine::{
    Backend, DeviceInfo, DeviceKind, EngineError, Footprint, HostMemory, LlmInstance, LoadOptions,
    ModelSource,
};

pub use instance::LlamaCppInstance;

/// Where the library is looked for when no folder is given:
/// `$SLINFER_LLAMA_CPP_DIR`, else this checkout's npm install.
pub const DIR_ENV: &str = "SLINFER_LLAMA_CPP_DIR";
/// The library folder inside an npm install of `@node-llama-cpp/linux-x64`.
pub const NPM_BINS: &str = "node_modules/@node-llama-cpp/linux-x64/bins/linux-x64";

/// Tokens per KV block (accounting only: llama.cpp places cells itself).
const BLOCK_SIZE: usize = 16;

/// How the backend runs.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// The folder holding `libllama.v0.5.0.so`; `None` for [`DIR_ENV`].
    pub dir: Option<PathBuf>,
    /// Threads per step; `None` for one per CPU this process may use.
    pub threads: Option<usize>,
}

/// The folder of the library: `explicit`, else [`DIR_ENV`].
pub fn find_library_dir(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .ok_or_else(|| {
                format!(
                    "no llama.cpp library: set {DIR_ENV} (or --llama-cpp-dir) to the folder of \
                 {} (./dev installs it under scripts/llama-cpp/{NPM_BINS})",
                    ffi::LLAMA_LIB
                )
            })?,
    };
    if dir.join(ffi::LLAMA_LIB).is_file() {
        Ok(dir)
    } else {
        Err(format!("{} has no {}", dir.display(), ffi::LLAMA_LIB))
    }
}

/// The engine: one CPU device, instances from model packages' GGUF files.
pub struct LlamaCppBackend {
    api: Arc<ffi::Api>,
    dir: PathBuf,
    threads: usize,
}

impl LlamaCppBackend {
    pub fn new(options: &BackendOptions) -> Result<Self, EngineError> {
        let dir = find_library_dir(options.dir.as_deref()).map_err(EngineError::Unavailable)?;
        let api = ffi::Api::load(&dir).map_err(|e| {
            EngineError::Unavailable(format!("llama.cpp in {}: {e}", dir.display()))
        })?;
        let threads = options.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let threads = threads.max(1);
        tracing::info!(dir = %dir.display(), threads, "llama.cpp engine loaded");
        Ok(LlamaCppBackend {
            api: Arc::new(api),
            dir,
            threads,
        })
    }

    /// The folder the library was loaded from.
    pub fn library_dir(&self) -> &Path {
        &self.dir
    }

    pub fn load_package(
        &self,
        dir: &Path,
        options: &LoadOptions,
    ) -> Result<LlamaCppInstance, EngineError> {
        let pkg = ModelPackage::open(dir)?;
        let gguf = gguf_file(&pkg)?;
        let path = CString::new(gguf.as_os_str().as_encoded_bytes())
            .map_err(|_| EngineError::Model(format!("{} has a NUL byte", gguf.display())))?;
        // SAFETY: returns a plain struct.
        let mut params = unsafe { (self.api.model_default_params)() };
        params.n_gpu_layers = 0;
        params.split_mode = ffi::SPLIT_MODE_NONE;
        // SAFETY: a NUL-terminated path and this release's params.
        let ptr = unsafe { (self.api.model_load_from_file)(path.as_ptr(), params) };
        if ptr.is_null() {
            return Err(EngineError::Model(format!(
                "llama.cpp could not load {}",
                gguf.display()
            )));
        }
        let model = instance::ModelHandle {
            api: self.api.clone(),
            ptr,
        };
        // SAFETY: a loaded model.
        let vocab = unsafe {
            let v = (self.api.model_get_vocab)(ptr);
            (self.api.vocab_n_tokens)(v)
        };
        let config = pkg.manifest.config.clone();
        if vocab as usize != config.vocab_size {
            return Err(EngineError::Model(format!(
                "{} has {vocab} tokens, the package says {}",
                gguf.display(),
                config.vocab_size
            )));
        }
        let block_size = options.block_size_tokens.unwrap_or(BLOCK_SIZE);
        LlamaCppInstance::new(
            self.api.clone(),
            model,
            config,
            self.threads as i32,
            block_size,
            options.initial_kv_blocks,
        )
    }
}

fn gguf_file(pkg: &ModelPackage) -> Result<PathBuf, EngineError> {
    let gguf = pkg
        .gguf_path()
        .ok_or_else(|| EngineError::Model(format!("{} has no GGUF file", pkg.dir.display())))?;
    if gguf.is_file() {
        Ok(gguf)
    } else {
        Err(EngineError::Model(format!("{} is missing", gguf.display())))
    }
}

impl Backend for LlamaCppBackend {
    fn name(&self) -> &str {
        "llama.cpp"
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }
    fn devices(&self) -> Result<Vec<DeviceInfo>, EngineError> {
        Ok(vec![DeviceInfo::host_cpu()])
    }
    fn used_bytes(&self, device: usize) -> Option<u64> {
        (device == 0).then(HostMemory::process_bytes)
    }
    /// The GGUF file (llama.cpp maps it and computes in its formats) and
    /// an f16 KV cache.
    fn footprint(&self, package: &ModelPackage) -> Result<Footprint, EngineError> {
        let kv = package.manifest.config.kv_bytes_per_token(2);
        Footprint::of_file(&gguf_file(package)?, kv)
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
                "the llama.cpp engine loads model packages (scripts/models/import.py)".into(),
            )),
        }
    }
}
