//! A model package: the folder `scripts/models/import.py` writes under the
//! data dir's `models/` — `model.toml` (name and [`ModelConfig`]), the source
//! `model.gguf`, the OpenVINO IR (stateful; the engine turns it into its paged-attention
//! form at load time) and
//! `tokenizer.json`.

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
