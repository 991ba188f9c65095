//! `slinfer serve`: open the data directory, restore deployments, and serve
//! the API until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use slinfer_inference::graphs::Graphs;
use slinfer_inference::{Device, Inference, InferenceConfig, LlmMetrics, MemoryBudget};
use slinfer_sandbox::Services;
use slinfer_sandbox::limits::HostLimits;

use crate::api::{AppState, router};
use crate::cluster::Member;
use crate::connections;
use crate::devices::{DeviceSelection, discover};
use crate::functions::Functions;
use crate::metrics::Metrics;
use crate::models::Models;
use crate::placement::{self, Placer};
use crate::routing::{self, Router};

/// Settings of a running server.
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub admin_token_file: Option<PathBuf>,
    /// Model packages (`<name>/model.toml`), served and imported into.
    pub models_dir: PathBuf,
    /// The project virtualenv (the `openvino` wheel, the importer's
    /// packages); default `$SLINFER_VENV`.
    pub venv: Option<PathBuf>,
    /// The devices to serve models on (`--devices`).
    pub devices: DeviceSelection,
    /// Which engine serves the CPU and how (`--cpu-engine`, `--cpu-precision`,
    /// `--llama-cpp-dir`).
    pub cpu: crate::devices::CpuOptions,
    /// The connection cap and timeouts (see `connections`).
    pub connections: connections::ConnectionLimits,
    /// Who may read `/metrics`.
    pub metrics_access: crate::api::MetricsAccess,
    /// The host-wide memory budget's bound (`--memory-budget`).
    pub memory_budget: Option<u64>,
    /// The scheduling policy and keep-alive (`--policy`, `--keep-alive-s`).
    pub scheduling: slinfer_inference::Scheduling,
    /// Join a cluster (`--cluster`); `None` serves alone, without NATS.
    pub cluster: Option<crate::cluster::ClusterOptions>,
    pub host: HostLimits,
}

/// Where the admin token lives inside the data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// Read the admin token from `--admin-token-file`, or from the data dir; on
/// first start generate one, store it owner-only and print it once.
fn admin_token(opts: &ServeOptions) -> anyhow::Result<String> {
    if let Some(file) = &opts.admin_token_file {
        let t = std::fs::read_to_string(file)
            .with_context(|| format!("reading admin token file {}", file.display()))?;
        let t = t.trim().to_owned();
        anyhow::ensure!(
            !t.is_empty(),
            "admin token file {} is empty",
            file.display()
        );
        return Ok(t);
    }
    let path = admin_token_path(&opts.data_dir);
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_owned());
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token = hex::encode(raw);
    crate::functions::store::write_atomic(&path, format!("{token}\n").as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    println!("admin token (stored in {}): {token}", path.display());
    Ok(token)
}

/// Run the server until a shutdown signal.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&opts.data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let token = admin_token(&opts)?;
    let node = opts.cluster.as_ref().map(|c| c.node());
    let metrics = Arc::new(Metrics::new(node.as_deref()));
    let memory = MemoryBudget::new(opts.memory_budget).context("starting the memory budget")?;
    tracing::info!(
        bytes = memory.usage().total_bytes,
        "memory budget for functions and models on the CPU"
    );
    let found = discover(
        &opts.devices,
        opts.venv.as_deref(),
        &opts.cpu,
        &opts.models_dir,
    )?;
    let inference = start_inference(
        &opts.models_dir,
        found.devices,
        metrics.llm.clone(),
        memory.clone(),
        opts.scheduling,
    );
    // A cluster member without engines still generates: with a service of
    // no devices, whose every generation is routed to other members.
    let generations = match (&inference, &opts.cluster) {
        (None, Some(_)) => Some(Inference::start(
            &opts.models_dir,
            InferenceConfig {
                metrics: Some(metrics.llm.clone()),
                ..Default::default()
            },
        )?),
        _ => inference.clone(),
    };
    let graphs = Arc::new(Graphs::open(&opts.models_dir, found.tensor));
    let models = Arc::new(Models::new(
        &opts.models_dir,
        opts.venv.as_deref(),
        &opts.data_dir.join("cache/models"),
        inference.clone(),
        graphs.clone(),
    ));
    let functions = Arc::new(Functions::open(
        &opts.data_dir,
        opts.host,
        metrics.clone(),
        Services {
            inference: generations.clone(),
            graphs,
            memory: memory.clone(),
        },
    )?);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let member = match &opts.cluster {
        None => None,
        Some(c) => Some(
            Member::join(
                c,
                &opts.data_dir,
                addr,
                &token,
                functions.clone(),
                models.clone(),
                opts.host.max_package_bytes,
            )
            .await
            .context("joining the cluster")?,
        ),
    };
    if let Some(m) = &member {
        if let Some(g) = &generations {
            let router = Arc::new(Router::new(m.cluster.clone(), metrics.clone()));
            g.set_remote(router.clone());
            let placer = Placer::new(m.cluster.clone());
            placer
                .answer()
                .await
                .context("answering as the cluster's controller")?;
            tokio::spawn(placement::replace_lost(placer, router, g.clone()));
        }
        if let Some(i) = &inference {
            routing::answer(&m.cluster, i.clone(), metrics.clone())
                .await
                .context("answering the cluster's generations")?;
        }
    }
    let state = AppState {
        functions,
        models,
        metrics,
        admin_token: token.into(),
        max_package_bytes: opts.host.max_package_bytes,
        metrics_access: opts.metrics_access,
        memory,
        member: member.clone(),
        started_unix_s: slinfer_inference::recent::unix_now(),
    };
    if let Some(i) = &inference {
        crate::ui::sample_devices(state.metrics.clone(), i.clone());
    }
    tracing::info!(%addr, data_dir = %opts.data_dir.display(), max_connections = opts.connections.max_connections, "slinfer listening");
    // Tests and scripts read this line to find an ephemeral port.
    println!("listening on http://{addr}");
    println!("dashboard at http://{addr}/ui");
    let metrics = state.metrics.clone();
    connections::serve(
        listener,
        router(state),
        opts.connections,
        metrics,
        shutdown_signal(),
    )
    .await;
    if let Some(m) = member {
        m.cluster.leave().await;
    }
    Ok(())
}

/// Start the inference service on `models_dir` (models can be imported
/// later) and `devices`. Without a device the platform still serves;
/// `slinfer:llm` then answers "model not found" and `/v1/models` "inference
/// is off".
fn start_inference(
    models_dir: &Path,
    devices: Vec<Device>,
    metrics: Arc<LlmMetrics>,
    memory: Arc<MemoryBudget>,
    scheduling: slinfer_inference::Scheduling,
) -> Option<Arc<Inference>> {
    if devices.is_empty() {
        tracing::warn!("inference is off: no devices");
        return None;
    }
    if let Err(e) = std::fs::create_dir_all(models_dir) {
        tracing::warn!(models_dir = %models_dir.display(), "inference is off: {e}");
        return None;
    }
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    tracing::info!(devices = ?names, "serving models on");
    let config = InferenceConfig {
        devices,
        metrics: Some(metrics),
        memory: Some(memory),
        scheduling,
    };
    match Inference::start(models_dir, config) {
        Ok(i) => {
            tracing::info!(models = ?i.models(), "inference ready");
            Some(i)
        }
        Err(e) => {
            tracing::warn!("inference is off: {e:#}");
            None
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
