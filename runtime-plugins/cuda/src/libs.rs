//! Finding the CUDA libraries at run time. cudarc opens them by bare soname
//! (`libnvrtc.so.13`, `libcublas.so.13`, `libcuda.so.1`); we look in the
//! places slinfer installs them and open each by absolute path first, so the
//! dynamic loader then hands cudarc the library already loaded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Colon-separated extra directories to search, first.
pub const LIB_DIRS_ENV: &str = "SLINFER_CUDA_LIB_DIRS";
/// The project's virtualenv (its `site-packages/nvidia/*/lib` is searched).
pub const VENV_ENV: &str = "SLINFER_VENV";

/// Libraries in load order (dependencies first), by file name.
const LIBS: &[&str] = &[
    "libcuda.so.1",
    "libnvrtc-builtins.so.13.0",
    "libnvrtc.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
];

/// The directories searched, in order: `$SLINFER_CUDA_LIB_DIRS`,
/// `/usr/local/cuda/lib64`, then `site-packages/nvidia/*/lib` under
/// `$SLINFER_VENV` or `$VIRTUAL_ENV`.
pub fn search_dirs() -> Vec<PathBuf> {
    search_dirs_from(
        std::env::var(LIB_DIRS_ENV).ok().as_deref(),
        std::env::var(VENV_ENV)
            .ok()
            .or_else(|| std::env::var("VIRTUAL_ENV").ok())
            .as_deref(),
    )
}

fn search_dirs_from(lib_dirs: Option<&str>, venv: Option<&str>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = lib_dirs
        .unwrap_or("")
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    if let Some(venv) = venv.filter(|v| !v.is_empty()) {
        let lib = Path::new(venv).join("lib");
        let mut found = Vec::new();
        for py in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
            let nv = py.path().join("site-packages").join("nvidia");
            for pkg in std::fs::read_dir(&nv).into_iter().flatten().flatten() {
                let l = pkg.path().join("lib");
                if l.is_dir() {
                    found.push(l);
                }
            }
        }
        found.sort();
        dirs.extend(found);
    }
    dirs
}

/// Where each library was found (`None`: not in the search dirs; the system
/// loader may still find it).
pub fn locate() -> Vec<(&'static str, Option<PathBuf>)> {
    let dirs = search_dirs();
    LIBS.iter()
        .map(|name| {
            (
                *name,
                dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()),
            )
        })
        .collect()
}

/// Open every library found in the search dirs by absolute path, once per
/// process. Returns a line per library for logs.
pub fn preload() -> &'static [String] {
    static DONE: OnceLock<Vec<String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut report = Vec::new();
        for (name, path) in locate() {
            let Some(path) = path else {
                report.push(format!("{name}: not in search dirs"));
                continue;
            };
            // SAFETY: these are NVIDIA's own libraries, whose initialisers are
            // safe to run; the handle is leaked on purpose so the library stays
            // loaded (and findable by soname) for the life of the process.
            let opened = unsafe {
                libloading::os::unix::Library::open(
                    Some(&path),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            };
            match opened {
                Ok(lib) => {
                    std::mem::forget(lib);
                    report.push(format!("{name}: {}", path.display()));
                }
                Err(e) => report.push(format!("{name}: {} failed: {e}", path.display())),
            }
        }
        report
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_env_then_system_then_venv() {
        let tmp = std::env::temp_dir().join(format!("slinfer-cuda-libs-{}", std::process::id()));
        let lib = tmp.join("lib/python3.13/site-packages/nvidia/cuda_nvrtc/lib");
        std::fs::create_dir_all(&lib).unwrap();
        let dirs = search_dirs_from(Some("/a:/b::"), Some(tmp.to_str().unwrap()));
        assert_eq!(dirs[0], PathBuf::from("/a"));
        assert_eq!(dirs[1], PathBuf::from("/b"));
        assert_eq!(dirs[2], PathBuf::from("/usr/local/cuda/lib64"));
        assert_eq!(dirs[3], lib);
        assert_eq!(dirs.len(), 4);
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(search_dirs_from(None, None).len(), 1);
    }
}
