//! `slinfer-cuda-bench`: the GPU check's tools, run on a machine with a GPU.
//!
//! - `bench [--batches 1,8,32,64] [--steps 64] [--prompt 128] [--graphs]`: decode
//!   tokens/s on a ~1B-parameter Llama shape with random weights drawn on the
//!   device, and batch-1 achieved memory bandwidth against the device's
//!   measured copy bandwidth. Prints one JSON object per line. `--graphs`
//!   repeats the runs with decode iterations replayed as CUDA graphs.
//! - `logits --model DIR --prompt 1,2,3 --decode 32 --out FILE [--dtype f16|bf16]`:
//!   prefill then greedy decode on a safetensors folder, writing every step's
//!   last-position logits and the tokens as JSON (compared with transformers
//!   by scripts/gpu/hf_compare.py).

use std::path::PathBuf;
use std::time::Instant;

use slinfer_cuda::CudaBackend;
use slinfer_engine::sampler::argmax;
use slinfer_engine::weights::WeightDType;
use slinfer_engine::{Backend, LlmInstance, LoadOptions, ModelConfig, ModelSource, StepEntry};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(s: &str) -> Vec<u32> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.trim().parse().expect("a number"))
        .collect()
}

fn dtype(args: &[String]) -> WeightDType {
    match arg(args, "--dtype").as_deref() {
        Some("bf16") => WeightDType::BF16,
        _ => WeightDType::F16,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("slinfer-cuda-bench: {e}");
            std::process::exit(2);
        }
    };
    let result = match args.get(1).map(String::as_str) {
        Some("bench") => bench(&backend, &args),
        Some("logits") => logits(&backend, &args),
        _ => {
            eprintln!(
                "usage: slinfer-cuda-bench bench|logits [options] (see the source's doc comment)"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("slinfer-cuda-bench: {e}");
        std::process::exit(1);
    }
}

fn logits(backend: &CudaBackend, args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(arg(args, "--model").ok_or("--model DIR")?);
    let prompt = list(&arg(args, "--prompt").ok_or("--prompt ids")?);
    let decode: usize = arg(args, "--decode").map_or(Ok(32), |s| s.parse())?;
    let out = PathBuf::from(arg(args, "--out").ok_or("--out FILE")?);
    let options = LoadOptions {
        initial_kv_blocks: (prompt.len() + decode).div_ceil(16) + 2,
        block_size_tokens: Some(16),
        dtype: Some(dtype(args)),
    };
    let mut inst = backend.load(&ModelSource::SafetensorsDir(dir), 0, &options)?;
    inst.add_sequence(0)?;
    let mut steps = Vec::new();
    let mut tokens = Vec::new();
    let mut l = inst.step(&[StepEntry {
        seq: 0,
        tokens: prompt.clone(),
    }])?;
    for i in 0..=decode {
        let t = argmax(&l[0]);
        steps.push(std::mem::take(&mut l[0]));
        if i == decode {
            break;
        }
        tokens.push(t);
        l = inst.step(&[StepEntry {
            seq: 0,
            tokens: vec![t],
        }])?;
    }
    let json = format!(
        "{{\"prompt\":{:?},\"generated\":{:?},\"logits\":[{}]}}",
        prompt,
        tokens,
        steps
            .iter()
            .map(|s| format!(
                "[{}]",
                s.iter()
                    .map(|v| format!("{v:e}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    std::fs::write(&out, json)?;
    eprintln!("wrote {} steps of logits to {}", steps.len(), out.display());
    Ok(())
}

fn bench(backend: &CudaBackend, args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let batches = list(&arg(args, "--batches").unwrap_or_else(|| "1,8,32,64".into()));
    let steps: usize = arg(args, "--steps").map_or(Ok(64), |s| s.parse())?;
    let prompt: usize = arg(args, "--prompt").map_or(Ok(128), |s| s.parse())?;
    let config = ModelConfig::llama_1b();
    let dev = &backend.devices()?[0];
    println!(
        "{{\"device\":{:?},\"arch\":{:?},\"total_bytes\":{},\"free_bytes\":{}}}",
        dev.name,
        backend.arch(0)?,
        dev.total_bytes,
        dev.free_bytes
    );
    let copy_bw = backend.measure_copy_bandwidth(0, 1 << 30, 20)?;
    println!("{{\"copy_bandwidth_gb_s\":{:.1}}}", copy_bw / 1e9);
    let max_batch = *batches.iter().max().unwrap_or(&1) as usize;
    let per_seq_blocks = (prompt + steps + 8).div_ceil(16) + 1;
    let options = LoadOptions {
        initial_kv_blocks: max_batch * per_seq_blocks,
        block_size_tokens: Some(16),
        dtype: Some(dtype(args)),
    };
    let t0 = Instant::now();
    let source = ModelSource::Random {
        config: config.clone(),
        seed: 1,
        scale: 0.02,
    };
    let mut inst = backend.load_cuda(&source, 0, &options)?;
    println!(
        "{{\"model\":\"llama_1b random\",\"parameters\":{},\"weight_bytes\":{},\"load_s\":{:.2}}}",
        config.parameter_count(),
        inst.weight_bytes(),
        t0.elapsed().as_secs_f64()
    );
    let modes: &[bool] = if args.iter().any(|a| a == "--graphs") {
        &[false, true]
    } else {
        &[false]
    };
    for &graphs in modes {
        inst.set_cuda_graphs(graphs);
        bench_batches(&mut inst, &config, &batches, steps, prompt, copy_bw, graphs)?;
        if let Some(why) = inst.cuda_graph_failure() {
            println!("{{\"cuda_graphs_failed\":{why:?}}}");
        }
    }
    Ok(())
}

fn bench_batches(
    inst: &mut slinfer_cuda::CudaInstance,
    config: &ModelConfig,
    batches: &[u32],
    steps: usize,
    prompt: usize,
    copy_bw: f64,
    graphs: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut results = Vec::new();
    for &b in batches {
        let b = b as usize;
        let seqs: Vec<u64> = (0..b as u64).collect();
        for &s in &seqs {
            inst.add_sequence(s)?;
        }
        // Prefill in chunks of at most 8 sequences per iteration.
        for chunk in seqs.chunks(8) {
            let batch: Vec<StepEntry> = chunk
                .iter()
                .map(|&s| StepEntry {
                    seq: s,
                    tokens: (0..prompt as u32)
                        .map(|i| (i * 31 + s as u32 * 7) % 32000)
                        .collect(),
                })
                .collect();
            inst.step(&batch)?;
        }
        let mut next: Vec<u32> = vec![5; b];
        let decode_step = |inst: &mut slinfer_cuda::CudaInstance,
                           next: &mut Vec<u32>|
         -> Result<(), slinfer_engine::EngineError> {
            let batch: Vec<StepEntry> = seqs
                .iter()
                .zip(next.iter())
                .map(|(&s, &t)| StepEntry {
                    seq: s,
                    tokens: vec![t],
                })
                .collect();
            let l = inst.step(&batch)?;
            for (n, l) in next.iter_mut().zip(&l) {
                *n = argmax(l);
            }
            Ok(())
        };
        for _ in 0..3 {
            decode_step(inst, &mut next)?;
        }
        let t = Instant::now();
        for _ in 0..steps {
            decode_step(inst, &mut next)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let step_s = secs / steps as f64;
        let tok_s = (b * steps) as f64 / secs;
        // Bytes read per decode step: all weights once, plus each sequence's KV.
        let ctx_tokens = prompt + 3 + steps / 2;
        let kv_read = (b * ctx_tokens) as u64 * config.kv_bytes_per_token(2);
        let bw = (inst.weight_bytes() + kv_read) as f64 / step_s;
        println!(
            "{{\"cuda_graphs\":{graphs},\"batch\":{b},\"steps\":{steps},\"step_ms\":{:.3},\"tokens_per_s\":{:.1},\"achieved_gb_s\":{:.1},\"fraction_of_copy_bw\":{:.3}}}",
            step_s * 1e3,
            tok_s,
            bw / 1e9,
            bw / copy_bw
        );
        results.push((b, tok_s, bw));
        for &s in &seqs {
            inst.free_sequence(s)?;
        }
    }
    if let (Some(first), Some(last)) = (results.first(), results.last()) {
        println!(
            "{{\"summary\":true,\"cuda_graphs\":{graphs},\"batch1_fraction_of_copy_bw\":{:.3},\"scaling_last_over_first\":{:.2},\"target_fraction\":0.6,\"target_scaling\":10}}",
            first.2 / copy_bw,
            last.1 / first.1
        );
    }
    Ok(())
}
