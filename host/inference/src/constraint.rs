//! Constrained decoding: a generation may carry a [`Constraint`] (a JSON
//! schema, a regular expression or a Lark grammar), compiled by
//! `llguidance` into a [`Matcher`] that gives, before each token, the set of
//! tokens that keep the output inside it; the sampler draws only from that
//! set, and the constraint's end ends the generation.
//!
//! The token trie behind the masks is built once per model, on the first
//! constrained request (~0.2 s for a 49k vocabulary), from the same token
//! bytes the detokenizer uses; compiling a constraint takes about a
//! millisecond, a mask 2–200 µs.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::api::{Constraint, InferenceError};

/// The model's tokens as `llguidance` sees them, and its tokenizer for the
/// text a grammar forces.
struct Tokens {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for Tokens {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Compiles constraints for one model.
pub(crate) struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// The trie of `vocab` tokens (the width of the model's logits; ids the
    /// tokenizer lacks are never allowed), with the model's special tokens
    /// kept apart from text (a grammar cannot produce them by spelling
    /// them) and its end-of-sequence tokens.
    pub fn new(
        tokenizer: Arc<tokenizers::Tokenizer>,
        vocab: usize,
        eos: &[u32],
    ) -> anyhow::Result<Grammars> {
        let special = tokenizer.get_added_tokens_decoder();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match special.get(&id) {
                Some(t) if t.special => {
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(t.content.as_bytes());
                    b
                }
                _ => crate::text::token_bytes(&tokenizer, id),
            })
            .collect();
        let first_eos = *eos
            .first()
            .ok_or_else(|| anyhow::anyhow!("the model has no end-of-sequence token"))?;
        let trie =
            TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Tokens { trie, tokenizer });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::general_slices(),
        )?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A fresh matcher for `c`; an invalid schema, expression or grammar is
    /// `InvalidParams` naming the problem.
    pub fn compile(&self, c: &Constraint) -> Result<Matcher, InferenceError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            InferenceError::InvalidParams(format!("{what}: {e}"))
        };
        let grammar = match c {
            Constraint::JsonSchema(s) => {
                let mut schema: serde_json::Value =
                    serde_json::from_str(s).map_err(|e| bad("json schema is not JSON", &e))?;
                // One layout, `{"a": 1, "b": [2, 3]}`, unless the schema
                // says otherwise: with free whitespace a small model can
                // fill its whole budget with blanks.
                if let Some(o) = schema.as_object_mut() {
                    o.entry("x-guidance").or_insert_with(|| {
                        serde_json::json!({
                            "whitespace_flexible": false,
                            "item_separator": ", ",
                            "key_separator": ": ",
                        })
                    });
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| bad(c.kind(), &e))?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(bad(c.kind(), &e)),
            None => Ok(m),
        }
    }
}

/// One generation's constraint, step by step (a clone goes on from the same
/// state: several choices of one prompt each take one).
#[derive(Clone)]
pub(crate) struct Constrained(pub Matcher);

impl Constrained {
    /// The tokens allowed next, as a bitset (bit `t % 32` of word `t / 32`).
    pub fn allowed(&mut self) -> Result<Vec<u32>, InferenceError> {
        self.0
            .compute_mask()
            .map(|v| v.as_slice().to_vec())
            .map_err(|e| InferenceError::Engine(format!("constraint: {e}")))
    }

    /// Takes the sampled `token`; true when nothing may follow it (the
    /// output is complete).
    pub fn take(&mut self, token: u32) -> Result<bool, InferenceError> {
        self.0
            .consume_token(token)
            .map_err(|e| InferenceError::Engine(format!("constraint: {e}")))?;
        Ok(self.0.is_stopped())
    }
}
