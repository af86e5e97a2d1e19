//! Fuzz target: arbitrary bytes as the body of `POST /v1/completions` and
//! `POST /v1/chat/completions`, through the same steps the handlers take before the engine sees
//! a request: `parse_body`, then (when it parses) the prompt (text encoded with the fixture's
//! real tokenizer, ids checked against the vocabulary) or the chat template (the fixture's),
//! `n`, and `to_engine_request`. Every outcome must be `Ok` or an `ApiError`, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moe_engine::TextTokenizer;
use moe_server::chat_template::ChatTemplate;
use moe_server::serve::error::ApiError;
use moe_server::serve::protocol::{parse_body, ChatRequest, CompletionRequest};

/// The fixture's `max_position_embeddings`, which `moe serve` uses as the model length.
const MAX_MODEL_LEN: usize = 4096;

struct Fixture {
    tokenizer: TextTokenizer,
    template: ChatTemplate,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/deepseek-v3"));
        let tokenizer = TextTokenizer::load(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
            Some(&dir.join("generation_config.json")),
        )
        .expect("the fixture tokenizer loads");
        let template = ChatTemplate::from_model_dir(&dir)
            .expect("the fixture chat template loads")
            .expect("the fixture has a chat template");
        Fixture { tokenizer, template }
    })
}

fn encode(text: &str) -> Result<Vec<u32>, ApiError> {
    fixture()
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    if let Ok(req) = parse_body::<CompletionRequest>(data) {
        if let Ok(request) = req.to_engine_request(encode, f.tokenizer.vocab_size(), MAX_MODEL_LEN) {
            assert!(!request.prompt_token_ids.is_empty());
            assert!(request.prompt_token_ids.len() + request.max_tokens <= MAX_MODEL_LEN);
        }
        let _ = req.sampling.n();
        let _ = req.sampling.include_usage();
    }
    if let Ok(req) = parse_body::<ChatRequest>(data) {
        let _ = req.sampling.n();
        if let Ok(text) = f.template.render(&req.messages, true) {
            if let Ok(prompt) = encode(&text) {
                if let Ok(request) = req.to_engine_request(prompt, MAX_MODEL_LEN) {
                    assert!(request.prompt_token_ids.len() + request.max_tokens <= MAX_MODEL_LEN);
                }
            }
        }
    }
});
