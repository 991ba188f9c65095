//! Device discovery: which engines this host has and which devices it
//! serves on (`serve --devices`). The one place that names the engine
//! crates; everything else receives them as `slinfer_inference::Device`s
//! and a `TensorBackend`.
//!
//! - `cpu`: the OpenVINO CPU engine, when `libopenvino_c` loads (from the
//!   `openvino` wheel in the virtualenv), or the llama.cpp engine (its
//!   prebuilt library from npm), or the two paired (llama.cpp while an
//!   instance holds few sequences, OpenVINO from then on), as
//!   `--cpu-engine` says. `auto` and `paired` time both engines on the
//!   first imported model at start (decode at one to eight sequences,
//!   prefill included): `auto` serves with the faster, or the pair when
//!   each is faster at one end ([`CpuEngine`]); a pair moves to its engine
//!   of many at the fewest sequences from which that one measured faster
//!   ([`switch_point`]), or at `--paired-from`. What it may hold is set by
//!   the host memory budget (`slinfer_inference::MemoryBudget`), which it
//!   shares with the functions.
//! - `cuda:N`: each GPU the CUDA engine finds (driver, cuBLAS and NVRTC
//!   present); its capacity is its free memory at start less a margin.
//!
//! The default (`all`) takes whatever is found: a missing CUDA library is
//! one log line. Naming a device that is not there is an error at start.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::bail;
use slinfer_engine::package::{PackageKind, package_dirs};
use slinfer_engine::paired::{EngineCosts, PairedBackend};
use slinfer_engine::tensor::TensorBackend;
use slinfer_engine::{Backend, EngineError, LoadOptions, ModelSource};
use slinfer_inference::{Device, gpu_capacity_bytes};

use crate::timing;

/// One device `--devices` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

/// What `--devices` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelection {
    /// Every device found (the default).
    All,
    /// None: the host serves functions but no models.
    None,
    Only(Vec<DeviceName>),
}

impl FromStr for DeviceSelection {
    type Err = String;

    /// `all`, `none`, or a comma-separated list of `cpu` and `cuda:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => return Ok(DeviceSelection::All),
            "none" => return Ok(DeviceSelection::None),
            _ => {}
        }
        let mut names = Vec::new();
        for part in s.split(',').map(str::trim) {
            let name = match part {
                "cpu" => DeviceName::Cpu,
                _ => match part.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(n)) => DeviceName::Cuda(n),
                    _ => {
                        return Err(format!(
                            "unknown device {part:?}: use all, none, or a list of cpu and cuda:N"
                        ));
                    }
                },
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(DeviceSelection::Only(names))
    }
}

impl DeviceSelection {
    fn wants_cpu(&self) -> Option<bool> {
        match self {
            DeviceSelection::All => Some(false),
            DeviceSelection::None => None,
            DeviceSelection::Only(v) => v.contains(&DeviceName::Cpu).then_some(true),
        }
    }

    /// CUDA ordinals named explicitly; `Some(vec![])` for all found.
    fn wanted_gpus(&self) -> Option<Vec<usize>> {
        match self {
            DeviceSelection::All => Some(Vec::new()),
            DeviceSelection::None => None,
            DeviceSelection::Only(v) => {
                let n: Vec<usize> = v
                    .iter()
                    .filter_map(|d| match d {
                        DeviceName::Cuda(n) => Some(*n),
                        DeviceName::Cpu => None,
                    })
                    .collect();
                (!n.is_empty()).then_some(n)
            }
        }
    }
}

/// Which engine serves the CPU device (`serve --cpu-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuEngine {
    /// Both measured at start on the first imported model; the faster
    /// serves, or the pair when each is faster at one batch size.
    Auto,
    Openvino,
    LlamaCpp,
    /// Both, each model loaded on each: llama.cpp while an instance holds
    /// fewer than [`CpuOptions::paired_from`] sequences, OpenVINO from then
    /// on ([`slinfer_engine::paired`]).
    Paired,
}

impl CpuEngine {
    /// As `--cpu-engine` spells it.
    fn name(self) -> &'static str {
        match self {
            CpuEngine::Auto => "auto",
            CpuEngine::Openvino => "openvino",
            CpuEngine::LlamaCpp => "llama-cpp",
            CpuEngine::Paired => "paired",
        }
    }
}

/// How the CPU device is set up.
#[derive(Debug, Clone)]
pub struct CpuOptions {
    pub engine: CpuEngine,
    /// What OpenVINO computes in.
    pub precision: slinfer_openvino::Precision,
    /// The folder of llama.cpp's library (default `$SLINFER_LLAMA_CPP_DIR`).
    pub llama_cpp_dir: Option<PathBuf>,
    /// Threads of a llama.cpp step (default: one per core).
    pub llama_cpp_threads: Option<usize>,
    /// Sequences from which a paired instance runs on its engine of many;
    /// by default where the engines' measurement at start puts it
    /// ([`switch_point`]).
    pub paired_from: Option<usize>,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            engine: CpuEngine::Auto,
            precision: Default::default(),
            llama_cpp_dir: None,
            llama_cpp_threads: None,
            paired_from: None,
        }
    }
}

/// Prompt tokens and decode steps of the start-up measurement. 160 tokens
/// of context is a chat answer half-way (a ~45-token templated question,
/// ~115 tokens of answer): the engines' attention costs part there, where
/// 64 tokens measured a tie at eight sequences on the Intel Xeon that
/// the whole path at eight streams does not show (BENCHMARKS.md).
const MEASURE_PROMPT: usize = 160;
const MEASURE_STEPS: usize = 16;
/// The largest batch measured: `auto` compares the engines there.
const MEASURE_BATCH: usize = 8;
/// Tokens of answer per request in the batched figure: a chat answer (the
/// benchmark's 128; the traces' mean is ~220 after ~870 tokens of prompt,
/// which would weigh prefill more still), what a pair weighs a lone
/// sequence's engine by as well.
const MEASURE_ANSWER: usize = slinfer_engine::paired::LONE_ANSWER_STEPS;
/// Sequences from which a paired instance runs on its engine of many when
/// no `--paired-from` is given and the engines could not be measured: the
/// largest batch measured.
const PAIRED_FROM: usize = MEASURE_BATCH;

/// What `auto` and `paired` measure of one engine on one model.
#[derive(Debug, Clone, Copy)]
struct Speed {
    /// Seconds of a decode step of `k` sequences of about
    /// [`MEASURE_PROMPT`] tokens each, at index `k - 1`.
    step_s: [f64; MEASURE_BATCH],
    /// Prompt tok/s of the prefill of a prompt of [`MEASURE_PROMPT`]
    /// tokens. Prefill counts: on an AVX2-only AMD EPYC, llama.cpp
    /// decoded eight sequences as fast as OpenVINO but prefilled them 2-3x
    /// slower, and served eight streams at 0.65x OpenVINO (BENCHMARKS.md).
    prefill: f64,
}

impl Speed {
    /// Decode tok/s of one sequence: what keeps a model within its TPOT
    /// when it has one request, the usual case of a serverless model.
    fn one(&self) -> f64 {
        1.0 / self.step_s[0]
    }

    /// Tok/s of `k` requests (1 to [`MEASURE_BATCH`]) served together
    /// ([`served_tok_s`]): their prompts prefilled at the measured rate,
    /// then [`MEASURE_ANSWER`] decode steps of them all.
    fn served(&self, k: usize) -> f64 {
        let prefill_s = (k * MEASURE_PROMPT) as f64 / self.prefill;
        served_tok_s(k, MEASURE_ANSWER, prefill_s, self.step_s[k - 1])
    }

    /// What a pair weighs to place a lone sequence on this engine.
    fn costs(&self) -> EngineCosts {
        EngineCosts {
            prompt_token_s: 1.0 / self.prefill,
            step_s: self.step_s[0],
        }
    }

    /// [`Self::served`] at [`MEASURE_BATCH`]: how a busy model fares.
    fn batched(&self) -> f64 {
        self.served(MEASURE_BATCH)
    }

    /// Which is better when neither engine is faster at both: single-stream
    /// speed decides how many models a CPU keeps within their TPOT, batched
    /// speed how a busy one fares; the geometric mean weighs the two alike.
    fn score(&self) -> f64 {
        (self.one() * self.batched()).sqrt()
    }
}

/// Tok/s of `requests` served together: a prefill of their prompts taking
/// `prefill_s`, then `answer` decode steps of `step_s` each.
fn served_tok_s(requests: usize, answer: usize, prefill_s: f64, step_s: f64) -> f64 {
    (requests * answer) as f64 / (prefill_s + answer as f64 * step_s)
}

/// Sequences from which a pair runs on its engine of `many`: the fewest
/// from which `many` serves every batch up to [`MEASURE_BATCH`] at least
/// as fast as `few` ([`Speed::served`]); [`MEASURE_BATCH`] when it is
/// faster only there (or not even there).
fn switch_point(few: &Speed, many: &Speed) -> usize {
    (2..=MEASURE_BATCH)
        .rev()
        .take_while(|&k| many.served(k) >= few.served(k))
        .last()
        .unwrap_or(MEASURE_BATCH)
}

/// Loads the package on `backend` and times it at each batch size from
/// one to [`MEASURE_BATCH`]: a sequence joins with a prompt of
/// [`MEASURE_PROMPT`] tokens (timed), then [`MEASURE_STEPS`] decode steps
/// of all held. Sequences only join, as a burst's do, so that the KV of
/// those held lies together (llama.cpp attends over the span of its
/// context that holds sequences, freed cells within it too). A noisy
/// batch can only move a pair's switch up, toward [`MEASURE_BATCH`]
/// ([`switch_point`] wants every larger batch faster).
fn measure(backend: &dyn Backend, package: &Path) -> Result<Speed, EngineError> {
    let mut inst = backend.load(
        &ModelSource::Package(package.to_path_buf()),
        0,
        &LoadOptions::default(),
    )?;
    let chunk = slinfer_inference::prefill_chunk_tokens(backend.kind());
    // A prompt, and a token for every step of every batch (each batch has
    // an untimed first step).
    let per_seq = MEASURE_PROMPT + (MEASURE_STEPS + 1) * MEASURE_BATCH;
    inst.resize_kv(per_seq.div_ceil(inst.block_size_tokens()) * MEASURE_BATCH)?;
    let ids: Vec<u64> = (0..MEASURE_BATCH as u64).collect();
    let mut prefill_s = 0.0;
    let mut step_s = [0.0; MEASURE_BATCH];
    for k in 1..=MEASURE_BATCH {
        inst.add_sequence(ids[k - 1])?;
        prefill_s += timing::extend(inst.as_mut(), &ids[k - 1..k], MEASURE_PROMPT, chunk)?;
        step_s[k - 1] = timing::decode_step_s(inst.as_mut(), &ids[..k], MEASURE_STEPS)?;
    }
    Ok(Speed {
        step_s,
        prefill: (MEASURE_BATCH * MEASURE_PROMPT) as f64 / prefill_s,
    })
}

/// What `auto` serves with, from the two engines' speeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    Openvino,
    LlamaCpp,
    /// Both: `llama_cpp_few` says whether llama.cpp is the engine of few
    /// sequences (faster at one), OpenVINO the engine of many.
    Paired {
        llama_cpp_few: bool,
    },
}

/// The engine faster at both one sequence and a batch; the two paired
/// when each is faster at one of them (the one faster at one sequence
/// serves few); the better [`Speed::score`] on a tie.
fn pick(openvino: &Speed, llama: &Speed) -> Pick {
    let one = llama.one() > openvino.one();
    if one != (llama.batched() > openvino.batched()) {
        Pick::Paired { llama_cpp_few: one }
    } else if llama.score() > openvino.score() {
        Pick::LlamaCpp
    } else {
        Pick::Openvino
    }
}

/// Both engines' [`Speed`]s on the first imported model that both can
/// load, or why there are none.
fn measure_both(
    openvino: &slinfer_openvino::OpenVinoBackend,
    llama: &slinfer_llama_cpp::LlamaCppBackend,
    models_dir: &Path,
) -> Result<(PathBuf, Speed, Speed), String> {
    let packages = package_dirs(models_dir, PackageKind::Llm).unwrap_or_default();
    let package = packages
        .iter()
        .find(|dir| {
            slinfer_engine::ModelPackage::open(dir)
                .is_ok_and(|p| openvino.footprint(&p).is_ok() && llama.footprint(&p).is_ok())
        })
        .ok_or_else(|| {
            format!(
                "no imported model in {} to measure the engines on",
                models_dir.display()
            )
        })?;
    let failed = |e: EngineError| format!("measuring the engines failed: {e}");
    let o = measure(openvino, package).map_err(failed)?;
    let l = measure(llama, package).map_err(failed)?;
    Ok((package.clone(), o, l))
}

/// A [`Speed`]'s served tok/s at each batch size from one (logged).
fn served_figures(s: &Speed) -> String {
    let each = (1..=MEASURE_BATCH).map(|k| format!("{:.1}", s.served(k)));
    each.collect::<Vec<_>>().join(" ")
}

/// `auto`: [`pick`] on the first imported model that both engines can
/// load; OpenVINO when there is no such model or a measurement fails. A
/// pair switches at `paired_from`, or where [`switch_point`] says.
fn choose(
    openvino: slinfer_openvino::OpenVinoBackend,
    llama: slinfer_llama_cpp::LlamaCppBackend,
    models_dir: &Path,
    paired_from: Option<usize>,
) -> Arc<dyn Backend> {
    let (package, o, l) = match measure_both(&openvino, &llama, models_dir) {
        Ok(measured) => measured,
        Err(why) => {
            tracing::info!("CPU engine: OpenVINO ({why})");
            return Arc::new(openvino);
        }
    };
    let (chosen, switch): (Arc<dyn Backend>, Option<usize>) = match pick(&o, &l) {
        Pick::Openvino => (Arc::new(openvino), None),
        Pick::LlamaCpp => (Arc::new(llama), None),
        Pick::Paired { llama_cpp_few } => {
            let (ov, ll): (Arc<dyn Backend>, Arc<dyn Backend>) =
                (Arc::new(openvino), Arc::new(llama));
            let ((few, few_speed), (many, many_speed)) = if llama_cpp_few {
                ((ll, &l), (ov, &o))
            } else {
                ((ov, &o), (ll, &l))
            };
            let from = paired_from.unwrap_or_else(|| switch_point(few_speed, many_speed));
            let pair = PairedBackend::new(few, many, from)
                .expect("two CPU engines")
                .with_costs(few_speed.costs(), many_speed.costs());
            (Arc::new(pair), Some(from))
        }
    };
    tracing::info!(
        model = %package.display(),
        openvino_one = format!("{:.1}", o.one()),
        openvino_batched = format!("{:.1}", o.batched()),
        openvino_prefill = format!("{:.1}", o.prefill),
        openvino_served = served_figures(&o),
        llama_cpp_one = format!("{:.1}", l.one()),
        llama_cpp_batched = format!("{:.1}", l.batched()),
        llama_cpp_prefill = format!("{:.1}", l.prefill),
        llama_cpp_served = served_figures(&l),
        batch = MEASURE_BATCH,
        answer = MEASURE_ANSWER,
        chosen = chosen.name(),
        paired_from = switch.map_or_else(|| "-".into(), |f| f.to_string()),
        "CPU engine chosen by measured tok/s"
    );
    chosen
}

/// `paired`: llama.cpp for few sequences, OpenVINO for many, switching at
/// `paired_from`, or where [`switch_point`] puts it on the first imported
/// model both load ([`PAIRED_FROM`] when there is none); measured, a lone
/// sequence goes where the measured costs say.
fn pair_up(
    openvino: slinfer_openvino::OpenVinoBackend,
    llama: slinfer_llama_cpp::LlamaCppBackend,
    models_dir: &Path,
    paired_from: Option<usize>,
) -> Result<PairedBackend, EngineError> {
    let (from, costs) = match paired_from {
        Some(from) => (from, None),
        None => match measure_both(&openvino, &llama, models_dir) {
            Ok((package, o, l)) => {
                let from = switch_point(&l, &o);
                tracing::info!(
                    model = %package.display(),
                    openvino_served = served_figures(&o),
                    llama_cpp_served = served_figures(&l),
                    openvino_one = format!("{:.1}", o.one()),
                    llama_cpp_one = format!("{:.1}", l.one()),
                    openvino_prefill = format!("{:.1}", o.prefill),
                    llama_cpp_prefill = format!("{:.1}", l.prefill),
                    paired_from = from,
                    "paired CPU engines switch where measured"
                );
                (from, Some((l.costs(), o.costs())))
            }
            Err(why) => {
                tracing::info!(paired_from = PAIRED_FROM, "paired CPU engines ({why})");
                (PAIRED_FROM, None)
            }
        },
    };
    let pair = PairedBackend::new(Arc::new(llama), Arc::new(openvino), from)?;
    Ok(match costs {
        Some((few, many)) => pair.with_costs(few, many),
        None => pair,
    })
}

/// The CPU device's engine, as `cpu` asks.
fn cpu_backend(
    cpu: &CpuOptions,
    openvino: Result<slinfer_openvino::OpenVinoBackend, EngineError>,
    models_dir: &Path,
) -> Result<Arc<dyn Backend>, EngineError> {
    let llama = || {
        slinfer_llama_cpp::LlamaCppBackend::new(&slinfer_llama_cpp::BackendOptions {
            dir: cpu.llama_cpp_dir.clone(),
            threads: cpu.llama_cpp_threads,
        })
    };
    Ok(match cpu.engine {
        CpuEngine::Openvino => Arc::new(openvino?),
        CpuEngine::LlamaCpp => Arc::new(llama()?),
        CpuEngine::Paired => Arc::new(pair_up(openvino?, llama()?, models_dir, cpu.paired_from)?),
        CpuEngine::Auto => match (openvino, llama()) {
            (Ok(o), Ok(l)) => choose(o, l, models_dir, cpu.paired_from),
            (Ok(o), Err(e)) => {
                tracing::info!("CPU engine: OpenVINO (no llama.cpp: {e})");
                Arc::new(o)
            }
            (Err(e), Ok(l)) => {
                tracing::info!("CPU engine: llama.cpp (no OpenVINO: {e})");
                Arc::new(l)
            }
            (Err(e), Err(_)) => return Err(e),
        },
    })
}

/// The devices and the tensor engine (for `wasi:nn`) this host has.
pub struct Discovered {
    pub devices: Vec<Device>,
    pub tensor: Option<Arc<dyn TensorBackend>>,
}

/// Finds the devices `selection` asks for. `venv` holds the `openvino`
/// wheel (default `$SLINFER_VENV`); `cpu` says which engine serves the CPU
/// (`auto` measures them on the first package in `models_dir`).
pub fn discover(
    selection: &DeviceSelection,
    venv: Option<&Path>,
    cpu: &CpuOptions,
    models_dir: &Path,
) -> anyhow::Result<Discovered> {
    let mut devices = Vec::new();
    let openvino = slinfer_openvino::OpenVinoBackend::new(&slinfer_openvino::BackendOptions {
        venv: venv.map(Path::to_path_buf),
        precision: cpu.precision,
        ..Default::default()
    });
    // wasi:nn graphs run on OpenVINO whatever devices the scheduler has.
    let tensor = match &openvino {
        Ok(_) => slinfer_openvino::tensor::TensorEngine::new(None, venv)
            .map(|t| Arc::new(t) as Arc<dyn TensorBackend>)
            .map_err(|e| tracing::warn!("no tensor engine for wasi:nn: {e}"))
            .ok(),
        Err(_) => None,
    };
    if let Some(named) = selection.wants_cpu() {
        match cpu_backend(cpu, openvino, models_dir) {
            Ok(backend) => devices.push(Device {
                name: "cpu:0".into(),
                kind: backend.kind(),
                backend,
                index: 0,
                // The host memory budget bounds it (see `InferenceConfig`).
                capacity_bytes: u64::MAX,
            }),
            Err(e) if cpu.engine != CpuEngine::Auto => {
                bail!("--cpu-engine {}: {e}", cpu.engine.name())
            }
            Err(e) if named => bail!("--devices cpu: {e}"),
            Err(e) => tracing::warn!("no CPU device: {e}"),
        }
    }
    if let Some(wanted) = selection.wanted_gpus() {
        match slinfer_cuda::CudaBackend::new() {
            Ok(b) => {
                let b: Arc<dyn Backend> = Arc::new(b);
                let found = b.devices()?;
                for n in &wanted {
                    if *n >= found.len() {
                        bail!(
                            "--devices cuda:{n}: this host has {} CUDA device(s)",
                            found.len()
                        );
                    }
                }
                for d in found {
                    if wanted.is_empty() || wanted.contains(&d.index) {
                        tracing::info!(device = %d.name, free_bytes = d.free_bytes, "GPU found");
                        devices.push(Device {
                            name: format!("cuda:{}", d.index),
                            kind: d.kind,
                            backend: b.clone(),
                            index: d.index,
                            capacity_bytes: gpu_capacity_bytes(d.free_bytes, d.total_bytes),
                        });
                    }
                }
            }
            Err(e) if wanted.is_empty() => tracing::info!("no GPU device: {e}"),
            Err(e) => bail!("--devices cuda:{}: {e}", wanted[0]),
        }
    }
    Ok(Discovered { devices, tensor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse_and_bad_names_are_refused() {
        assert_eq!("all".parse(), Ok(DeviceSelection::All));
        assert_eq!("none".parse(), Ok(DeviceSelection::None));
        assert_eq!(
            "cpu, cuda:1,cpu".parse(),
            Ok(DeviceSelection::Only(vec![
                DeviceName::Cpu,
                DeviceName::Cuda(1)
            ]))
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cpu,tpu:0", ""] {
            let e = bad.parse::<DeviceSelection>().unwrap_err();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
    }

    #[test]
    fn what_a_selection_asks_for() {
        let only = |v: Vec<DeviceName>| DeviceSelection::Only(v);
        assert_eq!(DeviceSelection::All.wants_cpu(), Some(false));
        assert_eq!(DeviceSelection::All.wanted_gpus(), Some(vec![]));
        assert_eq!(DeviceSelection::None.wants_cpu(), None);
        assert_eq!(DeviceSelection::None.wanted_gpus(), None);
        assert_eq!(only(vec![DeviceName::Cpu]).wants_cpu(), Some(true));
        assert_eq!(only(vec![DeviceName::Cpu]).wanted_gpus(), None);
        assert_eq!(only(vec![DeviceName::Cuda(2)]).wanted_gpus(), Some(vec![2]));
        assert_eq!(only(vec![DeviceName::Cuda(2)]).wants_cpu(), None);
    }

    /// Test double of a measurement: decode tok/s at one sequence, prefill
    /// seconds of the batch's prompts, seconds a step of the batch; the
    /// steps between straight from one to the batch.
    fn speed(one: f64, prefill_s: f64, step_s: f64) -> Speed {
        let n = MEASURE_BATCH as f64 - 1.0;
        let mut steps = [0.0; MEASURE_BATCH];
        for (i, s) in steps.iter_mut().enumerate() {
            *s = (1.0 / one) + (step_s - 1.0 / one) * i as f64 / n;
        }
        Speed {
            step_s: steps,
            prefill: (MEASURE_BATCH * MEASURE_PROMPT) as f64 / prefill_s,
        }
    }

    #[test]
    fn a_batch_is_served_at_its_tokens_over_prefill_and_decode() {
        // 8 x 128 tokens in 1 s of prefill and 128 steps of 20 ms.
        let t = served_tok_s(8, 128, 1.0, 0.020);
        assert!((t - 1024.0 / 3.56).abs() < 1e-9, "{t}");
        // No prefill: the decode rate of the batch.
        assert!((served_tok_s(8, 128, 0.0, 0.020) - 400.0).abs() < 1e-9);
    }

    #[test]
    fn auto_pairs_the_engines_when_each_is_faster_at_one_batch_size() {
        // Figures of the CPU types measured (BENCHMARKS.md), in decode tok/s
        // at one sequence, prefill seconds of 8 x 160 tokens, seconds a step
        // of eight.
        // Intel Xeon with AMX: llama.cpp at one, OpenVINO at eight.
        let (ov, ll) = (
            speed(64.3, 0.65, 1.0 / 402.8 * 8.0),
            speed(167.2, 0.9, 1.0 / 346.7 * 8.0),
        );
        assert_eq!(
            pick(&ov, &ll),
            Pick::Paired {
                llama_cpp_few: true
            }
        );
        // AMD EPYC Zen 3 (AVX2): llama.cpp decodes eight as fast as
        // OpenVINO (184 against 173 tok/s) but prefills at a third of its
        // speed; served, OpenVINO is faster at eight.
        let (ov, ll) = (
            speed(46.3, 1.7, 8.0 / 172.9),
            speed(110.9, 6.1, 8.0 / 183.8),
        );
        assert!(ll.batched() < ov.batched(), "{ll:?} {ov:?}");
        assert_eq!(
            pick(&ov, &ll),
            Pick::Paired {
                llama_cpp_few: true
            }
        );
        // With prefill as fast, llama.cpp alone (faster at both).
        let ll = speed(110.9, 1.7, 8.0 / 183.8);
        assert_eq!(pick(&ov, &ll), Pick::LlamaCpp);
        // AMD EPYC Zen 5: llama.cpp 1.14x at one, OpenVINO 2.5x at eight.
        let (ov, ll) = (
            speed(157.0, 0.4, 8.0 / 735.7),
            speed(178.9, 0.8, 8.0 / 294.5),
        );
        assert_eq!(
            pick(&ov, &ll),
            Pick::Paired {
                llama_cpp_few: true
            }
        );
        // OpenVINO faster at both: OpenVINO alone.
        let ll = speed(150.0, 0.8, 8.0 / 294.5);
        assert_eq!(pick(&ov, &ll), Pick::Openvino);
        // OpenVINO faster at one, llama.cpp at eight: paired the other way.
        let (ov, ll) = (speed(150.0, 2.0, 0.04), speed(100.0, 0.5, 0.02));
        assert_eq!(
            pick(&ov, &ll),
            Pick::Paired {
                llama_cpp_few: false
            }
        );
    }

    /// Test double of a measurement from served tok/s at each batch size
    /// (no prefill, so that served is the decode rate).
    fn served_at(tok_s: [f64; MEASURE_BATCH]) -> Speed {
        let mut step_s = [0.0; MEASURE_BATCH];
        for (k, (s, t)) in step_s.iter_mut().zip(tok_s).enumerate() {
            *s = (k + 1) as f64 / t;
        }
        Speed {
            step_s,
            prefill: f64::INFINITY,
        }
    }

    #[test]
    fn a_pair_switches_where_its_engine_of_many_serves_every_larger_batch_faster() {
        // Measured at start on the Intel Xeon (this change's BENCHMARKS
        // section): llama.cpp first, OpenVINO from 5.
        let ll = served_at([137.2, 150.5, 184.7, 189.3, 197.7, 201.6, 194.8, 193.1]);
        let ov = served_at([73.1, 119.9, 156.0, 183.7, 209.5, 223.9, 242.5, 244.0]);
        assert_eq!(switch_point(&ll, &ov), 5);
        // Faster at 3 but not at 4: from where it stays faster.
        let ov = served_at([73.1, 119.9, 190.0, 180.0, 209.5, 223.9, 242.5, 244.0]);
        assert_eq!(switch_point(&ll, &ov), 5);
        // Faster from two on.
        let ov = served_at([73.1, 160.0, 190.0, 200.0, 209.5, 223.9, 242.5, 244.0]);
        assert_eq!(switch_point(&ll, &ov), 2);
        // Faster only at the batch, or not even there: at the batch.
        let ov = served_at([73.1, 119.9, 156.0, 183.7, 190.0, 200.0, 190.0, 244.0]);
        assert_eq!(switch_point(&ll, &ov), MEASURE_BATCH);
        assert_eq!(switch_point(&ov, &ll), MEASURE_BATCH);
        // Prefill counts: an engine decoding faster at every batch but
        // prefilling at a third of the speed gives way from four.
        let slow = Speed {
            prefill: 500.0,
            ..served_at([100.0, 180.0, 240.0, 280.0, 300.0, 320.0, 330.0, 340.0])
        };
        let fast = Speed {
            prefill: 1500.0,
            ..served_at([60.0, 110.0, 160.0, 200.0, 240.0, 270.0, 300.0, 330.0])
        };
        assert!(fast.served(4) > slow.served(4) && fast.served(3) < slow.served(3));
        assert_eq!(switch_point(&slow, &fast), 4);
    }

    #[test]
    fn naming_a_gpu_this_host_lacks_is_an_error() {
        // No machine running the tests without a GPU has cuda:0; with one,
        // it has no cuda:99.
        let n = if slinfer_cuda::CudaBackend::new().is_ok() {
            99
        } else {
            0
        };
        let sel = DeviceSelection::Only(vec![DeviceName::Cuda(n)]);
        let e = discover(
            &sel,
            None,
            &CpuOptions::default(),
            Path::new("/nonexistent"),
        )
        .err()
        .expect("an error")
        .to_string();
        assert!(e.starts_with(&format!("--devices cuda:{n}: ")), "{e}");
    }
}
