//! Paths the integration tests share.

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project virtualenv: `$SLINFER_VENV`, else `<repo>/.venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("SLINFER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"))
}
