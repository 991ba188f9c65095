//! The host side of the standard `wasi:nn@0.2.0-rc-2024-10-28`: graphs,
//! tensors and execution contexts in the store's resource table, computed on
//! the host's shared tensor engine ([`slinfer_inference::graphs`]).
//!
//! - `load-by-name(name)`: a graph registered with the host (a tensor-model
//!   package in the models dir), if the manifest's `models.allowed` lists it;
//!   compiled once and shared by all functions and instances.
//! - `load(builders, encoding, target)`: `openvino` encoding (xml, weights)
//!   on `cpu`; compiled for this instance only.
//! - `compute` checks the inputs against the model (names, types, shapes,
//!   byte lengths) and runs on a blocking thread, never on a tokio worker.
//!   Outputs come back in the model's order, named by the model's output names.
//! - Host-side bytes an instance holds through `wasi:nn` (tensors, and graphs
//!   it loaded from bytes) count against its memory limit (`memory_bytes`)
//!   and are reserved in the host-wide memory budget: a `compute` or `load`
//!   beyond either answers `too-large`; a tensor constructor beyond either
//!   (constructors cannot fail) traps with a message saying so.
//!
//! Self-contained in the manner of wasmtime-wasi-http: [`NnConfig`] is what
//! the manifest grants, [`NnCtx`] an instance's context (with the bytes it
//! holds), and a store whose data implements [`NnView`] gets the interface
//! from [`add_to_linker`].

use std::sync::{Arc, Mutex};

use slinfer_inference::MemoryBudget;
use slinfer_inference::graphs::{self, Graphs};
use slinfer_inference::tensor::{
    TensorContext, TensorData, TensorError, TensorErrorKind, TensorGraph, TensorType,
};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/wasi-nn",
        world: "wasi:nn/ml",
        imports: {
            "wasi:nn/graph.load": async | trappable,
            "wasi:nn/graph.load-by-name": async | trappable,
            "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
            default: trappable,
        },
        with: {
            "wasi:nn/graph.graph": super::NnGraph,
            "wasi:nn/tensor.tensor": super::NnTensor,
            "wasi:nn/inference.graph-execution-context": super::NnContext,
            "wasi:nn/errors.error": super::NnError,
        },
        require_store_data_send: true,
    });
}

use bindings::wasi::nn::{errors, graph, inference, tensor};

/// What a function may do with `wasi:nn` (from its manifest).
#[derive(Clone, Debug, Default)]
pub struct NnConfig {
    /// Graphs it may load by name (`models.allowed`).
    pub allowed_models: Arc<[String]>,
    /// Host-side bytes one instance may hold (its memory limit).
    pub budget_bytes: usize,
}

/// One instance's `wasi:nn` context: the registry and what it holds.
pub struct NnCtx {
    graphs: Arc<Graphs>,
    config: NnConfig,
    /// The host-wide budget its bytes are reserved in.
    host: Arc<MemoryBudget>,
    /// Host-side bytes it holds now.
    held_bytes: usize,
}

impl NnCtx {
    pub fn new(graphs: Arc<Graphs>, config: NnConfig, host: Arc<MemoryBudget>) -> Self {
        NnCtx {
            graphs,
            config,
            host,
            held_bytes: 0,
        }
    }
}

impl Drop for NnCtx {
    fn drop(&mut self) {
        self.host.release_functions(self.held_bytes as u64);
    }
}

/// An instance's context and resource table, borrowed for one call.
pub struct NnCtxView<'a> {
    pub ctx: &'a mut NnCtx,
    pub table: &'a mut ResourceTable,
}

/// Store data that carries `wasi:nn`.
pub trait NnView: Send {
    fn nn(&mut self) -> NnCtxView<'_>;
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnCtxView<'a>;
}

/// A loaded graph (the `graph` resource).
pub struct NnGraph {
    graph: Arc<dyn TensorGraph>,
    /// Bytes counted against the budget (graphs loaded from bytes).
    held: usize,
}

/// A tensor (the `tensor` resource).
pub struct NnTensor(TensorData);

/// An execution context of a graph.
pub struct NnContext {
    context: Arc<Mutex<Box<dyn TensorContext>>>,
}

/// A `wasi:nn` error: its code and a message for the guest.
#[derive(Debug)]
pub struct NnError {
    code: errors::ErrorCode,
    message: String,
}

impl NnError {
    fn new(code: errors::ErrorCode, message: impl Into<String>) -> Self {
        NnError {
            code,
            message: message.into(),
        }
    }
}

impl From<TensorError> for NnError {
    fn from(e: TensorError) -> Self {
        let code = match e.kind {
            TensorErrorKind::InvalidArgument => errors::ErrorCode::InvalidArgument,
            TensorErrorKind::InvalidEncoding => errors::ErrorCode::InvalidEncoding,
            TensorErrorKind::Unsupported => errors::ErrorCode::UnsupportedOperation,
            TensorErrorKind::Runtime => errors::ErrorCode::RuntimeError,
        };
        NnError::new(code, e.message)
    }
}

fn to_type(t: tensor::TensorType) -> TensorType {
    match t {
        tensor::TensorType::Fp16 => TensorType::F16,
        tensor::TensorType::Fp32 => TensorType::F32,
        tensor::TensorType::Fp64 => TensorType::F64,
        tensor::TensorType::Bf16 => TensorType::Bf16,
        tensor::TensorType::U8 => TensorType::U8,
        tensor::TensorType::I32 => TensorType::I32,
        tensor::TensorType::I64 => TensorType::I64,
    }
}

fn from_type(t: TensorType) -> tensor::TensorType {
    match t {
        TensorType::F16 => tensor::TensorType::Fp16,
        TensorType::F32 => tensor::TensorType::Fp32,
        TensorType::F64 => tensor::TensorType::Fp64,
        TensorType::Bf16 => tensor::TensorType::Bf16,
        TensorType::U8 => tensor::TensorType::U8,
        TensorType::I32 => tensor::TensorType::I32,
        TensorType::I64 => tensor::TensorType::I64,
    }
}

type NnResult<T> = wasmtime::Result<Result<T, Resource<NnError>>>;

/// Link `wasi:nn` into `linker`.
pub fn add_to_linker<T: NnView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    errors::add_to_linker::<T, HasNn>(linker, T::nn)?;
    tensor::add_to_linker::<T, HasNn>(linker, T::nn)?;
    inference::add_to_linker::<T, HasNn>(linker, T::nn)?;
    graph::add_to_linker::<T, HasNn>(linker, T::nn)
}

impl NnCtx {
    /// Count `bytes` more against the function's limit and the host's
    /// budget.
    fn take(&mut self, bytes: usize) -> Result<(), NnError> {
        match self.held_bytes.checked_add(bytes) {
            Some(n) if n <= self.config.budget_bytes => {
                if !self.host.try_reserve_functions(bytes as u64) {
                    return Err(NnError::new(
                        errors::ErrorCode::TooLarge,
                        format!(
                            "wasi:nn: the host's memory budget of {} bytes (shared by every function and the models on the CPU) has no room for {bytes} more bytes; retry later",
                            self.host.usage().total_bytes
                        ),
                    ));
                }
                self.held_bytes = n;
                Ok(())
            }
            _ => Err(NnError::new(
                errors::ErrorCode::TooLarge,
                format!(
                    "wasi:nn: {bytes} more bytes would exceed this function's memory limit of {} bytes \
                     ({} held in tensors and graphs); drop tensors no longer needed or raise limits.memory_bytes",
                    self.config.budget_bytes, self.held_bytes
                ),
            )),
        }
    }

    fn give_back(&mut self, bytes: usize) {
        let bytes = bytes.min(self.held_bytes);
        self.held_bytes -= bytes;
        self.host.release_functions(bytes as u64);
    }
}

impl NnCtxView<'_> {
    fn nn_err<T>(&mut self, e: impl Into<NnError>) -> NnResult<T> {
        let e = e.into();
        tracing::debug!(code = ?e.code, "wasi:nn error: {}", e.message);
        Ok(Err(self.table.push(e)?))
    }
}

impl graph::Host for NnCtxView<'_> {
    async fn load(
        &mut self,
        builders: Vec<graph::GraphBuilder>,
        encoding: graph::GraphEncoding,
        target: graph::ExecutionTarget,
    ) -> NnResult<Resource<NnGraph>> {
        if encoding != graph::GraphEncoding::Openvino {
            return self.nn_err(NnError::new(
                errors::ErrorCode::InvalidEncoding,
                format!("wasi:nn: graph encoding {encoding:?} is not supported; this host loads openvino IR (xml + weights) or graphs by name"),
            ));
        }
        if target != graph::ExecutionTarget::Cpu {
            return self.nn_err(NnError::new(
                errors::ErrorCode::UnsupportedOperation,
                format!("wasi:nn: execution target {target:?} is not available; this host runs graphs on the cpu"),
            ));
        }
        let [xml, weights]: [Vec<u8>; 2] = match builders.try_into() {
            Ok(b) => b,
            Err(b) => {
                return self.nn_err(NnError::new(
                    errors::ErrorCode::InvalidArgument,
                    format!(
                        "wasi:nn: an openvino graph is two builders (the IR's xml, then its weights), not {}",
                        b.len()
                    ),
                ));
            }
        };
        let held = xml.len() + weights.len();
        if let Err(e) = self.ctx.take(held) {
            return self.nn_err(e);
        }
        match self.ctx.graphs.compile(xml, weights).await {
            Ok(graph) => Ok(Ok(self.table.push(NnGraph { graph, held })?)),
            Err(e) => {
                self.ctx.give_back(held);
                self.nn_err(e)
            }
        }
    }

    async fn load_by_name(&mut self, name: String) -> NnResult<Resource<NnGraph>> {
        let graphs = self.ctx.graphs.clone();
        let allowed = self.ctx.config.allowed_models.contains(&name);
        if allowed || !graphs.contains(&name) {
            match graphs.get(&name).await {
                Ok(Some(graph)) => return Ok(Ok(self.table.push(NnGraph { graph, held: 0 })?)),
                Ok(None) => {
                    let visible: Vec<String> = graphs
                        .names()
                        .into_iter()
                        .filter(|g| self.ctx.config.allowed_models.contains(g))
                        .collect();
                    return self.nn_err(NnError::new(
                        errors::ErrorCode::NotFound,
                        format!(
                            "wasi:nn: no graph named {name:?} is registered with this host \
                             (graphs this function may load: {visible:?})"
                        ),
                    ));
                }
                Err(e) => return self.nn_err(e),
            }
        }
        self.nn_err(NnError::new(
            errors::ErrorCode::Security,
            format!(
                "wasi:nn: graph {name:?} is not in this function's models.allowed (slinfer.toml)"
            ),
        ))
    }
}

impl graph::HostGraph for NnCtxView<'_> {
    fn init_execution_context(&mut self, this: Resource<NnGraph>) -> NnResult<Resource<NnContext>> {
        let graph = self.table.get(&this)?.graph.clone();
        match graph.context() {
            Ok(context) => Ok(Ok(self.table.push(NnContext {
                context: Arc::new(Mutex::new(context)),
            })?)),
            Err(e) => self.nn_err(e),
        }
    }

    fn drop(&mut self, this: Resource<NnGraph>) -> wasmtime::Result<()> {
        let g = self.table.delete(this)?;
        self.ctx.give_back(g.held);
        Ok(())
    }
}

impl inference::Host for NnCtxView<'_> {}

impl inference::HostGraphExecutionContext for NnCtxView<'_> {
    async fn compute(
        &mut self,
        this: Resource<NnContext>,
        inputs: Vec<inference::NamedTensor>,
    ) -> NnResult<Vec<inference::NamedTensor>> {
        // The input handles are owned: they move to the host and are used up.
        let mut named = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let NnTensor(data) = self.table.delete(t)?;
            self.ctx.give_back(data.data.len());
            named.push((name, data));
        }
        let context = self.table.get(&this)?.context.clone();
        let result = graphs::blocking(move || {
            let mut context = context.lock().unwrap_or_else(|e| e.into_inner());
            context.infer(&named)
        })
        .await;
        let outputs = match result {
            Ok(o) => o,
            Err(e) => return self.nn_err(e),
        };
        let bytes: usize = outputs.iter().map(|(_, t)| t.data.len()).sum();
        if let Err(e) = self.ctx.take(bytes) {
            return self.nn_err(e);
        }
        let mut out = Vec::with_capacity(outputs.len());
        for (name, t) in outputs {
            out.push((name, self.table.push(NnTensor(t))?));
        }
        Ok(Ok(out))
    }

    fn drop(&mut self, this: Resource<NnContext>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl tensor::Host for NnCtxView<'_> {}

impl tensor::HostTensor for NnCtxView<'_> {
    fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: tensor::TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<NnTensor>> {
        // A constructor cannot return an error: a tensor beyond the budget traps.
        self.ctx
            .take(data.len())
            .map_err(|e| wasmtime::Error::msg(e.message))?;
        Ok(self.table.push(NnTensor(TensorData {
            dims: dimensions,
            ty: to_type(ty),
            data,
        }))?)
    }

    fn dimensions(&mut self, this: Resource<NnTensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&this)?.0.dims.clone())
    }

    fn ty(&mut self, this: Resource<NnTensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(from_type(self.table.get(&this)?.0.ty))
    }

    fn data(&mut self, this: Resource<NnTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&this)?.0.data.clone())
    }

    fn drop(&mut self, this: Resource<NnTensor>) -> wasmtime::Result<()> {
        let NnTensor(t) = self.table.delete(this)?;
        self.ctx.give_back(t.data.len());
        Ok(())
    }
}

impl errors::Host for NnCtxView<'_> {}

impl errors::HostError for NnCtxView<'_> {
    fn code(&mut self, this: Resource<NnError>) -> wasmtime::Result<errors::ErrorCode> {
        Ok(self.table.get(&this)?.code)
    }

    fn data(&mut self, this: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.message.clone())
    }

    fn drop(&mut self, this: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(budget: usize, host: &Arc<MemoryBudget>) -> NnCtx {
        NnCtx::new(
            Arc::new(Graphs::open(std::path::Path::new("/nonexistent"), None)),
            NnConfig {
                allowed_models: Arc::from([]),
                budget_bytes: budget,
            },
            host.clone(),
        )
    }

    #[test]
    fn budget_counts_taken_and_given_back_bytes() {
        let host = MemoryBudget::fixed(1000);
        let mut g = grant(100, &host);
        g.take(60).unwrap();
        let e = g.take(41).unwrap_err();
        assert_eq!(e.code, errors::ErrorCode::TooLarge);
        assert!(
            e.message.contains("memory limit of 100 bytes"),
            "{}",
            e.message
        );
        g.give_back(60);
        g.take(100).unwrap();
        assert!(g.take(usize::MAX).is_err());
        assert_eq!(host.usage().functions_bytes, 100);
        drop(g);
        assert_eq!(
            host.usage().functions_bytes,
            0,
            "released with the instance"
        );
    }

    #[test]
    fn the_host_budget_bounds_what_all_instances_hold() {
        let host = MemoryBudget::fixed(150);
        let mut a = grant(100, &host);
        let mut b = grant(100, &host);
        a.take(100).unwrap();
        let e = b.take(60).unwrap_err();
        assert_eq!(e.code, errors::ErrorCode::TooLarge);
        assert!(
            e.message.contains("host's memory budget of 150 bytes"),
            "{}",
            e.message
        );
        assert_eq!(host.usage().functions_bytes, 100, "a refusal holds nothing");
        b.take(50).unwrap();
        a.give_back(100);
        b.take(50).unwrap();
        assert_eq!(host.usage().functions_bytes, 100);
    }

    #[test]
    fn tensor_types_round_trip_and_errors_keep_their_kind() {
        for t in [
            tensor::TensorType::Fp16,
            tensor::TensorType::Fp32,
            tensor::TensorType::Fp64,
            tensor::TensorType::Bf16,
            tensor::TensorType::U8,
            tensor::TensorType::I32,
            tensor::TensorType::I64,
        ] {
            assert_eq!(from_type(to_type(t)), t);
        }
        let e: NnError = TensorError::new(TensorErrorKind::InvalidArgument, "m").into();
        assert_eq!(e.code, errors::ErrorCode::InvalidArgument);
    }
}
