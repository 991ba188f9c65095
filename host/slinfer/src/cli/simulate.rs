//! `slinfer simulate`: replays a trace through a scheduling policy on a
//! virtual clock with profiled costs. A thin mapping of flags onto
//! `slinfer_scheduler`; the simulation, sweep, capacity and figures live
//! there.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use slinfer_scheduler::{
    ClusterSim, DeviceKind, Policy, Profile, SimSetup, load_trace, simulate, svg, sweep, trace,
};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub(crate) fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
        format!("unknown policy `{s}` (known: {})", names.join(", "))
    })
}

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Trace in the format of azure-functions-128fn-30min.json.
    #[arg(
        long,
        default_value = "../shared/data/traces/azure-functions-128fn-30min.json"
    )]
    pub trace: PathBuf,
    /// Latency profile in the format of slinfer-artifact-latency-ms.json.
    #[arg(
        long,
        default_value = "../shared/data/profiles/slinfer-artifact-latency-ms.json"
    )]
    pub profile: PathBuf,
    /// Model type every served model has (a key of the profile's `models`).
    #[arg(long, default_value = "llama-2-7b")]
    pub model: String,
    /// Serve the first K functions of each group of 8 (K=2,4,8: 32,64,128 models).
    #[arg(long, default_value_t = 8)]
    pub models_per_group: usize,
    /// Serve these trace functions (indices, such as `0,8,16,24`), one
    /// model each, instead of --models-per-group.
    #[arg(long, value_delimiter = ',', conflicts_with = "sweep")]
    pub functions: Vec<usize>,
    /// Start this many seconds into the trace.
    #[arg(long, default_value_t = 0.0, value_parser = super::seconds)]
    pub start_s: f64,
    /// Replay arrivals this many times faster (2: twice the load).
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    pub time_scale: f64,
    /// Write the requests replayed (after --functions, --start-s,
    /// --time-scale, --duration-s, --jitter-s) and the SLOs to this JSON
    /// file, for `scripts/replay.py` to send to a live server.
    #[arg(long, conflicts_with = "sweep")]
    pub requests_out: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub gpus: usize,
    #[arg(long, default_value_t = 0)]
    pub cpus: usize,
    /// sllm, sllm+c, sllm+c+s, slinfer, or slinfer+p (predictive look-ahead).
    #[arg(long, default_value = "slinfer", value_parser = parse_policy)]
    pub policy: Policy,
    /// Replay only arrivals before this many seconds.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Shift each arrival by a uniform offset up to ± this many seconds
    /// (seeded by --seed), to see how much a result owes to exact timing.
    #[arg(long, default_value_t = 0.0)]
    pub jitter_s: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// TTFT SLO: max(input_tokens / this, --ttft-min-s) plus load delay
    /// (default: the profile's, else 512 and 0.5 s, the paper's).
    #[arg(long)]
    pub ttft_tokens_per_s: Option<f64>,
    #[arg(long)]
    pub ttft_min_s: Option<f64>,
    /// TPOT SLO (default: the profile's, 0.25 s in the paper's).
    #[arg(long)]
    pub tpot_s: Option<f64>,
    /// Fixed KV look-ahead per request.
    #[arg(long, default_value_t = 512)]
    pub lookahead_tokens: u64,
    #[arg(long, default_value_t = 0.25)]
    pub kv_watermark: f64,
    /// Idle seconds before a GPU instance unloads (default: 1, the paper's;
    /// with --live-host, the live host's).
    #[arg(long, value_parser = super::seconds)]
    pub keep_alive_gpu_s: Option<f64>,
    /// Idle seconds before a CPU instance unloads (default: 0, the paper's:
    /// at once; with --live-host, the live host's).
    #[arg(long, value_parser = super::seconds)]
    pub keep_alive_cpu_s: Option<f64>,
    /// Schedule with the live host's settings (`serve`'s: KV pools that
    /// scale on CPUs too, early refusal, the load counted in the TTFT SLO,
    /// its instance overhead and keep-alive) instead of the paper's: to
    /// predict a live run, with a profile of its machine (`slinfer
    /// profile`). The flags below still apply on top.
    #[arg(long)]
    pub live_host: bool,
    /// Weights load bandwidth onto a GPU, GiB/s (cold start = weights / this).
    #[arg(long, default_value_t = 8.0)]
    pub gpu_load_gib_per_s: f64,
    /// Weights load bandwidth onto a CPU node, GiB/s (default: weights stay
    /// resident, no CPU cold start, as in the paper's artifact).
    #[arg(long)]
    pub cpu_load_gib_per_s: Option<f64>,
    /// Iterations per grant in GPU decode (default: 4 for 3B, 2 for 7B/8B,
    /// 1 for 13B; prefill and CPU grants are always 1).
    #[arg(long)]
    pub gpu_decode_quota: Option<u32>,
    /// slinfer+p: quantile of a function's past output lengths to reserve KV for.
    #[arg(long, default_value_t = 0.9)]
    pub predict_quantile: f64,
    /// slinfer+p: completions needed before predicting.
    #[arg(long, default_value_t = 20)]
    pub predict_min_history: usize,
    /// Preempted requests keep their KV (swapped to host memory and back)
    /// instead of recomputing it.
    #[arg(long)]
    pub preempt_keeps_kv: bool,
    /// Refuse a waiting request as soon as its model's recent completion
    /// rate says it would miss its deadline (the live host's setting).
    #[arg(long)]
    pub refuse_early: bool,
    /// The TTFT SLO counts a cold start's load (the live host's setting):
    /// the scheduler plans with it, and a request met its SLO only if its
    /// TTFT, load included, is within it.
    #[arg(long)]
    pub ttft_counts_load: bool,
    /// Simulate a cluster of one member per device, each with its own
    /// scheduler, routed on state published every --publish-ms, one
    /// --hop-ms network hop per try (the default: one machine, one
    /// scheduler).
    #[arg(long)]
    pub cluster: bool,
    #[arg(long, default_value_t = ClusterSim::default().publish_every_s * 1e3, requires = "cluster")]
    pub publish_ms: f64,
    #[arg(long, default_value_t = ClusterSim::default().hop_s * 1e3, requires = "cluster")]
    pub hop_ms: f64,
    /// Run every policy (or --policies) at every K (or --ks).
    #[arg(long)]
    pub sweep: bool,
    /// Policies for --sweep (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_policy)]
    pub policies: Vec<Policy>,
    /// Loads for --sweep, as models per group (default: 1..=8).
    #[arg(long, value_delimiter = ',')]
    pub ks: Vec<usize>,
    /// Capacity: most models served with SLO attainment at least this.
    #[arg(long, default_value_t = 0.9)]
    pub capacity_threshold: f64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// With --json: every request's record too (`per_request`, the fields
    /// `scripts/replay.py --per-request` writes), to compare a live run
    /// with its prediction request by request.
    #[arg(long, requires = "json", conflicts_with = "sweep")]
    pub per_request: bool,
    /// Write SVG figures into this directory.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write one self-contained HTML page (settings, summary table,
    /// figures) to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let mut profile = Profile::load(&args.profile)?;
    profile.load_bytes_per_s[DeviceKind::Gpu] = Some(args.gpu_load_gib_per_s * GIB);
    profile.load_bytes_per_s[DeviceKind::Cpu] = args.cpu_load_gib_per_s.map(|g| g * GIB);
    if let Some(q) = args.gpu_decode_quota {
        for m in &mut profile.models {
            m.gpu_decode_quota = q.max(1);
        }
    }
    let fns = load_trace(&args.trace)?;
    let model_type = profile.model_type(&args.model)?;
    let mut setup = SimSetup::paper(&profile, args.policy, model_type, args.gpus, args.cpus);
    let slo = &mut setup.slo;
    slo.ttft_tokens_per_s = args.ttft_tokens_per_s.unwrap_or(slo.ttft_tokens_per_s);
    slo.ttft_min_s = args.ttft_min_s.unwrap_or(slo.ttft_min_s);
    slo.tpot_s = args.tpot_s.unwrap_or(slo.tpot_s);
    if args.live_host {
        setup.scheduler =
            slinfer_inference::live_scheduler_config(&slinfer_inference::Scheduling {
                policy: args.policy,
                ..Default::default()
            });
    }
    let sc = &mut setup.scheduler;
    sc.lookahead_tokens = args.lookahead_tokens;
    sc.kv_watermark = args.kv_watermark;
    let keep_alive = &mut sc.keep_alive_s;
    keep_alive[DeviceKind::Gpu] = args.keep_alive_gpu_s.unwrap_or(keep_alive[DeviceKind::Gpu]);
    keep_alive[DeviceKind::Cpu] = args.keep_alive_cpu_s.unwrap_or(keep_alive[DeviceKind::Cpu]);
    sc.ttft_counts_load |= args.ttft_counts_load;
    sc.predictor.quantile = args.predict_quantile;
    sc.predictor.min_history = args.predict_min_history;
    sc.preempt_keeps_kv = args.preempt_keeps_kv;
    sc.refuse_early |= args.refuse_early;
    if args.cluster {
        anyhow::ensure!(
            args.publish_ms > 0.0 && args.hop_ms >= 0.0,
            "--publish-ms must be > 0 and --hop-ms >= 0"
        );
        setup.cluster = Some(ClusterSim {
            publish_every_s: args.publish_ms / 1e3,
            hop_s: args.hop_ms / 1e3,
        });
    }
    let replay = sweep::Replay {
        duration_s: args.duration_s.unwrap_or(f64::INFINITY),
        jitter_s: args.jitter_s,
        seed: args.seed,
        functions: (!args.functions.is_empty()).then(|| args.functions.clone()),
        start_s: args.start_s,
        time_scale: args.time_scale,
    };

    // A page that cannot be written is refused now, not after a run that
    // can take minutes. Opening to append leaves an existing file as it is.
    let writing = |file: &Path| format!("writing {}", file.display());
    if let Some(file) = &args.html {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(file)
            .with_context(|| writing(file))?;
    }
    let plan = args.sweep.then(|| Plan {
        policies: if args.policies.is_empty() {
            Policy::ALL.to_vec()
        } else {
            args.policies.clone()
        },
        ks: if args.ks.is_empty() {
            (1..=trace::GROUP_SIZE).collect()
        } else {
            args.ks.clone()
        },
    });

    let mut capacity = None;
    let results = if let Some(Plan { policies, ks }) = &plan {
        let started = Instant::now();
        let results = sweep::sweep(
            &profile,
            &setup,
            &fns,
            policies,
            ks,
            &replay,
            |done, total, s| {
                eprintln!(
                    "[{done}/{total}] {} at {} models: {} of {} requests met SLO ({:.1}%), {:.1} s elapsed",
                    s.policy.name(),
                    s.models,
                    s.slo_met,
                    s.requests,
                    100.0 * s.slo_attainment,
                    started.elapsed().as_secs_f64()
                );
            },
        )?;
        let report = sweep::report(&results, args.capacity_threshold);
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", sweep::render_table(&report.runs));
            println!(
                "capacity (models at SLO attainment >= {}):",
                report.capacity_threshold
            );
            for (policy, models) in &report.capacity {
                println!("  {policy:<10} {models}");
            }
        }
        capacity = Some(report.capacity.clone());
        results
    } else {
        let reqs = replay.requests(&fns, args.models_per_group)?;
        let models = replay.models(&fns, args.models_per_group);
        if let Some(file) = &args.requests_out {
            let out = RequestsFile {
                policy: setup.scheduler.policy,
                model: &profile.models[model_type.0 as usize].name,
                models,
                slo: &setup.slo,
                requests: &reqs,
            };
            std::fs::write(file, serde_json::to_vec(&out)?).with_context(|| writing(file))?;
            eprintln!("wrote {} requests to {}", reqs.len(), file.display());
        }
        let started = Instant::now();
        let result = simulate(&profile, &setup, &reqs, models);
        eprintln!("simulated in {:.2} s", started.elapsed().as_secs_f64());
        if args.per_request {
            let out = WithRequests {
                summary: &result.summary,
                per_request: &result.per_request,
            };
            println!("{}", serde_json::to_string(&out)?);
        } else if args.json {
            println!("{}", serde_json::to_string(&result.summary)?);
        } else {
            print!(
                "{}",
                sweep::render_table(std::slice::from_ref(&result.summary))
            );
        }
        vec![result]
    };
    if let Some(file) = &args.html {
        let page = slinfer_scheduler::report::html(
            &settings(&args, plan.as_ref()),
            &results,
            capacity.as_ref().map(|c| (args.capacity_threshold, c)),
        );
        std::fs::write(file, page).with_context(|| writing(file))?;
        eprintln!("wrote {}", file.display());
    }
    if let Some(dir) = &args.svg {
        let files = svg::write_figures(dir, &results)
            .with_context(|| format!("writing figures to {}", dir.display()))?;
        for f in files {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

/// `--requests-out`: what `scripts/replay.py` sends to a live server.
#[derive(serde::Serialize)]
struct RequestsFile<'a> {
    policy: Policy,
    model: &'a str,
    models: usize,
    slo: &'a slinfer_scheduler::Slo,
    requests: &'a [trace::TraceRequest],
}

/// `--json --per-request`: the summary's fields and every request's record.
#[derive(serde::Serialize)]
struct WithRequests<'a> {
    #[serde(flatten)]
    summary: &'a slinfer_scheduler::Summary,
    per_request: &'a [slinfer_scheduler::RequestRecord],
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a number greater than 0")),
    }
}

/// The runs of a `--sweep`: every policy at every load.
struct Plan {
    policies: Vec<Policy>,
    /// Loads, as models per group.
    ks: Vec<usize>,
}

/// What the HTML report lists as the run's settings.
fn settings(args: &SimulateArgs, plan: Option<&Plan>) -> Vec<(&'static str, String)> {
    let list = |items: Vec<String>| items.join(", ");
    let mut s = vec![
        ("trace", args.trace.display().to_string()),
        ("profile", args.profile.display().to_string()),
        ("model", args.model.clone()),
        ("gpus", args.gpus.to_string()),
        ("cpus", args.cpus.to_string()),
    ];
    match plan {
        Some(plan) => {
            s.push((
                "policies",
                list(plan.policies.iter().map(|p| p.name().to_string()).collect()),
            ));
            s.push((
                "models per group",
                list(plan.ks.iter().map(|k| k.to_string()).collect()),
            ));
        }
        None => {
            s.push(("policy", args.policy.name().to_string()));
            s.push(("models per group", args.models_per_group.to_string()));
        }
    }
    s.push(("seed", args.seed.to_string()));
    if let Some(d) = args.duration_s {
        s.push(("duration (s)", d.to_string()));
    }
    if args.jitter_s > 0.0 {
        s.push(("jitter (s)", args.jitter_s.to_string()));
    }
    if args.cluster {
        s.push((
            "cluster",
            format!(
                "publish every {} ms, hop {} ms",
                args.publish_ms, args.hop_ms
            ),
        ));
    }
    s.push((
        "date",
        humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    ));
    // Lossy: a path that is not UTF-8 must not stop the report.
    let command: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    s.push(("command", command.join(" ")));
    s
}
