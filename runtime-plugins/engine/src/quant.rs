//! Tensor element types found in GGUF and safetensors files, and their
//! conversion to f32 / f16 (dequantisation of the GGML block formats).
//!
//! Block layouts follow the GGUF specification (ggml `ggml-common.h`):
//! - `Q8_0`: 32 weights = f16 scale `d` + 32 × i8; `x = d·q`.
//! - `Q4_0`: 32 weights = f16 `d` + 16 bytes; the low nibbles are weights
//!   0..16, the high nibbles 16..32; `x = d·(q − 8)`.
//! - `Q4_1`: 32 weights = f16 `d`, f16 `m` + 16 bytes, same nibble order;
//!   `x = d·q + m`.

use half::{bf16, f16};

use crate::EngineError;

/// A tensor's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    /// A GGML type this build does not dequantise (its GGML id and name).
    Other(u32, &'static str),
}

/// A tensor as read from a file: row-major shape, type, raw bytes.
pub type RawTensor<'a> = (Vec<usize>, TensorType, &'a [u8]);

/// Weights per block for the block formats.
pub const QK: usize = 32;

impl TensorType {
    /// Map a GGML type id (as stored in GGUF tensor infos).
    pub fn from_ggml(id: u32) -> TensorType {
        match id {
            0 => TensorType::F32,
            1 => TensorType::F16,
            2 => TensorType::Q4_0,
            3 => TensorType::Q4_1,
            8 => TensorType::Q8_0,
            30 => TensorType::BF16,
            other => TensorType::Other(other, ggml_type_name(other)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TensorType::F32 => "F32",
            TensorType::F16 => "F16",
            TensorType::BF16 => "BF16",
            TensorType::Q8_0 => "Q8_0",
            TensorType::Q4_0 => "Q4_0",
            TensorType::Q4_1 => "Q4_1",
            TensorType::Other(_, n) => n,
        }
    }

    /// Bytes taken by `n` elements, or an error naming the type if this build
    /// cannot read it (or `n` is not a whole number of blocks).
    pub fn byte_len(&self, n: usize) -> Result<usize, EngineError> {
        let blocks = |bytes_per_block: usize| {
            if !n.is_multiple_of(QK) {
                Err(EngineError::Model(format!(
                    "{} tensor of {n} elements is not a whole number of {QK}-blocks",
                    self.name()
                )))
            } else {
                Ok(n / QK * bytes_per_block)
            }
        };
        match self {
            TensorType::F32 => Ok(n * 4),
            TensorType::F16 | TensorType::BF16 => Ok(n * 2),
            TensorType::Q8_0 => blocks(2 + 32),
            TensorType::Q4_0 => blocks(2 + 16),
            TensorType::Q4_1 => blocks(4 + 16),
            TensorType::Other(..) => Err(self.unsupported()),
        }
    }

    fn unsupported(&self) -> EngineError {
        EngineError::UnsupportedType(format!(
            "{} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1; requantise to Q8_0 first)",
            self.name()
        ))
    }
}

fn ggml_type_name(id: u32) -> &'static str {
    match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown GGML type",
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantise (or convert) `n` elements of type `ty` from `bytes` into f32,
/// calling `out(i, x)` for each element in order.
fn for_each(
    ty: TensorType,
    bytes: &[u8],
    n: usize,
    mut out: impl FnMut(usize, f32),
) -> Result<(), EngineError> {
    let need = ty.byte_len(n)?;
    if bytes.len() < need {
        return Err(EngineError::Model(format!(
            "{} tensor of {n} elements needs {need} bytes, has {}",
            ty.name(),
            bytes.len()
        )));
    }
    match ty {
        TensorType::F32 => {
            for i in 0..n {
                let c = &bytes[4 * i..4 * i + 4];
                out(i, f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        TensorType::F16 => {
            for i in 0..n {
                out(i, f16_at(bytes, 2 * i));
            }
        }
        TensorType::BF16 => {
            for i in 0..n {
                out(
                    i,
                    bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
                );
            }
        }
        TensorType::Q8_0 => {
            for (b, blk) in bytes[..need].chunks_exact(34).enumerate() {
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    out(b * QK + j, d * (blk[2 + j] as i8) as f32);
                }
            }
        }
        TensorType::Q4_0 => {
            for (b, blk) in bytes[..need].chunks_exact(18).enumerate() {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    out(b * QK + j, d * ((q & 0x0f) as i32 - 8) as f32);
                    out(b * QK + j + 16, d * ((q >> 4) as i32 - 8) as f32);
                }
            }
        }
        TensorType::Q4_1 => {
            for (b, blk) in bytes[..need].chunks_exact(20).enumerate() {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    out(b * QK + j, d * (q & 0x0f) as f32 + m);
                    out(b * QK + j + 16, d * (q >> 4) as f32 + m);
                }
            }
        }
        TensorType::Other(..) => return Err(ty.unsupported()),
    }
    Ok(())
}

/// Dequantise `n` elements to f32.
pub fn to_f32(ty: TensorType, bytes: &[u8], n: usize) -> Result<Vec<f32>, EngineError> {
    let mut v = vec![0f32; n];
    for_each(ty, bytes, n, |i, x| v[i] = x)?;
    Ok(v)
}

/// Dequantise `n` elements to f16 (round to nearest even).
pub fn to_f16(ty: TensorType, bytes: &[u8], n: usize) -> Result<Vec<f16>, EngineError> {
    if ty == TensorType::F16 && bytes.len() >= 2 * n {
        return Ok(bytes[..2 * n]
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect());
    }
    let mut v = vec![f16::ZERO; n];
    for_each(ty, bytes, n, |i, x| v[i] = f16::from_f32(x))?;
    Ok(v)
}

/// Dequantise `n` elements to bf16.
pub fn to_bf16(ty: TensorType, bytes: &[u8], n: usize) -> Result<Vec<bf16>, EngineError> {
    let mut v = vec![bf16::ZERO; n];
    for_each(ty, bytes, n, |i, x| v[i] = bf16::from_f32(x))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        // d = 0.5, q = -16..16 → x = -8.0 .. 7.5
        let mut blk = f16b(0.5).to_vec();
        blk.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let x = to_f32(TensorType::Q8_0, &blk, 32).unwrap();
        for (j, v) in x.iter().enumerate() {
            assert_eq!(*v, 0.5 * (j as f32 - 16.0));
        }
        assert_eq!(x[0], -8.0);
        assert_eq!(x[31], 7.5);
    }

    #[test]
    fn q4_0_block_nibble_order() {
        // byte j holds weight j (low nibble) and weight j+16 (high nibble).
        let mut blk = f16b(2.0).to_vec();
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = to_f32(TensorType::Q4_0, &blk, 32).unwrap();
        for j in 0..16 {
            assert_eq!(x[j], 2.0 * (j as f32 - 8.0), "low {j}");
            assert_eq!(x[j + 16], 2.0 * ((15 - j) as f32 - 8.0), "high {j}");
        }
    }

    #[test]
    fn q4_1_block_with_min() {
        let mut blk = f16b(0.25).to_vec();
        blk.extend(f16b(-1.0));
        blk.extend((0..16u8).map(|j| j | (3 << 4)));
        let x = to_f32(TensorType::Q4_1, &blk, 32).unwrap();
        for j in 0..16 {
            assert_eq!(x[j], 0.25 * j as f32 - 1.0);
            assert_eq!(x[j + 16], 0.25 * 3.0 - 1.0);
        }
    }

    #[test]
    fn two_blocks_are_independent() {
        let mut bytes = f16b(1.0).to_vec();
        bytes.extend([1u8; 32]);
        bytes.extend(f16b(-3.0));
        bytes.extend([2u8; 32]);
        let x = to_f32(TensorType::Q8_0, &bytes, 64).unwrap();
        assert!(x[..32].iter().all(|&v| v == 1.0));
        assert!(x[32..].iter().all(|&v| v == -6.0));
    }

    #[test]
    fn float_types() {
        let vals = [1.0f32, -2.5, 0.0, 65504.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(to_f32(TensorType::F32, &f32b, 4).unwrap(), vals);
        let f16bytes: Vec<u8> = vals.iter().flat_map(|&v| f16b(v)).collect();
        assert_eq!(to_f32(TensorType::F16, &f16bytes, 4).unwrap(), vals);
        // bf16 1.0 = 0x3f80, -2.5 = 0xc020
        let bf: Vec<u8> = [0x3f80u16, 0xc020, 0, 0x4040]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        assert_eq!(
            to_f32(TensorType::BF16, &bf, 4).unwrap(),
            [1.0, -2.5, 0.0, 3.0]
        );
        let h = to_f16(TensorType::F32, &f32b, 4).unwrap();
        assert_eq!(h[1], f16::from_f32(-2.5));
    }

    #[test]
    fn unsupported_types_are_named() {
        let t = TensorType::from_ggml(12);
        let e = to_f32(t, &[0; 1000], 256).unwrap_err();
        assert!(e.to_string().contains("Q4_K"), "{e}");
        let e = to_f16(TensorType::from_ggml(14), &[0; 1000], 256).unwrap_err();
        assert!(e.to_string().contains("Q6_K"), "{e}");
    }

    #[test]
    fn short_data_and_partial_blocks_are_errors() {
        assert!(to_f32(TensorType::Q8_0, &[0; 33], 32).is_err());
        assert!(to_f32(TensorType::Q4_0, &[0; 18], 31).is_err());
        assert!(to_f32(TensorType::F32, &[0; 7], 2).is_err());
    }
}
