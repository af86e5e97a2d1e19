//! Constrained decoding: a request's grammar (any JSON object, a JSON schema,
//! or a Lark grammar) masks its logits at every step, so what it generates
//! parses. Built on `llguidance` over the model's own tokenizer vocabulary.
//!
//! [`GrammarCompiler`] is made once per served model (its token trie and
//! slicer cost tens of milliseconds and megabytes); [`GrammarCompiler::compile`]
//! turns a request's [`Grammar`] into a [`TokenConstraint`], failing with
//! [`EngineError::InvalidRequest`] for a schema or grammar llguidance rejects.
//! The engine keeps one constraint per constrained sequence: requests without
//! one pay nothing.
//!
//! JSON is generated compactly with Python-style separators (`", "`, `": "`)
//! and no free whitespace, so a constrained output cannot wander off into
//! blank lines; a schema's own `x-guidance` options are ignored.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema (`response_format: {"type": "json_schema", ...}` or a
    /// forced tool call's parameters).
    JsonSchema(Value),
    /// A Lark grammar as llguidance reads it (may embed `%json {...}`).
    Lark(String),
}

/// The JSON layout every schema gets.
fn compact_json_options() -> Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl Grammar {
    fn to_llguidance(&self) -> Result<TopLevelGrammar> {
        let with_layout = |schema: &Value| -> Result<Value> {
            match schema {
                Value::Object(map) => {
                    let mut map = map.clone();
                    map.insert("x-guidance".to_owned(), compact_json_options());
                    Ok(Value::Object(map))
                }
                Value::Bool(true) => Ok(serde_json::json!({"x-guidance": compact_json_options()})),
                other => Err(EngineError::InvalidRequest(format!(
                    "a JSON schema must be an object, got {other}"
                ))),
            }
        };
        Ok(match self {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(&serde_json::json!({"type": "object"}))?)
            }
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_layout(schema)?),
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        })
    }
}

/// The tokenizer as llguidance sees it: one byte string per token id
/// (special tokens marked), padded to the model's logits width.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode_plain(text).unwrap_or_default())
    }

    /// Forced text is matched through the mask rather than trusted to
    /// tokenize canonically: slower by a hair, never wrong.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Compiles request grammars for one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// `vocab_size`: the width of the model's logits (at least the
    /// tokenizer's); `eos_ids`: the tokens that may end a finished output.
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize, eos_ids: &[u32]) -> Result<Self> {
        let path = tokenizer.source().display().to_string();
        let bad = |m: String| EngineError::Tokenizer {
            path: path.clone(),
            message: m,
        };
        let json: Value = {
            let text = std::fs::read_to_string(tokenizer.source()).map_err(|e| bad(e.to_string()))?;
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?
        };
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| bad(format!("cannot read the token bytes for constrained decoding: {e}")))?;
        if words.len() > vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} tokens but the model's vocabulary is {vocab_size}",
                words.len()
            )));
        }
        while words.len() < vocab_size {
            let mut w = format!(".<[{}]>", words.len()).into_bytes();
            w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(w);
        }
        let Some(&first_eos) = eos_ids.first() else {
            return Err(bad(
                "constrained decoding needs an end-of-sequence token and the model has none".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_ids);
        let env: TokEnv = Arc::new(VocabEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(GrammarCompiler { factory })
    }

    /// Compiles `grammar`; an unusable schema or grammar is an `InvalidRequest`.
    pub fn compile(&self, grammar: &Grammar) -> Result<TokenConstraint> {
        let top = grammar.to_llguidance()?;
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| EngineError::InvalidRequest(format!("invalid grammar: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!("invalid grammar: {e}")));
        }
        Ok(TokenConstraint {
            matcher,
            eos_ids: self.factory.tok_env().tok_trie().eos_tokens().to_vec(),
        })
    }
}

/// One sequence's grammar state.
pub struct TokenConstraint {
    matcher: Matcher,
    eos_ids: Vec<u32>,
}

impl Clone for TokenConstraint {
    /// An independent copy (for `n` > 1 choices of one request).
    fn clone(&self) -> Self {
        TokenConstraint {
            matcher: self.matcher.deep_clone(),
            eos_ids: self.eos_ids.clone(),
        }
    }
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

/// What the constraint says before a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintStep {
    /// Sample from the masked logits.
    Sample,
    /// The grammar is complete and admits nothing more: end the output.
    Finished,
}

/// The tokens a grammar allows next; `None` when it admits nothing more.
pub struct TokenMask(Option<llguidance::toktrie::SimpleVob>);

impl TokenMask {
    /// Sets every forbidden token's logit (`logits`: `[vocab]`) to `-inf`.
    pub fn apply(&self, logits: &mut [f32]) -> ConstraintStep {
        let Some(allowed) = &self.0 else {
            return ConstraintStep::Finished;
        };
        let width = logits.len().min(allowed.len());
        allowed.iter_unset_entries(|i| {
            if i < width {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for l in logits.iter_mut().skip(width) {
            *l = f32::NEG_INFINITY;
        }
        ConstraintStep::Sample
    }
}

impl TokenConstraint {
    /// The mask for the next token. It depends only on the tokens accepted so
    /// far, so the engine computes it while the forward pass runs.
    pub fn compute_mask(&mut self) -> Result<TokenMask> {
        if self.matcher.is_stopped() {
            return Ok(TokenMask(None));
        }
        self.matcher
            .compute_mask()
            .map(|m| TokenMask(Some(m)))
            .map_err(|e| EngineError::InvalidRequest(format!("constrained decoding failed: {e}")))
    }

    /// Computes the mask and applies it to `logits` (`[vocab]`).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<ConstraintStep> {
        Ok(self.compute_mask()?.apply(logits))
    }

    /// The token that ends a constrained output.
    pub fn eos_token(&self) -> u32 {
        self.eos_ids[0]
    }

    /// Advances past the sampled `token`. `Ok(true)`: the output is complete
    /// (an end token was taken, or the grammar admits nothing more).
    pub fn accept(&mut self, token: u32) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| EngineError::InvalidRequest(format!("constrained decoding failed: {e}")))?;
        Ok(self.eos_ids.contains(&token) || self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _constraint_is_send() {
        fn send<T: Send>() {}
        send::<TokenConstraint>();
        send::<GrammarCompiler>();
    }
}
