//! Text <-> token ids for a model directory: `tokenizer.json` through the `tokenizers` crate,
//! plus the BOS/EOS conventions of `tokenizer_config.json` and `generation_config.json`.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
    bos_id: Option<u32>,
    add_bos: bool,
    eos_ids: Vec<u32>,
}

/// A token given in tokenizer_config.json either as a string or as
/// `{"__type": "AddedToken", "content": "..."}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let err = |message: String| EngineError::Tokenizer {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))
}

/// Token ids from a field that may be an integer or a list of integers.
pub fn ids_field(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, and the BOS/EOS settings of `tokenizer_config.json` and
    /// `generation_config.json` when given.
    pub fn load(tokenizer: &Path, tokenizer_config: Option<&Path>, generation_config: Option<&Path>) -> Result<Self> {
        let inner = Tokenizer::from_file(tokenizer).map_err(|e| EngineError::Tokenizer {
            path: tokenizer.display().to_string(),
            message: e.to_string(),
        })?;
        let cfg = tokenizer_config.map(read_json).transpose()?;
        let lookup =
            |field: &str| token_text(cfg.as_ref().and_then(|c| c.get(field))).and_then(|t| inner.token_to_id(&t));
        let bos_id = lookup("bos_token");
        let add_bos = cfg
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut eos_ids: Vec<u32> = lookup("eos_token").into_iter().collect();
        if let Some(gen) = generation_config.map(read_json).transpose()? {
            for id in ids_field(gen.get("eos_token_id")) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(TextTokenizer {
            inner,
            bos_id,
            add_bos,
            eos_ids,
        })
    }

    /// Encodes a prompt, prepending BOS when `tokenizer_config.json` asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer {
            path: "tokenizer.json".into(),
            message: e.to_string(),
        })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer {
            path: "tokenizer.json".into(),
            message: e.to_string(),
        })
    }

    /// The text of one token as the vocabulary spells it decoded (special tokens included),
    /// for logprob listings; `None` for an unknown id.
    pub fn token_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)?;
        self.inner.decode(&[id], false).ok()
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
