//! Device discovery: which engines this host has and which devices it
//! serves on (`serve --devices`). The one place that names the engine
//! crates; everything else receives them as `slinfer_inference::Device`s
//! and a `TensorBackend`.
//!
//! - `cpu`: the OpenVINO CPU engine, when `libopenvino_c` loads (from the
//!   `openvino` wheel in the virtualenv); what it may hold is set by the
//!   host memory budget (`slinfer_inference::MemoryBudget`), which it
//!   shares with the functions.
//! - `cuda:N`: each GPU the CUDA engine finds (driver, cuBLAS and NVRTC
//!   present); its capacity is its free memory at start less a margin.
//!
//! The default (`all`) takes whatever is found: a missing CUDA library is
//! one log line. Naming a device that is not there is an error at start.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::bail;
use slinfer_engine::Backend;
use slinfer_engine::tensor::TensorBackend;
use slinfer_inference::{Device, gpu_capacity_bytes};

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

/// The devices and the tensor engine (for `wasi:nn`) this host has.
pub struct Discovered {
    pub devices: Vec<Device>,
    pub tensor: Option<Arc<dyn TensorBackend>>,
}

/// Finds the devices `selection` asks for. `venv` holds the `openvino`
/// wheel (default `$SLINFER_VENV`); the CPU engine computes in
/// `cpu_precision`.
pub fn discover(
    selection: &DeviceSelection,
    venv: Option<&Path>,
    cpu_precision: slinfer_openvino::Precision,
) -> anyhow::Result<Discovered> {
    let mut devices = Vec::new();
    let openvino = slinfer_openvino::OpenVinoBackend::new(&slinfer_openvino::BackendOptions {
        venv: venv.map(Path::to_path_buf),
        precision: cpu_precision,
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
    match (selection.wants_cpu(), openvino) {
        (Some(_), Ok(b)) => devices.push(Device {
            name: "cpu:0".into(),
            kind: b.kind(),
            backend: Arc::new(b),
            index: 0,
            // The host memory budget bounds it (see `InferenceConfig`).
            capacity_bytes: u64::MAX,
        }),
        (Some(true), Err(e)) => bail!("--devices cpu: {e}"),
        (Some(false), Err(e)) => tracing::warn!("no CPU device: {e}"),
        (None, _) => {}
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
        let e = discover(&sel, None, Default::default())
            .err()
            .expect("an error")
            .to_string();
        assert!(e.starts_with(&format!("--devices cuda:{n}: ")), "{e}");
    }
}
