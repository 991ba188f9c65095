//! What the examples share: where the venv and the default model are.

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// SLINFER_VENV, else `<repo>/.venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("SLINFER_VENV")
        .map(PathBuf::from)
        .unwrap_or(repo().join(".venv"))
}

/// The default model's package: in SLINFER_MODELS_DIR, else
/// `<repo>/.data/models`.
pub fn default_model() -> PathBuf {
    std::env::var_os("SLINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or(repo().join(".data/models"))
        .join("smollm2-135m-instruct")
}
