//! Hugging Face safetensors folders: one `model.safetensors`, or shards named
//! by `model.safetensors.index.json`. Tensors are found by name and handed out
//! as (shape, type, bytes) for [`crate::weights`] to convert.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::EngineError;
use crate::quant::{RawTensor, TensorType};

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    /// The type, or the message naming the unsupported one.
    ty: Result<TensorType, String>,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a model folder, held in memory.
#[derive(Debug)]
pub struct SafetensorsFolder {
    buffers: Vec<Vec<u8>>,
    index: HashMap<String, Entry>,
}

fn map_dtype(d: Dtype, name: &str) -> Result<TensorType, String> {
    match d {
        Dtype::F32 => Ok(TensorType::F32),
        Dtype::F16 => Ok(TensorType::F16),
        Dtype::BF16 => Ok(TensorType::BF16),
        other => Err(format!(
            "safetensors {other:?} in tensor {name} (supported: F32, F16, BF16)"
        )),
    }
}

impl SafetensorsFolder {
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::Model(format!("{}: {e}", index_path.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    EngineError::Model(format!("{} has no weight_map", index_path.display()))
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut buffers = Vec::with_capacity(files.len());
        for f in &files {
            if f.contains('/') || f.contains("..") {
                return Err(EngineError::Model(format!(
                    "shard name {f:?} leaves the folder"
                )));
            }
            let p = dir.join(f);
            buffers.push(std::fs::read(&p).map_err(|e| EngineError::io(&p, e))?);
        }
        Self::from_buffers(buffers)
    }

    /// Index tensors held in memory (one buffer per file).
    pub fn from_buffers(buffers: Vec<Vec<u8>>) -> Result<Self, EngineError> {
        let mut index = HashMap::new();
        for (file, buf) in buffers.iter().enumerate() {
            let st = SafeTensors::deserialize(buf)
                .map_err(|e| EngineError::Model(format!("safetensors: {e}")))?;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - buf.as_ptr() as usize;
                let entry = Entry {
                    file,
                    ty: map_dtype(view.dtype(), &name),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                };
                index.insert(name, entry);
            }
        }
        Ok(SafetensorsFolder { buffers, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's shape, type and bytes; `None` if absent.
    pub fn tensor(&self, name: &str) -> Result<Option<RawTensor<'_>>, EngineError> {
        let Some(e) = self.index.get(name) else {
            return Ok(None);
        };
        let ty = e.ty.clone().map_err(EngineError::UnsupportedType)?;
        Ok(Some((
            e.shape.clone(),
            ty,
            &self.buffers[e.file][e.start..e.end],
        )))
    }
}

/// Write f32 tensors (row-major shapes) as one safetensors file's bytes.
pub fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>, EngineError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| EngineError::Model(format!("safetensors: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| EngineError::Model(format!("safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_back_what_was_written() {
        let buf = serialize_f32(&[
            ("a.weight".into(), vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("b".into(), vec![3], vec![-1.0, 0.5, 8.0]),
        ])
        .unwrap();
        let f = SafetensorsFolder::from_buffers(vec![buf]).unwrap();
        let (shape, ty, bytes) = f.tensor("a.weight").unwrap().unwrap();
        assert_eq!(shape, [2, 2]);
        assert_eq!(ty, TensorType::F32);
        assert_eq!(
            crate::quant::to_f32(ty, bytes, 4).unwrap(),
            [1.0, 2.0, 3.0, 4.0]
        );
        assert!(f.tensor("nope").unwrap().is_none());
        let mut names: Vec<_> = f.names().collect();
        names.sort();
        assert_eq!(names, ["a.weight", "b"]);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(SafetensorsFolder::from_buffers(vec![b"not a safetensors file".to_vec()]).is_err());
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let data = [1u8, 2, 3, 4];
        let v = safetensors::tensor::TensorView::new(Dtype::I8, vec![4], &data).unwrap();
        let buf = safetensors::serialize([("ids".to_string(), v)], None).unwrap();
        let f = SafetensorsFolder::from_buffers(vec![buf]).unwrap();
        let e = f.tensor("ids").unwrap_err();
        assert!(e.to_string().contains("ids"), "{e}");
    }
}
