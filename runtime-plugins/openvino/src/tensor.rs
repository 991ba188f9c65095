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
//! A [`TensorModel`] is compiled once and shared (`Arc`); each
//! [`TensorRequest`] is one OpenVINO infer request of it. Inputs are checked
//! against the compiled model's ports (name, element type, rank and static
//! dimensions, byte length) before anything reaches OpenVINO, so a mistake is
//! reported as [`TensorErrorKind::InvalidArgument`] naming what was expected.

use std::path::Path;
use std::sync::Mutex;

use openvino::{CompiledModel, Core, DeviceType, ElementType, InferRequest, RwPropertyKey, Shape};
use slinfer_engine::EngineError;

/// Element types a tensor may have (the `wasi:nn` `tensor-type` set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F16,
    F32,
    F64,
    Bf16,
    U8,
    I32,
    I64,
}

impl TensorType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            TensorType::U8 => 1,
            TensorType::F16 | TensorType::Bf16 => 2,
            TensorType::F32 | TensorType::I32 => 4,
            TensorType::F64 | TensorType::I64 => 8,
        }
    }

    fn to_ov(self) -> ElementType {
        match self {
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
}

/// A tensor: dimensions, element type, row-major bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub dims: Vec<u32>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

impl TensorData {
    /// The byte length `dims` and `ty` call for (`None` on overflow).
    pub fn expected_len(dims: &[u32], ty: TensorType) -> Option<usize> {
        dims.iter()
            .try_fold(ty.bytes(), |acc, &d| acc.checked_mul(d as usize))
    }
}

/// What kind of failure a [`TensorError`] is (the `wasi:nn` error codes
/// that apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorErrorKind {
    /// The caller's tensors or names do not fit the model.
    InvalidArgument,
    /// The IR could not be read.
    InvalidEncoding,
    /// The model uses something this engine cannot run.
    Unsupported,
    /// OpenVINO failed while compiling or computing.
    Runtime,
}

/// A tensor-model error: its kind and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TensorError {
    pub kind: TensorErrorKind,
    pub message: String,
}

impl TensorError {
    fn new(kind: TensorErrorKind, message: impl Into<String>) -> Self {
        TensorError {
            kind,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(TensorErrorKind::InvalidArgument, message)
    }
    fn runtime(context: &str, e: impl std::fmt::Display) -> Self {
        Self::new(
            TensorErrorKind::Runtime,
            format!("OpenVINO: {context}: {e}"),
        )
    }
}

/// One input or output of a compiled model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub ty: TensorType,
    /// `None`: any rank. Each dimension: `None` = any size.
    pub dims: Option<Vec<Option<u32>>>,
}

impl Port {
    fn describe(&self) -> String {
        let dims = match &self.dims {
            None => "?".to_string(),
            Some(d) => d
                .iter()
                .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        };
        format!("{:?}: {:?} [{dims}]", self.name, self.ty)
    }

    /// Check a tensor for this port.
    pub fn check(&self, t: &TensorData) -> Result<(), TensorError> {
        if t.ty != self.ty {
            return Err(TensorError::invalid(format!(
                "input {:?} is {:?}, the model wants {}",
                self.name,
                t.ty,
                self.describe()
            )));
        }
        if let Some(want) = &self.dims {
            let fits = want.len() == t.dims.len()
                && want
                    .iter()
                    .zip(&t.dims)
                    .all(|(w, &d)| w.is_none_or(|w| w == d));
            if !fits {
                return Err(TensorError::invalid(format!(
                    "input {:?} has shape {:?}, the model wants {}",
                    self.name,
                    t.dims,
                    self.describe()
                )));
            }
        }
        match TensorData::expected_len(&t.dims, t.ty) {
            Some(n) if n == t.data.len() => Ok(()),
            Some(n) => Err(TensorError::invalid(format!(
                "input {:?}: {} bytes of data for shape {:?} of {:?} (needs {n})",
                self.name,
                t.data.len(),
                t.dims,
                t.ty
            ))),
            None => Err(TensorError::invalid(format!(
                "input {:?}: shape {:?} is too large",
                self.name, t.dims
            ))),
        }
    }
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

    /// Read and compile an IR from files (a tensor-model package).
    pub fn compile_files(&self, xml: &Path, weights: &Path) -> Result<TensorModel, TensorError> {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let model = core
            .read_model_from_file(&xml.to_string_lossy(), &weights.to_string_lossy())
            .map_err(|e| {
                TensorError::new(
                    TensorErrorKind::InvalidEncoding,
                    format!("reading the OpenVINO IR {}: {e}", xml.display()),
                )
            })?;
        TensorModel::compile(&mut core, &model)
    }

    /// Read and compile an IR from memory (`xml` and its weights).
    pub fn compile_bytes(&self, xml: &[u8], weights: &[u8]) -> Result<TensorModel, TensorError> {
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
            &Shape::new(&[weights.len() as i64]).map_err(|e| TensorError::runtime("shape", e))?,
        )
        .map_err(|e| TensorError::runtime("weights tensor", e))?;
        blob.get_raw_data_mut()
            .map_err(|e| TensorError::runtime("weights tensor", e))?
            .copy_from_slice(weights);
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let model = core
            .read_model_from_buffer(xml, Some(&blob))
            .map_err(|e| bad(&e))?;
        TensorModel::compile(&mut core, &model)
    }
}

/// A compiled tensor model; share it (`Arc`) and make requests from it.
pub struct TensorModel {
    compiled: Mutex<CompiledModel>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

fn port(node: openvino::Node, what: &str, i: usize) -> Result<Port, TensorError> {
    let name = node.get_name().unwrap_or_else(|_| i.to_string());
    let ov_ty = node
        .get_element_type()
        .map_err(|e| TensorError::runtime("port type", e))?;
    let ty = TensorType::from_ov(ov_ty).ok_or_else(|| {
        TensorError::new(
            TensorErrorKind::Unsupported,
            format!("{what} {name:?} has element type {ov_ty:?}, which wasi:nn cannot carry"),
        )
    })?;
    let shape = node
        .get_partial_shape()
        .map_err(|e| TensorError::runtime("port shape", e))?;
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
            .map_err(|e| TensorError::runtime("compile_model", e))?;
        let n_in = compiled
            .get_input_size()
            .map_err(|e| TensorError::runtime("inputs", e))?;
        let n_out = compiled
            .get_output_size()
            .map_err(|e| TensorError::runtime("outputs", e))?;
        let mut inputs = Vec::with_capacity(n_in);
        for i in 0..n_in {
            let node = compiled
                .get_input_by_index(i)
                .map_err(|e| TensorError::runtime("input", e))?;
            inputs.push(port(node, "input", i)?);
        }
        let mut outputs = Vec::with_capacity(n_out);
        for i in 0..n_out {
            let node = compiled
                .get_output_by_index(i)
                .map_err(|e| TensorError::runtime("output", e))?;
            outputs.push(port(node, "output", i)?);
        }
        Ok(TensorModel {
            compiled: Mutex::new(compiled),
            inputs,
            outputs,
        })
    }

    pub fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    /// A new infer request (an execution context) of this model.
    pub fn request(&self) -> Result<TensorRequest, TensorError> {
        let request = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .create_infer_request()
            .map_err(|e| TensorError::runtime("create_infer_request", e))?;
        Ok(TensorRequest { request })
    }

    /// Check named inputs against the model's ports: every input given
    /// exactly once, each fitting its port. Returns each tensor's port index.
    pub fn check_inputs(&self, inputs: &[(String, TensorData)]) -> Result<Vec<usize>, TensorError> {
        let names = || {
            self.inputs
                .iter()
                .map(Port::describe)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let mut seen = vec![false; self.inputs.len()];
        let mut index = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let i = self
                .inputs
                .iter()
                .position(|p| &p.name == name)
                .ok_or_else(|| {
                    TensorError::invalid(format!(
                        "the model has no input {name:?}; its inputs: {}",
                        names()
                    ))
                })?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(TensorError::invalid(format!("input {name:?} given twice")));
            }
            self.inputs[i].check(t)?;
            index.push(i);
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(TensorError::invalid(format!(
                "input {:?} is missing; the model's inputs: {}",
                self.inputs[i].name,
                names()
            )));
        }
        Ok(index)
    }
}

/// One infer request of a [`TensorModel`].
pub struct TensorRequest {
    request: InferRequest,
}

impl TensorRequest {
    /// Run the model on `inputs` (checked by [`TensorModel::check_inputs`]
    /// first) and return every output, by name, in the model's order.
    pub fn infer(
        &mut self,
        model: &TensorModel,
        inputs: &[(String, TensorData)],
    ) -> Result<Vec<(String, TensorData)>, TensorError> {
        let index = model.check_inputs(inputs)?;
        for ((_, t), i) in inputs.iter().zip(index) {
            let dims: Vec<i64> = t.dims.iter().map(|&d| d as i64).collect();
            let shape = Shape::new(&dims).map_err(|e| TensorError::runtime("shape", e))?;
            let mut ov = openvino::Tensor::new(t.ty.to_ov(), &shape)
                .map_err(|e| TensorError::runtime("input tensor", e))?;
            ov.get_raw_data_mut()
                .map_err(|e| TensorError::runtime("input tensor", e))?
                .copy_from_slice(&t.data);
            self.request
                .set_input_tensor_by_index(i, &ov)
                .map_err(|e| TensorError::runtime("set input", e))?;
        }
        self.request
            .infer()
            .map_err(|e| TensorError::runtime("infer", e))?;
        let mut out = Vec::with_capacity(model.outputs.len());
        for (i, p) in model.outputs.iter().enumerate() {
            let t = self
                .request
                .get_output_tensor_by_index(i)
                .map_err(|e| TensorError::runtime("output", e))?;
            let ov_ty = t
                .get_element_type()
                .map_err(|e| TensorError::runtime("output type", e))?;
            let ty = TensorType::from_ov(ov_ty).ok_or_else(|| {
                TensorError::new(
                    TensorErrorKind::Unsupported,
                    format!("output {:?} has element type {ov_ty:?}", p.name),
                )
            })?;
            let dims = t
                .get_shape()
                .map_err(|e| TensorError::runtime("output shape", e))?
                .get_dimensions()
                .iter()
                .map(|&d| d as u32)
                .collect();
            let data = t
                .get_raw_data()
                .map_err(|e| TensorError::runtime("output data", e))?
                .to_vec();
            out.push((p.name.clone(), TensorData { dims, ty, data }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(dims: Option<Vec<Option<u32>>>) -> Port {
        Port {
            name: "x".into(),
            ty: TensorType::F32,
            dims,
        }
    }

    fn t(dims: &[u32], ty: TensorType, len: usize) -> TensorData {
        TensorData {
            dims: dims.to_vec(),
            ty,
            data: vec![0; len],
        }
    }

    #[test]
    fn expected_len_multiplies_and_catches_overflow() {
        assert_eq!(TensorData::expected_len(&[1, 4], TensorType::F32), Some(16));
        assert_eq!(TensorData::expected_len(&[], TensorType::I64), Some(8));
        assert_eq!(
            TensorData::expected_len(&[u32::MAX, u32::MAX, u32::MAX], TensorType::F64),
            None
        );
    }

    #[test]
    fn port_check_wants_type_shape_and_length() {
        let p = port(Some(vec![Some(1), None]));
        p.check(&t(&[1, 7], TensorType::F32, 28)).unwrap();
        let e = p.check(&t(&[1, 7], TensorType::I32, 28)).unwrap_err();
        assert_eq!(e.kind, TensorErrorKind::InvalidArgument);
        assert!(e.message.contains("is I32"), "{e}");
        let e = p.check(&t(&[2, 7], TensorType::F32, 56)).unwrap_err();
        assert!(e.message.contains("shape [2, 7]"), "{e}");
        assert!(e.message.contains("[1, ?]"), "{e}");
        let e = p.check(&t(&[1, 7], TensorType::F32, 27)).unwrap_err();
        assert!(e.message.contains("needs 28"), "{e}");
        port(None)
            .check(&t(&[3, 3, 3], TensorType::F32, 108))
            .unwrap();
    }
}
