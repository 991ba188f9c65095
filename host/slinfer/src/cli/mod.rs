//! The `slinfer` command line: `serve` runs the platform; `deploy`,
//! `functions`, `models`, `status`, `cluster` and `invoke` are thin clients of its HTTP
//! API; `simulate`
//! runs the scheduler simulator.

mod client;
pub mod profile;
pub mod simulate;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::devices::DeviceSelection;
use crate::server::{ServeOptions, serve};
use slinfer_sandbox::limits::HostLimits;

#[derive(Parser, Debug)]
#[command(
    name = "slinfer",
    version,
    about = "Serverless WebAssembly functions for LLM inference"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the platform's HTTP server.
    Serve(ServeArgs),
    /// Deploy (or replace) the function package in directory PATH.
    Deploy {
        /// A package directory: slinfer.toml and the component it names.
        path: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List, show or remove deployed functions.
    Functions {
        #[command(subcommand)]
        action: FunctionsAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Import, list, show or remove the models the server serves.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the live scheduler's state (devices, models, instances, KV, queues) as JSON.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The cluster a server belongs to (`serve --cluster`).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Invoke a function over HTTP and print its response body.
    Invoke(client::InvokeArgs),
    /// Run the scheduler simulator on a trace.
    Simulate(simulate::SimulateArgs),
    /// Measure this machine's CPU engine on a model (prefill and decode
    /// step latency, load, unload, KV resize) and write a latency profile
    /// that `slinfer simulate --profile` reads.
    Profile(profile::ProfileArgs),
}

#[derive(Subcommand, Debug)]
pub enum FunctionsAction {
    /// List deployed functions.
    Ls,
    /// Show one function: manifest, digest, deploy time, limits.
    Show { name: String },
    /// Remove a function.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterAction {
    /// Members (alive or dead, heartbeat age, devices, instances) and the
    /// controller, as the server sees them.
    Status {
        /// Print the whole view as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelsAction {
    /// Import a model: `default` (SmolLM2-135M-Instruct), a `.gguf` file
    /// (uploaded), or an OpenVINO IR folder (a path the server can read).
    Import {
        source: String,
        /// Package name (default: `smollm2-135m-instruct` for `default`,
        /// else derived from the file or folder name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the models served.
    Ls,
    /// Show one model's architecture numbers.
    Show { name: String },
    /// Stop serving a model and delete its package.
    Rm { name: String },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SLINFER_LISTEN")]
    pub listen: SocketAddr,
    /// Data directory (deployed functions, compile cache, admin token).
    #[arg(long, env = "SLINFER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read the admin token from this file instead of generating one.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Model packages (default: `<data-dir>/models`).
    #[arg(long, env = "SLINFER_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// The project virtualenv (`openvino` wheel; model import).
    #[arg(long, env = "SLINFER_VENV")]
    pub venv: Option<PathBuf>,
    /// Threads running HTTP and the functions' Wasm (default: one per core).
    /// The inference engines use every core in lock-stepped threads; fewer
    /// I/O threads disturb them less (BENCHMARKS.md: 1 on a 2-core host
    /// raised 8-stream decode throughput by ~3 %), at the cost of
    /// parallelism for CPU-heavy functions.
    #[arg(long, env = "SLINFER_IO_THREADS")]
    pub io_threads: Option<usize>,
    /// Instances alive at once across all functions.
    #[arg(long, default_value_t = HostLimits::default().total_instances)]
    pub max_instances: u32,
    /// Devices to serve models on: `all` (every one found), `none`, or a
    /// list such as `cpu,cuda:0`. Naming a device that is not there is an
    /// error.
    #[arg(long, env = "SLINFER_DEVICES", default_value = "all")]
    pub devices: DeviceSelection,
    #[command(flatten)]
    pub cpu: CpuArgs,
    /// The scheduling policy: `slinfer` (token-level time slices between
    /// instances sharing a device, CPU-first placement, KV pools scaled
    /// ahead of need), `slinfer+p` (with the output-length look-ahead), or
    /// a baseline of the paper's experiment: `sllm` (each instance has its
    /// device to itself, a concurrency cap, keep-alive; GPUs only when the
    /// host has one), `sllm+c` (also the CPUs), `sllm+c+s` (two instances
    /// per device, each throttled to half its time).
    #[arg(long, env = "SLINFER_POLICY", default_value = "slinfer", value_parser = crate::cli::simulate::parse_policy)]
    pub policy: slinfer_scheduler::Policy,
    /// Idle seconds before an instance unloads (and frees its device for
    /// another model).
    #[arg(long, env = "SLINFER_KEEP_ALIVE_S", default_value_t = slinfer_inference::KEEP_ALIVE_S, value_parser = seconds)]
    pub keep_alive_s: f64,
    /// KV tokens a loaded CPU instance keeps while idle (its pool shrinks no
    /// lower): the ended requests' sequences that fit stay, so the next
    /// call of a conversation copies the last one's prompt and answer
    /// instead of computing them again. 0: an idle pool shrinks to nothing.
    #[arg(long, env = "SLINFER_IDLE_KV_TOKENS", default_value_t = slinfer_inference::IDLE_KV_TOKENS)]
    pub idle_kv_tokens: u64,
    /// A profile of this machine (`slinfer profile --out FILE`): the
    /// scheduler plans the models it covers with its measured tables (the
    /// costs `simulate --profile FILE` predicts with) instead of a
    /// calibration at each load.
    #[arg(long, env = "SLINFER_PROFILE")]
    pub profile: Option<std::path::PathBuf>,
    /// The profile's model that plans a model it does not name (copies and
    /// fine-tunes of one base model cost the same).
    #[arg(long, requires = "profile")]
    pub profile_model: Option<String>,
    /// Open HTTP connections at most; beyond it a new one is answered 503
    /// (default: the open-files limit, raised to its hard limit, less 512).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's header, and an idle keep-alive
    /// connection to start its next request, before it is closed.
    #[arg(long, default_value_t = crate::connections::HEADER_READ_TIMEOUT.as_millis() as u64)]
    pub header_timeout_ms: u64,
    /// Who may read /metrics, which names every function and model:
    /// `public` (a scraper needs no token) or `admin` (the admin token).
    #[arg(long, value_enum, default_value = "public")]
    pub metrics: crate::api::MetricsAccess,
    /// Memory the functions (Wasm memories, wasi:nn tensors) and the models
    /// on the CPU may hold together, such as `8GiB` (default: the host's
    /// available memory less 2 GiB, followed as it changes). Never more
    /// than the host has.
    #[arg(long, env = "SLINFER_MEMORY_BUDGET")]
    pub memory_budget: Option<bytesize::ByteSize>,
    /// Join the cluster whose NATS server (with JetStream) is at this URL,
    /// such as `nats://10.0.0.5:4222`. Every member needs the same admin
    /// token (`--admin-token-file`). Without it the server runs alone.
    #[arg(long, env = "SLINFER_CLUSTER")]
    pub cluster: Option<String>,
    /// This member's name in the cluster (default: the host name); unique
    /// among live members.
    #[arg(long, env = "SLINFER_NODE_NAME", requires = "cluster")]
    pub node_name: Option<String>,
    /// The base URL other members and clients reach this member at
    /// (default: `http://` and the address it listens on, or the host name
    /// when it listens on every interface).
    #[arg(long, env = "SLINFER_ADVERTISE", requires = "cluster")]
    pub advertise: Option<String>,
}

/// Which engine serves the CPU, and how (`serve`, `profile`).
#[derive(Args, Debug)]
pub struct CpuArgs {
    /// What the CPU engine computes in (OpenVINO's inference precision):
    /// `f32`, or `bf16`, which is OpenVINO's own default on CPUs with bf16
    /// instructions and faster only for long prompts (BENCHMARKS.md, "CPU
    /// decode speed").
    #[arg(long, env = "SLINFER_CPU_PRECISION", default_value_t = slinfer_openvino::Precision::default())]
    pub cpu_precision: slinfer_openvino::Precision,
    /// The CPU's LLM engine: `openvino`, `llama-cpp` (llama.cpp's prebuilt
    /// library, see --llama-cpp-dir), `paired` (each model on both:
    /// llama.cpp while an instance holds few sequences, OpenVINO from
    /// --paired-from; twice the memory), or `auto`: both measured at start
    /// on the first imported model, serving one to eight requests; the
    /// faster at one and at eight serves, the pair when each is faster at
    /// one (BENCHMARKS.md, "CPU decode speed"). `wasi:nn` tensors run on
    /// OpenVINO whatever this is.
    #[arg(long, env = "SLINFER_CPU_ENGINE", value_enum, default_value = "auto")]
    pub cpu_engine: crate::devices::CpuEngine,
    /// The folder of llama.cpp's `libllama.v0.5.0.so` (the npm package
    /// `@node-llama-cpp/linux-x64` 3.22.1, which `./dev` installs).
    #[arg(long, env = slinfer_llama_cpp::DIR_ENV)]
    pub llama_cpp_dir: Option<PathBuf>,
    /// Threads of each llama.cpp step (default: one per core). ggml's
    /// threads wait for each other by spinning, so on a host whose cores
    /// other work keeps busy, fewer threads than cores decode faster
    /// (BENCHMARKS.md: 108.7 against 21.7 tok/s with one of two cores busy).
    #[arg(long, env = "SLINFER_LLAMA_CPP_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub llama_cpp_threads: Option<u16>,
    /// Sequences from which an instance of the paired engines runs on its
    /// engine of many (OpenVINO; back on the other at one or none). By
    /// default `auto` and `paired` set it at start: the fewest (2 to 8)
    /// from which they measure that engine serving batches faster.
    #[arg(long, env = "SLINFER_PAIRED_FROM", value_parser = clap::value_parser!(u16).range(2..))]
    pub paired_from: Option<u16>,
}

impl From<CpuArgs> for crate::devices::CpuOptions {
    fn from(a: CpuArgs) -> Self {
        crate::devices::CpuOptions {
            engine: a.cpu_engine,
            precision: a.cpu_precision,
            llama_cpp_dir: a.llama_cpp_dir,
            llama_cpp_threads: a.llama_cpp_threads.map(usize::from),
            paired_from: a.paired_from.map(usize::from),
        }
    }
}

/// A duration in seconds: a finite number, not negative.
pub(crate) fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a number of seconds (0 or more)")),
    }
}

/// Where the server is and how to authenticate to it.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        env = "SLINFER_URL"
    )]
    pub server: String,
    /// Admin token (default: read from the data dir of a local server).
    #[arg(
        long,
        global = true,
        env = "SLINFER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Data directory of a local server, to find its admin token.
    #[arg(long, global = true, env = "SLINFER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The default data directory: `$XDG_DATA_HOME/slinfer` or its platform
/// equivalent.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("slinfer")
}

/// `serve --profile FILE [--profile-model NAME]`, read and checked.
fn plan_profile(
    path: Option<&std::path::Path>,
    default_model: Option<String>,
) -> anyhow::Result<Option<slinfer_inference::PlanProfile>> {
    let Some(path) = path else { return Ok(None) };
    let profile = slinfer_scheduler::Profile::load(path)?;
    if let Some(name) = &default_model {
        profile
            .model_type(name)
            .with_context(|| format!("--profile-model: {}", path.display()))?;
    }
    Ok(Some(slinfer_inference::PlanProfile {
        profile: std::sync::Arc::new(profile),
        default_model,
    }))
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt_with = |threads: Option<usize>| {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = threads {
            b.worker_threads(n.max(1));
        }
        b.enable_all().build()
    };
    let rt = || rt_with(None);
    match cli.command {
        Command::Serve(a) => {
            let data_dir = a.data_dir.unwrap_or_else(default_data_dir);
            rt_with(a.io_threads)?.block_on(serve(ServeOptions {
                listen: a.listen,
                models_dir: a.models_dir.unwrap_or_else(|| data_dir.join("models")),
                data_dir,
                admin_token_file: a.admin_token_file,
                venv: a.venv,
                devices: a.devices,
                cpu: a.cpu.into(),
                connections: crate::connections::ConnectionLimits {
                    max_connections: a
                        .max_connections
                        .unwrap_or_else(crate::connections::default_max_connections),
                    header_timeout: std::time::Duration::from_millis(a.header_timeout_ms),
                },
                metrics_access: a.metrics,
                memory_budget: a.memory_budget.map(|b| b.as_u64()),
                scheduling: slinfer_inference::Scheduling {
                    policy: a.policy,
                    keep_alive_s: a.keep_alive_s,
                    idle_kv_tokens: a.idle_kv_tokens,
                    profile: plan_profile(a.profile.as_deref(), a.profile_model)?,
                },
                cluster: a.cluster.map(|url| crate::cluster::ClusterOptions {
                    url,
                    node_name: a.node_name,
                    advertise: a.advertise,
                }),
                host: HostLimits {
                    total_instances: a.max_instances,
                    ..HostLimits::default()
                },
            }))
        }
        Command::Deploy { path, client } => rt()?.block_on(client::deploy(&client, &path)),
        Command::Functions { action, client } => rt()?.block_on(client::functions(&client, action)),
        Command::Models { action, client } => rt()?.block_on(client::models(&client, action)),
        Command::Status { client } => rt()?.block_on(client::status(&client)),
        Command::Cluster {
            action: ClusterAction::Status { json },
            client,
        } => rt()?.block_on(client::cluster_status(&client, json)),
        Command::Invoke(a) => rt()?.block_on(client::invoke(a)),
        Command::Simulate(a) => simulate::run(a),
        Command::Profile(a) => profile::run(a),
    }
}
