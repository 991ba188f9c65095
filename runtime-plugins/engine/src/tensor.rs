//! Tensor models (what `wasi:nn` runs): the neutral types the host and the
//! engines share — element types, tensors, ports, errors — and the traits a
//! tensor engine implements. [`TensorBackend`] compiles a model once;
//! a [`TensorGraph`] is shared by every function and instance that loads it;
//! each [`TensorContext`] (an execution context) computes on it. Inputs are
//! checked against the graph's ports ([`check_inputs`]) before any engine
//! sees them, so a mistake is an [`TensorErrorKind::InvalidArgument`] naming
//! what was expected.

use std::path::Path;
use std::sync::Arc;

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
    pub fn new(kind: TensorErrorKind, message: impl Into<String>) -> Self {
        TensorError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(TensorErrorKind::InvalidArgument, message)
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
    /// `"name": Type [dims]`, `?` for what is free.
    pub fn describe(&self) -> String {
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

/// Check named inputs against a graph's input ports: every input given
/// exactly once, each fitting its port. Returns each tensor's port index.
pub fn check_inputs(
    ports: &[Port],
    inputs: &[(String, TensorData)],
) -> Result<Vec<usize>, TensorError> {
    let names = || {
        ports
            .iter()
            .map(Port::describe)
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut seen = vec![false; ports.len()];
    let mut index = Vec::with_capacity(inputs.len());
    for (name, t) in inputs {
        let i = ports.iter().position(|p| &p.name == name).ok_or_else(|| {
            TensorError::invalid(format!(
                "the model has no input {name:?}; its inputs: {}",
                names()
            ))
        })?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(TensorError::invalid(format!("input {name:?} given twice")));
        }
        ports[i].check(t)?;
        index.push(i);
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(TensorError::invalid(format!(
            "input {:?} is missing; the model's inputs: {}",
            ports[i].name,
            names()
        )));
    }
    Ok(index)
}

/// An engine that compiles tensor models.
pub trait TensorBackend: Send + Sync {
    /// Compile an OpenVINO IR (xml and weights files), the `wasi:nn`
    /// `openvino` encoding.
    fn compile_files(
        &self,
        xml: &Path,
        weights: &Path,
    ) -> Result<Arc<dyn TensorGraph>, TensorError>;
    /// The same, from bytes a guest passed.
    fn compile_bytes(
        &self,
        xml: &[u8],
        weights: &[u8],
    ) -> Result<Arc<dyn TensorGraph>, TensorError>;
}

/// A compiled tensor model, shared by every context made from it.
pub trait TensorGraph: Send + Sync {
    fn inputs(&self) -> &[Port];
    fn outputs(&self) -> &[Port];
    /// A new execution context.
    fn context(&self) -> Result<Box<dyn TensorContext>, TensorError>;
}

/// One execution context of a [`TensorGraph`].
pub trait TensorContext: Send {
    /// Run the graph on `inputs` (checked against its ports first) and return
    /// every output, by name, in the graph's order.
    fn infer(
        &mut self,
        inputs: &[(String, TensorData)],
    ) -> Result<Vec<(String, TensorData)>, TensorError>;
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
