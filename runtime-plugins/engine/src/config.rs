//! Architecture numbers of a Llama-family decoder, shared by every backend and
//! by the host's `model.toml`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::EngineError;

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f32 {
    1e-5
}

/// The numbers that define a Llama-family model (Llama, Qwen2, SmolLM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture family as the source names it ("llama", "qwen2").
    pub family: String,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub context_length_tokens: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    /// The output projection is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry biases (Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
}

/// Families whose decoder this crate's forward (and the CUDA engine's) runs.
pub const SUPPORTED_FAMILIES: &[&str] = &["llama", "qwen2", "mistral"];

impl ModelConfig {
    /// KV cache bytes per token over all layers, keys and values, at
    /// `dtype_bytes` per element.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> u64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes) as u64
    }

    /// Width of the query projection (heads × head dim).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key (or value) projection.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters in the decoder (embedding and head included once if tied).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_layer = h * (self.q_dim() as u64)
            + 2 * h * (self.kv_dim() as u64)
            + (self.q_dim() as u64) * h
            + 3 * h * self.intermediate_size as u64
            + 2 * h;
        let emb = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + h + per_layer * self.num_layers as u64
    }

    /// Check the numbers fit together and the family is one we run.
    pub fn validate(&self) -> Result<(), EngineError> {
        if !SUPPORTED_FAMILIES.contains(&self.family.as_str()) {
            return Err(EngineError::UnsupportedArchitecture(self.family.clone()));
        }
        let bad = |m: &str| Err(EngineError::Model(format!("config: {m}")));
        if self.num_layers == 0 || self.num_heads == 0 || self.num_kv_heads == 0 {
            return bad("layers, heads and KV heads must be positive");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad("heads must be a multiple of KV heads");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("head dim must be even and positive");
        }
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.vocab_size == 0 {
            return bad("hidden, intermediate and vocab sizes must be positive");
        }
        if self.context_length_tokens == 0 {
            return bad("context length must be positive");
        }
        Ok(())
    }

    /// Read a Hugging Face `config.json` (Llama, Qwen2, Mistral, SmolLM).
    pub fn from_hf_config_json(text: &str) -> Result<Self, EngineError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| EngineError::Model(format!("config.json: {e}")))?;
        let get_u = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let need =
            |k: &str| get_u(k).ok_or_else(|| EngineError::Model(format!("config.json lacks {k}")));
        let family = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .unwrap_or("llama")
            .to_string();
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let head_dim = get_u("head_dim").unwrap_or(hidden_size / num_heads.max(1));
        // transformers 5 moved rope_theta under rope_parameters.
        let rope_theta = v
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| {
                v.get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(|x| x.as_f64())
            })
            .unwrap_or(10_000.0) as f32;
        let scaling = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or_else(|| v.get("rope_parameters").filter(|s| !s.is_null()));
        if let Some(scaling) = scaling {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|x| x.as_str())
                .unwrap_or("");
            if kind != "default" && !kind.is_empty() {
                return Err(EngineError::UnsupportedArchitecture(format!(
                    "{family} with rope scaling {kind:?}"
                )));
            }
        }
        let eos_token_ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        let attention_bias = v
            .get("attention_bias")
            .and_then(|x| x.as_bool())
            .unwrap_or(family == "qwen2");
        let cfg = ModelConfig {
            num_layers: need("num_hidden_layers")?,
            num_kv_heads: get_u("num_key_value_heads").unwrap_or(num_heads),
            num_heads,
            head_dim,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            vocab_size: need("vocab_size")?,
            context_length_tokens: get_u("max_position_embeddings").unwrap_or(2048),
            rope_theta,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5) as f32,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
            eos_token_ids,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            attention_bias,
            family,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read `config.json` from a Hugging Face model folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        Self::from_hf_config_json(&text)
    }

    /// Derive the configuration from a GGUF file's metadata.
    pub fn from_gguf(g: &crate::gguf::GgufFile) -> Result<Self, EngineError> {
        let arch = g
            .metadata_str("general.architecture")
            .ok_or_else(|| EngineError::Model("GGUF lacks general.architecture".into()))?
            .to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| {
            g.metadata_u64(&key(k))
                .map(|x| x as usize)
                .ok_or_else(|| EngineError::Model(format!("GGUF lacks {}", key(k))))
        };
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let head_dim = g
            .metadata_u64(&key("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match g.metadata_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => g
                .metadata_array_len("tokenizer.ggml.tokens")
                .ok_or_else(|| EngineError::Model("GGUF has no vocabulary size".into()))?,
        };
        let eos = g
            .metadata_u64("tokenizer.ggml.eos_token_id")
            .map(|x| vec![x as u32])
            .unwrap_or_default();
        let cfg = ModelConfig {
            num_layers: need("block_count")?,
            num_kv_heads: g
                .metadata_u64(&key("attention.head_count_kv"))
                .map(|x| x as usize)
                .unwrap_or(num_heads),
            num_heads,
            head_dim,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            vocab_size,
            context_length_tokens: g
                .metadata_u64(&key("context_length"))
                .map(|x| x as usize)
                .unwrap_or(2048),
            rope_theta: g.metadata_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rms_norm_eps: g
                .metadata_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            bos_token_id: g
                .metadata_u64("tokenizer.ggml.bos_token_id")
                .map(|x| x as u32),
            eos_token_ids: eos,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            family: arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// SmolLM2-135M's shape (the default model), for tests and examples.
    pub fn smollm2_135m() -> Self {
        ModelConfig {
            family: "llama".into(),
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            hidden_size: 576,
            intermediate_size: 1536,
            vocab_size: 49152,
            context_length_tokens: 8192,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    /// A Llama shape of about one billion parameters (TinyLlama-1.1B's
    /// numbers), used by the GPU benchmark with random weights.
    pub fn llama_1b() -> Self {
        ModelConfig {
            family: "llama".into(),
            num_layers: 22,
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 64,
            hidden_size: 2048,
            intermediate_size: 5632,
            vocab_size: 32000,
            context_length_tokens: 2048,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            tie_word_embeddings: false,
            attention_bias: false,
        }
    }

    /// A tiny shape for unit tests.
    pub fn tiny_for_tests() -> Self {
        ModelConfig {
            family: "llama".into(),
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            hidden_size: 32,
            intermediate_size: 48,
            vocab_size: 64,
            context_length_tokens: 128,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            tie_word_embeddings: false,
            attention_bias: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_kv_bytes_per_token() {
        let c = ModelConfig::smollm2_135m();
        // 2 (K,V) × 30 layers × 3 KV heads × 64 × 2 bytes
        assert_eq!(c.kv_bytes_per_token(2), 23_040);
        c.validate().unwrap();
    }

    #[test]
    fn llama_1b_is_about_one_billion() {
        let n = ModelConfig::llama_1b().parameter_count();
        assert!((1_000_000_000..1_200_000_000).contains(&n), "{n}");
    }

    #[test]
    fn hf_config_json_llama_and_qwen2() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
            "hidden_size":576,"intermediate_size":1536,"num_attention_heads":9,
            "num_hidden_layers":30,"num_key_value_heads":3,"vocab_size":49152,
            "max_position_embeddings":8192,"rope_theta":100000.0,"rms_norm_eps":1e-5,
            "bos_token_id":1,"eos_token_id":2,"tie_word_embeddings":true,
            "rope_scaling":null}"#;
        let c = ModelConfig::from_hf_config_json(text).unwrap();
        assert_eq!(c, ModelConfig::smollm2_135m());

        let qwen = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
            "num_attention_heads":14,"num_hidden_layers":24,"num_key_value_heads":2,
            "vocab_size":151936,"max_position_embeddings":32768,
            "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},
            "rms_norm_eps":1e-6,"eos_token_id":[151645,151643],"tie_word_embeddings":true}"#;
        let q = ModelConfig::from_hf_config_json(qwen).unwrap();
        assert_eq!(q.head_dim, 64);
        assert!(q.attention_bias);
        assert_eq!(q.rope_theta, 1_000_000.0);
        assert_eq!(q.eos_token_ids, vec![151645, 151643]);
    }

    #[test]
    fn rope_scaling_is_refused_by_name() {
        let text = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_attention_heads":2,"num_hidden_layers":1,"vocab_size":10,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0}}"#;
        let e = ModelConfig::from_hf_config_json(text).unwrap_err();
        assert!(e.to_string().contains("llama3"), "{e}");
    }

    #[test]
    fn hf_config_errors_are_clear() {
        let e = ModelConfig::from_hf_config_json(
            r#"{"model_type":"gpt2","hidden_size":8,
            "num_attention_heads":2,"num_hidden_layers":1,"intermediate_size":8,"vocab_size":8}"#,
        )
        .unwrap_err();
        assert!(
            matches!(e, EngineError::UnsupportedArchitecture(ref f) if f == "gpt2"),
            "{e}"
        );
        let e = ModelConfig::from_hf_config_json(r#"{"model_type":"llama"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn serde_roundtrip_with_defaults() {
        let c = ModelConfig::llama_1b();
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
        let minimal = r#"{"family":"llama","num_layers":1,"num_heads":2,"num_kv_heads":1,
            "head_dim":4,"hidden_size":8,"intermediate_size":8,"vocab_size":10,
            "context_length_tokens":16}"#;
        let m: ModelConfig = serde_json::from_str(minimal).unwrap();
        assert_eq!(m.rope_theta, 10_000.0);
        assert!(m.eos_token_ids.is_empty());
    }
}
