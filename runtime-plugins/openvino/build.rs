//! Builds `shim/paged_attention.cpp` into `libslinfer_ov_paged.so` against the
//! `openvino` wheel's headers in the project virtualenv (`$SLINFER_VENV`,
//! `$VIRTUAL_ENV`, or `<repo>/.venv`). Without the wheel the crate still
//! builds; the backend then reports "OpenVINO unavailable" at run time.

use std::path::{Path, PathBuf};
use std::process::Command;

fn wheel_dir() -> Option<PathBuf> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").ok()?);
    let venvs = ["SLINFER_VENV", "VIRTUAL_ENV"]
        .iter()
        .filter_map(|k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .chain(std::iter::once(manifest.join("../../.venv")));
    for v in venvs {
        for lib in ["lib", "lib64"] {
            let Ok(rd) = std::fs::read_dir(v.join(lib)) else {
                continue;
            };
            for py in rd.flatten() {
                let ov = py.path().join("site-packages/openvino");
                if ov
                    .join("include/openvino/pass/sdpa_to_paged_attention.hpp")
                    .is_file()
                {
                    return Some(ov);
                }
            }
        }
    }
    None
}

fn libopenvino(libs: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(libs)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("libopenvino.so"))
        .collect();
    names.sort();
    names.into_iter().next()
}

fn main() {
    println!("cargo:rerun-if-changed=shim/paged_attention.cpp");
    println!("cargo:rerun-if-env-changed=SLINFER_VENV");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("libslinfer_ov_paged.so");
    let built = (|| -> Result<(), String> {
        let ov = wheel_dir().ok_or("the openvino wheel (with headers) is not in the virtualenv")?;
        println!("cargo:rerun-if-changed={}", ov.join("libs").display());
        let libs = ov.join("libs");
        let lib = libopenvino(&libs).ok_or("no libopenvino.so in the wheel")?;
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-shared", "-fPIC", "-O1", "-std=c++17", "-w"])
            .arg(format!("-I{}", ov.join("include").display()))
            .arg("shim/paged_attention.cpp")
            .arg("-o")
            .arg(&out)
            .arg(format!("-L{}", libs.display()))
            .arg(format!("-l:{lib}"))
            .arg(format!("-Wl,-rpath,{}", libs.display()))
            .status()
            .map_err(|e| format!("{cxx}: {e}"))?;
        if !status.success() {
            return Err(format!("{cxx} failed ({status})"));
        }
        Ok(())
    })();
    match built {
        Ok(()) => println!("cargo:rustc-env=SLINFER_OV_SHIM={}", out.display()),
        Err(e) => {
            // Build again once the virtualenv appears (a missing path reruns).
            let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
            println!(
                "cargo:rerun-if-changed={}",
                manifest.join("../../.venv/lib").display()
            );
            println!("cargo:warning=slinfer-openvino built without its paged-attention shim: {e}");
            println!("cargo:rustc-env=SLINFER_OV_SHIM=");
            println!("cargo:rustc-env=SLINFER_OV_SHIM_ERROR={e}");
        }
    }
}
