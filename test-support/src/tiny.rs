//! Tiny model packages: a real Llama-family model with seeded random
//! weights (f32 safetensors), a byte-level tokenizer and a chat template,
//! small enough that the pure-Rust reference engine runs a step in
//! microseconds. Tests of the live inference path run on them without a
//! virtualenv or a native library.
//!
//! Only the tokens of printable ASCII characters keep random output rows;
//! the others' (special tokens, other bytes) are zero, so their logits are
//! 0 while the printable ones spread around it: greedy generation never
//! stops early (it runs to `max_tokens`) and its text is plain ASCII, the
//! same however it is decoded.

use std::path::{Path, PathBuf};

use slinfer_engine::ModelConfig;
use slinfer_engine::package::{FORMAT_VERSION, PackageFiles, PackageManifest};
use slinfer_engine::weights::{HostData, LlamaWeights, WeightDType};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// `<s>`, `</s>` (end of sequence) and `<pad>`, then the 256 bytes.
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
const SPECIALS: [&str; 3] = ["<pad>", "<s>", "</s>"];

/// The shape of every tiny model.
pub fn config() -> ModelConfig {
    ModelConfig {
        family: "llama".into(),
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        hidden_size: 64,
        intermediate_size: 128,
        vocab_size: SPECIALS.len() + 256,
        context_length_tokens: 2048,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        bos_token_id: Some(BOS),
        eos_token_ids: vec![EOS],
        tie_word_embeddings: false,
        attention_bias: false,
    }
}

/// Writes the package of model `name` (weights drawn from `seed`) into
/// `models_dir/name` and returns its folder.
pub fn write_package(models_dir: &Path, name: &str, seed: u64) -> PathBuf {
    let dir = models_dir.join(name);
    std::fs::create_dir_all(&dir).expect("creating the package folder");
    let config = config();
    let tokenizer = tokenizer();
    let mut w = LlamaWeights::random(config.clone(), seed, 0.2, WeightDType::F32);
    let head = w.lm_head.as_mut().expect("untied");
    let HostData::F32(rows) = &mut head.data else {
        unreachable!("f32 weights")
    };
    let h = config.hidden_size;
    for id in 0..config.vocab_size {
        let text = tokenizer.decode(&[id as u32], false).unwrap_or_default();
        let printable = text.len() == 1 && text.bytes().all(|b| (0x20..0x7f).contains(&b));
        if !printable {
            rows[id * h..(id + 1) * h].fill(0.0);
        }
    }
    std::fs::write(
        dir.join("model.safetensors"),
        w.to_safetensors().expect("serialising"),
    )
    .expect("writing the weights");
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .expect("writing the tokenizer");
    let manifest = PackageManifest {
        format_version: FORMAT_VERSION,
        name: name.to_string(),
        source: format!("tiny test model, seed {seed}"),
        kv_bytes_per_token: config.kv_bytes_per_token(2),
        chat_template: Some(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}<assistant>{% endif %}"
                .into(),
        ),
        files: PackageFiles {
            safetensors: Some("model.safetensors".into()),
            tokenizer: Some("tokenizer.json".into()),
            ..Default::default()
        },
        config,
    };
    std::fs::write(
        dir.join("model.toml"),
        toml::to_string(&manifest).expect("serialising the manifest"),
    )
    .expect("writing model.toml");
    dir
}

/// Byte-level BPE without merges: every byte is a token, so any text
/// encodes and decodes back exactly.
fn tokenizer() -> Tokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab: Vocab = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i as u32))
        .collect();
    for (i, c) in alphabet.into_iter().enumerate() {
        vocab.insert(c.to_string(), (SPECIALS.len() + i) as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .expect("a byte-level BPE");
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    t.with_decoder(Some(ByteLevel::default()));
    t.add_special_tokens(&SPECIALS.map(|s| AddedToken::from(s, true)));
    t
}
