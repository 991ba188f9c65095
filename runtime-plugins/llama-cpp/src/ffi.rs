//! The part of llama.cpp's C API (`include/llama.h`) this engine calls,
//! loaded from the shared library at run time.
//!
//! The structs mirror the header of the one release this crate is written
//! against: node-llama-cpp 3.22.1's prebuilt llama.cpp (`libllama.v0.5.0.so`,
//! the name the file is found by). [`Api::load`] checks that the library's
//! default parameters read back as that header defines them, so a library
//! with another layout is refused instead of misread.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::Path;

use libloading::Library;

pub type Token = i32;
pub type Pos = i32;
pub type SeqIdC = i32;

/// Opaque handles.
pub enum Model {}
pub enum Context {}
pub enum Vocab {}
pub enum Memory {}

/// `struct llama_model_params`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModelParams {
    pub devices: *mut c_void,
    pub tensor_buft_overrides: *const c_void,
    pub n_gpu_layers: i32,
    pub split_mode: i32,
    pub load_mode: i32,
    pub lazy_mode: i32,
    pub main_gpu: i32,
    pub tensor_split: *const f32,
    pub progress_callback: *mut c_void,
    pub progress_callback_user_data: *mut c_void,
    pub kv_overrides: *const c_void,
    pub vocab_only: bool,
    pub check_tensors: bool,
    pub use_extra_bufts: bool,
    pub no_host: bool,
    pub no_alloc: bool,
    pub load_mtp: bool,
}

/// `struct llama_context_params`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_seq_max: u32,
    pub n_rs_seq: u32,
    pub n_outputs_max: u32,
    pub n_outputs_max_per_seq: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    pub ctx_type: i32,
    pub rope_scaling_type: i32,
    pub pooling_type: i32,
    pub attention_type: i32,
    pub flash_attn_type: i32,
    pub rope_freq_base: f32,
    pub rope_freq_scale: f32,
    pub yarn_ext_factor: f32,
    pub yarn_attn_factor: f32,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    pub yarn_orig_ctx: u32,
    pub defrag_thold: f32,
    pub cb_eval: *mut c_void,
    pub cb_eval_user_data: *mut c_void,
    pub type_k: i32,
    pub type_v: i32,
    pub abort_callback: *mut c_void,
    pub abort_callback_data: *mut c_void,
    pub embeddings: bool,
    pub offload_kqv: bool,
    pub no_perf: bool,
    pub op_offload: bool,
    pub swa_full: bool,
    pub kv_unified: bool,
    pub samplers: *mut c_void,
    pub n_samplers: usize,
    pub ctx_other: *mut c_void,
}

/// `struct llama_batch`, allocated by `llama_batch_init` (passed by value,
/// its arrays borrowed).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Batch {
    pub n_tokens: i32,
    pub token: *mut Token,
    pub embd: *mut f32,
    pub pos: *mut Pos,
    pub n_seq_id: *mut i32,
    pub seq_id: *mut *mut SeqIdC,
    pub logits: *mut i8,
}

pub const POOLING_NONE: i32 = 0;
pub const FLASH_ATTN_ENABLED: i32 = 1;
pub const SPLIT_MODE_NONE: i32 = 0;
/// `LLAMA_MAX_SEQ` of this release: sequence ids are below it.
pub const MAX_SEQ: usize = 256;
/// `ggml_log_level`: warnings and errors are logged (not debug, info, or
/// the continuation lines, 5, of progress output).
const LOG_WARN: i32 = 3;
const LOG_ERROR: i32 = 4;

type LogCallback = unsafe extern "C" fn(i32, *const c_char, *mut c_void);

/// The functions, resolved once. The `Library`s stay loaded for as long
/// as this value lives (it is kept for the life of the process).
pub struct Api {
    pub model_default_params: unsafe extern "C" fn() -> ModelParams,
    pub context_default_params: unsafe extern "C" fn() -> ContextParams,
    pub model_load_from_file: unsafe extern "C" fn(*const c_char, ModelParams) -> *mut Model,
    pub model_free: unsafe extern "C" fn(*mut Model),
    pub model_size: unsafe extern "C" fn(*const Model) -> u64,
    pub model_get_vocab: unsafe extern "C" fn(*const Model) -> *const Vocab,
    pub vocab_n_tokens: unsafe extern "C" fn(*const Vocab) -> i32,
    pub init_from_model: unsafe extern "C" fn(*mut Model, ContextParams) -> *mut Context,
    pub free: unsafe extern "C" fn(*mut Context),
    pub n_ctx: unsafe extern "C" fn(*const Context) -> u32,
    pub get_memory: unsafe extern "C" fn(*const Context) -> *mut Memory,
    pub memory_seq_rm: unsafe extern "C" fn(*mut Memory, SeqIdC, Pos, Pos) -> bool,
    pub memory_seq_cp: unsafe extern "C" fn(*mut Memory, SeqIdC, SeqIdC, Pos, Pos),
    pub batch_init: unsafe extern "C" fn(i32, i32, i32) -> Batch,
    pub batch_free: unsafe extern "C" fn(Batch),
    pub decode: unsafe extern "C" fn(*mut Context, Batch) -> i32,
    pub get_logits_ith: unsafe extern "C" fn(*mut Context, i32) -> *mut f32,
    pub get_embeddings_ith: unsafe extern "C" fn(*mut Context, i32) -> *mut f32,
    pub set_embeddings: unsafe extern "C" fn(*mut Context, bool),
    pub state_seq_get_size: unsafe extern "C" fn(*mut Context, SeqIdC) -> usize,
    pub state_seq_get_data: unsafe extern "C" fn(*mut Context, *mut u8, usize, SeqIdC) -> usize,
    pub state_seq_set_data: unsafe extern "C" fn(*mut Context, *const u8, usize, SeqIdC) -> usize,
    _llama: Library,
    _ggml: Library,
}

/// The library file names of the release this crate mirrors.
pub const LLAMA_LIB: &str = "libllama.v0.5.0.so";
const GGML_LIB: &str = "libggml.v0.5.0.so";

unsafe extern "C" fn log_to_tracing(level: i32, text: *const c_char, _: *mut c_void) {
    if !(LOG_WARN..=LOG_ERROR).contains(&level) || text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated message.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    if !text.is_empty() {
        tracing::warn!(target: "llama.cpp", "{text}");
    }
}

/// A function pointer out of `lib`, which must outlive its use.
///
/// # Safety
/// `T` must be the symbol's real type.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller names the type; the pointer is copied out and
    // stays valid while `lib` is loaded.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{}: {e}", name.trim_end_matches('\0')))
}

impl Api {
    /// Loads the library from `dir` (the folder of `libllama.v0.5.0.so` and
    /// its `libggml-cpu-*.so` variants), registers its CPU backend (the
    /// variant for this CPU), and checks the struct layouts.
    pub fn load(dir: &Path) -> Result<Api, String> {
        let path = dir.join(LLAMA_LIB);
        if !path.is_file() {
            return Err(format!("{} is missing", path.display()));
        }
        // SAFETY: loading llama.cpp runs its (ordinary) initialisers; the
        // symbols below are declared as `llama.h` of this release declares them.
        unsafe {
            let ggml = Library::new(dir.join(GGML_LIB)).map_err(|e| e.to_string())?;
            let llama = Library::new(&path).map_err(|e| e.to_string())?;
            let log_set: libloading::Symbol<unsafe extern "C" fn(LogCallback, *mut c_void)> =
                llama.get(b"llama_log_set\0").map_err(|e| e.to_string())?;
            log_set(log_to_tracing, std::ptr::null_mut());
            let load_all: libloading::Symbol<unsafe extern "C" fn(*const c_char)> = ggml
                .get(b"ggml_backend_load_all_from_path\0")
                .map_err(|e| e.to_string())?;
            let dir_c = CString::new(dir.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{} has a NUL byte", dir.display()))?;
            load_all(dir_c.as_ptr());
            let backend_init: libloading::Symbol<unsafe extern "C" fn()> = llama
                .get(b"llama_backend_init\0")
                .map_err(|e| e.to_string())?;
            backend_init();
            macro_rules! sym {
                ($name:literal) => {
                    sym(&llama, concat!($name, "\0"))?
                };
            }
            let api = Api {
                model_default_params: sym!("llama_model_default_params"),
                context_default_params: sym!("llama_context_default_params"),
                model_load_from_file: sym!("llama_model_load_from_file"),
                model_free: sym!("llama_model_free"),
                model_size: sym!("llama_model_size"),
                model_get_vocab: sym!("llama_model_get_vocab"),
                vocab_n_tokens: sym!("llama_vocab_n_tokens"),
                init_from_model: sym!("llama_init_from_model"),
                free: sym!("llama_free"),
                n_ctx: sym!("llama_n_ctx"),
                get_memory: sym!("llama_get_memory"),
                memory_seq_rm: sym!("llama_memory_seq_rm"),
                memory_seq_cp: sym!("llama_memory_seq_cp"),
                batch_init: sym!("llama_batch_init"),
                batch_free: sym!("llama_batch_free"),
                decode: sym!("llama_decode"),
                get_logits_ith: sym!("llama_get_logits_ith"),
                get_embeddings_ith: sym!("llama_get_embeddings_ith"),
                set_embeddings: sym!("llama_set_embeddings"),
                state_seq_get_size: sym!("llama_state_seq_get_size"),
                state_seq_get_data: sym!("llama_state_seq_get_data"),
                state_seq_set_data: sym!("llama_state_seq_set_data"),
                _llama: llama,
                _ggml: ggml,
            };
            api.check_layout()?;
            Ok(api)
        }
    }

    /// The defaults of this release, read back through our structs: a
    /// library with another layout fails here.
    fn check_layout(&self) -> Result<(), String> {
        // SAFETY: both return plain structs by value.
        let (m, c) = unsafe {
            (
                (self.model_default_params)(),
                (self.context_default_params)(),
            )
        };
        let model_ok = m.n_gpu_layers == -1
            && m.split_mode == 1
            && m.load_mode == -1
            && m.lazy_mode == 1
            && m.devices.is_null()
            && !m.vocab_only
            && m.use_extra_bufts;
        let context_ok = c.n_ctx == 512
            && c.n_batch == 2048
            && c.n_ubatch == 512
            && c.n_seq_max == 1
            && c.n_outputs_max_per_seq == 1
            && c.yarn_ext_factor == -1.0
            && c.defrag_thold == -1.0
            && c.type_k == 1
            && c.type_v == 1
            && !c.embeddings
            && c.offload_kqv
            && c.swa_full
            && !c.kv_unified
            && c.samplers.is_null()
            && c.n_samplers == 0
            && c.ctx_other.is_null();
        if model_ok && context_ok {
            Ok(())
        } else {
            Err(format!(
                "the library's parameter structs do not match the llama.h this engine was written \
                 for ({LLAMA_LIB}, node-llama-cpp 3.22.1)"
            ))
        }
    }
}
