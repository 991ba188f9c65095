//! Tensor models on OpenVINO against numpy: the classifier package that
//! `scripts/models/make_classifier.py` builds (into this test's own temporary
//! models dir) must give the answers its `reference.json` records.

use std::path::PathBuf;
use std::process::Command;

use slinfer_test_support::{repo_root, venv};

use slinfer_engine::tensor::{TensorBackend, TensorData, TensorErrorKind, TensorType};
use slinfer_openvino::tensor::TensorEngine;

/// Build the package (idempotent) and return its folder.
fn package() -> PathBuf {
    let models = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tensor-models");
    let out = Command::new(venv().join("bin/python"))
        .arg(repo_root().join("scripts/models/make_classifier.py"))
        .arg("--models-dir")
        .arg(&models)
        .output()
        .expect("running make_classifier.py (run `./dev test` to create .venv)");
    assert!(
        out.status.success(),
        "make_classifier.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn features(v: &[f32]) -> Vec<(String, TensorData)> {
    vec![(
        "features".to_string(),
        TensorData {
            dims: vec![1, v.len() as u32],
            ty: TensorType::F32,
            data: f32s(v),
        },
    )]
}

#[test]
fn classifier_matches_numpy_from_files_and_from_bytes() {
    let dir = package();
    let engine = TensorEngine::new(None, Some(&venv())).unwrap();
    let from_files = engine
        .compile_files(&dir.join("model.xml"), &dir.join("model.bin"))
        .unwrap();
    let from_bytes = engine
        .compile_bytes(
            &std::fs::read(dir.join("model.xml")).unwrap(),
            &std::fs::read(dir.join("model.bin")).unwrap(),
        )
        .unwrap();
    assert_eq!(from_files.inputs()[0].name, "features");
    assert_eq!(from_files.outputs()[0].name, "probabilities");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    for model in [&from_files, &from_bytes] {
        let mut req = model.context().unwrap();
        for case in reference["cases"].as_array().unwrap() {
            let x: Vec<f32> = serde_json::from_value(case["input"].clone()).unwrap();
            let want: Vec<f32> = serde_json::from_value(case["probabilities"].clone()).unwrap();
            let out = req.infer(&features(&x)).unwrap();
            assert_eq!(out.len(), 1);
            let (name, t) = &out[0];
            assert_eq!(name, "probabilities");
            assert_eq!((t.dims.as_slice(), t.ty), (&[1, 3][..], TensorType::F32));
            let got: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{x:?}: got {got:?}, numpy {want:?}");
            }
        }
    }
}

#[test]
fn bad_inputs_and_bad_ir_are_refused_by_kind() {
    let dir = package();
    let engine = TensorEngine::new(None, Some(&venv())).unwrap();
    let model = engine
        .compile_files(&dir.join("model.xml"), &dir.join("model.bin"))
        .unwrap();
    let mut req = model.context().unwrap();
    let e = req.infer(&features(&[1.0, 2.0])).unwrap_err();
    assert_eq!(e.kind, TensorErrorKind::InvalidArgument);
    assert!(e.message.contains("[1, 4]"), "{e}");
    let mut wrong_name = features(&[1.0; 4]);
    wrong_name[0].0 = "pixels".into();
    let e = req.infer(&wrong_name).unwrap_err();
    assert!(e.message.contains("no input \"pixels\""), "{e}");
    let e = req.infer(&[]).unwrap_err();
    assert!(e.message.contains("\"features\" is missing"), "{e}");
    // The request still works after refusals.
    req.infer(&features(&[1.0; 4])).unwrap();

    let e = engine
        .compile_bytes(b"\x00garbage", b"more garbage")
        .err()
        .unwrap();
    assert_eq!(e.kind, TensorErrorKind::InvalidEncoding);
    let e = engine
        .compile_bytes(b"<net><layers></net>", b"")
        .err()
        .unwrap();
    assert_eq!(e.kind, TensorErrorKind::InvalidEncoding, "{e}");
}

/// `y = x + x` IRs for each element type wasi:nn commonly uses, written by
/// the openvino Python package at test time.
const DOUBLE_IR: &str = r#"
import sys, openvino as ov, openvino.opset13 as ops
for t in ["f16", "f32", "u8", "i32", "i64"]:
    x = ops.parameter([2, 3], getattr(ov.Type, t), name="x")
    y = ops.add(x, x)
    y.output(0).get_tensor().set_names({"y"})
    ov.save_model(ov.Model([y], [x], t), f"{sys.argv[1]}/{t}.xml", compress_to_fp16=False)
"#;

#[test]
fn every_common_element_type_goes_in_and_comes_out() {
    let dir = tempfile_dir("double-ir");
    let out = Command::new(venv().join("bin/python"))
        .args(["-c", DOUBLE_IR])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let engine = TensorEngine::new(None, Some(&venv())).unwrap();
    // Values 0..6 as each type's little-endian bytes, and their doubles.
    let f16 = |v: u16| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, TensorType, Vec<u8>, Vec<u8>)> = vec![
        (
            "f16",
            TensorType::F16,
            // 0, 1, 2, 3, 4, 5 and 0, 2, 4, 6, 8, 10 in IEEE half precision.
            [0x0000, 0x3c00, 0x4000, 0x4200, 0x4400, 0x4500]
                .into_iter()
                .flat_map(f16)
                .collect(),
            [0x0000, 0x4000, 0x4400, 0x4600, 0x4800, 0x4900]
                .into_iter()
                .flat_map(f16)
                .collect(),
        ),
        (
            "f32",
            TensorType::F32,
            f32s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
            f32s(&[0.0, 2.0, 4.0, 6.0, 8.0, 10.0]),
        ),
        (
            "u8",
            TensorType::U8,
            (0..6).collect(),
            (0..6).map(|v| v * 2).collect(),
        ),
        (
            "i32",
            TensorType::I32,
            (0..6i32).flat_map(|v| (v - 3).to_le_bytes()).collect(),
            (0..6i32)
                .flat_map(|v| (2 * (v - 3)).to_le_bytes())
                .collect(),
        ),
        (
            "i64",
            TensorType::I64,
            // The CPU plugin computes i64 in i32 (measured: 1 << 40 comes
            // back 0), so the values stay within i32.
            (0..6i64)
                .flat_map(|v| (-v * 100_000).to_le_bytes())
                .collect(),
            (0..6i64)
                .flat_map(|v| (-v * 200_000).to_le_bytes())
                .collect(),
        ),
    ];
    for (name, ty, x, want) in cases {
        let model = engine
            .compile_files(
                &dir.join(format!("{name}.xml")),
                &dir.join(format!("{name}.bin")),
            )
            .unwrap();
        assert_eq!(model.inputs()[0].ty, ty, "{name}");
        let x = TensorData {
            dims: vec![2, 3],
            ty,
            data: x,
        };
        let out = model
            .context()
            .unwrap()
            .infer(&[("x".to_string(), x)])
            .unwrap();
        assert_eq!(out[0].0, "y");
        assert_eq!(
            out[0].1,
            TensorData {
                dims: vec![2, 3],
                ty,
                data: want
            },
            "{name}"
        );
    }
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
