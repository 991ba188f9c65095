//! `scripts/models/import.py` on bad inputs (missing, not GGUF, truncated,
//! unsupported architecture, unsupported quantization, neither GGUF nor IR):
//! a clear error and nothing left in the models dir; an OpenVINO IR folder
//! (IR + config.json + tokenizer.json) imports with the GGUF's numbers. And
//! re-importing the default model is a no-op.

use std::path::PathBuf;
use std::process::Command;

use slinfer_test_support::{models_dir, repo_root, venv};

fn python() -> PathBuf {
    venv().join("bin/python")
}

#[test]
fn bad_inputs_get_clear_errors_and_leave_nothing() {
    let out = Command::new(python())
        .arg(repo_root().join("scripts/models/test_import.py"))
        .output()
        .expect("run the venv's python (./dev test sets it up)");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "test_import.py failed:\n{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.lines().filter(|l| l.starts_with("ok")).count() >= 6);
}

#[test]
fn importing_again_skips() {
    let models = models_dir();
    let out = Command::new(python())
        .arg(repo_root().join("scripts/models/import.py"))
        .arg("--models-dir")
        .arg(&models)
        .arg("default")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already imported"), "{err}");
}
