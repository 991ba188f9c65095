//! `slinfer profile`: measures this machine's CPU engine on one model
//! through the engine contract, as the live host runs it, and writes a
//! latency profile in the format of `slinfer-artifact-latency-ms.json`:
//! prefill by prompt tokens, decode by context and batch, plus the load,
//! unload and KV resize times that file lacks, what writing fresh pool
//! memory costs per GiB, this host's memory, and the
//! paper's SLOs scaled to this machine. `slinfer simulate --profile FILE
//! --model NAME --gpus 0 --cpus 1 --live-host` then predicts a live run
//! here.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use serde_json::{Value, json};
use slinfer_engine::{Backend, EngineError, LoadOptions, ModelSource, SeqId};
use slinfer_inference::{
    BLOCK_TOKENS, INSTANCE_OVERHEAD_BYTES, INSTANCE_SLOTS, MIN_INSTANCE_TOKENS, MemoryBudget,
    SLLM_EXCLUSIVE_CAP, sllm_cpu_kv_bytes,
};
use slinfer_scheduler::{CostModel, DeviceKind, Policy, Profile, SchedulerConfig};

use super::CpuArgs;
use crate::devices::{DeviceSelection, discover};
use crate::timing;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// Model packages (default: `<data dir>/models`).
    #[arg(long, env = "SLINFER_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// The model measured (a package in the models folder); the profile
    /// names it so.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// The project virtualenv (the `openvino` wheel).
    #[arg(long, env = "SLINFER_VENV")]
    pub venv: Option<PathBuf>,
    #[command(flatten)]
    pub cpu: CpuArgs,
    /// The CPU node's memory in the profile, as `serve --memory-budget`
    /// (default: what `serve` would give models now).
    #[arg(long, env = "SLINFER_MEMORY_BUDGET")]
    pub memory_budget: Option<bytesize::ByteSize>,
    /// The profile whose SLOs are scaled to this machine: TPOT by the
    /// ratio of one sequence's decode step, TTFT by that of a 512-token
    /// prefill, this machine's against the reference model's on the
    /// reference CPU.
    #[arg(
        long,
        default_value = "../shared/data/profiles/slinfer-artifact-latency-ms.json"
    )]
    pub reference: PathBuf,
    #[arg(long, default_value = "llama-2-7b")]
    pub reference_model: String,
    /// A small grid that runs in seconds (for tests), not the full one
    /// (about a minute).
    #[arg(long)]
    pub quick: bool,
    /// Where to write the profile (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(|| super::default_data_dir().join("models"));
    let package = models_dir.join(&args.model);
    anyhow::ensure!(
        package.join("model.toml").is_file(),
        "no model `{}` in {} (`slinfer models ls` lists a server's models)",
        args.model,
        models_dir.display()
    );
    let reference = Profile::load(&args.reference)?;
    let reference_type = reference.model_type(&args.reference_model)?;
    let memory = MemoryBudget::new(args.memory_budget.map(|b| b.as_u64()))
        .context("reading the host's memory")?;
    let found = discover(
        &"cpu"
            .parse::<DeviceSelection>()
            .map_err(anyhow::Error::msg)?,
        args.venv.as_deref(),
        &args.cpu.into(),
        &models_dir,
    )?;
    let device = found
        .devices
        .into_iter()
        .next()
        .context("no CPU engine could start")?;
    let backend = device.backend.as_ref();
    let opened = slinfer_engine::ModelPackage::open(&package)
        .map_err(|e| anyhow::anyhow!("model {}: {e}", package.display()))?;
    let footprint = backend.footprint(&opened)?;
    let context_tokens = opened.manifest.config.context_length_tokens;
    let grid = Grid::new(args.quick, context_tokens);
    eprintln!(
        "profiling {} on {} ({})",
        args.model,
        backend.name(),
        if args.quick {
            "quick grid"
        } else {
            "full grid"
        }
    );
    let started = Instant::now();
    let measured = measure(backend, &package, &grid)?;
    eprintln!("measured in {:.1} s", started.elapsed().as_secs_f64());

    let mut doc = document(
        &args.model,
        backend.name(),
        footprint,
        context_tokens as u64,
        memory.engine_capacity(),
        &measured,
    );
    // This machine's figures, interpolated as `simulate` will, against the
    // reference's (the SLOs, still the reference's, are replaced below).
    let paper = &reference.paper;
    doc["slo_in_paper"] = json!({
        "tpot_s": paper.tpot_slo_s,
        "scheduler_margin": paper.scheduler_margin,
        "ttft_cap_s": paper.ttft_cap_s,
    });
    let here = Profile::parse(&doc.to_string())?;
    let here_type = here.model_type(&args.model)?;
    let cpu = DeviceKind::Cpu;
    let decode_ratio =
        here.decode_s(here_type, cpu, 1024, 1) / reference.decode_s(reference_type, cpu, 1024, 1);
    let prefill_ratio =
        here.prefill_s(here_type, cpu, 512) / reference.prefill_s(reference_type, cpu, 512);
    let tpot_s = paper.tpot_slo_s * decode_ratio;
    let ttft_tokens_per_s = paper.ttft_tokens_per_s.unwrap_or(512.0) / prefill_ratio;
    let ttft_min_s = paper.ttft_min_s.unwrap_or(0.5) * prefill_ratio;
    doc["slo_in_paper"] = json!({
        "ttft_s": format!("max(input_tokens/{ttft_tokens_per_s:.0}, {ttft_min_s:.3}) + model load delay"),
        "ttft_tokens_per_s": ttft_tokens_per_s,
        "ttft_min_s": ttft_min_s,
        "tpot_s": tpot_s,
        "scheduler_margin": paper.scheduler_margin,
        "ttft_cap_s": paper.ttft_cap_s,
        "scaled_from": format!(
            "{} on {}'s cpu: this machine's 1-sequence decode step (context 1024) is {decode_ratio:.3}x, \
             its 512-token prefill {prefill_ratio:.3}x the reference's",
            args.reference_model,
            args.reference.display()
        ),
    });
    // What `simulate` reads back must be what was measured.
    Profile::parse(&doc.to_string()).context("the profile written does not parse")?;
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {}: TPOT SLO {:.0} ms, TTFT SLO max(input/{:.0} tok/s, {:.0} ms)",
        args.out.display(),
        tpot_s * 1e3,
        ttft_tokens_per_s,
        ttft_min_s * 1e3
    );
    Ok(())
}

/// The points measured.
struct Grid {
    prefill_tokens: Vec<usize>,
    /// Decode contexts (ascending) and batch sizes (ascending).
    contexts: Vec<usize>,
    batches: Vec<usize>,
    /// Decode steps timed per point.
    steps: usize,
    /// Repeats of each prefill, load and resize (their median is kept).
    repeats: usize,
    /// The pool each `kv_write_ms_per_gib` probe writes.
    write_probe_bytes: u64,
}

impl Grid {
    fn new(quick: bool, context_tokens: usize) -> Grid {
        let (prefill_tokens, contexts, batches, steps, repeats) = match quick {
            true => (vec![16, 64], vec![32, 96], vec![1, 2], 2, 1),
            false => (
                vec![16, 64, 128, 256, 512, 1024, 2048, 4096],
                vec![128, 512, 1024, 2048, 4096],
                vec![1, 2, 4, 8, 16],
                16,
                5,
            ),
        };
        // Room for the decode steps of every batch within the context.
        let room = batches.len() * (steps + 1) + 1;
        let fits = |n: &usize| n + room < context_tokens;
        Grid {
            prefill_tokens: prefill_tokens.into_iter().filter(fits).collect(),
            contexts: contexts.into_iter().filter(fits).collect(),
            batches,
            steps,
            repeats,
            write_probe_bytes: if quick { 16 << 20 } else { 256 << 20 },
        }
    }
}

/// Milliseconds, as the profile file keeps them.
struct Measured {
    prefill_ms: Vec<(usize, f64)>,
    decode_ms: Vec<(usize, Vec<(usize, f64)>)>,
    load_ms: f64,
    unload_ms: f64,
    kv_resize_ms: f64,
    kv_write_ms_per_gib: f64,
}

/// Times the package on `backend` as the live runner drives it: loads (the
/// weights and a first pool of the smallest size) and unloads, pool
/// resizes between that size and twice it, one prompt's
/// prefill at each size, and decode steps of distinct sequences (not forks:
/// an engine's attention may read every cached token of the batch) at each
/// context and batch size.
fn measure(backend: &dyn Backend, package: &Path, grid: &Grid) -> Result<Measured, EngineError> {
    let source = ModelSource::Package(package.to_path_buf());
    let chunk = slinfer_inference::prefill_chunk_tokens(backend.kind());
    let ms = |s: f64| s * 1e3;
    let (mut loads, mut unloads) = (Vec::new(), Vec::new());
    let mut first_pool = 0;
    for _ in 0..grid.repeats.max(2) {
        let t = Instant::now();
        let mut inst = backend.load(&source, 0, &LoadOptions::default())?;
        first_pool = (MIN_INSTANCE_TOKENS as usize).div_ceil(inst.block_size_tokens());
        inst.resize_kv(first_pool)?;
        loads.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        drop(inst);
        unloads.push(t.elapsed().as_secs_f64());
    }
    let mut inst = backend.load(&source, 0, &LoadOptions::default())?;
    let block = inst.block_size_tokens();
    let longest =
        grid.contexts.last().copied().unwrap_or(0) + grid.batches.len() * (grid.steps + 1);
    let most = grid.batches.last().copied().unwrap_or(1);
    let per_seq = longest.div_ceil(block) + 1;
    let pool = (most * per_seq).max(
        grid.prefill_tokens
            .last()
            .copied()
            .unwrap_or(0)
            .div_ceil(block)
            + 1,
    );
    // A resize as predictive scaling makes them: the smallest pool doubled
    // and back (their cost grows with the pool an engine copies).
    let mut resizes = Vec::new();
    for _ in 0..grid.repeats {
        for blocks in [2 * first_pool, first_pool] {
            let t = Instant::now();
            inst.resize_kv(blocks)?;
            resizes.push(t.elapsed().as_secs_f64());
        }
    }
    let kv_resize_s = timing::median(resizes);
    let kv_write_s_per_gib = write_s_per_gib(backend, &source, grid, first_pool, kv_resize_s)?;
    inst.resize_kv(pool)?;

    // One untimed one-token step first (first-call allocations, for an
    // engine that does not take them at load).
    let mut next_seq: SeqId = 0;
    inst.add_sequence(next_seq)?;
    timing::extend(inst.as_mut(), &[next_seq], 1, chunk)?;
    inst.free_sequence(next_seq)?;
    // Each timed prefill runs in the live runner's steps (chunks of at most
    // `chunk` tokens) and has a length no earlier step had, as a live
    // host's prompts seldom repeat one: OpenVINO's CPU plugin prepares its
    // kernels for every new input shape, ~12% of a 1,000-token prefill on
    // an Intel Xeon (2 cores) that a repeated length would not show.
    let mut prefill_ms = Vec::new();
    for &n in &grid.prefill_tokens {
        let mut times = Vec::new();
        for r in 0..grid.repeats {
            next_seq += 1;
            inst.add_sequence(next_seq)?;
            times.push(timing::extend(inst.as_mut(), &[next_seq], n + r, chunk)?);
            inst.free_sequence(next_seq)?;
        }
        prefill_ms.push((n, ms(timing::median(times))));
    }

    let seqs: Vec<SeqId> = (0..most as SeqId).map(|i| next_seq + 1 + i).collect();
    for &seq in &seqs {
        inst.add_sequence(seq)?;
    }
    let mut decode_ms = Vec::new();
    for &context in &grid.contexts {
        for &seq in &seqs {
            let len = inst.sequence_len(seq).unwrap_or(0);
            if context > len {
                timing::extend(inst.as_mut(), &[seq], context - len, chunk)?;
            }
        }
        let mut row = Vec::new();
        for &b in &grid.batches {
            let step_s = timing::decode_step_s(inst.as_mut(), &seqs[..b], grid.steps)?;
            row.push((b, ms(step_s)));
        }
        decode_ms.push((context, row));
    }
    Ok(Measured {
        prefill_ms,
        decode_ms,
        load_ms: ms(timing::median(loads)),
        unload_ms: ms(timing::median(unloads)),
        kv_resize_ms: ms(kv_resize_s),
        kv_write_ms_per_gib: ms(kv_write_s_per_gib),
    })
}

/// Seconds per GiB to write a KV pool into memory the process has not
/// touched lately, as a load after a quiet while does, beyond a small
/// resize's `kv_resize_s`. Each probe grows a fresh instance's pool to
/// `grid.write_probe_bytes` while the earlier probes' instances are still
/// held, so no probe reuses memory another just freed. On a virtual
/// machine whose host takes freed memory back, that first touch costs
/// several times a write into memory just freed (on the AMD EPYC machines
/// here ~2.8 s per GiB against ~0.4).
fn write_s_per_gib(
    backend: &dyn Backend,
    source: &ModelSource,
    grid: &Grid,
    first_pool: usize,
    kv_resize_s: f64,
) -> Result<f64, EngineError> {
    let mut held = Vec::new();
    let mut per_gib = Vec::new();
    for _ in 0..grid.repeats.max(2) {
        let mut inst = backend.load(source, 0, &LoadOptions::default())?;
        inst.resize_kv(first_pool)?;
        let blocks = (grid.write_probe_bytes / inst.kv_bytes_per_block().max(1)) as usize;
        let blocks = blocks.max(2 * first_pool);
        let t = Instant::now();
        inst.resize_kv(blocks)?;
        let s = (t.elapsed().as_secs_f64() - kv_resize_s).max(0.0);
        per_gib.push(s * GIB / (blocks as u64 * inst.kv_bytes_per_block()) as f64);
        held.push(inst);
    }
    Ok(timing::median(per_gib))
}

/// The profile file, in the artifact's format, for one model on this CPU.
fn document(
    model: &str,
    engine: &str,
    footprint: slinfer_engine::Footprint,
    context_tokens: u64,
    memory_bytes: u64,
    m: &Measured,
) -> Value {
    let paper = SchedulerConfig::paper(Policy::Slinfer);
    let (cpu, gpu) = (DeviceKind::Cpu, DeviceKind::Gpu);
    let pairs = |xs: &[(usize, f64)]| xs.iter().map(|&(x, y)| json!([x, y])).collect::<Vec<_>>();
    let machine = machine();
    json!({
        "source": format!(
            "Measured by `slinfer profile` on {} ({} cores), engine {engine}, {}",
            machine["cpu"].as_str().unwrap_or("?"),
            machine["cores"],
            machine["date"].as_str().unwrap_or("?"),
        ),
        "units": {
            "latency": "ms per iteration",
            "prefill key": "input tokens",
            "decode key": "context length, then batch size",
            "load_ms, unload_ms, kv_resize_ms": "ms: an instance's load (weights and its first KV pool), unload, one KV pool resize",
            "kv_write_ms_per_gib": "ms per GiB of KV pool a load or resize writes into memory not touched lately, beyond load_ms and kv_resize_ms"
        },
        "interpolation": "piecewise linear; beyond the last point scale proportionally (y_last * x / x_last)",
        "machine": machine,
        "safety_factors_used_by_artifact_scheduler": {
            "gpu": paper.safety[gpu],
            "cpu": paper.safety[cpu]
        },
        "models": {
            model: {
                "weights_gb": footprint.weights_bytes as f64 / GIB,
                "kv_kb_per_token": footprint.kv_bytes_per_token as f64 / 1024.0,
                "block_tokens": {"cpu": BLOCK_TOKENS[cpu], "gpu": BLOCK_TOKENS[gpu]},
                "cpu_kv_gb": sllm_cpu_kv_bytes(context_tokens, footprint.kv_bytes_per_token) as f64 / GIB
            }
        },
        "cluster_in_paper": {
            "gpu_nodes": 0,
            "gpu_node_memory_gb": 0,
            "cpu_nodes": 1,
            "cpu_node_memory_gb": memory_bytes as f64 / GIB,
            "instance_slots_per_gpu": {model: INSTANCE_SLOTS[gpu]},
            "instance_slots_per_cpu": {model: INSTANCE_SLOTS[cpu]},
            "per_instance_overhead_gb": INSTANCE_OVERHEAD_BYTES as f64 / GIB
        },
        "latency": {
            model: {
                "cpu": {
                    "cpu": {
                        "prefill_ms_by_input_tokens": pairs(&m.prefill_ms),
                        "decode_ms_by_context_then_batch": m.decode_ms.iter()
                            .map(|(c, row)| json!([c, pairs(row)]))
                            .collect::<Vec<_>>(),
                        "exclusive_concurrency_cap": SLLM_EXCLUSIVE_CAP[cpu],
                        "half_share_concurrency_cap": SLLM_EXCLUSIVE_CAP[cpu] / 2,
                        "load_ms": m.load_ms,
                        "unload_ms": m.unload_ms,
                        "kv_resize_ms": m.kv_resize_ms,
                        "kv_write_ms_per_gib": m.kv_write_ms_per_gib
                    }
                }
            }
        }
    })
}

/// The CPU's model name, its cores and the date, for the record.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!({
        "cpu": cpu,
        "cores": cores,
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    })
}
