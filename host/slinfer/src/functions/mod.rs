//! Function packages: the manifest format, archives, the on-disk store and
//! the in-memory registry of what is deployed.
//!
//! This room owns the life of a function — deploy, replace, remove, restore
//! after a restart — and admission of its requests (concurrency slots and the
//! wait queue). Running guest code is the sandbox's job.

pub mod manifest;
pub mod package;
pub mod pool;
pub mod store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{FunctionLabel, Metrics};
use manifest::Manifest;
use package::PackageError;
use slinfer_sandbox::limits::{FunctionLimits, HostLimits};
use slinfer_sandbox::llm::LlmConfig;
use slinfer_sandbox::nn::NnConfig;
use slinfer_sandbox::{
    FunctionPre, Grants, Invocation, InvokeError, LoadError, Sandbox, Services, digest,
};
use store::Store;

/// Environment variable naming a deploy stage at which the process aborts,
/// for the crash-safety tests: `deploy-before-commit`.
pub const CRASH_AT_ENV: &str = "SLINFER_CRASH_AT";

/// A function that is deployed and serving.
pub struct Deployed {
    pub manifest: Manifest,
    pub limits: FunctionLimits,
    pub digest: String,
    /// The deployed upload: the first 32 hex digits of its archive's digest.
    pub version: String,
    pub deployed_at_unix_s: u64,
    pre: FunctionPre,
    grants: Grants,
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
}

/// What the API shows about a function.
#[derive(Debug, Serialize)]
pub struct FunctionInfo {
    pub name: String,
    pub digest: String,
    pub version: String,
    pub deployed_at_unix_s: u64,
    pub limits: FunctionLimits,
    pub manifest: Manifest,
}

impl Deployed {
    pub fn info(&self) -> FunctionInfo {
        let mut manifest = self.manifest.clone();
        if manifest.invoke_key.is_some() {
            manifest.invoke_key = Some("<redacted>".into());
        }
        FunctionInfo {
            name: self.manifest.name.clone(),
            digest: self.digest.clone(),
            version: self.version.clone(),
            deployed_at_unix_s: self.deployed_at_unix_s,
            limits: self.limits,
            manifest,
        }
    }

    /// Does `presented` (the bearer token of the request) satisfy the
    /// function's invoke key?
    pub fn invoke_key_ok(&self, presented: Option<&str>) -> bool {
        match &self.manifest.invoke_key {
            None => true,
            Some(key) => presented.is_some_and(|p| constant_time_eq(p.as_bytes(), key.as_bytes())),
        }
    }
}

/// The host directory a manifest grants, under package directory `dir`.
fn granted_files(manifest: &Manifest, dir: &Path) -> Option<(std::path::PathBuf, String)> {
    manifest
        .files_mount()
        .map(|(rel, mount)| (dir.join(rel), mount))
        .filter(|(path, _)| path.is_dir())
}

/// Compare without an early exit, so timing does not reveal a prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the package is named {manifest:?} but was uploaded as {url:?}")]
    NameMismatch { manifest: String, url: String },
    #[error(
        "invalid function name {0:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
}

/// Why an invocation was not run (or failed).
#[derive(Debug, thiserror::Error)]
pub enum InvokeFailure {
    #[error("no function named {0:?} is deployed")]
    NotFound(String),
    #[error("this function requires an invoke key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error(
        "too many requests for this function: {running} running and {waiting} waiting; retry later"
    )]
    Busy { running: u32, waiting: u32 },
    #[error("no instance of this function became free within {waited_ms} ms; retry later")]
    QueueTimeout { waited_ms: u64 },
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

impl InvokeFailure {
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeFailure::NotFound(_) => "not_found",
            InvokeFailure::Unauthorized => "unauthorized",
            InvokeFailure::Busy { .. } => "busy",
            InvokeFailure::QueueTimeout { .. } => "queue_timeout",
            InvokeFailure::Invoke(e) => e.kind(),
        }
    }
}

/// The registry: what is deployed, backed by the store, run by the sandbox.
pub struct Functions {
    store: Store,
    sandbox: Arc<Sandbox>,
    deployed: RwLock<HashMap<String, Arc<Deployed>>>,
    deploy_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// The host-wide instance slots, shared fairly between functions.
    pool: Arc<pool::SlotPool>,
}

impl Functions {
    /// Open the store under `data_dir` and load every deployed function
    /// (from the compile cache where possible).
    pub fn open(
        data_dir: &Path,
        host: HostLimits,
        metrics: Arc<Metrics>,
        services: Services,
    ) -> anyhow::Result<Functions> {
        let sandbox = Arc::new(Sandbox::new(&data_dir.join("cache"), host, services)?);
        let store = Store::open(data_dir.join("functions"))?;
        let functions = Functions {
            store,
            sandbox,
            deployed: RwLock::new(HashMap::new()),
            deploy_lock: tokio::sync::Mutex::new(()),
            metrics,
            pool: pool::SlotPool::new(host.total_instances),
        };
        for name in functions.store.names()? {
            let Some(current) = functions.store.current(&name)? else {
                continue;
            };
            let dir = functions.store.version_dir(&name, &current.version);
            match functions.load_dir(&dir, &current.version, current.deployed_at_unix_s) {
                Ok(d) => {
                    tracing::info!(function = %name, digest = %d.digest, "restored");
                    functions.insert(d);
                }
                Err(e) => tracing::error!(function = %name, "cannot restore: {e}"),
            }
        }
        functions.prune_cache();
        Ok(functions)
    }

    fn insert(&self, d: Deployed) {
        let mut map = self.deployed.write().expect("registry lock");
        map.insert(d.manifest.name.clone(), Arc::new(d));
        self.metrics.functions.set(map.len() as i64);
    }

    /// Load a package directory: manifest, component, grants.
    fn load_dir(
        &self,
        dir: &Path,
        version: &str,
        deployed_at_unix_s: u64,
    ) -> Result<Deployed, DeployError> {
        let host = self.sandbox.host_limits();
        let manifest = Manifest::parse(
            &std::fs::read_to_string(dir.join(manifest::MANIFEST_FILE))?,
            host,
        )
        .map_err(PackageError::from)?;
        let limits = manifest.resolved_limits(host).map_err(PackageError::from)?;
        let wasm = std::fs::read(dir.join(&manifest.component))?;
        let digest = digest(&wasm);
        let (pre, cached) = self.sandbox.load(&wasm, &digest)?;
        if cached {
            self.metrics.cache_hits.inc();
        } else {
            self.metrics.compiles.inc();
        }
        let files = granted_files(&manifest, dir);
        // `models.allowed` grants both slinfer:llm models and wasi:nn graphs.
        let models: Arc<[String]> = manifest.models.allowed.clone().into();
        let grants = Grants {
            function: manifest.name.as_str().into(),
            limits,
            env: manifest
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            files,
            outbound_hosts: manifest.outbound.allowed_hosts.clone().into(),
            llm: LlmConfig {
                allowed_models: models.clone(),
                ttft_slo_s: manifest.slo.ttft_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
                ttft_prompt_tokens_per_s: manifest.slo.ttft_prompt_tokens_per_s.unwrap_or(0.0),
                tpot_slo_s: manifest.slo.tpot_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
            },
            nn: NnConfig {
                allowed_models: models,
                budget_bytes: limits.memory_bytes as usize,
            },
        };
        Ok(Deployed {
            slots: Arc::new(Semaphore::new(limits.max_concurrency as usize)),
            waiting: AtomicU32::new(0),
            limits,
            digest,
            version: version.to_owned(),
            deployed_at_unix_s,
            pre,
            grants,
            manifest,
        })
    }

    /// Deploy (or replace) `name` from a package archive, deployed now or
    /// (a deploy made through another cluster member) at `deployed_at`. The
    /// previous version keeps serving until the new one is committed.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        archive: bytes::Bytes,
        deployed_at: Option<u64>,
    ) -> Result<FunctionInfo, DeployError> {
        if !manifest::valid_name(name) {
            return Err(DeployError::BadName(name.to_owned()));
        }
        let _guard = self.deploy_lock.lock().await;
        let this = self.clone();
        let name = name.to_owned();
        let deployed_at = deployed_at.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        tokio::task::spawn_blocking(move || this.deploy_blocking(&name, &archive, deployed_at))
            .await
            .map_err(|e| DeployError::Io(std::io::Error::other(e.to_string())))?
    }

    fn deploy_blocking(
        &self,
        name: &str,
        archive: &[u8],
        deployed_at: u64,
    ) -> Result<FunctionInfo, DeployError> {
        let incoming = self.store.incoming_dir()?;
        let result = (|| {
            let manifest = package::unpack(archive, &incoming, self.sandbox.host_limits())?;
            if manifest.name != name {
                return Err(DeployError::NameMismatch {
                    manifest: manifest.name,
                    url: name.to_owned(),
                });
            }
            // A version is one upload: a new manifest with the same component
            // is a new version too.
            let version = digest(archive)[..32].to_owned();
            // Validate and compile before anything replaces the old version.
            let mut staged = self.load_dir(&incoming, &version, deployed_at)?;
            let dir = self.store.install(name, &version, &incoming)?;
            if std::env::var(CRASH_AT_ENV).as_deref() == Ok("deploy-before-commit") {
                tracing::error!("{CRASH_AT_ENV}=deploy-before-commit: aborting on purpose");
                std::process::abort();
            }
            self.store.commit(name, &version, deployed_at)?;
            // The package moved: point the granted directory at its new home.
            staged.grants.files = granted_files(&staged.manifest, &dir);
            let info = staged.info();
            self.insert(staged);
            Ok(info)
        })();
        if incoming.exists() {
            let _ = std::fs::remove_dir_all(&incoming);
        }
        if let Ok(info) = &result {
            tracing::info!(function = %info.name, digest = %info.digest, "deployed");
        }
        // A refused deploy's artifact, or the replaced version's.
        self.prune_cache();
        result
    }

    /// Deletes compiled artifacts no deployed function uses (call under
    /// the deploy lock, or before serving).
    fn prune_cache(&self) {
        let digests: Vec<String> = self.list().iter().map(|d| d.digest.clone()).collect();
        let keep: Vec<&str> = digests.iter().map(String::as_str).collect();
        match self.sandbox.prune_cache(&keep) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "compile cache: artifacts no function uses removed"
            ),
            Err(e) => tracing::warn!("compile cache: {e}"),
        }
    }

    /// Remove `name`; returns whether it existed.
    pub async fn remove(&self, name: &str) -> Result<bool, DeployError> {
        if !manifest::valid_name(name) {
            return Err(DeployError::BadName(name.to_owned()));
        }
        let _guard = self.deploy_lock.lock().await;
        let existed = self.store.remove(name)?;
        let was_loaded = {
            let mut map = self.deployed.write().expect("registry lock");
            let was = map.remove(name).is_some();
            self.metrics.functions.set(map.len() as i64);
            was
        };
        self.metrics.forget(name);
        self.prune_cache();
        Ok(existed || was_loaded)
    }

    /// The folder `d` was unpacked into.
    pub fn package_dir(&self, d: &Deployed) -> std::path::PathBuf {
        self.store.version_dir(&d.manifest.name, &d.version)
    }

    pub fn host_limits(&self) -> HostLimits {
        *self.sandbox.host_limits()
    }

    /// Everything deployed, by name.
    pub fn list(&self) -> Vec<Arc<Deployed>> {
        let map = self.deployed.read().expect("registry lock");
        let mut all: Vec<_> = map.values().cloned().collect();
        all.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        all
    }

    /// One function.
    pub fn get(&self, name: &str) -> Option<Arc<Deployed>> {
        self.deployed
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Run a request on `d`: wait for a slot (bounded queue), then a fresh
    /// instance. Metrics are recorded when the instance has finished.
    pub async fn invoke(
        &self,
        d: Arc<Deployed>,
        req: http::Request<axum::body::Body>,
        path_and_query: http::uri::PathAndQuery,
    ) -> Result<http::Response<axum::body::Body>, InvokeFailure> {
        let started = std::time::Instant::now();
        let name = d.manifest.name.clone();
        let result = self.run(&d, req, (path_and_query, started)).await;
        match result {
            Ok(inv) => {
                let metrics = self.metrics.clone();
                let instances = metrics
                    .instances
                    .get_or_create(&FunctionLabel {
                        function: name.clone(),
                    })
                    .clone();
                instances.inc();
                let done = inv.done;
                tokio::spawn(async move {
                    let error = done.await;
                    instances.dec();
                    metrics.record(&name, started.elapsed().as_secs_f64(), error);
                });
                Ok(inv.response)
            }
            Err(e) => {
                self.metrics
                    .record(&name, started.elapsed().as_secs_f64(), Some(e.kind()));
                Err(e)
            }
        }
    }

    async fn run(
        &self,
        d: &Arc<Deployed>,
        req: http::Request<axum::body::Body>,
        target: (http::uri::PathAndQuery, std::time::Instant),
    ) -> Result<Invocation, InvokeFailure> {
        let permit = self.acquire(d).await?;
        Ok(self
            .sandbox
            .invoke(&d.pre, &d.grants, req, target, permit)
            .await?)
    }

    /// A slot of the function's own (`max_concurrency`) and one of the
    /// host's pool, waiting for them in the function's bounded queue.
    async fn acquire(
        &self,
        d: &Deployed,
    ) -> Result<(OwnedSemaphorePermit, pool::Slot), InvokeFailure> {
        let name = &d.grants.function;
        if let Ok(p) = d.slots.clone().try_acquire_owned()
            && let Some(slot) = self.pool.try_acquire(name)
        {
            return Ok((p, slot));
        }
        let waiting = d.waiting.fetch_add(1, Ordering::SeqCst);
        let queued = self
            .metrics
            .queued
            .get_or_create(&FunctionLabel {
                function: d.manifest.name.clone(),
            })
            .clone();
        queued.inc();
        struct Leave<'a>(&'a AtomicU32, prometheus_client::metrics::gauge::Gauge);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
                self.1.dec();
            }
        }
        let _leave = Leave(&d.waiting, queued);
        if waiting >= d.limits.max_queue {
            return Err(InvokeFailure::Busy {
                running: d.limits.max_concurrency,
                waiting,
            });
        }
        // A function with a time-to-first-token SLO waits for a slot at most
        // nine tenths of it: the last tenth is the least its start and its
        // prefill need, so later it could not meet it and is better refused
        // while the caller can still go elsewhere.
        let wait_ms = d.manifest.slo.ttft_ms.map_or(d.limits.timeout_ms, |ttft| {
            (ttft * 9 / 10).min(d.limits.timeout_ms)
        });
        let wait = Duration::from_millis(wait_ms);
        let both = async {
            let p = d.slots.clone().acquire_owned().await.ok()?;
            Some((p, self.pool.acquire(name).await))
        };
        match tokio::time::timeout(wait, both).await {
            Ok(Some(held)) => Ok(held),
            _ => Err(InvokeFailure::QueueTimeout { waited_ms: wait_ms }),
        }
    }
}
