//! A model package: the folder `scripts/models/import.py` writes under the
//! data dir's `models/` — `model.toml` (name and [`ModelConfig`]), the source
//! `model.gguf`, the OpenVINO IR (stateful; the engine turns it into its paged-attention
//! form at load time) and
//! `tokenizer.json`.
//!
//! The same folder may instead hold a *tensor model* for `wasi:nn`
//! ([`TensorPackage`], `kind = "tensor"` in `model.toml`): an OpenVINO IR that
//! guests load by the folder's name. [`package_kind`] tells the two apart; the
//! LLM loader skips tensor packages and the `wasi:nn` registry skips LLMs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{EngineError, ModelConfig};

/// The package format this crate reads.
pub const FORMAT_VERSION: u32 = 1;

/// Files of a package, relative to its folder.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PackageFiles {
    #[serde(default)]
    pub gguf: Option<String>,
    /// The stateful IR (`openvino_genai.LLMPipeline` loads its folder; the
    /// OpenVINO engine applies the paged-attention transformation on load).
    #[serde(default)]
    pub openvino_ir: Option<String>,
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Weights as one safetensors file with Hugging Face tensor names (an
    /// alternative to `gguf`; the shape comes from `[config]`).
    #[serde(default)]
    pub safetensors: Option<String>,
}

/// `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageManifest {
    pub format_version: u32,
    pub name: String,
    /// `"default"` or the path imported from.
    #[serde(default)]
    pub source: String,
    /// KV bytes per token over all layers at f16 (backends report their own
    /// exact figure, e.g. a u8 cache with quantisation parameters).
    pub kv_bytes_per_token: u64,
    /// The model's Jinja chat template, if it has one.
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub files: PackageFiles,
    pub config: ModelConfig,
}

/// An opened package folder.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub manifest: PackageManifest,
}

impl ModelPackage {
    /// Read and check `dir/model.toml`.
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        if kind_of(&path, &text)? == PackageKind::Tensor {
            return Err(EngineError::Model(format!(
                "{}: a tensor model (kind = \"tensor\"), not an LLM",
                path.display()
            )));
        }
        let manifest: PackageManifest = toml::from_str(&text)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(EngineError::Model(format!(
                "{}: package format {} (this build reads {FORMAT_VERSION}); re-import the model",
                path.display(),
                manifest.format_version
            )));
        }
        manifest.config.validate()?;
        Ok(ModelPackage {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    fn file(&self, f: &Option<String>) -> Option<PathBuf> {
        f.as_ref().map(|f| self.dir.join(f))
    }
    pub fn gguf_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.files.gguf)
    }
    pub fn openvino_ir_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.files.openvino_ir)
    }
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.files.tokenizer)
    }
    pub fn safetensors_path(&self) -> Option<PathBuf> {
        self.file(&self.manifest.files.safetensors)
    }

    /// The weights the pure-Rust loaders read (the reference and CUDA
    /// engines): the GGUF, else the safetensors file.
    pub fn weights_file(&self) -> Result<WeightsFile, EngineError> {
        if let Some(p) = self.gguf_path() {
            return Ok(WeightsFile::Gguf(p));
        }
        if let Some(p) = self.safetensors_path() {
            return Ok(WeightsFile::Safetensors(p));
        }
        Err(EngineError::Model(format!(
            "{}: the package holds no GGUF or safetensors weights",
            self.dir.display()
        )))
    }
}

/// A package's weights file, by format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFile {
    Gguf(PathBuf),
    Safetensors(PathBuf),
}

/// What a package folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageKind {
    /// An LLM package ([`ModelPackage`]; `kind` absent or `"llm"`).
    Llm,
    /// A tensor model for `wasi:nn` ([`TensorPackage`]; `kind = "tensor"`).
    Tensor,
}

fn kind_of(path: &Path, text: &str) -> Result<PackageKind, EngineError> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        kind: Option<String>,
    }
    let probe: Probe =
        toml::from_str(text).map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
    match probe.kind.as_deref() {
        None | Some("llm") => Ok(PackageKind::Llm),
        Some("tensor") => Ok(PackageKind::Tensor),
        Some(k) => Err(EngineError::Model(format!(
            "{}: unknown package kind {k:?} (\"llm\" or \"tensor\")",
            path.display()
        ))),
    }
}

/// The kind of the package in `dir` (from `dir/model.toml`).
pub fn package_kind(dir: &Path) -> Result<PackageKind, EngineError> {
    let path = dir.join("model.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    kind_of(&path, &text)
}

/// The folders of `models_dir` holding a `model.toml` of `kind`, sorted. A
/// `model.toml` whose kind cannot be read counts as an LLM's, so that the
/// LLM loader reports what is wrong with it.
pub fn package_dirs(models_dir: &Path, kind: PackageKind) -> Result<Vec<PathBuf>, EngineError> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(models_dir)
        .map_err(|e| EngineError::io(models_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        // Hidden folders are imports in progress and removed packages.
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .filter(|p| p.join("model.toml").is_file())
        .filter(|p| package_kind(p).unwrap_or(PackageKind::Llm) == kind)
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// `model.toml` of a tensor-model package.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorManifest {
    kind: String,
    name: String,
    format: String,
    files: TensorFiles,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorFiles {
    xml: String,
    weights: String,
}

/// A tensor-model package: `<models>/<name>/model.toml` with
///
/// ```toml
/// kind = "tensor"
/// name = "<name>"            # must equal the folder's name
/// format = "openvino"        # the only format so far
/// [files]
/// xml = "model.xml"          # relative to the folder
/// weights = "model.bin"
/// ```
///
/// Named `model.xml`/`model.bin`, the folder is also what
/// `wasmtime serve -S nn-graph=openvino::<folder>` loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPackage {
    pub dir: PathBuf,
    pub name: String,
    pub xml: PathBuf,
    pub weights: PathBuf,
}

impl TensorPackage {
    /// Read and check `dir/model.toml` and that its files exist.
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let bad = |m: String| EngineError::Model(format!("{}: {m}", path.display()));
        let m: TensorManifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if m.kind != "tensor" {
            return Err(bad(format!("kind is {:?}, not \"tensor\"", m.kind)));
        }
        if m.format != "openvino" {
            return Err(bad(format!(
                "format {:?} is not supported (\"openvino\" only)",
                m.format
            )));
        }
        let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if m.name != folder {
            return Err(bad(format!(
                "name {:?} differs from the folder's name {folder:?}",
                m.name
            )));
        }
        let file = |f: &str| {
            let rel = Path::new(f);
            if f.is_empty()
                || !rel
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(bad(format!("file {f:?} must be a path inside the package")));
            }
            let p = dir.join(rel);
            if !p.is_file() {
                return Err(bad(format!("{} is missing", p.display())));
            }
            Ok(p)
        };
        Ok(TensorPackage {
            dir: dir.to_path_buf(),
            xml: file(&m.files.xml)?,
            weights: file(&m.files.weights)?,
            name: m.name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_packages_are_checked_and_told_apart_from_llms() {
        let root = std::env::temp_dir().join(format!("slinfer-tpkg-test-{}", std::process::id()));
        let dir = root.join("clf");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |s: &str| std::fs::write(dir.join("model.toml"), s).unwrap();
        let good = "kind = \"tensor\"\nname = \"clf\"\nformat = \"openvino\"\n[files]\nxml = \"model.xml\"\nweights = \"model.bin\"\n";
        write(good);
        let err = |r: Result<TensorPackage, EngineError>| r.unwrap_err().to_string();
        assert!(err(TensorPackage::open(&dir)).contains("model.xml is missing"));
        std::fs::write(dir.join("model.xml"), "<net/>").unwrap();
        std::fs::write(dir.join("model.bin"), "").unwrap();
        let p = TensorPackage::open(&dir).unwrap();
        assert_eq!(
            (p.name.as_str(), p.xml.clone()),
            ("clf", dir.join("model.xml"))
        );
        assert_eq!(package_kind(&dir).unwrap(), PackageKind::Tensor);
        assert!(
            ModelPackage::open(&dir)
                .unwrap_err()
                .to_string()
                .contains("tensor model")
        );
        assert_eq!(
            package_dirs(&root, PackageKind::Tensor).unwrap(),
            vec![dir.clone()]
        );
        assert!(package_dirs(&root, PackageKind::Llm).unwrap().is_empty());

        write(&good.replace("\"clf\"", "\"other\""));
        assert!(err(TensorPackage::open(&dir)).contains("folder's name"));
        write(&good.replace("openvino", "onnx"));
        assert!(err(TensorPackage::open(&dir)).contains("not supported"));
        write(&good.replace("\"model.bin\"", "\"../x.bin\""));
        assert!(err(TensorPackage::open(&dir)).contains("inside the package"));
        write(&format!("{good}extra = 1\n"));
        assert!(err(TensorPackage::open(&dir)).contains("extra"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn reads_a_manifest() {
        let dir = std::env::temp_dir().join(format!("slinfer-pkg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = ModelConfig::smollm2_135m();
        let m = PackageManifest {
            format_version: FORMAT_VERSION,
            name: "m".into(),
            source: "default".into(),
            kv_bytes_per_token: cfg.kv_bytes_per_token(2),
            chat_template: Some("{{ x }}\n\"q\"".into()),
            files: PackageFiles {
                gguf: Some("model.gguf".into()),
                ..Default::default()
            },
            config: cfg,
        };
        std::fs::write(dir.join("model.toml"), toml::to_string(&m).unwrap()).unwrap();
        let p = ModelPackage::open(&dir).unwrap();
        assert_eq!(p.manifest, m);
        assert_eq!(p.gguf_path(), Some(dir.join("model.gguf")));
        assert_eq!(p.tokenizer_path(), None);
        std::fs::write(dir.join("model.toml"), "format_version = 9").unwrap();
        assert!(matches!(
            ModelPackage::open(&dir),
            Err(EngineError::Model(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
