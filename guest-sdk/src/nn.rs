//! Tensor models with the standard `wasi:nn@0.2.0-rc-2024-10-28`.
//!
//! The raw bindings are re-exported ([`graph`], [`tensor`], [`inference`],
//! [`errors`]) — the same interfaces a guest written for
//! `wasmtime run -S nn` uses — plus a small layer over them: [`Graph`]
//! (`load-by-name` of a graph registered with the host, or an OpenVINO IR
//! from bytes), [`Session`] (an execution context) and [`Tensor`] (plain
//! data, with `f32` helpers).
//!
//! ```ignore
//! use slinfer_sdk::nn::{Graph, Tensor};
//! let graph = Graph::load_by_name("nn-classifier-v1")?;
//! let outputs = graph.session()?.compute(&[("features", Tensor::f32(&[1, 4], &[5.1, 3.5, 1.4, 0.2]))])?;
//! let probabilities = outputs[0].1.to_f32();
//! ```

pub use crate::bindings::wasi::nn::{errors, graph, inference, tensor};
pub use errors::ErrorCode;
pub use graph::{ExecutionTarget, GraphEncoding};
pub use tensor::TensorType;

/// A `wasi:nn` error: its code and the host's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl From<errors::Error> for Error {
    fn from(e: errors::Error) -> Self {
        Error {
            code: e.code(),
            message: e.data(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code_name(), self.message)
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The code as the WIT spells it (`invalid-argument`, …).
    pub fn code_name(&self) -> &'static str {
        match self.code {
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::InvalidEncoding => "invalid-encoding",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RuntimeError => "runtime-error",
            ErrorCode::UnsupportedOperation => "unsupported-operation",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Security => "security",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status that best describes the error to a client.
    pub fn http_status(&self) -> u16 {
        match self.code {
            ErrorCode::InvalidArgument | ErrorCode::InvalidEncoding => 400,
            ErrorCode::Security => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::UnsupportedOperation => 501,
            ErrorCode::Timeout => 504,
            ErrorCode::RuntimeError | ErrorCode::Unknown => 500,
        }
    }
}

/// A tensor as plain data: dimensions, element type, row-major bytes
/// (little-endian).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<u32>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

impl Tensor {
    /// An `fp32` tensor of `values` with dimensions `dims`.
    pub fn f32(dims: &[u32], values: &[f32]) -> Tensor {
        Tensor {
            dims: dims.to_vec(),
            ty: TensorType::Fp32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The values of an `fp32` tensor (`None` for other types).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.ty == TensorType::Fp32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    fn to_wit(&self) -> tensor::Tensor {
        tensor::Tensor::new(&self.dims, self.ty, &self.data)
    }

    fn from_wit(t: &tensor::Tensor) -> Tensor {
        Tensor {
            dims: t.dimensions(),
            ty: t.ty(),
            data: t.data(),
        }
    }
}

/// A loaded graph (model).
pub struct Graph(graph::Graph);

impl Graph {
    /// A graph registered with the host under `name` (on slinfer: a
    /// tensor-model package the function's `models.allowed` lists).
    pub fn load_by_name(name: &str) -> Result<Graph, Error> {
        Ok(Graph(graph::load_by_name(name)?))
    }

    /// An OpenVINO IR (the `.xml` and its `.bin` weights) to run on the CPU.
    pub fn load_openvino(xml: &[u8], weights: &[u8]) -> Result<Graph, Error> {
        Self::load(
            &[xml.to_vec(), weights.to_vec()],
            GraphEncoding::Openvino,
            ExecutionTarget::Cpu,
        )
    }

    /// `wasi:nn`'s `load` as is.
    pub fn load(
        builders: &[Vec<u8>],
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> Result<Graph, Error> {
        Ok(Graph(graph::load(builders, encoding, target)?))
    }

    /// A new execution context of this graph.
    pub fn session(&self) -> Result<Session, Error> {
        Ok(Session(self.0.init_execution_context()?))
    }
}

/// An execution context: run the graph on named inputs, any number of times.
pub struct Session(inference::GraphExecutionContext);

impl Session {
    /// Compute the graph's outputs (named, in the model's order).
    pub fn compute(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, Error> {
        let inputs = inputs
            .iter()
            .map(|(name, t)| (name.to_string(), t.to_wit()))
            .collect();
        let outputs = self.0.compute(inputs)?;
        Ok(outputs
            .iter()
            .map(|(name, t)| (name.clone(), Tensor::from_wit(t)))
            .collect())
    }
}
