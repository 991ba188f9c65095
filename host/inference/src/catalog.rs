//! The served models: each an opened package with its tokenizer and what an
//! instance of it holds on each kind of device this host has.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use slinfer_engine::package::ModelPackage;
use slinfer_engine::{DeviceKind, Footprint, PerKind};
use slinfer_scheduler::ModelSpec;

use crate::api::{
    BLOCK_TOKENS, ChatMessage, Constraint, INSTANCE_SLOTS, InferenceError, ModelInfo,
    SLLM_EXCLUSIVE_CAP, TokenLogprob, TokenLogprobs, sllm_cpu_kv_bytes,
};
use crate::constraint::{Constrained, Grammars};
use crate::devices::Device;

/// Decode iterations per grant on a GPU (see `ModelSpec::gpu_decode_quota`).
const GPU_DECODE_QUOTA: u32 = 8;

/// One model package, opened.
pub(crate) struct ModelEntry {
    pub name: String,
    pub dir: PathBuf,
    pub package: ModelPackage,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// `None` where no device of that kind can load the package.
    pub footprints: PerKind<Option<Footprint>>,
    /// The most bytes of text one token can stand for (its longest token
    /// string): a prompt longer than `context × this × 2` cannot fit, and
    /// is refused before it is tokenized.
    pub max_token_bytes: usize,
    /// Tokens in its tokenizer's vocabulary, added ones included (counted
    /// once: the tokenizer builds a map to count them).
    pub vocab_size: usize,
    /// Compiles constraints (built on the first constrained request).
    grammars: OnceLock<Result<Grammars, String>>,
}

impl ModelEntry {
    /// Opens the package in `dir` and asks each device kind's engine what an
    /// instance would hold; an error when none of `devices` can load it.
    pub fn open(dir: &Path, devices: &[Device]) -> anyhow::Result<ModelEntry> {
        let package = ModelPackage::open(dir)?;
        let tok_path = package
            .tokenizer_path()
            .unwrap_or_else(|| dir.join("tokenizer.json"));
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
        let mut footprints = PerKind::default();
        let mut refusals = Vec::new();
        for kind in DeviceKind::ALL {
            let Some(d) = devices.iter().find(|d| d.kind == kind) else {
                continue;
            };
            match d.backend.footprint(&package) {
                Ok(f) => footprints[kind] = Some(f),
                Err(e) => refusals.push(format!("{} ({}): {e}", kind, d.backend.name())),
            }
        }
        if footprints.cpu.is_none() && footprints.gpu.is_none() {
            anyhow::bail!(
                "{}: no device of this host can load it: {}",
                dir.display(),
                if refusals.is_empty() {
                    "there are no devices".to_string()
                } else {
                    refusals.join("; ")
                }
            );
        }
        let vocab = tokenizer.get_vocab(true);
        let max_token_bytes = vocab.keys().map(String::len).max().unwrap_or(1).max(1);
        let vocab_size = vocab.len();
        Ok(ModelEntry {
            name: package.manifest.name.clone(),
            dir: dir.to_path_buf(),
            package,
            tokenizer: Arc::new(tokenizer),
            footprints,
            max_token_bytes,
            vocab_size,
            grammars: OnceLock::new(),
        })
    }

    /// Refuses a prompt of `bytes` bytes that cannot fit the context
    /// whatever it tokenizes to (normalisers may shrink text, hence the
    /// factor 2), without tokenizing it.
    pub fn check_prompt_bytes(&self, bytes: usize) -> Result<(), InferenceError> {
        let context = self.context_tokens();
        if bytes > context as usize * self.max_token_bytes * 2 {
            return Err(InferenceError::PromptTooLong {
                prompt_tokens: (bytes / (self.max_token_bytes * 2)).min(u32::MAX as usize) as u32,
                context_tokens: context,
            });
        }
        Ok(())
    }

    /// A matcher for `c` over this model's tokens (slow the first time: it
    /// builds the token trie; call it off the async workers).
    pub fn constrain(&self, c: &Constraint) -> Result<Constrained, InferenceError> {
        let grammars = self.grammars.get_or_init(|| {
            let cfg = &self.package.manifest.config;
            Grammars::new(
                self.tokenizer.clone(),
                cfg.vocab_size.max(self.vocab_size),
                &cfg.eos_token_ids,
            )
            .map_err(|e| format!("{e:#}"))
        });
        match grammars {
            Ok(g) => g.compile(c).map(Constrained),
            Err(e) => Err(InferenceError::Engine(format!(
                "constrained decoding is not available for model {}: {e}",
                self.name
            ))),
        }
    }

    pub fn context_tokens(&self) -> u32 {
        self.package.manifest.config.context_length_tokens as u32
    }

    /// `token` with its log-probability and the alternatives', as reported.
    pub fn token_logprobs(&self, token: u32, lp: slinfer_engine::Logprobs) -> TokenLogprobs {
        let entry = |token: u32, logprob: f32| {
            let bytes = crate::text::token_bytes(&self.tokenizer, token);
            TokenLogprob {
                token,
                text: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob,
            }
        };
        TokenLogprobs {
            chosen: entry(token, lp.logprob),
            top: lp.top.into_iter().map(|(t, l)| entry(t, l)).collect(),
        }
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.package.manifest.config.eos_token_ids
    }

    /// What the scheduler knows of it: per kind, its footprint and slots (no
    /// slots where no device of the kind can load it).
    pub fn spec(&self) -> ModelSpec {
        let f = self.footprints.as_ref();
        ModelSpec {
            name: self.name.clone(),
            weights_bytes: f.map(|_, f| f.map_or(0, |f| f.weights_bytes)),
            kv_bytes_per_token: f.map(|_, f| f.map_or(1, |f| f.kv_bytes_per_token.max(1))),
            block_tokens: BLOCK_TOKENS,
            // The fixed pool of an sllm instance on the CPU: its cap of
            // requests, each of the model's whole context. (slinfer's CPU
            // pools scale: `cpu_kv_scales`.)
            cpu_kv_bytes: f[DeviceKind::Cpu].map_or(0, |f| {
                sllm_cpu_kv_bytes(u64::from(self.context_tokens()), f.kv_bytes_per_token)
            }),
            slots_per_node: f.map(|k, f| f.map_or(0, |_| INSTANCE_SLOTS[k])),
            sllm_exclusive_cap: f.map(|k, f| f.map(|_| SLLM_EXCLUSIVE_CAP[k])),
            sllm_half_share_cap: f.map(|k, f| f.map(|_| SLLM_EXCLUSIVE_CAP[k] / 2)),
            gpu_decode_quota: GPU_DECODE_QUOTA,
        }
    }

    pub fn info(&self) -> ModelInfo {
        let (man, cfg) = (&self.package.manifest, &self.package.manifest.config);
        let first = DeviceKind::ALL
            .into_iter()
            .find_map(|k| self.footprints[k])
            .expect("a served model has a footprint");
        ModelInfo {
            name: self.name.clone(),
            family: cfg.family.clone(),
            source: man.source.clone(),
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            context_length_tokens: cfg.context_length_tokens,
            kv_bytes_per_token: first.kv_bytes_per_token,
            weights_bytes: first.weights_bytes,
            footprints: DeviceKind::ALL
                .into_iter()
                .filter_map(|k| self.footprints[k].map(|f| (k.name().to_string(), f)))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| InferenceError::Engine(format!("tokenizer: {e}")))
    }

    pub fn detokenize(&self, tokens: &[u32]) -> Result<String, InferenceError> {
        let vocab = self.vocab_size as u32;
        if let Some(t) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(InferenceError::InvalidParams(format!(
                "token id {t} is outside the vocabulary ({vocab})"
            )));
        }
        self.tokenizer
            .decode(tokens, false)
            .map_err(|e| InferenceError::Engine(format!("tokenizer: {e}")))
    }

    /// The text chat messages become with the model's template (and the
    /// tools the model may call).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&str>,
    ) -> Result<String, InferenceError> {
        let template = self
            .package
            .manifest
            .chat_template
            .as_deref()
            .ok_or_else(|| {
                InferenceError::InvalidParams(format!("model {} has no chat template", self.name))
            })?;
        let token = |id: u32| self.tokenizer.id_to_token(id).unwrap_or_default();
        let cfg = &self.package.manifest.config;
        let bos = cfg.bos_token_id.map(token).unwrap_or_default();
        let eos = cfg
            .eos_token_ids
            .first()
            .copied()
            .map(token)
            .unwrap_or_default();
        crate::text::render_chat(template, messages, tools, (&bos, &eos))
    }
}

/// The served models: ids index `all` and never change (a removed model's
/// entry stays, unnamed, for requests still running on it).
#[derive(Default)]
pub(crate) struct Catalog {
    pub all: Vec<Arc<ModelEntry>>,
    pub by_name: HashMap<String, usize>,
}

impl Catalog {
    pub fn add(&mut self, entry: Arc<ModelEntry>) -> usize {
        let id = self.all.len();
        self.by_name.insert(entry.name.clone(), id);
        self.all.push(entry);
        id
    }

    pub fn get(&self, name: &str) -> Result<(usize, Arc<ModelEntry>), InferenceError> {
        self.by_name
            .get(name)
            .map(|&i| (i, self.all[i].clone()))
            .ok_or_else(|| InferenceError::ModelNotFound(name.to_string()))
    }

    /// The served entries (not removed ones), sorted by name.
    pub fn served(&self) -> Vec<(usize, &Arc<ModelEntry>)> {
        let mut v: Vec<(usize, &Arc<ModelEntry>)> =
            self.by_name.values().map(|&i| (i, &self.all[i])).collect();
        v.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        v
    }
}
