//! Tensor models on OpenVINO: compile an IR once, run it from many infer
//! requests. This is what `wasi:nn` runs on in the host.
//!
//! A [`TensorEngine`] owns one OpenVINO `Core` on the process's
//! `libopenvino_c` (the same library the LLM engine loads). It sets
//! `INFERENCE_PRECISION_HINT=f32` on its Core — the CPU plugin's default on a
//! bf16-capable CPU is bf16, which changes a tensor model's answers in the
//! third digit, and `compile_model` passes no per-model properties — so
//! tensor models are computed at the precision their IR states, while the
//! LLM engine's Core keeps its own defaults.
//!
//! [`TensorEngine`] implements the engine contract's
//! [`TensorBackend`]: a [`TensorModel`] is compiled once and shared; each
//! [`TensorRequest`] is one OpenVINO infer request of it. Inputs are checked
//! against the compiled model's ports (`slinfer_engine::tensor::check_inputs`)
//! before anything reaches OpenVINO.

use std::path::Path;
use std::sync::{Arc, Mutex};

use openvino::{CompiledModel, Core, DeviceType, ElementType, InferRequest, RwPropertyKey, Shape};
use slinfer_engine::EngineError;
use slinfer_engine::tensor::{
    Port, TensorBackend, TensorContext, TensorData, TensorError, TensorErrorKind, TensorGraph,
    TensorType, check_inputs,
};

fn to_ov(ty: TensorType) -> ElementType {
    match ty {
        TensorType::F16 => ElementType::F16,
        TensorType::F32 => ElementType::F32,
        TensorType::F64 => ElementType::F64,
        TensorType::Bf16 => ElementType::Bf16,
        TensorType::U8 => ElementType::U8,
        TensorType::I32 => ElementType::I32,
        TensorType::I64 => ElementType::I64,
    }
}

fn from_ov(ty: ElementType) -> Option<TensorType> {
    Some(match ty {
        ElementType::F16 => TensorType::F16,
        ElementType::F32 => TensorType::F32,
        ElementType::F64 => TensorType::F64,
        ElementType::Bf16 => TensorType::Bf16,
        ElementType::U8 => TensorType::U8,
        ElementType::I32 => TensorType::I32,
        ElementType::I64 => TensorType::I64,
        _ => return None,
    })
}

fn runtime(context: &str, e: impl std::fmt::Display) -> TensorError {
    TensorError::new(
        TensorErrorKind::Runtime,
        format!("OpenVINO: {context}: {e}"),
    )
}

/// The OpenVINO Core that compiles tensor models (CPU).
pub struct TensorEngine {
    core: Mutex<Core>,
}

impl TensorEngine {
    /// Load `libopenvino_c` (see [`crate::find_library`]; a no-op when the
    /// LLM engine already did) and set up a Core for tensor models.
    pub fn new(library: Option<&Path>, venv: Option<&Path>) -> Result<Self, EngineError> {
        crate::load_library(library, venv)?;
        let mut core = Core::new()
            .map_err(|e| EngineError::Unavailable(format!("OpenVINO unavailable: {e}")))?;
        let cpu = DeviceType::CPU;
        core.set_property(&cpu, &RwPropertyKey::HintInferencePrecision, "f32")
            .map_err(|e| crate::dev("INFERENCE_PRECISION_HINT", e))?;
        core.set_property(&cpu, &RwPropertyKey::HintPerformanceMode, "LATENCY")
            .map_err(|e| crate::dev("PERFORMANCE_HINT", e))?;
        Ok(TensorEngine {
            core: Mutex::new(core),
        })
    }
}

impl TensorBackend for TensorEngine {
    /// Read and compile an IR from files (a tensor-model package).
    fn compile_files(
        &self,
        xml: &Path,
        weights: &Path,
    ) -> Result<Arc<dyn TensorGraph>, TensorError> {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let model = core
            .read_model_from_file(&xml.to_string_lossy(), &weights.to_string_lossy())
            .map_err(|e| {
                TensorError::new(
                    TensorErrorKind::InvalidEncoding,
                    format!("reading the OpenVINO IR {}: {e}", xml.display()),
                )
            })?;
        Ok(Arc::new(TensorModel::compile(&mut core, &model)?))
    }

    /// Read and compile an IR from memory (`xml` and its weights).
    fn compile_bytes(
        &self,
        xml: &[u8],
        weights: &[u8],
    ) -> Result<Arc<dyn TensorGraph>, TensorError> {
        let bad = |e: &dyn std::fmt::Display| {
            TensorError::new(
                TensorErrorKind::InvalidEncoding,
                format!("not a valid OpenVINO IR (xml + weights): {e}"),
            )
        };
        if !xml.starts_with(b"<") && !xml.trim_ascii_start().starts_with(b"<") {
            return Err(bad(&"the first builder is not XML"));
        }
        let mut blob = openvino::Tensor::new(
            ElementType::U8,
            &Shape::new(&[weights.len() as i64]).map_err(|e| runtime("shape", e))?,
        )
        .map_err(|e| runtime("weights tensor", e))?;
        blob.get_raw_data_mut()
            .map_err(|e| runtime("weights tensor", e))?
            .copy_from_slice(weights);
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let model = core
            .read_model_from_buffer(xml, Some(&blob))
            .map_err(|e| bad(&e))?;
        Ok(Arc::new(TensorModel::compile(&mut core, &model)?))
    }
}

/// A compiled tensor model; share it (`Arc`) and make contexts from it.
pub struct TensorModel {
    compiled: Mutex<CompiledModel>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

fn port(node: openvino::Node, what: &str, i: usize) -> Result<Port, TensorError> {
    let name = node.get_name().unwrap_or_else(|_| i.to_string());
    let ov_ty = node
        .get_element_type()
        .map_err(|e| runtime("port type", e))?;
    let ty = from_ov(ov_ty).ok_or_else(|| {
        TensorError::new(
            TensorErrorKind::Unsupported,
            format!("{what} {name:?} has element type {ov_ty:?}, which wasi:nn cannot carry"),
        )
    })?;
    let shape = node
        .get_partial_shape()
        .map_err(|e| runtime("port shape", e))?;
    let dims = if shape.get_rank().is_dynamic() {
        None
    } else {
        Some(
            shape
                .get_dimensions()
                .iter()
                .map(|d| {
                    (!d.is_dynamic())
                        .then(|| u32::try_from(d.get_min()).ok())
                        .flatten()
                })
                .collect(),
        )
    };
    Ok(Port { name, ty, dims })
}

impl TensorModel {
    fn compile(core: &mut Core, model: &openvino::Model) -> Result<TensorModel, TensorError> {
        let compiled = core
            .compile_model(model, DeviceType::CPU)
            .map_err(|e| runtime("compile_model", e))?;
        let n_in = compiled
            .get_input_size()
            .map_err(|e| runtime("inputs", e))?;
        let n_out = compiled
            .get_output_size()
            .map_err(|e| runtime("outputs", e))?;
        let mut inputs = Vec::with_capacity(n_in);
        for i in 0..n_in {
            let node = compiled
                .get_input_by_index(i)
                .map_err(|e| runtime("input", e))?;
            inputs.push(port(node, "input", i)?);
        }
        let mut outputs = Vec::with_capacity(n_out);
        for i in 0..n_out {
            let node = compiled
                .get_output_by_index(i)
                .map_err(|e| runtime("output", e))?;
            outputs.push(port(node, "output", i)?);
        }
        Ok(TensorModel {
            compiled: Mutex::new(compiled),
            inputs,
            outputs,
        })
    }
}

impl TensorGraph for TensorModel {
    fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    fn context(&self) -> Result<Box<dyn TensorContext>, TensorError> {
        let request = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .create_infer_request()
            .map_err(|e| runtime("create_infer_request", e))?;
        Ok(Box::new(TensorRequest {
            request,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
        }))
    }
}

/// One infer request of a [`TensorModel`], with its ports.
pub struct TensorRequest {
    request: InferRequest,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

impl TensorContext for TensorRequest {
    fn infer(
        &mut self,
        inputs: &[(String, TensorData)],
    ) -> Result<Vec<(String, TensorData)>, TensorError> {
        let index = check_inputs(&self.inputs, inputs)?;
        for ((_, t), i) in inputs.iter().zip(index) {
            let dims: Vec<i64> = t.dims.iter().map(|&d| d as i64).collect();
            let shape = Shape::new(&dims).map_err(|e| runtime("shape", e))?;
            let mut ov = openvino::Tensor::new(to_ov(t.ty), &shape)
                .map_err(|e| runtime("input tensor", e))?;
            ov.get_raw_data_mut()
                .map_err(|e| runtime("input tensor", e))?
                .copy_from_slice(&t.data);
            self.request
                .set_input_tensor_by_index(i, &ov)
                .map_err(|e| runtime("set input", e))?;
        }
        self.request.infer().map_err(|e| runtime("infer", e))?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for (i, p) in self.outputs.iter().enumerate() {
            let t = self
                .request
                .get_output_tensor_by_index(i)
                .map_err(|e| runtime("output", e))?;
            let ov_ty = t
                .get_element_type()
                .map_err(|e| runtime("output type", e))?;
            let ty = from_ov(ov_ty).ok_or_else(|| {
                TensorError::new(
                    TensorErrorKind::Unsupported,
                    format!("output {:?} has element type {ov_ty:?}", p.name),
                )
            })?;
            let dims = t
                .get_shape()
                .map_err(|e| runtime("output shape", e))?
                .get_dimensions()
                .iter()
                .map(|&d| d as u32)
                .collect();
            let data = t
                .get_raw_data()
                .map_err(|e| runtime("output data", e))?
                .to_vec();
            out.push((p.name.clone(), TensorData { dims, ty, data }));
        }
        Ok(out)
    }
}
