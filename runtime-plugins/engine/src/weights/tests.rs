use super::*;
use crate::gguf::{GgufWriter, Value};

/// Write random tiny weights as a GGUF file the way llama.cpp's converter
/// does (Q/K permuted), read it back, and get the original weights.
pub(crate) fn tiny_gguf(w: &LlamaWeights) -> Vec<u8> {
    let c = &w.config;
    let mut g = GgufWriter::new();
    g.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(c.num_layers as u32))
        .meta("llama.embedding_length", Value::U32(c.hidden_size as u32))
        .meta(
            "llama.feed_forward_length",
            Value::U32(c.intermediate_size as u32),
        )
        .meta("llama.attention.head_count", Value::U32(c.num_heads as u32))
        .meta(
            "llama.attention.head_count_kv",
            Value::U32(c.num_kv_heads as u32),
        )
        .meta(
            "llama.context_length",
            Value::U32(c.context_length_tokens as u32),
        )
        .meta("llama.rope.freq_base", Value::F32(c.rope_theta))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps),
        )
        .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(2))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(
                (0..c.vocab_size)
                    .map(|i| Value::String(format!("t{i}")))
                    .collect(),
            ),
        );
    let permute = |t: &HostTensor, heads: usize| -> Vec<f32> {
        // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2)
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let hd = rows / heads;
        let src = t.to_f32();
        let mut out = vec![0.0; src.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let from = h * hd + j * (hd / 2) + i;
                    let to = h * hd + 2 * i + j;
                    out[to * cols..(to + 1) * cols]
                        .copy_from_slice(&src[from * cols..(from + 1) * cols]);
                }
            }
        }
        out
    };
    g.tensor_f32("token_embd.weight", &w.embed.shape, &w.embed.to_f32());
    g.tensor_f32("output_norm.weight", &[c.hidden_size], &w.final_norm);
    if let Some(o) = &w.lm_head {
        g.tensor_f32("output.weight", &o.shape, &o.to_f32());
    }
    for (i, l) in w.layers.iter().enumerate() {
        let n = |p: &str| format!("blk.{i}.{p}");
        g.tensor_f32(&n("attn_norm.weight"), &[c.hidden_size], &l.attn_norm);
        g.tensor_f32(
            &n("attn_q.weight"),
            &l.wq.shape,
            &permute(&l.wq, c.num_heads),
        );
        g.tensor_f32(
            &n("attn_k.weight"),
            &l.wk.shape,
            &permute(&l.wk, c.num_kv_heads),
        );
        g.tensor_f32(&n("attn_v.weight"), &l.wv.shape, &l.wv.to_f32());
        g.tensor_f32(&n("attn_output.weight"), &l.wo.shape, &l.wo.to_f32());
        g.tensor_f32(&n("ffn_norm.weight"), &[c.hidden_size], &l.ffn_norm);
        g.tensor_f32(&n("ffn_gate.weight"), &l.w_gate.shape, &l.w_gate.to_f32());
        g.tensor_f32(&n("ffn_up.weight"), &l.w_up.shape, &l.w_up.to_f32());
        g.tensor_f32(&n("ffn_down.weight"), &l.w_down.shape, &l.w_down.to_f32());
    }
    g.to_bytes()
}

#[test]
fn gguf_roundtrip_unpermutes_q_and_k() {
    let w = LlamaWeights::random(ModelConfig::tiny_for_tests(), 3, 0.5, WeightDType::F32);
    let g = GgufFile::parse(tiny_gguf(&w)).unwrap();
    let back = LlamaWeights::from_gguf_file(&g, WeightDType::F32).unwrap();
    assert_eq!(back.config, w.config);
    assert_eq!(back.layers[1].wq, w.layers[1].wq);
    assert_eq!(back.layers[0].wk, w.layers[0].wk);
    assert_eq!(back.layers[1].w_down, w.layers[1].w_down);
    assert_eq!(back.lm_head, w.lm_head);
    let h = LlamaWeights::from_gguf_file(&g, WeightDType::F16).unwrap();
    assert_eq!(
        h.layers[0].wv.to_f32()[5],
        f16::from_f32(w.layers[0].wv.to_f32()[5]).to_f32()
    );
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let w = LlamaWeights::random(ModelConfig::tiny_for_tests(), 3, 0.5, WeightDType::F32);
    let mut bytes = tiny_gguf(&w);
    // Rename a tensor in place: "blk.1.ffn_up" → "blk.1.ffn_uq".
    let pat = b"blk.1.ffn_up.weight";
    let at = bytes.windows(pat.len()).position(|x| x == pat).unwrap();
    bytes[at + 11] = b'q';
    let g = GgufFile::parse(bytes).unwrap();
    let e = LlamaWeights::from_gguf_file(&g, WeightDType::F32).unwrap_err();
    assert!(e.to_string().contains("blk.1.ffn_up.weight"), "{e}");
}

#[test]
fn safetensors_folder_with_hf_names() {
    let c = ModelConfig::tiny_for_tests();
    let w = LlamaWeights::random(c.clone(), 4, 0.5, WeightDType::F32);
    let dir = std::env::temp_dir().join(format!("slinfer-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), w.to_safetensors().unwrap()).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "num_hidden_layers": c.num_layers,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length_tokens,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "rms_norm_eps": c.rms_norm_eps, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": false, "head_dim": c.head_dim, "dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let back =
        LlamaWeights::load(&ModelSource::SafetensorsDir(dir.clone()), WeightDType::F32).unwrap();
    let file =
        LlamaWeights::from_safetensors_file(&dir.join("model.safetensors"), &c, WeightDType::F32)
            .unwrap();
    assert_eq!(file.layers[1].wk, w.layers[1].wk);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(back.config, c);
    assert_eq!(back.layers[1].wq, w.layers[1].wq);
    assert_eq!(back.layers[0].w_down, w.layers[0].w_down);
    assert_eq!(back.lm_head.as_ref(), Some(w.output()));
    let e = LlamaWeights::load(&ModelSource::SafetensorsDir(dir), WeightDType::F32).unwrap_err();
    assert!(matches!(e, EngineError::Io { .. }), "{e}");
}

#[test]
fn random_is_reproducible_and_sized() {
    let c = ModelConfig::tiny_for_tests();
    let a = LlamaWeights::random(c.clone(), 9, 0.1, WeightDType::F16);
    let b = LlamaWeights::random(c.clone(), 9, 0.1, WeightDType::F16);
    assert_eq!(a.layers[1].w_up, b.layers[1].w_up);
    let params = c.parameter_count();
    let norms = (c.hidden_size * (2 * c.num_layers + 1)) as u64;
    assert_eq!(a.byte_len(), (params - norms) * 2 + norms * 4);
}
