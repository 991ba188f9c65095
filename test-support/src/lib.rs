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

/// Runs `work` while sampling `gauge` every `every`, then waits up to
/// `settle` for the gauge to fall below the peak it reached (a pool that
/// grew under load and shrinks after). Returns the work's output, the peak
/// and the last reading.
pub async fn peak_then_fall<T>(
    work: impl std::future::Future<Output = T>,
    gauge: impl Fn() -> usize,
    every: std::time::Duration,
    settle: std::time::Duration,
) -> (T, usize, usize) {
    let mut peak = gauge();
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tokio::time::sleep(every) => peak = peak.max(gauge()),
        }
    };
    let deadline = tokio::time::Instant::now() + settle;
    let mut last = gauge();
    while last >= peak && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(every).await;
        last = gauge();
    }
    (out, peak, last)
}
