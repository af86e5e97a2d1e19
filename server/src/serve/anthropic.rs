//! Anthropic's Messages API: `POST /v1/messages` (whole, or streamed as Anthropic's event
//! sequence) and `POST /v1/messages/count_tokens`, with errors in Anthropic's shape
//! (`{"type": "error", "error": {"type", "message"}}`). Requests go through the model's chat
//! template and the same engine as the OpenAI endpoints. Text content only for now: tools,
//! `tool_use`/`tool_result` blocks, images and extended thinking are refused with a 400 that
//! names the field.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use moe_engine::engine::RequestStream;
use moe_engine::{FinishReason, GenerationRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::handlers::{pump, read_body};
use super::protocol::{parse_body, SamplingFields, StopInput};
use super::AppState;
use crate::chat_template::ChatMessage;

/// An [`ApiError`] answered in Anthropic's error shape.
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

/// Anthropic's error type for an HTTP status (and its status: overload is 529 there).
fn error_type(status: StatusCode) -> (StatusCode, &'static str) {
    match status.as_u16() {
        400 | 408 | 431 => (status, "invalid_request_error"),
        401 => (status, "authentication_error"),
        403 => (status, "permission_error"),
        404 | 405 => (status, "not_found_error"),
        413 => (status, "request_too_large"),
        429 => (status, "rate_limit_error"),
        503 => (StatusCode::from_u16(529).unwrap_or(status), "overloaded_error"),
        _ => (status, "api_error"),
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        // Anthropic answers an unknown model with a 404.
        let (status, kind) = match self.0.code {
            Some("model_not_found") => (StatusCode::NOT_FOUND, "not_found_error"),
            _ => error_type(self.0.status),
        };
        let message = match &self.0.param {
            Some(p) => format!("{p}: {}", self.0.message),
            None => self.0.message.clone(),
        };
        let mut response = (
            status,
            Json(json!({ "type": "error", "error": { "type": kind, "message": message } })),
        )
            .into_response();
        if let Some(secs) = self.0.retry_after_secs {
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        response
    }
}

fn bad(message: impl Into<String>, param: &str) -> AnthropicError {
    AnthropicError(ApiError::bad_request(message, Some(param)))
}

/// A string, or a list of content blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

impl Content {
    /// The text of the content; any block but `text` is refused, naming `field`.
    fn text(&self, field: &str) -> Result<String, AnthropicError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Blocks(blocks) => {
                let mut out = String::new();
                for (i, b) in blocks.iter().enumerate() {
                    let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
                    match (kind, b.get("text").and_then(Value::as_str)) {
                        ("text", Some(t)) => out.push_str(t),
                        ("text", None) => {
                            return Err(bad("a text block needs a string `text`", &format!("{field}.{i}.text")))
                        }
                        (other, _) => {
                            return Err(bad(
                                format!("content blocks of type {other:?} are not supported yet (only \"text\")"),
                                &format!("{field}.{i}.type"),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct InputMessage {
    role: String,
    content: Option<Content>,
}

/// The body of `/v1/messages` (and, without `max_tokens`, of `count_tokens`).
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    model: String,
    max_tokens: Option<i64>,
    messages: Vec<InputMessage>,
    system: Option<Content>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    #[serde(default)]
    stream: bool,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    thinking: Option<Value>,
    #[allow(dead_code)]
    metadata: Option<Value>,
}

impl MessagesRequest {
    /// The conversation as chat-template messages: the system prompt first, then the turns,
    /// which must alternate from `user` (the last may be `assistant`: a prefill).
    fn chat_messages(&self) -> Result<Vec<ChatMessage>, AnthropicError> {
        for (field, v) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("thinking", &self.thinking),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(bad(format!("`{field}` is not supported yet by this server"), field));
            }
        }
        if self.messages.is_empty() {
            return Err(bad("messages must contain at least one message", "messages"));
        }
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            out.push(ChatMessage::new("system", system.text("system")?));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if m.role != "user" && m.role != "assistant" {
                return Err(bad(
                    format!("role must be \"user\" or \"assistant\", got {:?}", m.role),
                    &format!("messages.{i}.role"),
                ));
            }
            let content = m
                .content
                .as_ref()
                .ok_or_else(|| bad("every message needs `content`", &format!("messages.{i}.content")))?
                .text(&format!("messages.{i}.content"))?;
            out.push(ChatMessage::new(m.role.clone(), content));
        }
        if self.messages[0].role != "user" {
            return Err(bad("the first message must have role \"user\"", "messages.0.role"));
        }
        Ok(out)
    }

    /// Validates the sampling fields into an engine request for `prompt`.
    fn to_engine_request(&self, prompt: Vec<u32>, max_model_len: usize) -> Result<GenerationRequest, AnthropicError> {
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

/// Renders and tokenizes the conversation.
fn prompt_of(state: &AppState, req: &MessagesRequest) -> Result<Vec<u32>, AnthropicError> {
    state.check_model(&req.model)?;
    let messages = req.chat_messages()?;
    let template = state
        .chat_template
        .as_ref()
        .ok_or_else(|| bad("this model has no chat template", "messages"))?;
    // A conversation ending with the assistant's turn is a prefill: it continues that turn.
    let prefill = messages.last().is_some_and(|m| m.role == "assistant");
    let rendered = template
        .render(&messages, !prefill)
        .map_err(|e| bad(e.to_string(), "messages"))?;
    Ok(state.encode(&rendered)?)
}

/// Anthropic's stop reason for how a request ended.
fn stop_reason(finish: Option<FinishReason>, stop_string: Option<&str>) -> &'static str {
    match (stop_string, finish) {
        (Some(_), _) => "stop_sequence",
        (None, Some(FinishReason::Length)) => "max_tokens",
        _ => "end_turn",
    }
}

pub async fn messages(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, AnthropicError> {
    let body = read_body(&state, body).await?;
    let req: MessagesRequest = parse_body(&body)?;
    let prompt = prompt_of(&state, &req)?;
    let request = req.to_engine_request(prompt, state.max_model_len)?;
    state.check_capacity(1)?;
    let mut streams = state.submit(&request, 1)?;
    let stream = streams.remove(0);
    let id = format!("msg_{:024}", stream.id.0);
    let prompt_tokens = request.prompt_token_ids.len();
    if req.stream {
        return Ok(stream_events(&state, stream, id, prompt_tokens));
    }
    let mut rx = pump(&state, vec![stream]);
    let (mut text, mut output_tokens, mut finish, mut stop_string) = (String::new(), 0, None, None);
    while let Some((_, piece)) = rx.recv().await {
        text.push_str(&piece.text);
        output_tokens += piece.token_ids.len();
        if piece.finish_reason.is_some() {
            finish = piece.finish_reason;
            stop_string = piece.stop_string;
        }
    }
    if finish.is_none() {
        return Err(ApiError::internal("the engine stopped before the request finished").into());
    }
    Ok(Json(json!({
        "id": id, "type": "message", "role": "assistant", "model": state.model_name,
        "content": [{ "type": "text", "text": text }],
        "stop_reason": stop_reason(finish, stop_string.as_deref()),
        "stop_sequence": stop_string,
        "usage": { "input_tokens": prompt_tokens, "output_tokens": output_tokens },
    }))
    .into_response())
}

fn event(kind: &str, data: Value) -> Result<Event, std::convert::Infallible> {
    Ok(Event::default().event(kind).data(data.to_string()))
}

/// Anthropic's stream: `message_start`, `content_block_start`, `ping`, one
/// `content_block_delta` per piece of text, `content_block_stop`, `message_delta` (stop
/// reason, output tokens), `message_stop`.
fn stream_events(state: &Arc<AppState>, stream: RequestStream, id: String, prompt_tokens: usize) -> Response {
    let mut rx = pump(state, vec![stream]);
    let model = state.model_name.clone();
    let (tx, events) = mpsc::channel(64);
    tokio::spawn(async move {
        let opening = [
            event(
                "message_start",
                json!({ "type": "message_start", "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": { "input_tokens": prompt_tokens, "output_tokens": 0 },
                }}),
            ),
            event(
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
            ),
            event("ping", json!({ "type": "ping" })),
        ];
        for e in opening {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let (mut output_tokens, mut finish, mut stop_string) = (0, None, None);
        while let Some((_, piece)) = rx.recv().await {
            output_tokens += piece.token_ids.len();
            if piece.finish_reason.is_some() {
                finish = piece.finish_reason;
                stop_string = piece.stop_string.clone();
            }
            if piece.text.is_empty() {
                continue;
            }
            let delta = json!({ "type": "content_block_delta", "index": 0,
                                "delta": { "type": "text_delta", "text": piece.text } });
            if tx.send(event("content_block_delta", delta)).await.is_err() {
                return;
            }
        }
        let closing = [
            event(
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": 0 }),
            ),
            event(
                "message_delta",
                json!({ "type": "message_delta",
                        "delta": { "stop_reason": stop_reason(finish, stop_string.as_deref()), "stop_sequence": stop_string },
                        "usage": { "output_tokens": output_tokens } }),
            ),
            event("message_stop", json!({ "type": "message_stop" })),
        ];
        for e in closing {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(events))
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub async fn count_tokens(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, AnthropicError> {
    let body = read_body(&state, body).await?;
    let req: MessagesRequest = parse_body(&body)?;
    let prompt = prompt_of(&state, &req)?;
    Ok(Json(json!({ "input_tokens": prompt.len() })).into_response())
}
