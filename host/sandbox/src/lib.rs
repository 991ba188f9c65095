//! # slinfer-sandbox
//!
//! The WebAssembly sandbox: one wasmtime engine with the pooling allocator,
//! components compiled once (and cached on disk by digest), and a fresh,
//! limited instance for every request, linked with the host interfaces —
//! one self-contained module each ([`http`], [`llm`], [`nn`]), each with its
//! per-function configuration, its per-instance context and a view trait
//! that the store data ([`store::GuestState`]) implements. A new interface
//! is a new module and one line in [`Sandbox::new`].
//!
//! The sandbox never imports an engine crate: `slinfer:llm` and `wasi:nn`
//! reach devices only through `slinfer-inference`. It knows nothing of where
//! a component came from: it is given bytes and a request, and gives back a
//! response or a classified error.

mod body;
mod cpu;
mod guest_log;
pub mod http;
pub mod limits;
pub mod llm;
pub mod nn;
pub mod store;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use body::Capped;
use limits::{EPOCH_TICK_MS, FunctionLimits, HostLimits};
use llm::{LlmConfig, LlmCtx};
use nn::{NnConfig, NnCtx};
use slinfer_inference::graphs::Graphs;
use slinfer_inference::{Inference, MemoryBudget};
use store::{GuestLimiter, GuestState, MemoryHit};

/// The wasmtime release the host is pinned to (workspace Cargo.toml), part
/// of every compile-cache key; the engine hash in the key also covers it.
const WASMTIME_VERSION: &str = "48.0.8";

/// Why a component could not be loaded. Each message names the problem.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the component file is not WebAssembly (no \\0asm header)")]
    NotWasm,
    #[error(
        "the file is a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("the component is not valid: {0}")]
    Invalid(String),
    #[error("the component does not export wasi:http/incoming-handler: {0}")]
    MissingHandler(String),
    #[error("the component imports something slinfer does not provide: {0}")]
    UnsupportedImport(String),
    #[error("compile cache: {0}")]
    Cache(String),
}

/// Why an invocation failed, as the caller will be told.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("the function ran past its timeout of {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the function exceeded its memory limit of {memory_bytes} bytes")]
    MemoryLimit { memory_bytes: u64 },
    #[error(
        "the host's memory budget of {total_bytes} bytes (shared by every function and the models on the CPU) is full; retry later"
    )]
    HostMemoryFull { total_bytes: u64 },
    #[error("the function overflowed its stack")]
    StackOverflow,
    #[error("the function trapped: {0}")]
    Trap(String),
    #[error("the function returned without sending a response")]
    NoResponse,
    #[error("the function answered with an error: {0}")]
    GuestError(String),
    #[error("the request body is larger than the limit of {limit_bytes} bytes")]
    RequestTooLarge { limit_bytes: u64 },
    #[error("no instance slot is free on this host; retry later")]
    PoolExhausted,
    #[error("internal error: {0}")]
    Internal(String),
}

impl InvokeError {
    /// A short, stable name for metrics and error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeError::Timeout { .. } => "timeout",
            InvokeError::MemoryLimit { .. } => "memory_limit",
            InvokeError::HostMemoryFull { .. } => "host_memory_full",
            InvokeError::StackOverflow => "stack_overflow",
            InvokeError::Trap(_) => "trap",
            InvokeError::NoResponse => "no_response",
            InvokeError::GuestError(_) => "guest_error",
            InvokeError::RequestTooLarge { .. } => "request_too_large",
            InvokeError::PoolExhausted => "pool_exhausted",
            InvokeError::Internal(_) => "internal",
        }
    }
}

/// A compiled, linked component ready to instantiate.
pub type FunctionPre = ProxyPre<GuestState>;

/// What a function's instances are given: its name, limits, and each
/// interface's configuration (from its manifest).
#[derive(Clone)]
pub struct Grants {
    pub function: Arc<str>,
    pub limits: FunctionLimits,
    pub env: Arc<[(String, String)]>,
    /// Host directory and the guest path it appears at, read-only.
    pub files: Option<(PathBuf, String)>,
    pub outbound_hosts: Arc<[String]>,
    pub llm: LlmConfig,
    pub nn: NnConfig,
}

/// The response of an invocation; `done` resolves when the instance has
/// finished (after the body has been streamed) to the kind of error it ended
/// with, if any, for metrics.
pub struct Invocation {
    pub response: ::http::Response<axum_core::body::Body>,
    pub done: std::pin::Pin<Box<dyn Future<Output = Option<&'static str>> + Send>>,
}

/// The engine, the linker, the compile cache, and the guests' runtime.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<GuestState>,
    cache_dir: PathBuf,
    host: HostLimits,
    services: Services,
    guests: cpu::GuestRuntime,
    shares: Arc<cpu::Shares>,
    next_guest: std::sync::atomic::AtomicU64,
}

/// What the host gives every guest besides its limits.
#[derive(Clone)]
pub struct Services {
    /// `slinfer:llm` (when the host has models).
    pub inference: Option<Arc<Inference>>,
    /// `wasi:nn`'s tensor models.
    pub graphs: Arc<Graphs>,
    /// The host-wide memory budget that Wasm memories and `wasi:nn`
    /// tensors draw from (shared with the CPU's inference instances).
    pub memory: Arc<MemoryBudget>,
}

impl Sandbox {
    /// Build the engine (pooling allocator sized by `host`), link the host
    /// interfaces, and start the epoch ticker that enforces wall-clock
    /// limits. Guests reach `services`' inference through `slinfer:llm`,
    /// its graphs through `wasi:nn`, and draw memory from its budget.
    pub fn new(cache_dir: &Path, host: HostLimits, services: Services) -> anyhow::Result<Sandbox> {
        let mut pool = PoolingAllocationConfig::default();
        let instances = host.total_instances;
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(4))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(4))
            .total_stacks(instances)
            .max_memory_size(host.max_function_memory_bytes as usize)
            .table_elements(host.max_table_elements);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(anyhow::Error::from)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)?;
        llm::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
        nn::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;

        std::fs::create_dir_all(cache_dir)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("slinfer-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                }
            })?;
        // One core stays with the server's I/O threads and the scheduler:
        // guests that compute without end cannot take every core.
        let threads =
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
        Ok(Sandbox {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
            host,
            services,
            guests: cpu::GuestRuntime::new(threads)?,
            shares: Arc::new(cpu::Shares::new(threads)),
            next_guest: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The host-wide limits this sandbox was built with.
    pub fn host_limits(&self) -> &HostLimits {
        &self.host
    }

    /// Check that `wasm` is a component slinfer can serve, and compile it —
    /// or load the artifact cached for `digest`. Returns the pre-instance and
    /// whether it came from the cache.
    pub fn load(&self, wasm: &[u8], digest: &str) -> Result<(FunctionPre, bool), LoadError> {
        if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        // Bytes 4..8: version 1 / layer 0 is a core module; layer 1 a component.
        if wasm[6..8] == [0, 0] {
            return Err(LoadError::CoreModule);
        }
        let cached = self.cache_path(digest);
        let (component, from_cache) = match self.deserialize(&cached) {
            Some(c) => (c, true),
            None => {
                let c = Component::new(&self.engine, wasm)
                    .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                let bytes = c.serialize().map_err(|e| LoadError::Cache(e.to_string()))?;
                write_cache(&cached, &bytes).map_err(|e| LoadError::Cache(e.to_string()))?;
                (c, false)
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::UnsupportedImport(format!("{e:#}")))?;
        let pre = ProxyPre::new(pre).map_err(|e| LoadError::MissingHandler(format!("{e:#}")))?;
        Ok((pre, from_cache))
    }

    fn deserialize(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the artifact was produced by `Component::serialize` on an
        // engine with this exact configuration (the file name carries the
        // engine's compatibility hash) and lives in the host's own data
        // directory, which only the host's user can write.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compile cache entry");
                None
            }
        }
    }

    /// Deletes every compiled artifact but those of `keep` (digests) for
    /// this engine: what refused deploys and removed or replaced functions
    /// left, and artifacts of other wasmtime versions or settings.
    pub fn prune_cache(&self, keep: &[&str]) -> std::io::Result<usize> {
        let keep: Vec<PathBuf> = keep.iter().map(|d| self.cache_path(d)).collect();
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.cache_dir)? {
            let entry = entry?;
            let path = entry.path();
            let stale = entry.file_type()?.is_file()
                && path.extension().is_some_and(|e| e == "cwasm")
                && !keep.contains(&path);
            if stale {
                std::fs::remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn cache_path(&self, digest: &str) -> PathBuf {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        self.cache_dir.join(format!(
            "{digest}-wasmtime{}-{:016x}.cwasm",
            WASMTIME_VERSION,
            h.finish()
        ))
    }

    /// Run one request in a fresh instance of `pre`. `permit` is held until
    /// the instance is gone. `path_and_query` is what the guest sees;
    /// `arrived` is when the request reached the host (latency targets of
    /// what the guest asks count from it).
    pub async fn invoke(
        &self,
        pre: &FunctionPre,
        grants: &Grants,
        req: ::http::Request<axum_core::body::Body>,
        (path_and_query, arrived): (::http::uri::PathAndQuery, Instant),
        permit: impl Send + 'static,
    ) -> Result<Invocation, InvokeError> {
        let started = Instant::now();
        let limits = grants.limits;
        let request_hit = Arc::new(AtomicBool::new(false));
        let memory_hit = Arc::new(MemoryHit::default());

        let (mut parts, body) = req.into_parts();
        let authority = parts
            .headers
            .get(::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<::http::uri::Authority>().ok())
            .unwrap_or_else(|| ::http::uri::Authority::from_static("localhost"));
        parts.uri = ::http::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| InvokeError::Internal(e.to_string()))?;
        let body = Capped::new(
            body.map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string()))),
            limits.max_request_body_bytes,
            request_hit.clone(),
            || wasmtime_wasi_http::Error::HttpRequestBodySize(None),
        );
        let hyper_req = ::http::Request::from_parts(parts, body);

        let mut store = self.new_store(grants, memory_hit.clone(), arrived)?;
        let deadline = started + Duration::from_millis(limits.timeout_ms);
        let guest = self.next_guest.fetch_add(1, Ordering::Relaxed);
        let (shares, function) = (self.shares.clone(), grants.function.clone());
        let turns = shares.arrive(&function, guest);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                return Err(Trap::Interrupt.into());
            }
            // Busy guests give their thread back every tick; a function
            // running its share of the threads waits for its turn (see `cpu`).
            Ok(match shares.tick(&function, guest) {
                None => wasmtime::UpdateDeadline::Yield(1),
                Some(turn) => wasmtime::UpdateDeadline::YieldCustom(1, Box::pin(turn)),
            })
        });

        let (tx, rx) = tokio::sync::oneshot::channel();
        let (req_res, out_res) = {
            let mut http = wasmtime_wasi_http::WasiHttpView::http(store.data_mut());
            let r = http
                .new_incoming_request(Scheme::Http, hyper_req)
                .map_err(|e| InvokeError::Internal(e.to_string()))?;
            let o = http
                .new_response_outparam(tx)
                .map_err(|e| InvokeError::Internal(e.to_string()))?;
            (r, o)
        };

        let pre = pre.clone();
        let timeout = Duration::from_millis(limits.timeout_ms);
        let memory_hit_task = memory_hit.clone();
        let budget = self.services.memory.clone();
        let function = grants.function.clone();
        let task = self.guests.handle().spawn(async move {
            let _permit = permit;
            let _turns = turns;
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req_res, out_res)
                    .await
            };
            let result = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(classify(e, &function, &limits, (&memory_hit_task, &budget))),
                Err(_) => Err(InvokeError::Timeout {
                    timeout_ms: limits.timeout_ms,
                }),
            };
            drop(store);
            result
        });

        // Until the response is handed back, the caller can leave (the
        // client hangs up and the server drops this future): the instance
        // goes with it, and whatever it holds (a generation's KV) is freed.
        let mut task = AbortOnDrop(Some(task));
        // Whatever the guest answered, a request body cut at the limit is
        // the caller's error.
        let request_too_large = || {
            request_hit
                .load(Ordering::Relaxed)
                .then_some(InvokeError::RequestTooLarge {
                    limit_bytes: limits.max_request_body_bytes,
                })
        };
        let answer = rx.await;
        let task = task.0.take().expect("taken once");
        match answer {
            Ok(Ok(resp)) => {
                if let Some(e) = request_too_large() {
                    return Err(e);
                }
                let response_hit = Arc::new(AtomicBool::new(false));
                let (parts, body) = resp.into_parts();
                let body = Capped::new(
                    body,
                    limits.max_response_body_bytes,
                    response_hit.clone(),
                    || wasmtime_wasi_http::Error::HttpResponseBodySize(None),
                );
                let function = grants.function.clone();
                // Awaited by the caller's metrics task: no extra task here.
                let done = Box::pin(async move {
                    match task.await {
                        Ok(Ok(())) if response_hit.load(Ordering::Relaxed) => {
                            tracing::warn!(%function, limit = limits.max_response_body_bytes, "response body cut at the limit");
                            Some("response_too_large")
                        }
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => {
                            tracing::warn!(%function, kind = e.kind(), "failed after the response started: {e}");
                            Some(e.kind())
                        }
                        Err(e) => {
                            tracing::error!(%function, "invocation task failed: {e}");
                            Some("internal")
                        }
                    }
                });
                Ok(Invocation {
                    response: ::http::Response::from_parts(parts, axum_core::body::Body::new(body)),
                    done,
                })
            }
            Ok(Err(code)) => {
                let _ = task.await;
                if let Some(e) = request_too_large() {
                    return Err(e);
                }
                Err(InvokeError::GuestError(format!("{code:?}")))
            }
            Err(_) => {
                let result = task
                    .await
                    .map_err(|e| InvokeError::Internal(e.to_string()))?;
                if let Some(e) = request_too_large() {
                    return Err(e);
                }
                Err(result.err().unwrap_or(InvokeError::NoResponse))
            }
        }
    }

    fn new_store(
        &self,
        grants: &Grants,
        memory_hit: Arc<MemoryHit>,
        arrived: Instant,
    ) -> Result<Store<GuestState>, InvokeError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.envs(&grants.env)
            .stdout(guest_log::GuestLog::new(grants.function.clone(), "stdout"))
            .stderr(guest_log::GuestLog::new(grants.function.clone(), "stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if let Some((dir, mount)) = &grants.files {
            wasi.preopened_dir(dir, mount, FsPerms::ReadOnly)
                .map_err(|e| InvokeError::Internal(format!("opening granted directory: {e}")))?;
        }
        let state = GuestState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: GuestLimiter {
                memory_bytes: grants.limits.memory_bytes as usize,
                table_elements: self.host.max_table_elements,
                hit: memory_hit,
                budget: self.services.memory.clone(),
                reserved: 0,
            },
            outbound: http::OutboundPolicy {
                allowed_hosts: grants.outbound_hosts.clone(),
            },
            llm: LlmCtx::new(
                self.services.inference.clone(),
                grants.function.clone(),
                grants.llm.clone(),
                arrived,
            ),
            nn: NnCtx::new(
                self.services.graphs.clone(),
                grants.nn.clone(),
                self.services.memory.clone(),
            ),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        Ok(store)
    }
}

/// Aborts the invocation's task if dropped while still holding it.
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// What a failed call means for the caller. The caller learns the kind and
/// a short reason (the trap, or the root cause of a host-call error); the
/// whole error with its wasm backtrace is for the function's owner, in the
/// log.
fn classify(
    e: wasmtime::Error,
    function: &str,
    limits: &FunctionLimits,
    (memory_hit, budget): (&MemoryHit, &MemoryBudget),
) -> InvokeError {
    tracing::warn!(%function, "the instance failed: {e:?}");
    if memory_hit.limit.load(Ordering::Relaxed) {
        return InvokeError::MemoryLimit {
            memory_bytes: limits.memory_bytes,
        };
    }
    if memory_hit.host.load(Ordering::Relaxed) {
        return InvokeError::HostMemoryFull {
            total_bytes: budget.usage().total_bytes,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => InvokeError::Timeout {
            timeout_ms: limits.timeout_ms,
        },
        Some(Trap::StackOverflow) => InvokeError::StackOverflow,
        Some(trap) => InvokeError::Trap(trap.to_string()),
        None => {
            let msg = format!("{e:#}");
            if msg.contains("concurrent") && msg.contains("limit") {
                InvokeError::PoolExhausted
            } else {
                InvokeError::Trap(e.root_cause().to_string())
            }
        }
    }
}

/// Writes a compiled artifact so that a reader (or a restart after a crash)
/// finds the whole file or none.
fn write_cache(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = atomic_write_file::AtomicWriteFile::open(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// Hex SHA-256 of a component: its identity in the store and the cache.
pub fn digest(wasm: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(wasm))
}
