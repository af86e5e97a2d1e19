//! Fuzz target: chat templates. The input is split at its first `0xFF` byte (never part of
//! UTF-8): before it, Jinja template source (empty: the fixture's real template from
//! `tokenizer_config.json`); after it, a JSON list of OpenAI chat messages (arbitrary roles and
//! contents; absent or not valid JSON: one user turn). Compiling and rendering must end in `Ok` or a `ChatTemplateError`: no panic, no
//! hang (rendering runs on a fuel budget) and no file access (no loader is installed).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moe_server::chat_template::{ChatMessage, ChatTemplate};

fn fixture_template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/deepseek-v3"));
        ChatTemplate::from_model_dir(&dir)
            .expect("the fixture chat template loads")
            .expect("the fixture has a chat template")
    })
}

fuzz_target!(|data: &[u8]| {
    let (source, messages) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (
            &data[..i],
            serde_json::from_slice::<Vec<ChatMessage>>(&data[i + 1..]).ok(),
        ),
        None => (data, None),
    };
    // Without a (valid) message list, one plain user turn, so the template itself still runs.
    let messages = messages.unwrap_or_else(|| vec![ChatMessage::new("user", "Hello!")]);
    let fixture = fixture_template();
    let custom;
    let template = if source.is_empty() {
        fixture
    } else {
        let source = String::from_utf8_lossy(source);
        let bos = fixture.bos_token().map(str::to_owned);
        let eos = fixture.eos_token().map(str::to_owned);
        match ChatTemplate::new(&source, bos, eos) {
            Ok(t) => {
                custom = t;
                &custom
            }
            Err(_) => return,
        }
    };
    let _ = template.render(&messages, true);
    let _ = template.render(&messages, false);
});
