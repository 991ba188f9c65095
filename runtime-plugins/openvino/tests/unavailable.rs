//! Without `libopenvino_c` the backend is an error, not a panic. A test binary
//! of its own: nothing else loads the library in this process.

use std::path::Path;

use slinfer_engine::EngineError;
use slinfer_openvino::{BackendOptions, OpenVinoBackend, find_library};

#[test]
fn missing_library_is_reported_not_a_panic() {
    let e = find_library(Some(Path::new("/nonexistent/libopenvino_c.so")), None).unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
    let e = find_library(Some(Path::new("/")), None).unwrap_err();
    assert!(e.contains("no libopenvino_c in /"), "{e}");
    if std::env::var_os("SLINFER_VENV").is_none()
        && std::env::var_os("VIRTUAL_ENV").is_none()
        && std::env::var_os(slinfer_openvino::LIB_ENV).is_none()
    {
        let e = find_library(None, Some(Path::new("/nonexistent-venv"))).unwrap_err();
        assert!(e.contains("not installed"), "{e}");
    }
    for lib in ["/nonexistent/libopenvino_c.so", "/etc/hostname"] {
        let r = OpenVinoBackend::new(&BackendOptions {
            library: Some(lib.into()),
            ..Default::default()
        });
        match r {
            Err(EngineError::Unavailable(m)) => {
                assert!(m.starts_with("OpenVINO unavailable: "), "{m}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{lib} loaded"),
        }
    }
}
