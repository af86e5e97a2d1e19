//! The OpenAI chat messages a template renders: their wire types, the checks a
//! conversation must pass (content where a role needs it, tool results that
//! answer an earlier call), and their conversion to template values shaped as
//! transformers passes them.

use std::collections::HashSet;

use minijinja::value::Value;
use serde::{Deserialize, Serialize};

use super::{ChatTemplateError, OrderedMap};

/// Roles `render` accepts.
pub(super) const VALID_ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// One OpenAI chat message.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    /// A string or a list of content parts; `None` when absent or `null`
    /// (allowed for an assistant message that makes tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant message's reasoning, for templates that show it again.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "reasoning")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A message with plain-text content and no name.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
            ..Default::default()
        }
    }
}

/// One tool call of an assistant message, as OpenAI sends it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON string (OpenAI's form) or, leniently, a JSON object.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

/// How a template wants tool-call arguments: most iterate or `tojson` a
/// mapping (what transformers users pass); DeepSeek's concatenate the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgumentsForm {
    Mapping,
    Text,
}

/// OpenAI message content: a string, or a list of parts such as
/// `[{"type": "text", "text": "..."}]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Default for MessageContent {
    fn default() -> Self {
        MessageContent::Text(String::new())
    }
}

impl From<String> for MessageContent {
    fn from(s: String) -> Self {
        MessageContent::Text(s)
    }
}

impl From<&str> for MessageContent {
    fn from(s: &str) -> Self {
        MessageContent::Text(s.to_owned())
    }
}

/// One part of a list-form content. Only `"type": "text"` parts can be
/// rendered; other fields (`image_url`, ...) are kept in `extra`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ContentPart {
    /// A `{"type": "text", "text": ...}` part.
    #[allow(dead_code)]
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart {
            kind: "text".to_owned(),
            text: Some(text.into()),
            extra: serde_json::Map::new(),
        }
    }
}

impl MessageContent {
    /// The content as the plain string handed to templates: text parts are
    /// concatenated as they are (no separator); any other part type is an
    /// error.
    pub fn to_text(&self) -> Result<String, ChatTemplateError> {
        match self {
            MessageContent::Text(s) => Ok(s.clone()),
            MessageContent::Parts(parts) => {
                let mut out = String::new();
                for part in parts {
                    if part.kind != "text" {
                        return Err(ChatTemplateError::InvalidMessage(format!(
                            "unsupported content part type {:?} (only \"text\" parts are supported)",
                            part.kind
                        )));
                    }
                    match &part.text {
                        Some(t) => out.push_str(t),
                        None => {
                            return Err(ChatTemplateError::InvalidMessage(
                                "content part of type \"text\" has no \"text\" field".to_owned(),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

fn invalid(msg: String) -> ChatTemplateError {
    ChatTemplateError::InvalidMessage(msg)
}

/// Checks a conversation: known roles; content on every message but an
/// assistant's that calls tools; tool results that name a call made earlier.
pub(super) fn validate(messages: &[ChatMessage]) -> Result<(), ChatTemplateError> {
    if messages.is_empty() {
        return Err(invalid("messages must contain at least one message".to_owned()));
    }
    let mut call_ids: HashSet<&str> = HashSet::new();
    for (i, m) in messages.iter().enumerate() {
        if !VALID_ROLES.contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "messages[{i}]: unknown role {:?} (expected one of {})",
                m.role,
                VALID_ROLES.join(", ")
            )));
        }
        let calls = m.tool_calls.as_deref().unwrap_or_default();
        let calls_tools = m.role == "assistant" && !calls.is_empty();
        if m.content.is_none() && !calls_tools {
            return Err(invalid(format!(
                "messages[{i}].content is required for a {} message",
                m.role
            )));
        }
        if !calls.is_empty() && m.role != "assistant" {
            return Err(invalid(format!(
                "messages[{i}].tool_calls: only assistant messages make tool calls"
            )));
        }
        for (j, call) in calls.iter().enumerate() {
            if call.function.name.is_empty() {
                return Err(invalid(format!("messages[{i}].tool_calls[{j}].function.name is empty")));
            }
            match &call.function.arguments {
                serde_json::Value::String(s) => {
                    if serde_json::from_str::<serde_json::Value>(s).is_err() {
                        return Err(invalid(format!(
                            "messages[{i}].tool_calls[{j}].function.arguments is not valid JSON"
                        )));
                    }
                }
                serde_json::Value::Object(_) | serde_json::Value::Null => {}
                _ => {
                    return Err(invalid(format!(
                        "messages[{i}].tool_calls[{j}].function.arguments must be a JSON string"
                    )))
                }
            }
            if let Some(id) = &call.id {
                call_ids.insert(id);
            }
        }
        if m.role == "tool" {
            match m.tool_call_id.as_deref() {
                None => {
                    return Err(invalid(format!(
                        "messages[{i}].tool_call_id is required for a tool message"
                    )))
                }
                Some(id) if !call_ids.contains(id) => {
                    return Err(invalid(format!(
                        "messages[{i}].tool_call_id {id:?} answers no tool call of an earlier assistant message"
                    )))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// The message as the template sees it: `role`, `content` (text; `""` for a
/// null content), then whichever of `name`, `tool_calls`, `tool_call_id`,
/// `reasoning_content` it has, in that order.
pub(super) fn template_value(i: usize, m: &ChatMessage, form: ArgumentsForm) -> Result<Value, ChatTemplateError> {
    let content = match &m.content {
        Some(c) => c.to_text().map_err(|e| match e {
            ChatTemplateError::InvalidMessage(msg) => invalid(format!("messages[{i}]: {msg}")),
            other => other,
        })?,
        None => String::new(),
    };
    let mut fields = vec![
        ("role", Value::from(m.role.as_str())),
        ("content", Value::from(content)),
    ];
    if let Some(name) = &m.name {
        fields.push(("name", Value::from(name.as_str())));
    }
    if let Some(calls) = &m.tool_calls {
        let calls: Vec<Value> = calls.iter().map(|c| call_value(c, form)).collect();
        fields.push(("tool_calls", Value::from(calls)));
    }
    if let Some(id) = &m.tool_call_id {
        fields.push(("tool_call_id", Value::from(id.as_str())));
    }
    if let Some(r) = &m.reasoning_content {
        fields.push(("reasoning_content", Value::from(r.as_str())));
    }
    Ok(Value::from_object(OrderedMap(fields)))
}

fn call_value(call: &ToolCall, form: ArgumentsForm) -> Value {
    let parsed = match &call.function.arguments {
        serde_json::Value::String(s) => serde_json::from_str(s).unwrap_or(serde_json::Value::Null),
        serde_json::Value::Null => serde_json::json!({}),
        other => other.clone(),
    };
    let arguments = match (form, &call.function.arguments) {
        (ArgumentsForm::Mapping, _) => json_value(&parsed),
        (ArgumentsForm::Text, serde_json::Value::String(s)) => Value::from(s.as_str()),
        (ArgumentsForm::Text, _) => Value::from(parsed.to_string()),
    };
    let function = OrderedMap(vec![
        ("name", Value::from(call.function.name.as_str())),
        ("arguments", arguments),
    ]);
    let mut fields = Vec::new();
    if let Some(id) = &call.id {
        fields.push(("id", Value::from(id.as_str())));
    }
    fields.push(("type", Value::from(call.kind.as_str())));
    fields.push(("function", Value::from_object(function)));
    Value::from_object(OrderedMap(fields))
}

/// A JSON value as a template value (maps keep their order).
pub(super) fn json_value(v: &serde_json::Value) -> Value {
    <Value as serde::Deserialize>::deserialize(v.clone()).unwrap_or_default()
}
