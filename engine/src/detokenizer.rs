//! Incremental detokenization: turns a request's stream of generated token ids into text deltas
//! for streaming, never emitting part of a UTF-8 character.

use crate::error::Result;
use crate::tokenizer::TextTokenizer;

/// Turns a stream of token ids into text deltas; never emits a partial UTF-8 character (a
/// byte-level BPE token can hold part of one).
///
/// Keeps every id and two offsets into them: `prefix_offset..read_offset` is a window whose text
/// was already emitted, decoded again as context so that decoders that depend on their
/// neighbours (leading spaces, byte fallback) give the same text as a whole decode. A new token
/// is decoded together with that window; the part past the window's text is emitted once it no
/// longer ends in U+FFFD (an incomplete character).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    text: String,
}

impl IncrementalDetokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one generated token; returns the new text (possibly empty while a multi-byte
    /// character is incomplete, or for a special token).
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> Result<String> {
        self.ids.push(token);
        let (prefix_text, new_text) = self.decode_window(tokenizer)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = suffix_after(&new_text, &prefix_text).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// Text held back at the end (an incomplete character at end of stream), decoded lossily.
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        let (prefix_text, new_text) = self.decode_window(tokenizer)?;
        let rest = if new_text.len() > prefix_text.len() {
            suffix_after(&new_text, &prefix_text).to_string()
        } else {
            String::new()
        };
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.text.push_str(&rest);
        Ok(rest)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every token pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Text of the already-emitted window, and of the window plus the tokens not yet emitted.
    fn decode_window(&self, tokenizer: &TextTokenizer) -> Result<(String, String)> {
        let prefix_text = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        Ok((prefix_text, new_text))
    }
}

/// `new_text` past `prefix_text`. The window decodes the same whether or not more tokens follow,
/// so `new_text` starts with it; should a decoder break that, cut at the next char boundary.
fn suffix_after<'a>(new_text: &'a str, prefix_text: &str) -> &'a str {
    if let Some(rest) = new_text.strip_prefix(prefix_text) {
        return rest;
    }
    let mut cut = prefix_text.len().min(new_text.len());
    while !new_text.is_char_boundary(cut) {
        cut += 1;
    }
    &new_text[cut..]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn tokenizer() -> TextTokenizer {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek-v3");
        TextTokenizer::load(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
            Some(&dir.join("generation_config.json")),
        )
        .unwrap()
    }

    /// Streams `ids` one by one; returns the deltas and the final flush.
    fn stream(tok: &TextTokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut d = IncrementalDetokenizer::new();
        let deltas: Vec<String> = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        let rest = d.finish(tok).unwrap();
        let joined: String = deltas.concat() + &rest;
        assert_eq!(d.text(), joined);
        assert_eq!(d.ids(), ids);
        (deltas, rest)
    }

    #[test]
    fn deltas_concatenate_to_the_whole_decode() {
        let tok = tokenizer();
        let texts = [
            "Hello, world!",
            "  leading spaces and\ttabs\nand\n\nnewlines  ",
            "Café déjà vu, naïve façade, Ærøskøbing",
            "日本語のテキストと中文文本",
            "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷 mixed with text",
            "mixed: αβγ – “quotes” … 한국어 🙂\r\nend",
        ];
        for text in texts {
            let ids = tok.encode(text).unwrap();
            let (deltas, rest) = stream(&tok, &ids);
            let whole = tok.decode(&ids).unwrap();
            assert_eq!(deltas.concat() + &rest, whole, "{text:?}");
            assert_eq!(whole, text);
            assert_eq!(rest, "", "{text:?}: complete text leaves nothing held back");
            for d in &deltas {
                assert!(!d.contains('\u{FFFD}'), "{text:?}: delta {d:?}");
            }
        }
    }

    #[test]
    fn a_split_emoji_is_emitted_once_whole() {
        let tok = tokenizer();
        let ids = tok.encode("a😀b").unwrap();
        let (deltas, _) = stream(&tok, &ids);
        // The fixture's small vocabulary spells the emoji's 4 bytes with more than one token.
        let emoji_tokens = ids.len() - 3; // BOS, "a", "b"
        assert!(emoji_tokens > 1, "{ids:?}");
        let with_emoji: Vec<&String> = deltas.iter().filter(|d| d.contains('😀')).collect();
        assert_eq!(with_emoji.len(), 1);
        assert_eq!(deltas.iter().filter(|d| d.is_empty()).count(), emoji_tokens - 1 + 1); // + BOS
        assert_eq!(deltas.concat(), "a😀b");
    }

    #[test]
    fn special_tokens_are_skipped_and_a_cut_character_is_flushed_lossily() {
        let tok = tokenizer();
        let eos = tok.eos_ids()[0];
        let mut ids = tok.encode("x 日本").unwrap();
        ids.push(eos);
        let (deltas, rest) = stream(&tok, &ids);
        assert_eq!(deltas.concat() + &rest, "x 日本");
        // Stop in the middle of a character: the held bytes come out once, lossily, at the end.
        let ids = tok.encode("ok 😀").unwrap();
        let cut = &ids[..ids.len() - 1];
        let (deltas, rest) = stream(&tok, cut);
        // (The space may share a token with the emoji's first byte, so it may be held too.)
        let shown = deltas.concat();
        assert!(shown == "ok " || shown == "ok", "{shown:?}");
        assert!(rest.contains('\u{FFFD}'));
        assert_eq!(deltas.concat() + &rest, tok.decode(cut).unwrap());
        // Nothing pushed: nothing out.
        let mut d = IncrementalDetokenizer::new();
        assert_eq!(d.finish(&tok).unwrap(), "");
        assert_eq!(d.text(), "");
    }
}
