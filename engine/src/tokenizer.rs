//! Text <-> token ids for a model directory: `tokenizer.json` through the `tokenizers` crate,
//! plus the BOS/EOS conventions of `tokenizer_config.json` and `generation_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{DecoderWrapper, Tokenizer};

use crate::error::{EngineError, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
    /// The `tokenizer.json` it was loaded from.
    source: PathBuf,
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
            source: tokenizer.to_path_buf(),
            bos_id,
            add_bos,
            eos_ids,
        })
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Encodes text as it is: no BOS, special-token text matched as special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer {
            path: self.source.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
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

    /// The raw bytes one token stands for, where the tokenizer is byte-level (each vocabulary
    /// entry spells bytes in the GPT-2 byte alphabet); `None` for special/added tokens and
    /// other tokenizers. A token may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if !matches!(self.inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return None;
        }
        // Added tokens are stored as plain text, not in the byte alphabet.
        if self.inner.get_added_vocabulary().simple_id_to_token(id).is_some() {
            return None;
        }
        self.inner.id_to_token(id)?.chars().map(byte_of_char).collect()
    }

    /// How a token reads in logprobs: its text when its bytes are whole UTF-8, else
    /// `bytes:\xNN...` (OpenAI and vLLM's spelling for a token that splits a character).
    pub fn token_display(&self, id: u32) -> Option<String> {
        match self.token_bytes(id) {
            Some(bytes) => Some(match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => e.as_bytes().iter().fold(String::from("bytes:"), |mut out, b| {
                    out.push_str(&format!("\\x{b:02x}"));
                    out
                }),
            }),
            None => self.token_piece(id),
        }
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

/// The byte a character of the GPT-2 byte-level alphabet stands for: printable Latin-1
/// characters stand for themselves, and the 68 other byte values were moved, in order, to
/// U+0100 and up.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let code = c as u32;
    if code < 0x100 {
        return printable(code).then_some(code as u8);
    }
    let shifted = (code - 0x100) as usize;
    (0u32..0x100).filter(|&b| !printable(b)).nth(shifted).map(|b| b as u8)
}

#[cfg(test)]
mod byte_level_tests {
    use super::{byte_of_char, TextTokenizer};

    #[test]
    fn token_bytes_spell_the_text_and_split_characters_read_as_bytes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek-v3");
        let t = TextTokenizer::load(&dir.join("tokenizer.json"), None, None).unwrap();
        let text = "Héllo wörld, 你好 🙂";
        let ids = t.encode(text).unwrap();
        let ids: Vec<u32> = ids.into_iter().filter(|&id| t.token_bytes(id).is_some()).collect();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.token_bytes(id).unwrap()).collect();
        assert_eq!(bytes, text.as_bytes());
        let shown: Vec<String> = ids.iter().map(|&id| t.token_display(id).unwrap()).collect();
        let split = shown
            .iter()
            .find(|s| s.starts_with("bytes:"))
            .expect("a token splits a character");
        assert!(split.len() > "bytes:".len() && split.contains("\\x"), "{split}");
        assert!(shown.iter().any(|s| s.contains("llo") || s.contains('l')), "{shown:?}");
    }

    #[test]
    fn the_byte_alphabet_covers_every_byte_once() {
        let mut seen = [false; 256];
        for code in 0x21u32..0x200 {
            if let Some(b) = char::from_u32(code).and_then(byte_of_char) {
                assert!(!seen[b as usize], "byte {b} twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_of_char('A'), Some(b'A'));
        assert_eq!(byte_of_char('\u{120}'), Some(b' ')); // the "Ġ" of GPT-2 vocabularies
        assert_eq!(byte_of_char('\u{10a}'), Some(b'\n')); // "Ċ"
    }
}
