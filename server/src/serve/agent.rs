//! What both APIs share for agents: tool definitions and the tool choice, the
//! structured-output grammar a request implies, and the per-choice parser that
//! turns generated text into reasoning, content and tool calls.
//!
//! A forced tool call (`tool_choice` `required` or a named function) is
//! generated under a JSON grammar rather than in the model's own markup, so
//! it parses whatever the family: a named call's output *is* its arguments
//! object; `required` produces `[{"name": ..., "parameters": {...}}, ...]`.
//! Free output (`auto`) goes through the family's tool-call parser, and
//! through the reasoning parser when the model thinks.

use std::sync::Arc;

use moe_engine::{Grammar, GrammarCompiler};
use serde_json::{json, Map, Value};

use crate::agent::{
    OutputDelta, OutputParser, ParsedOutput, ReasoningFormat, ReasoningParser, ToolCallDelta, ToolCallFormat,
    ToolCallParser, ToolSchemas,
};

/// How the served model's output is read, fixed at start-up.
#[derive(Default)]
pub struct AgentConfig {
    /// The tool-call markup (`--tool-call-parser`, or detected from the template).
    pub tool_format: Option<ToolCallFormat>,
    /// The reasoning markup (`--reasoning-parser`, or detected from the template).
    pub reasoning: Option<ReasoningFormat>,
    /// Structured outputs; `None` when the tokenizer cannot back them.
    pub grammars: Option<Arc<GrammarCompiler>>,
}

/// A request error in API-neutral form: each API wraps it in its own error body.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub message: String,
    pub param: String,
}

fn field_error(message: impl Into<String>, param: impl Into<String>) -> FieldError {
    FieldError {
        message: message.into(),
        param: param.into(),
    }
}

/// Which tools the model may or must call.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The agent-facing part of a request, in OpenAI's terms (the Anthropic API
/// translates into it).
#[derive(Debug, Clone)]
pub struct AgentRequest {
    /// OpenAI-form tool definitions, checked.
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel_tool_calls: bool,
    /// The grammar `response_format` asks for.
    pub response_grammar: Option<Grammar>,
}

/// Tool names as OpenAI allows them.
fn valid_tool_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Structural checks of a JSON schema that llguidance would otherwise only
/// meet when a grammar is compiled: every (sub)schema is an object or a
/// boolean, its `type` names JSON types, `properties` maps names to schemas
/// and `required` lists names; nested `properties`, `items`, `anyOf` /
/// `oneOf` / `allOf`, `additionalProperties` and `$defs` are checked alike.
/// (serde_json's nesting limit bounds the depth.)
pub fn check_schema(schema: &Value, param: &str) -> Result<(), FieldError> {
    check_subschema(schema, param, false)
}

fn check_subschema(schema: &Value, param: &str, nested: bool) -> Result<(), FieldError> {
    if schema.is_boolean() && nested {
        return Ok(());
    }
    let Some(obj) = schema.as_object() else {
        return Err(field_error(format!("{param} must be a JSON schema object"), param));
    };
    if let Some(t) = obj.get("type") {
        let known = |s: &str| ["object", "array", "string", "number", "integer", "boolean", "null"].contains(&s);
        let ok = match t {
            Value::String(s) => known(s),
            Value::Array(ts) => ts.iter().all(|t| t.as_str().is_some_and(known)),
            _ => false,
        };
        if !ok {
            return Err(field_error(
                format!("{param}.type is not a JSON schema type: {t}"),
                format!("{param}.type"),
            ));
        }
    }
    if let Some(p) = obj.get("properties") {
        let Some(props) = p.as_object() else {
            return Err(field_error(
                format!("{param}.properties must be an object"),
                format!("{param}.properties"),
            ));
        };
        for (k, v) in props {
            check_subschema(v, &format!("{param}.properties.{k}"), true)?;
        }
    }
    if let Some(r) = obj.get("required") {
        if !r.as_array().is_some_and(|r| r.iter().all(Value::is_string)) {
            return Err(field_error(
                format!("{param}.required must be a list of names"),
                format!("{param}.required"),
            ));
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        match obj.get(key) {
            Some(Value::Array(list)) if key == "items" => {
                for (i, v) in list.iter().enumerate() {
                    check_subschema(v, &format!("{param}.items.{i}"), true)?;
                }
            }
            Some(v) => check_subschema(v, &format!("{param}.{key}"), true)?,
            None => {}
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(v) = obj.get(key) {
            let Some(list) = v.as_array() else {
                return Err(field_error(
                    format!("{param}.{key} must be a list of schemas"),
                    format!("{param}.{key}"),
                ));
            };
            for (i, v) in list.iter().enumerate() {
                check_subschema(v, &format!("{param}.{key}.{i}"), true)?;
            }
        }
    }
    for key in ["$defs", "definitions"] {
        if let Some(defs) = obj.get(key).and_then(Value::as_object) {
            for (k, v) in defs {
                check_subschema(v, &format!("{param}.{key}.{k}"), true)?;
            }
        }
    }
    Ok(())
}

impl AgentRequest {
    /// Checks OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and
    /// `response_format`.
    pub fn from_openai(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel_tool_calls: Option<bool>,
        response_format: Option<&Value>,
    ) -> Result<Self, FieldError> {
        let tools = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(field_error("tools must be a list", "tools")),
        };
        for (i, tool) in tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            match tool.get("type").and_then(Value::as_str) {
                Some("function") => {}
                other => {
                    return Err(field_error(
                        format!("{at}.type must be \"function\", got {other:?}"),
                        format!("{at}.type"),
                    ))
                }
            }
            let Some(f) = tool.get("function").and_then(Value::as_object) else {
                return Err(field_error(
                    format!("{at}.function must be an object"),
                    format!("{at}.function"),
                ));
            };
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_tool_name(name) {
                return Err(field_error(
                    format!("{at}.function.name must be 1-64 letters, digits, '_' or '-', got {name:?}"),
                    format!("{at}.function.name"),
                ));
            }
            if tools[..i].iter().any(|t| t["function"]["name"] == name) {
                return Err(field_error(
                    format!("{at}.function.name {name:?} is defined twice"),
                    format!("{at}.function.name"),
                ));
            }
            if let Some(params) = f.get("parameters") {
                check_schema(params, &format!("{at}.function.parameters"))?;
            }
        }
        let names: Vec<&str> = tools.iter().filter_map(|t| t["function"]["name"].as_str()).collect();
        let choice = match tool_choice {
            None | Some(Value::Null) => {
                if tools.is_empty() {
                    ToolChoice::None
                } else {
                    ToolChoice::Auto
                }
            }
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(field_error(
                        format!("tool_choice must be \"none\", \"auto\", \"required\" or a function, got {other:?}"),
                        "tool_choice",
                    ))
                }
            },
            Some(v) => match (
                v.get("type").and_then(Value::as_str),
                v.pointer("/function/name").and_then(Value::as_str),
            ) {
                (Some("function"), Some(name)) => ToolChoice::Named(name.to_owned()),
                _ => {
                    return Err(field_error(
                        "tool_choice must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        "tool_choice",
                    ))
                }
            },
        };
        match &choice {
            ToolChoice::Named(name) if !names.contains(&name.as_str()) => {
                return Err(field_error(
                    format!("tool_choice names {name:?}, which is not among the tools"),
                    "tool_choice",
                ))
            }
            ToolChoice::Required | ToolChoice::Auto if tools.is_empty() => {
                return Err(field_error("tool_choice needs tools", "tool_choice"))
            }
            _ => {}
        }
        let response_grammar = match response_format {
            None | Some(Value::Null) => None,
            Some(rf) => match rf.get("type").and_then(Value::as_str) {
                Some("text") => None,
                Some("json_object") => Some(Grammar::JsonObject),
                Some("json_schema") => {
                    let Some(schema) = rf.pointer("/json_schema/schema") else {
                        return Err(field_error(
                            "response_format.json_schema.schema is required",
                            "response_format.json_schema.schema",
                        ));
                    };
                    check_schema(schema, "response_format.json_schema.schema")?;
                    Some(Grammar::JsonSchema(schema.clone()))
                }
                other => {
                    return Err(field_error(
                        format!(
                            "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"
                        ),
                        "response_format.type",
                    ))
                }
            },
        };
        Ok(AgentRequest {
            tools,
            choice,
            parallel_tool_calls: parallel_tool_calls.unwrap_or(true),
            response_grammar,
        })
    }

    /// The tools the template gets: none when there are none.
    pub fn template_tools(&self) -> Option<&[Value]> {
        (!self.tools.is_empty()).then_some(self.tools.as_slice())
    }

    fn parameters_of(&self, name: &str) -> Value {
        self.tools
            .iter()
            .find(|t| t["function"]["name"] == name)
            .and_then(|t| t["function"].get("parameters").cloned())
            .unwrap_or_else(|| json!({"type": "object"}))
    }

    /// The grammar the output must follow: a forced call's, else `response_format`'s.
    pub fn grammar(&self) -> Option<Grammar> {
        match &self.choice {
            ToolChoice::Named(name) => Some(Grammar::JsonSchema(self.parameters_of(name))),
            ToolChoice::Required => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .filter_map(|t| t["function"]["name"].as_str())
                    .map(|name| {
                        json!({"type": "object", "properties": {"name": {"const": name}, "parameters": self.parameters_of(name)},
                               "required": ["name", "parameters"], "additionalProperties": false})
                    })
                    .collect();
                let mut schema = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1});
                if !self.parallel_tool_calls {
                    schema["maxItems"] = json!(1);
                }
                Some(Grammar::JsonSchema(schema))
            }
            ToolChoice::None | ToolChoice::Auto => self.response_grammar.clone(),
        }
    }

    /// Compiles [`grammar`](Self::grammar) for the engine, off the async
    /// workers (a large schema takes milliseconds); a grammar llguidance
    /// rejects is the client's error, naming the field it came from.
    pub async fn constraint(&self, config: &AgentConfig) -> Result<Option<moe_engine::TokenConstraint>, FieldError> {
        let Some(grammar) = self.grammar() else {
            return Ok(None);
        };
        let param = match self.choice {
            ToolChoice::Named(_) | ToolChoice::Required => "tools",
            _ => "response_format",
        };
        let Some(compiler) = config.grammars.as_ref() else {
            return Err(field_error(
                "structured outputs are not available for this model (its tokenizer could not be read for constrained decoding)",
                param,
            ));
        };
        let compiler = compiler.clone();
        let compiled = tokio::task::spawn_blocking(move || compiler.compile(&grammar))
            .await
            .map_err(|e| field_error(format!("compiling the grammar failed: {e}"), param))?;
        compiled.map(Some).map_err(|e| {
            let message = match e {
                moe_engine::EngineError::InvalidRequest(m) => m,
                other => other.to_string(),
            };
            field_error(message, param)
        })
    }

    /// How one choice's text is to be read.
    pub fn choice_parser(&self, config: &AgentConfig, prompt: &str, id_prefix: String) -> ChoiceParser {
        let mode = match &self.choice {
            ToolChoice::Named(name) => Mode::Named {
                name: name.clone(),
                id: format!("{id_prefix}0"),
                started: false,
            },
            ToolChoice::Required => Mode::Required {
                text: String::new(),
                id_prefix,
            },
            ToolChoice::None | ToolChoice::Auto => {
                let constrained = self.response_grammar.is_some();
                // A grammar leaves no room for `<think>`; free text may think.
                let reasoning = (!constrained)
                    .then_some(config.reasoning)
                    .flatten()
                    .map(|f| ReasoningParser::new(f, prompt));
                let tools = match (&self.choice, config.tool_format) {
                    (ToolChoice::Auto, Some(format)) => Some(ToolCallParser::new(
                        format,
                        ToolSchemas::from_openai_tools(&self.tools),
                        id_prefix,
                    )),
                    _ => None,
                };
                Mode::Free(OutputParser::new(reasoning, tools))
            }
        };
        ChoiceParser {
            mode,
            saw_calls: false,
            one_call: !self.parallel_tool_calls,
        }
    }
}

enum Mode {
    Free(OutputParser),
    /// The whole output is the named function's arguments.
    Named {
        name: String,
        id: String,
        started: bool,
    },
    /// The output is a JSON list of `{"name", "parameters"}`, read at the end.
    Required {
        text: String,
        id_prefix: String,
    },
}

/// Reads one choice's generated text, delta by delta.
pub struct ChoiceParser {
    mode: Mode,
    saw_calls: bool,
    /// `parallel_tool_calls: false`: calls after the first are dropped.
    one_call: bool,
}

impl ChoiceParser {
    pub fn push(&mut self, text: &str) -> OutputDelta {
        let delta = match &mut self.mode {
            Mode::Free(p) => p.push(text),
            Mode::Named { name, id, started } => {
                let first = !*started;
                *started = true;
                if text.is_empty() && !first {
                    OutputDelta::default()
                } else {
                    OutputDelta {
                        tool_calls: vec![ToolCallDelta {
                            index: 0,
                            id: first.then(|| id.clone()),
                            name: first.then(|| name.clone()),
                            arguments: text.to_owned(),
                        }],
                        ..Default::default()
                    }
                }
            }
            Mode::Required { text: buf, .. } => {
                buf.push_str(text);
                OutputDelta::default()
            }
        };
        self.limit(delta)
    }

    fn limit(&mut self, mut delta: OutputDelta) -> OutputDelta {
        if self.one_call {
            delta.tool_calls.retain(|c| c.index == 0);
        }
        self.saw_calls |= !delta.tool_calls.is_empty();
        delta
    }

    pub fn finish(&mut self) -> OutputDelta {
        let delta = match &mut self.mode {
            Mode::Free(p) => p.finish(),
            Mode::Named { .. } => self.push(""),
            Mode::Required { text, id_prefix } => required_calls(text, id_prefix),
        };
        self.limit(delta)
    }

    /// Whether the output made tool calls (its finish reason is then `tool_calls`).
    pub fn saw_calls(&self) -> bool {
        self.saw_calls
    }

    /// Parses a whole output.
    pub fn parse_all(mut self, text: &str) -> (ParsedOutput, bool) {
        let mut out = ParsedOutput::default();
        out.absorb(self.push(text));
        out.absorb(self.finish());
        let saw = self.saw_calls;
        (out, saw)
    }
}

/// `[{"name": ..., "parameters": {...}}, ...]` as tool calls; text that is
/// not such a list (a cut-off output) stays content.
fn required_calls(text: &str, id_prefix: &str) -> OutputDelta {
    let parsed: Option<Vec<Map<String, Value>>> = serde_json::from_str(text).ok();
    match parsed {
        Some(calls) => OutputDelta {
            tool_calls: calls
                .iter()
                .enumerate()
                .map(|(i, c)| ToolCallDelta {
                    index: i,
                    id: Some(format!("{id_prefix}{i}")),
                    name: Some(c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned()),
                    arguments: c.get("parameters").map_or_else(|| "{}".to_owned(), Value::to_string),
                })
                .collect(),
            ..Default::default()
        },
        None => OutputDelta {
            content: text.to_owned(),
            ..Default::default()
        },
    }
}

/// A fresh tool-call id prefix: `call_` and 24 hex digits, then the call's index.
pub fn call_id_prefix() -> String {
    format!("call_{:024x}_", rand::random::<u128>() >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather_tools() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn tool_requests_are_checked_naming_the_field() {
        let tools = weather_tools();
        let err = |tools: &Value, choice: Value, rf: Option<Value>| {
            AgentRequest::from_openai(Some(tools), Some(&choice), None, rf.as_ref()).unwrap_err()
        };
        let e = err(&tools, json!({"type": "function", "function": {"name": "nope"}}), None);
        assert_eq!(e.param, "tool_choice");
        assert!(e.message.contains("nope"), "{}", e.message);
        let e = err(
            &json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
            json!("auto"),
            None,
        );
        assert_eq!(e.param, "tools[0].function.parameters.type");
        let e = err(
            &json!([{"type": "function", "function": {"name": "bad name!"}}]),
            json!("auto"),
            None,
        );
        assert_eq!(e.param, "tools[0].function.name");
        let e = err(
            &json!([{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}]),
            json!("auto"),
            None,
        );
        assert_eq!(e.param, "tools[0].function.parameters.properties");
        let e = err(
            &tools,
            json!("auto"),
            Some(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 5}})),
        );
        assert_eq!(e.param, "response_format.json_schema.schema");
        let e = err(&tools, json!("sometimes"), None);
        assert_eq!(e.param, "tool_choice");
        let e = err(
            &tools,
            json!({"type": "tool", "function": {"name": "get_weather"}}),
            None,
        );
        assert_eq!(e.param, "tool_choice");
        let nested = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"a": {"type": "array", "items": {"anyOf": [{"type": "strin"}]}}}}}}]);
        let e = err(&nested, json!("auto"), None);
        assert_eq!(e.param, "tools[0].function.parameters.properties.a.items.anyOf.0.type");
        let ok = AgentRequest::from_openai(Some(&tools), None, None, None).unwrap();
        assert_eq!(ok.choice, ToolChoice::Auto);
        assert!(ok.grammar().is_none());
    }

    #[test]
    fn forced_calls_are_read_from_json() {
        let tools = weather_tools();
        let named = AgentRequest::from_openai(
            Some(&tools),
            Some(&json!({"type": "function", "function": {"name": "get_weather"}})),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            named.grammar(),
            Some(Grammar::JsonSchema(tools[0]["function"]["parameters"].clone()))
        );
        let cfg = AgentConfig::default();
        let (out, saw) = named
            .choice_parser(&cfg, "", "call_x_".into())
            .parse_all("{\"city\": \"Oslo\"}");
        assert!(saw);
        assert_eq!(out.tool_calls[0].name, "get_weather");
        assert_eq!(out.tool_calls[0].id, "call_x_0");
        assert_eq!(out.tool_calls[0].arguments, "{\"city\": \"Oslo\"}");

        let required = AgentRequest::from_openai(Some(&tools), Some(&json!("required")), Some(false), None).unwrap();
        let Some(Grammar::JsonSchema(schema)) = required.grammar() else {
            panic!()
        };
        assert_eq!(schema["maxItems"], 1);
        let (out, _) = required
            .choice_parser(&cfg, "", "c_".into())
            .parse_all("[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\", \"a\": 1}}]");
        assert_eq!(out.tool_calls[0].name, "get_weather");
        assert_eq!(out.tool_calls[0].arguments, "{\"city\":\"Rome\",\"a\":1}");
    }
}
