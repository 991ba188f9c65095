//! Tensor models for `wasi:nn`: the graphs registered with the host.
//!
//! A graph is a tensor-model package in the models dir
//! ([`slinfer_engine::package::TensorPackage`], `kind = "tensor"`), named by
//! its folder. [`Graphs::open`] lists them at start; a graph is compiled on
//! the tensor engine handed in (the binary passes OpenVINO's) the first time
//! a guest loads it, and the compiled graph is shared by every function and
//! instance from then on (each execution context is its own). Compiling and
//! computing run on tokio's blocking pool, never on a runtime worker.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use slinfer_engine::package::{PackageKind, TensorPackage, package_dirs};
use slinfer_engine::tensor::{TensorBackend, TensorError, TensorErrorKind, TensorGraph};

/// The registered graphs and the engine that compiles them.
pub struct Graphs {
    packages: HashMap<String, Registered>,
    engine: Option<Arc<dyn TensorBackend>>,
}

struct Registered {
    package: TensorPackage,
    compiled: tokio::sync::OnceCell<Arc<dyn TensorGraph>>,
}

impl Graphs {
    /// The tensor-model packages of `models_dir` (none when it does not
    /// exist; a broken package is skipped with a warning), compiled on
    /// `engine` (`None`: this host has none, and loading a graph says so).
    pub fn open(models_dir: &Path, engine: Option<Arc<dyn TensorBackend>>) -> Graphs {
        let mut packages = HashMap::new();
        for dir in package_dirs(models_dir, PackageKind::Tensor).unwrap_or_default() {
            match TensorPackage::open(&dir) {
                Ok(package) => {
                    packages.insert(
                        package.name.clone(),
                        Registered {
                            package,
                            compiled: tokio::sync::OnceCell::new(),
                        },
                    );
                }
                Err(e) => tracing::warn!("skipping tensor model {}: {e}", dir.display()),
            }
        }
        if !packages.is_empty() {
            let mut names: Vec<&String> = packages.keys().collect();
            names.sort();
            tracing::info!(graphs = ?names, "wasi:nn graphs registered");
        }
        Graphs { packages, engine }
    }

    /// Names of the registered graphs, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.packages.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.packages.contains_key(name)
    }

    fn engine(&self) -> Result<Arc<dyn TensorBackend>, TensorError> {
        self.engine.clone().ok_or_else(|| {
            TensorError::new(
                TensorErrorKind::Runtime,
                "this host has no tensor engine (OpenVINO did not load: see the server log)",
            )
        })
    }

    /// The compiled graph `name` (compiled once, on a blocking thread);
    /// `Ok(None)` when no such graph is registered.
    pub async fn get(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<Arc<dyn TensorGraph>>, TensorError> {
        let Some(reg) = self.packages.get(name) else {
            return Ok(None);
        };
        let model = reg
            .compiled
            .get_or_try_init(|| {
                let this = self.clone();
                let (xml, weights) = (reg.package.xml.clone(), reg.package.weights.clone());
                let name = name.to_owned();
                blocking(move || {
                    let started = std::time::Instant::now();
                    let graph = this.engine()?.compile_files(&xml, &weights)?;
                    tracing::info!(graph = %name, elapsed_ms = started.elapsed().as_millis() as u64, "wasi:nn graph compiled");
                    Ok(graph)
                })
            })
            .await?;
        Ok(Some(model.clone()))
    }

    /// Compile an OpenVINO IR a guest passed as bytes (its own, not shared).
    pub async fn compile(
        self: &Arc<Self>,
        xml: Vec<u8>,
        weights: Vec<u8>,
    ) -> Result<Arc<dyn TensorGraph>, TensorError> {
        let this = self.clone();
        blocking(move || this.engine()?.compile_bytes(&xml, &weights)).await
    }
}

/// Run `f` on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TensorError> + Send + 'static,
) -> Result<T, TensorError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(TensorError::new(
            TensorErrorKind::Runtime,
            format!("the engine thread failed: {e}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registers_good_tensor_packages_only() {
        let root = tempfile::tempdir().unwrap();
        let write = |dir: &str, toml: &str, files: &[&str]| {
            let d = root.path().join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("model.toml"), toml).unwrap();
            for f in files {
                std::fs::write(d.join(f), "").unwrap();
            }
        };
        let tensor = |name: &str| {
            format!(
                "kind = \"tensor\"\nname = \"{name}\"\nformat = \"openvino\"\n\
                 [files]\nxml = \"model.xml\"\nweights = \"model.bin\"\n"
            )
        };
        write("good", &tensor("good"), &["model.xml", "model.bin"]);
        write("misnamed", &tensor("other"), &["model.xml", "model.bin"]);
        write("no-weights", &tensor("no-weights"), &["model.xml"]);
        write("an-llm", "format_version = 1\nname = \"an-llm\"\n", &[]);
        let graphs = Arc::new(Graphs::open(root.path(), None));
        assert_eq!(graphs.names(), vec!["good".to_string()]);
        assert!(graphs.contains("good") && !graphs.contains("an-llm"));
        assert!(graphs.get("an-llm").await.unwrap().is_none());
        assert!(
            Graphs::open(&root.path().join("absent"), None)
                .names()
                .is_empty()
        );
    }
}
