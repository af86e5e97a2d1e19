//! The body of `/v1/messages` and its translation into what the chat template
//! and the engine take: content blocks (`text`, `tool_use`, `tool_result`,
//! `thinking`) into chat messages, `tools` / `tool_choice` into an
//! [`AgentRequest`], `thinking` into template kwargs, the sampling fields into
//! an engine request. Every refusal names the field, Anthropic style
//! (`messages.1.content.0.tool_use_id`).

use std::collections::HashSet;

use moe_engine::GenerationRequest;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{bad, AnthropicError};
use crate::chat_template::{ChatMessage, FunctionCall, MessageContent, ToolCall};
use crate::serve::agent::{AgentRequest, FieldError};
use crate::serve::error::ApiError;
use crate::serve::protocol::{SamplingFields, StopInput};

/// A string, or a list of content blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

impl Content {
    /// The text of a content that may hold only text blocks (the system
    /// prompt, a tool result's content).
    pub(super) fn text(&self, field: &str) -> Result<String, AnthropicError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Blocks(blocks) => {
                let mut out = String::new();
                for (i, b) in blocks.iter().enumerate() {
                    out.push_str(&text_block(b, &format!("{field}.{i}"))?);
                }
                Ok(out)
            }
        }
    }

    fn blocks(&self) -> Vec<Value> {
        match self {
            Content::Text(s) => vec![json!({"type": "text", "text": s})],
            Content::Blocks(b) => b.clone(),
        }
    }
}

fn text_block(b: &Value, field: &str) -> Result<String, AnthropicError> {
    match (
        b.get("type").and_then(Value::as_str),
        b.get("text").and_then(Value::as_str),
    ) {
        (Some("text"), Some(t)) => Ok(t.to_owned()),
        (Some("text"), None) => Err(bad("a text block needs a string `text`", &format!("{field}.text"))),
        (other, _) => Err(bad(
            format!(
                "content blocks of type {:?} are not supported here (only \"text\")",
                other.unwrap_or("")
            ),
            &format!("{field}.type"),
        )),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct InputMessage {
    role: String,
    content: Option<Content>,
}

/// The body of `/v1/messages` (and, without `max_tokens`, of `count_tokens`).
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub(super) model: String,
    max_tokens: Option<i64>,
    messages: Vec<InputMessage>,
    system: Option<Content>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    #[serde(default)]
    pub(super) stream: bool,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    thinking: Option<Value>,
    #[allow(dead_code)]
    metadata: Option<Value>,
}

/// An agent-layer error with its field spelled the Anthropic way
/// (`tools[0].function.parameters` → `tools.0.input_schema`).
fn anthropic_field(e: FieldError) -> AnthropicError {
    let mut param = e
        .param
        .replace(".function.parameters", ".input_schema")
        .replace(".function.name", ".name");
    param = param.replace('[', ".").replace(']', "");
    bad(e.message.replace("function.parameters", "input_schema"), &param)
}

impl MessagesRequest {
    /// The conversation as chat messages: the system prompt, then each turn's
    /// blocks (a user turn's `tool_result`s become tool messages ahead of its
    /// text; an assistant turn's `thinking` becomes its reasoning and its
    /// `tool_use`s its tool calls).
    pub(super) fn chat_messages(&self) -> Result<Vec<ChatMessage>, AnthropicError> {
        if self.messages.is_empty() {
            return Err(bad("messages must contain at least one message", "messages"));
        }
        if self.messages[0].role != "user" {
            return Err(bad("the first message must have role \"user\"", "messages.0.role"));
        }
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            out.push(ChatMessage::new("system", system.text("system")?));
        }
        let mut tool_ids: HashSet<String> = HashSet::new();
        for (i, m) in self.messages.iter().enumerate() {
            let at = format!("messages.{i}");
            let content = m
                .content
                .as_ref()
                .ok_or_else(|| bad("every message needs `content`", &format!("{at}.content")))?;
            match m.role.as_str() {
                "user" => out.extend(user_turn(&content.blocks(), &at, &tool_ids)?),
                "assistant" => out.push(assistant_turn(&content.blocks(), &at, &mut tool_ids)?),
                other => {
                    return Err(bad(
                        format!("role must be \"user\" or \"assistant\", got {other:?}"),
                        &format!("{at}.role"),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// `tools` and `tool_choice` in OpenAI's terms, checked.
    pub(super) fn agent(&self) -> Result<AgentRequest, AnthropicError> {
        let tools = match &self.tools {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, t) in list.iter().enumerate() {
                    if let Some(kind) = t.get("type").and_then(Value::as_str).filter(|k| *k != "custom") {
                        return Err(bad(
                            format!("tools of type {kind:?} are not supported (only client tools)"),
                            &format!("tools.{i}.type"),
                        ));
                    }
                    let Some(schema) = t.get("input_schema") else {
                        return Err(bad(
                            "a tool needs an `input_schema`",
                            &format!("tools.{i}.input_schema"),
                        ));
                    };
                    let mut function =
                        json!({"name": t.get("name").cloned().unwrap_or(Value::Null), "parameters": schema});
                    if let Some(d) = t.get("description") {
                        function["description"] = d.clone();
                    }
                    out.push(json!({"type": "function", "function": function}));
                }
                Some(Value::Array(out))
            }
            Some(_) => return Err(bad("tools must be a list", "tools")),
        };
        let (choice, parallel) = match &self.tool_choice {
            None | Some(Value::Null) => (None, None),
            Some(c) => {
                let parallel = c.get("disable_parallel_tool_use").and_then(Value::as_bool).map(|d| !d);
                let choice = match c.get("type").and_then(Value::as_str) {
                    Some("auto") => json!("auto"),
                    Some("any") => json!("required"),
                    Some("none") => json!("none"),
                    Some("tool") => match c.get("name").and_then(Value::as_str) {
                        Some(name) => json!({"type": "function", "function": {"name": name}}),
                        None => return Err(bad("tool_choice of type \"tool\" needs a `name`", "tool_choice.name")),
                    },
                    other => {
                        return Err(bad(
                            format!("tool_choice.type must be auto, any, tool or none, got {other:?}"),
                            "tool_choice.type",
                        ))
                    }
                };
                (Some(choice), parallel)
            }
        };
        AgentRequest::from_openai(tools.as_ref(), choice.as_ref(), parallel, None).map_err(anthropic_field)
    }

    /// `thinking` as the template variables thinking models read
    /// (`thinking` for DeepSeek, `enable_thinking` for Qwen3 and GLM).
    pub(super) fn template_kwargs(&self) -> Result<Option<Map<String, Value>>, AnthropicError> {
        let Some(t) = self.thinking.as_ref().filter(|t| !t.is_null()) else {
            return Ok(None);
        };
        let on = match t.get("type").and_then(Value::as_str) {
            Some("enabled") => {
                if let Some(b) = t.get("budget_tokens") {
                    if b.as_u64().is_none_or(|b| b == 0) {
                        return Err(bad(
                            "budget_tokens must be a positive integer",
                            "thinking.budget_tokens",
                        ));
                    }
                }
                true
            }
            Some("disabled") => false,
            other => {
                return Err(bad(
                    format!("thinking.type must be \"enabled\" or \"disabled\", got {other:?}"),
                    "thinking.type",
                ))
            }
        };
        let mut kwargs = Map::new();
        kwargs.insert("thinking".into(), json!(on));
        kwargs.insert("enable_thinking".into(), json!(on));
        Ok(Some(kwargs))
    }

    /// Validates the sampling fields into an engine request for `prompt`.
    pub(super) fn to_engine_request(
        &self,
        prompt: Vec<u32>,
        max_model_len: usize,
    ) -> Result<GenerationRequest, AnthropicError> {
        let max_tokens = self
            .max_tokens
            .ok_or_else(|| bad("max_tokens is required", "max_tokens"))?;
        // Anthropic's temperature range is [0, 1].
        if let Some(t) = self.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
            return Err(bad(format!("temperature must be in [0, 1], got {t}"), "temperature"));
        }
        if let Some(k) = self.top_k.filter(|&k| k < 1) {
            return Err(bad(format!("top_k must be positive, got {k}"), "top_k"));
        }
        let fields = SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop_sequences.clone().map(StopInput::Many),
            ..Default::default()
        };
        let mut request = fields
            .to_request(Some(max_tokens), None, prompt.len(), max_model_len)
            .map_err(|e| {
                // The shared validation says `stop`; this API calls it `stop_sequences`.
                let rename = e.param.as_deref() == Some("stop");
                AnthropicError(ApiError {
                    param: if rename {
                        Some("stop_sequences".into())
                    } else {
                        e.param.clone()
                    },
                    ..e
                })
            })?;
        request.prompt_token_ids = prompt;
        Ok(request)
    }
}

/// A user turn: its `tool_result` blocks as tool messages, then its text.
fn user_turn(blocks: &[Value], at: &str, tool_ids: &HashSet<String>) -> Result<Vec<ChatMessage>, AnthropicError> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut has_text = false;
    for (j, b) in blocks.iter().enumerate() {
        let field = format!("{at}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("tool_result") => {
                let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or_default();
                if !tool_ids.contains(id) {
                    return Err(bad(
                        format!("tool_result for {id:?}, which no earlier tool_use block has"),
                        &format!("{field}.tool_use_id"),
                    ));
                }
                let result = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => serde_json::from_value::<Content>(c.clone())
                        .map_err(|_| bad("content must be a string or text blocks", &format!("{field}.content")))?
                        .text(&format!("{field}.content"))?,
                };
                out.push(ChatMessage {
                    tool_call_id: Some(id.to_owned()),
                    ..ChatMessage::new("tool", result)
                });
            }
            _ => {
                text.push_str(&text_block(b, &field)?);
                has_text = true;
            }
        }
    }
    if has_text || out.is_empty() {
        out.push(ChatMessage::new("user", text));
    }
    Ok(out)
}

/// An assistant turn: text, `thinking` (as reasoning) and `tool_use` blocks.
fn assistant_turn(blocks: &[Value], at: &str, tool_ids: &mut HashSet<String>) -> Result<ChatMessage, AnthropicError> {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let field = format!("{at}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("thinking") => reasoning.push_str(b.get("thinking").and_then(Value::as_str).unwrap_or_default()),
            Some("redacted_thinking") => {}
            Some("tool_use") => {
                let id = b.get("id").and_then(Value::as_str).unwrap_or_default();
                let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
                if id.is_empty() || name.is_empty() {
                    return Err(bad("a tool_use block needs an `id` and a `name`", &field));
                }
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                if !input.is_object() {
                    return Err(bad("tool_use input must be an object", &format!("{field}.input")));
                }
                tool_ids.insert(id.to_owned());
                calls.push(ToolCall {
                    id: Some(id.to_owned()),
                    kind: "function".to_owned(),
                    function: FunctionCall {
                        name: name.to_owned(),
                        arguments: Value::String(input.to_string()),
                    },
                });
            }
            _ => text.push_str(&text_block(b, &field)?),
        }
    }
    Ok(ChatMessage {
        role: "assistant".to_owned(),
        content: Some(MessageContent::Text(text)),
        tool_calls: (!calls.is_empty()).then_some(calls),
        reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
        ..Default::default()
    })
}
