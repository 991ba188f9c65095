//! Host-side Llama-family weights, read from a Hugging Face safetensors
//! folder, a GGUF file, or drawn at random, converted to one precision.
//! Engines upload these to their device (or, for the reference, compute on
//! them directly).

use std::path::Path;

use half::{bf16, f16};

use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::package::WeightsFile;
use crate::quant::{self, RawTensor, TensorType};
use crate::sampler::Rng;
use crate::{EngineError, ModelSource};

/// Precision of matrices on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    F16,
    BF16,
}

impl WeightDType {
    pub fn bytes(&self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::F16 | WeightDType::BF16 => 2,
        }
    }
}

/// Elements of a host tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A row-major host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn len(&self) -> usize {
        match &self.data {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn byte_len(&self) -> usize {
        match &self.data {
            HostData::F32(v) => v.len() * 4,
            HostData::F16(v) => v.len() * 2,
            HostData::BF16(v) => v.len() * 2,
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    fn from_bytes(
        shape: Vec<usize>,
        ty: TensorType,
        bytes: &[u8],
        dtype: WeightDType,
    ) -> Result<Self, EngineError> {
        let n = shape.iter().product();
        let data = match dtype {
            WeightDType::F32 => HostData::F32(quant::to_f32(ty, bytes, n)?),
            WeightDType::F16 => HostData::F16(quant::to_f16(ty, bytes, n)?),
            WeightDType::BF16 => HostData::BF16(quant::to_bf16(ty, bytes, n)?),
        };
        Ok(HostTensor { shape, data })
    }
    fn random(shape: Vec<usize>, rng: &mut Rng, scale: f32, dtype: WeightDType) -> Self {
        let n: usize = shape.iter().product();
        let data = match dtype {
            WeightDType::F32 => HostData::F32((0..n).map(|_| rng.next_f32_sym(scale)).collect()),
            WeightDType::F16 => HostData::F16(
                (0..n)
                    .map(|_| f16::from_f32(rng.next_f32_sym(scale)))
                    .collect(),
            ),
            WeightDType::BF16 => HostData::BF16(
                (0..n)
                    .map(|_| bf16::from_f32(rng.next_f32_sym(scale)))
                    .collect(),
            ),
        };
        HostTensor { shape, data }
    }
    /// Undo llama.cpp's Q/K row permutation (GGUF stores each head's rotary
    /// pairs interleaved; we rotate halves, as Hugging Face does).
    fn unpermute_heads(&mut self, n_heads: usize) {
        fn go<T: Copy>(v: &mut [T], rows: usize, cols: usize, n_heads: usize) {
            let hd = rows / n_heads;
            let src = v.to_vec();
            for h in 0..n_heads {
                for i in 0..hd / 2 {
                    for j in 0..2 {
                        let from = h * hd + 2 * i + j;
                        let to = h * hd + j * (hd / 2) + i;
                        v[to * cols..(to + 1) * cols]
                            .copy_from_slice(&src[from * cols..(from + 1) * cols]);
                    }
                }
            }
        }
        let (rows, cols) = (self.shape[0], self.shape[1]);
        match &mut self.data {
            HostData::F32(v) => go(v, rows, cols, n_heads),
            HostData::F16(v) => go(v, rows, cols, n_heads),
            HostData::BF16(v) => go(v, rows, cols, n_heads),
        }
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: HostTensor,
    pub wk: HostTensor,
    pub wv: HostTensor,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub wo: HostTensor,
    pub ffn_norm: Vec<f32>,
    pub w_gate: HostTensor,
    pub w_up: HostTensor,
    pub w_down: HostTensor,
}

/// A whole Llama-family model on the host. Norm weights and biases are f32;
/// matrices are in [`LlamaWeights::dtype`].
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub config: ModelConfig,
    pub dtype: WeightDType,
    pub embed: HostTensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    pub lm_head: Option<HostTensor>,
}

/// A source of named tensors: shape (row-major), type, bytes.
trait TensorSource {
    fn get(&self, name: &str) -> Result<Option<RawTensor<'_>>, EngineError>;
}

impl TensorSource for GgufFile {
    fn get(&self, name: &str) -> Result<Option<RawTensor<'_>>, EngineError> {
        match self.tensor(name) {
            None => Ok(None),
            Some(t) => Ok(Some((t.shape(), t.ty, self.tensor_bytes(t)?))),
        }
    }
}

impl TensorSource for crate::safetensors::SafetensorsFolder {
    fn get(&self, name: &str) -> Result<Option<RawTensor<'_>>, EngineError> {
        self.tensor(name)
    }
}

struct Names {
    embed: &'static str,
    final_norm: &'static str,
    lm_head: &'static str,
    layer: fn(usize, &str) -> String,
}

const HF: Names = Names {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer: |i, part| {
        let p = match part {
            "attn_norm" => "input_layernorm.weight",
            "wq" => "self_attn.q_proj.weight",
            "wk" => "self_attn.k_proj.weight",
            "wv" => "self_attn.v_proj.weight",
            "bq" => "self_attn.q_proj.bias",
            "bk" => "self_attn.k_proj.bias",
            "bv" => "self_attn.v_proj.bias",
            "wo" => "self_attn.o_proj.weight",
            "ffn_norm" => "post_attention_layernorm.weight",
            "w_gate" => "mlp.gate_proj.weight",
            "w_up" => "mlp.up_proj.weight",
            "w_down" => "mlp.down_proj.weight",
            other => other,
        };
        format!("model.layers.{i}.{p}")
    },
};

const GGUF: Names = Names {
    embed: "token_embd.weight",
    final_norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: |i, part| {
        let p = match part {
            "attn_norm" => "attn_norm.weight",
            "wq" => "attn_q.weight",
            "wk" => "attn_k.weight",
            "wv" => "attn_v.weight",
            "bq" => "attn_q.bias",
            "bk" => "attn_k.bias",
            "bv" => "attn_v.bias",
            "wo" => "attn_output.weight",
            "ffn_norm" => "ffn_norm.weight",
            "w_gate" => "ffn_gate.weight",
            "w_up" => "ffn_up.weight",
            "w_down" => "ffn_down.weight",
            other => other,
        };
        format!("blk.{i}.{p}")
    },
};

fn load_from(
    src: &dyn TensorSource,
    names: &Names,
    config: ModelConfig,
    dtype: WeightDType,
    unpermute_qk: bool,
) -> Result<LlamaWeights, EngineError> {
    let c = &config;
    let mat = |name: &str, shape: [usize; 2]| -> Result<HostTensor, EngineError> {
        let (s, ty, bytes) = src
            .get(name)?
            .ok_or_else(|| EngineError::Model(format!("missing tensor {name}")))?;
        if s != shape {
            return Err(EngineError::Model(format!(
                "tensor {name} has shape {s:?}, expected {shape:?}"
            )));
        }
        HostTensor::from_bytes(shape.to_vec(), ty, bytes, dtype).map_err(|e| match e {
            EngineError::UnsupportedType(t) => {
                EngineError::UnsupportedType(format!("{t} in tensor {name}"))
            }
            other => other,
        })
    };
    let vec_opt = |name: &str, len: usize| -> Result<Option<Vec<f32>>, EngineError> {
        match src.get(name)? {
            None => Ok(None),
            Some((s, ty, bytes)) => {
                if s.iter().product::<usize>() != len {
                    return Err(EngineError::Model(format!(
                        "tensor {name} has shape {s:?}, expected [{len}]"
                    )));
                }
                Ok(Some(quant::to_f32(ty, bytes, len)?))
            }
        }
    };
    let vec = |name: &str, len: usize| {
        vec_opt(name, len)?.ok_or_else(|| EngineError::Model(format!("missing tensor {name}")))
    };
    let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let n = |p: &str| (names.layer)(i, p);
        let mut wq = mat(&n("wq"), [q, h])?;
        let mut wk = mat(&n("wk"), [kv, h])?;
        if unpermute_qk {
            wq.unpermute_heads(c.num_heads);
            wk.unpermute_heads(c.num_kv_heads);
        }
        layers.push(LayerWeights {
            attn_norm: vec(&n("attn_norm"), h)?,
            wq,
            wk,
            wv: mat(&n("wv"), [kv, h])?,
            bq: vec_opt(&n("bq"), q)?,
            bk: vec_opt(&n("bk"), kv)?,
            bv: vec_opt(&n("bv"), kv)?,
            wo: mat(&n("wo"), [h, q])?,
            ffn_norm: vec(&n("ffn_norm"), h)?,
            w_gate: mat(&n("w_gate"), [f, h])?,
            w_up: mat(&n("w_up"), [f, h])?,
            w_down: mat(&n("w_down"), [h, f])?,
        });
    }
    let lm_head = if src.get(names.lm_head)?.is_some() {
        Some(mat(names.lm_head, [c.vocab_size, h])?)
    } else {
        None
    };
    let mut config = config.clone();
    config.tie_word_embeddings = lm_head.is_none();
    Ok(LlamaWeights {
        embed: mat(names.embed, [config.vocab_size, h])?,
        final_norm: vec(names.final_norm, h)?,
        layers,
        lm_head,
        dtype,
        config,
    })
}

impl LlamaWeights {
    /// Load from any [`ModelSource`] at `dtype`.
    pub fn load(source: &ModelSource, dtype: WeightDType) -> Result<Self, EngineError> {
        match source {
            ModelSource::SafetensorsDir(dir) => Self::from_safetensors_dir(dir, dtype),
            ModelSource::Gguf(path) => Self::from_gguf(path, dtype),
            ModelSource::Package(dir) => {
                let pkg = crate::package::ModelPackage::open(dir)?;
                match pkg.weights_file()? {
                    WeightsFile::Gguf(p) => Self::from_gguf(&p, dtype),
                    WeightsFile::Safetensors(p) => {
                        Self::from_safetensors_file(&p, &pkg.manifest.config, dtype)
                    }
                }
            }
            ModelSource::Random {
                config,
                seed,
                scale,
            } => Ok(Self::random(config.clone(), *seed, *scale, dtype)),
        }
    }

    pub fn from_safetensors_dir(dir: &Path, dtype: WeightDType) -> Result<Self, EngineError> {
        let config = ModelConfig::from_hf_dir(dir)?;
        let folder = crate::safetensors::SafetensorsFolder::open(dir)?;
        load_from(&folder, &HF, config, dtype, false)
    }

    /// One safetensors file with Hugging Face names, shaped by `config`
    /// (a model package's `files.safetensors`).
    pub fn from_safetensors_file(
        path: &Path,
        config: &ModelConfig,
        dtype: WeightDType,
    ) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let folder = crate::safetensors::SafetensorsFolder::from_buffers(vec![bytes])?;
        load_from(&folder, &HF, config.clone(), dtype, false)
    }

    /// The weights as one f32 safetensors file with Hugging Face names (what
    /// [`Self::from_safetensors_file`] reads back).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, EngineError> {
        let c = &self.config;
        let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
            (
                "model.embed_tokens.weight".into(),
                self.embed.shape.clone(),
                self.embed.to_f32(),
            ),
            (
                "model.norm.weight".into(),
                vec![c.hidden_size],
                self.final_norm.clone(),
            ),
        ];
        if let Some(head) = &self.lm_head {
            t.push(("lm_head.weight".into(), head.shape.clone(), head.to_f32()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let n = |p: &str| format!("model.layers.{i}.{p}");
            t.push((
                n("input_layernorm.weight"),
                vec![c.hidden_size],
                l.attn_norm.clone(),
            ));
            t.push((
                n("post_attention_layernorm.weight"),
                vec![c.hidden_size],
                l.ffn_norm.clone(),
            ));
            for (name, m) in [
                ("self_attn.q_proj.weight", &l.wq),
                ("self_attn.k_proj.weight", &l.wk),
                ("self_attn.v_proj.weight", &l.wv),
                ("self_attn.o_proj.weight", &l.wo),
                ("mlp.gate_proj.weight", &l.w_gate),
                ("mlp.up_proj.weight", &l.w_up),
                ("mlp.down_proj.weight", &l.w_down),
            ] {
                t.push((n(name), m.shape.clone(), m.to_f32()));
            }
            for (name, b) in [
                ("self_attn.q_proj.bias", &l.bq),
                ("self_attn.k_proj.bias", &l.bk),
                ("self_attn.v_proj.bias", &l.bv),
            ] {
                if let Some(b) = b {
                    t.push((n(name), vec![b.len()], b.clone()));
                }
            }
        }
        crate::safetensors::serialize_f32(&t)
    }

    pub fn from_gguf(path: &Path, dtype: WeightDType) -> Result<Self, EngineError> {
        let g = GgufFile::open(path)?;
        Self::from_gguf_file(&g, dtype)
    }

    pub fn from_gguf_file(g: &GgufFile, dtype: WeightDType) -> Result<Self, EngineError> {
        let config = ModelConfig::from_gguf(g)?;
        // llama.cpp permutes Q/K rows for the "llama" family only.
        let unpermute = config.family == "llama" || config.family == "mistral";
        load_from(g, &GGUF, config, dtype, unpermute)
    }

    /// Random weights in ±`scale` (norm weights 1), reproducible from `seed`.
    pub fn random(config: ModelConfig, seed: u64, scale: f32, dtype: WeightDType) -> Self {
        let c = &config;
        let mut rng = Rng::new(seed);
        let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut r = |shape: [usize; 2]| HostTensor::random(shape.to_vec(), &mut rng, scale, dtype);
        let embed = r([c.vocab_size, h]);
        let layers = (0..c.num_layers)
            .map(|_| LayerWeights {
                attn_norm: vec![1.0; h],
                wq: r([q, h]),
                wk: r([kv, h]),
                wv: r([kv, h]),
                bq: None,
                bk: None,
                bv: None,
                wo: r([h, q]),
                ffn_norm: vec![1.0; h],
                w_gate: r([f, h]),
                w_up: r([f, h]),
                w_down: r([h, f]),
            })
            .collect();
        let lm_head = (!c.tie_word_embeddings).then(|| r([c.vocab_size, h]));
        LlamaWeights {
            config,
            dtype,
            embed,
            layers,
            final_norm: vec![1.0; h],
            lm_head,
        }
    }

    /// Bytes of all weights at their host precision.
    pub fn byte_len(&self) -> u64 {
        let mats: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|t| t.byte_len())
                    .sum::<usize>()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
                    + 4 * [&l.bq, &l.bk, &l.bv]
                        .iter()
                        .filter_map(|b| b.as_ref())
                        .map(|b| b.len())
                        .sum::<usize>()
            })
            .sum();
        (mats
            + self.embed.byte_len()
            + self.lm_head.as_ref().map_or(0, |t| t.byte_len())
            + 4 * self.final_norm.len()) as u64
    }

    /// The output projection (the embedding when tied).
    pub fn output(&self) -> &HostTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

#[cfg(test)]
mod tests;
