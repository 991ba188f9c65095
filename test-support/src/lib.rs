//! What slinfer's test suites share: where the repository, the project
//! virtualenv and the imported models are, OpenVINO's reference answers
//! ([`reference`]), and tiny real model packages for the pure-Rust
//! reference engine ([`tiny`]). A dev-dependency only; it never enters a
//! shipped binary.

pub mod reference;
pub mod tiny;

use std::path::PathBuf;

/// The default model (`./dev test` imports it).
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support/ has a parent")
        .to_path_buf()
}

/// The project virtualenv (OpenVINO, GenAI, the `openai` client):
/// `$SLINFER_VENV` as `./dev` exports it, else `<repo>/.venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("SLINFER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"))
}

/// The imported models: `$SLINFER_MODELS_DIR` as `./dev test` exports it,
/// else `<repo>/.data/models`. Panics, saying how to fix it, when the
/// default model is not there.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("SLINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".data/models"));
    assert!(
        dir.join(DEFAULT_MODEL).join("model.toml").is_file(),
        "the default model is not imported in {}: run `./dev test`, or \
         `.venv/bin/python scripts/models/import.py --models-dir {0} default`",
        dir.display()
    );
    dir
}

/// The default model's package folder.
pub fn default_model_dir() -> PathBuf {
    models_dir().join(DEFAULT_MODEL)
}
