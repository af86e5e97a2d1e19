//! Each family's tool-call markup, fed whole, one character at a time and in
//! uneven chunks: the assembled calls and content must be the same.

use serde_json::{json, Value};

use super::*;
use crate::agent::{OutputParser, ParsedOutput, ReasoningFormat, ReasoningParser};

fn schemas() -> ToolSchemas {
    ToolSchemas::from_openai_tools(&[
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}}}}}),
        json!({"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "filters": {"type": "object"}, "tags": {"type": "array"}}}}}),
    ])
}

fn run(format: ToolCallFormat, pieces: &[String], reasoning_prompt: Option<&str>) -> ParsedOutput {
    let reasoning = reasoning_prompt.map(|p| ReasoningParser::new(ReasoningFormat::from_name("qwen3").unwrap(), p));
    let mut parser = OutputParser::new(reasoning, Some(ToolCallParser::new(format, schemas(), "call_t_")));
    let mut out = ParsedOutput::default();
    for p in pieces {
        out.absorb(parser.push(p));
    }
    out.absorb(parser.finish());
    out
}

/// The pieces the engine would stream for `text`: encoded with the tiny fixture's byte-level
/// tokenizer (markers and multi-byte characters split across tokens) and decoded one token at
/// a time by the incremental detokenizer.
fn token_pieces(text: &str) -> Vec<String> {
    let tokenizer = moe_tests::fixture_tokenizer();
    let ids = tokenizer.encode_plain(text).unwrap();
    let mut detok = moe_engine::IncrementalDetokenizer::new();
    let mut pieces: Vec<String> = ids.iter().map(|&id| detok.push(&tokenizer, id).unwrap()).collect();
    pieces.push(detok.finish(&tokenizer).unwrap());
    assert_eq!(
        pieces.concat(),
        text,
        "the fixture tokenizer does not round-trip {text:?}"
    );
    pieces
}

/// Parses `text` whole, one token at a time, per character and in chunks of 2..=7
/// characters; all must agree.
fn parse(format: ToolCallFormat, text: &str, reasoning_prompt: Option<&str>) -> ParsedOutput {
    let whole = run(format, &[text.to_owned()], reasoning_prompt);
    assert_eq!(
        run(format, &token_pieces(text), reasoning_prompt),
        whole,
        "token by token: {text:?}"
    );
    let chars: Vec<String> = text.chars().map(String::from).collect();
    assert_eq!(run(format, &chars, reasoning_prompt), whole, "char by char: {text:?}");
    for width in [2usize, 3, 5, 7] {
        let chunks: Vec<String> = chars.chunks(width).map(|c| c.concat()).collect();
        assert_eq!(
            run(format, &chunks, reasoning_prompt),
            whole,
            "chunks of {width}: {text:?}"
        );
    }
    whole
}

fn args(call: &ParsedToolCall) -> Value {
    serde_json::from_str(&call.arguments).unwrap_or_else(|e| panic!("arguments {:?} are not JSON: {e}", call.arguments))
}

#[test]
fn deepseek_v31_two_calls_with_nested_arguments() {
    let text = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris <｜x｜>\", \"days\": 3}<｜tool▁call▁end｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{\"query\": \"a\\\"b\", \"filters\": {\"lang\": [\"en\", \"fr\"]}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let out = parse(ToolCallFormat::DeepSeek, text, None);
    assert_eq!(out.content, "Checking.");
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(out.tool_calls[0].name, "get_weather");
    assert_eq!(out.tool_calls[0].id, "call_t_0");
    assert_eq!(args(&out.tool_calls[0]), json!({"city": "Paris <｜x｜>", "days": 3}));
    assert_eq!(out.tool_calls[1].name, "search");
    assert_eq!(
        args(&out.tool_calls[1]),
        json!({"query": "a\"b", "filters": {"lang": ["en", "fr"]}})
    );
}

#[test]
fn deepseek_v3_fenced_calls() {
    let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{\"query\": \"x\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let out = parse(ToolCallFormat::DeepSeek, text, None);
    assert_eq!(out.content, "");
    let names: Vec<&str> = out.tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["get_weather", "search"]);
    assert_eq!(args(&out.tool_calls[0]), json!({"city": "Oslo"}));
    assert_eq!(out.tool_calls[1].arguments, "{\"query\": \"x\"}");
}

#[test]
fn kimi_calls_keep_the_model_ids() {
    let text = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Beijing\"}<|tool_call_end|><|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{\"query\": \"<|tool_call_end|> is a marker\"}<|tool_call_end|><|tool_calls_section_end|>";
    // A marker inside a JSON string ends the call early in Kimi's format too; what the model
    // means there is ambiguous, so we only check the first call and that nothing leaks.
    let out = parse(ToolCallFormat::Kimi, text, None);
    assert_eq!(out.tool_calls[0].id, "functions.get_weather:0");
    assert_eq!(out.tool_calls[0].name, "get_weather");
    assert_eq!(args(&out.tool_calls[0]), json!({"city": "Beijing"}));
    assert_eq!(out.tool_calls[1].id, "functions.search:1");
    assert!(!out.content.contains("<|tool_call"), "markup leaked: {:?}", out.content);

    let clean = "I'll look.<|tool_calls_section_begin|>\n<|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>{\"query\": \"q\", \"tags\": [1, {\"a\": null}]}<|tool_call_end|>\n<|tool_calls_section_end|>";
    let out = parse(ToolCallFormat::Kimi, clean, None);
    assert_eq!(out.content, "I'll look.");
    assert_eq!(
        args(&out.tool_calls[0]),
        json!({"query": "q", "tags": [1, {"a": null}]})
    );
}

#[test]
fn glm_pairs_become_typed_json() {
    let text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>São Paulo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>5</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>01000</arg_value>\n</tool_call>\n<tool_call>search<arg_key>query</arg_key><arg_value>a <b> & </c></arg_value><arg_key>filters</arg_key><arg_value>{\"k\": [1, 2]}</arg_value></tool_call>";
    let out = parse(ToolCallFormat::Glm, text, None);
    assert_eq!(out.content, "");
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(
        args(&out.tool_calls[0]),
        json!({"city": "São Paulo", "days": 5, "zip": "01000"})
    );
    assert_eq!(
        out.tool_calls[0].arguments,
        r#"{"city":"São Paulo","days":5,"zip":"01000"}"#
    );
    assert_eq!(
        args(&out.tool_calls[1]),
        json!({"query": "a <b> & </c>", "filters": {"k": [1, 2]}})
    );
}

#[test]
fn minimax_invokes() {
    let text = "Sure.\n<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">Tokyo</parameter>\n<parameter name=\"days\">2</parameter>\n</invoke>\n<invoke name=\"search\">\n<parameter name=\"tags\">[\"x\", \"y\"]</parameter>\n</invoke>\n</minimax:tool_call>";
    let out = parse(ToolCallFormat::MiniMax, text, None);
    assert_eq!(out.content, "Sure.\n");
    assert_eq!(args(&out.tool_calls[0]), json!({"city": "Tokyo", "days": 2}));
    assert_eq!(args(&out.tool_calls[1]), json!({"tags": ["x", "y"]}));
}

#[test]
fn deepseek_dsml_invokes_with_typed_parameters() {
    // V3.2 spells the section `function_calls`, V4 `tool_calls`; `string` decides the value type.
    for section in ["function_calls", "tool_calls"] {
        let text = format!(
            "Let me check.\n\n<｜DSML｜{section}>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">New <York></｜DSML｜parameter>\n<｜DSML｜parameter name=\"zip\" string=\"true\">007</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">5</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"search\">\n<｜DSML｜parameter name=\"filters\" string=\"false\">{{\"k\": [1, \"a\"]}}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜{section}>"
        );
        let out = parse(ToolCallFormat::DeepSeekDsml, &text, None);
        assert_eq!(out.content, "Let me check.\n\n");
        assert_eq!(out.tool_calls.len(), 2, "{section}");
        assert_eq!(
            out.tool_calls[0].arguments,
            r#"{"city":"New <York>","zip":"007","days":5}"#
        );
        assert_eq!(args(&out.tool_calls[1]), json!({"filters": {"k": [1, "a"]}}));
    }
}

#[test]
fn hermes_json_calls_after_reasoning() {
    let text = "<think>\nThe user wants weather; call the tool.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\", \"days\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"</tool\"}}\n</tool_call>";
    let out = parse(ToolCallFormat::Hermes, text, Some("<|im_start|>assistant\n"));
    assert_eq!(out.reasoning, "The user wants weather; call the tool.");
    assert_eq!(out.content, "");
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(out.tool_calls[0].arguments, "{\"city\": \"Rome\", \"days\": 1}");
    assert_eq!(args(&out.tool_calls[1]), json!({"query": "</tool"}));
}

#[test]
fn qwen3_coder_parameters() {
    let text = "<tool_call>\n<function=search>\n<parameter=query>\nline one\nline two\n</parameter>\n<parameter=filters>\n{\"n\": 1}\n</parameter>\n</function>\n</tool_call>";
    let out = parse(ToolCallFormat::Qwen3Coder, text, None);
    assert_eq!(out.tool_calls.len(), 1);
    assert_eq!(
        args(&out.tool_calls[0]),
        json!({"query": "line one\nline two", "filters": {"n": 1}})
    );
}

#[test]
fn text_that_only_looks_like_a_call_stays_content() {
    let out = parse(
        ToolCallFormat::Hermes,
        "Use <tool_call> tags like <tool_call>not json</tool_call> done",
        None,
    );
    assert!(out.tool_calls.is_empty());
    assert_eq!(
        out.content,
        "Use <tool_call> tags like <tool_call>not json</tool_call> done"
    );
    let out = parse(ToolCallFormat::Glm, "a < b and <tool_ca", None);
    assert_eq!(out.content, "a < b and <tool_ca");
}

#[test]
fn a_cut_off_call_keeps_the_complete_ones() {
    let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"A\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>sea";
    let out = parse(ToolCallFormat::DeepSeek, text, None);
    assert_eq!(out.tool_calls.len(), 1);
    assert_eq!(args(&out.tool_calls[0]), json!({"city": "A"}));
}

#[test]
fn json_arguments_stream_in_fragments() {
    let mut p = ToolCallParser::new(ToolCallFormat::DeepSeek, ToolSchemas::default(), "c");
    let mut fragments = Vec::new();
    for piece in [
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\"",
        ": 1, ",
        "\"b\": 2}",
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ] {
        for d in p.push(piece).tool_calls {
            fragments.push(d.arguments);
        }
    }
    assert!(fragments.len() >= 3, "arguments should arrive in pieces: {fragments:?}");
    assert_eq!(fragments.concat(), "{\"a\": 1, \"b\": 2}");
}

#[test]
fn names_and_detection() {
    assert_eq!(ToolCallFormat::from_name("glm45"), Some(ToolCallFormat::Glm));
    assert_eq!(ToolCallFormat::from_name("bogus"), None);
    assert_eq!(
        ToolCallFormat::detect("{{'<｜tool▁calls▁begin｜>'}}"),
        Some(ToolCallFormat::DeepSeek)
    );
    assert_eq!(
        ToolCallFormat::detect("<tool_call>\\n{{ tool_call.name }}<arg_key>"),
        Some(ToolCallFormat::Glm)
    );
    assert_eq!(
        ToolCallFormat::detect("<tool_call>\\n<function="),
        Some(ToolCallFormat::Qwen3Coder)
    );
    assert_eq!(
        ToolCallFormat::detect("<tool_call>\\n{\"name\""),
        Some(ToolCallFormat::Hermes)
    );
    assert_eq!(
        ToolCallFormat::detect("<｜DSML｜invoke"),
        Some(ToolCallFormat::DeepSeekDsml)
    );
    assert_eq!(
        ToolCallFormat::from_name("deepseek_v32"),
        Some(ToolCallFormat::DeepSeekDsml)
    );
    assert_eq!(ToolCallFormat::detect("plain"), None);
}

#[test]
fn a_call_missing_its_own_end_marker_ends_with_its_section() {
    // MiniMax without `</invoke>`, Qwen3-Coder without `</function>`, Kimi and DeepSeek
    // without the call-end marker: the section's end closes the call, in every chunking.
    let cases = [
        (ToolCallFormat::MiniMax, "<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">Oslo</parameter>\n</minimax:tool_call>"),
        (ToolCallFormat::Qwen3Coder, "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</tool_call>"),
        (ToolCallFormat::Kimi, "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Oslo\"}<|tool_calls_section_end|>"),
        (ToolCallFormat::DeepSeek, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁calls▁end｜>"),
    ];
    for (format, text) in cases {
        let out = parse(format, &format!("{text}Done."), None);
        assert_eq!(out.tool_calls.len(), 1, "{format:?}");
        assert_eq!(args(&out.tool_calls[0]), json!({"city": "Oslo"}), "{format:?}");
        assert_eq!(out.content, "Done.", "{format:?}");
    }
}

#[test]
fn a_call_cut_off_mid_arguments_still_has_json_arguments() {
    let out = parse(
        ToolCallFormat::Glm,
        "<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Par",
        None,
    );
    assert_eq!(out.tool_calls.len(), 1);
    assert_eq!(out.tool_calls[0].arguments, "{}");
    let out = parse(ToolCallFormat::MiniMax, "<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"days\">3</parameter>\n<parameter name=\"ci", None);
    assert_eq!(args(&out.tool_calls[0]), json!({"days": 3}));
}
