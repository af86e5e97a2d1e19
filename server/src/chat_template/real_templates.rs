//! The real chat templates of the families we serve (server/tests/data/templates,
//! sources in SOURCES.md) render tools, tool calls, tool results, reasoning and
//! template kwargs exactly as transformers' `apply_chat_template` does; the
//! expected strings come from tests/fixtures/render_templates.py.

use std::path::PathBuf;

use serde_json::Value;

use super::*;

fn templates_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/templates"))
}

fn load(name: &str) -> ChatTemplate {
    let dir = templates_dir().join(name);
    let source = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
    let special: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("special_tokens.json")).unwrap()).unwrap();
    let token = |k: &str| special.get(k).and_then(Value::as_str).map(str::to_owned);
    ChatTemplate::new(&source, token("bos_token"), token("eos_token")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn real_templates_render_like_transformers() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(templates_dir().join("golden.json")).unwrap()).unwrap();
    let mut checked = 0;
    for (name, cases) in golden.as_object().unwrap() {
        let Some(cases) = cases.as_array() else { continue };
        let template = load(name);
        for case in cases {
            let label = format!("{name}/{}", case["case"].as_str().unwrap());
            let form = match case["arguments_form"].as_str() {
                Some("dict") => Some(ArgumentsForm::Mapping),
                Some("string") => Some(ArgumentsForm::Text),
                _ => None,
            };
            // Cases rendered with the other argument form (Qwen3 and Kimi take both), and
            // transformers' literal `None` for a kept null content (we render "" instead, as
            // every template's author intended), are not what we send.
            if form.is_some_and(|f| f != template.arguments_form()) || label.ends_with("null_content_kept") {
                continue;
            }
            let Some(expected) = case["rendered"].as_str() else {
                continue;
            };
            let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
            let tools: Option<Vec<Value>> = case["tools"].as_array().cloned();
            let kwargs = case["kwargs"].as_object().cloned();
            let opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: tools.as_deref(),
                kwargs: kwargs.as_ref(),
            };
            let got = template
                .render_with(&messages, &opts)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(got, expected, "{label}");
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} cases checked");
}

#[test]
fn argument_forms_are_probed_per_template() {
    for (name, form) in [
        ("deepseek-v3.1", ArgumentsForm::Text),
        ("deepseek-r1", ArgumentsForm::Text),
        ("qwen3", ArgumentsForm::Mapping),
        ("glm-4.7-flash", ArgumentsForm::Mapping),
        ("minimax-m2.7", ArgumentsForm::Mapping),
        ("kimi-k2-thinking", ArgumentsForm::Mapping),
        ("qwen3-coder", ArgumentsForm::Mapping),
    ] {
        assert_eq!(load(name).arguments_form(), form, "{name}");
    }
}

#[test]
fn tool_formats_and_reasoning_are_detected_from_real_templates() {
    use crate::agent::{ReasoningFormat, ToolCallFormat};
    for (name, tools, thinks) in [
        ("deepseek-v3.1", ToolCallFormat::DeepSeek, true),
        ("deepseek-r1", ToolCallFormat::DeepSeek, true),
        ("qwen3", ToolCallFormat::Hermes, true),
        ("qwen3-coder", ToolCallFormat::Qwen3Coder, false),
        ("glm-4.6", ToolCallFormat::Glm, true),
        ("glm-4.7-flash", ToolCallFormat::Glm, true),
        ("minimax-m2.7", ToolCallFormat::MiniMax, true),
        ("kimi-k2-thinking", ToolCallFormat::Kimi, true),
    ] {
        let t = load(name);
        assert_eq!(ToolCallFormat::detect(t.source()), Some(tools), "{name}");
        assert_eq!(ReasoningFormat::detect(t.source()).is_some(), thinks, "{name}");
    }
}
