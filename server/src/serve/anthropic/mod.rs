//! Anthropic's Messages API: `POST /v1/messages` (whole, or streamed as Anthropic's event
//! sequence) and `POST /v1/messages/count_tokens`, with errors in Anthropic's shape
//! (`{"type": "error", "error": {"type", "message"}}`). Requests go through the model's chat
//! template and the same engine as the OpenAI endpoints: text, `tool_use`, `tool_result` and
//! `thinking` blocks, `tools` and `tool_choice` (forced choices under a JSON grammar), and
//! `thinking` as the template's thinking switch; images are refused with a 400 naming the field.

mod blocks;
mod request;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use moe_engine::engine::RequestStream;
use moe_engine::FinishReason;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::agent::{AgentRequest, ChoiceParser};
use super::error::ApiError;
use super::handlers::{pump, read_body};
use super::protocol::parse_body;
use super::AppState;
use crate::agent::ParsedOutput;
use crate::chat_template::RenderOptions;
use blocks::{content_blocks, BlockStream};
pub use request::MessagesRequest;

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

/// A request ready for the engine: the rendered prompt, its tokens and how
/// its output is read.
struct Prepared {
    rendered: String,
    prompt: Vec<u32>,
    agent: AgentRequest,
}

/// Renders and tokenizes the conversation with its tools and thinking switch.
fn prepare(state: &AppState, req: &MessagesRequest) -> Result<Prepared, AnthropicError> {
    state.check_model(&req.model)?;
    let messages = req.chat_messages()?;
    let agent = req.agent()?;
    let kwargs = req.template_kwargs()?;
    let template = state
        .chat_template
        .as_ref()
        .ok_or_else(|| bad("this model has no chat template", "messages"))?;
    // A conversation ending with the assistant's turn is a prefill: it continues that turn.
    let prefill = messages.last().is_some_and(|m| m.role == "assistant");
    let opts = RenderOptions {
        add_generation_prompt: !prefill,
        tools: agent.template_tools(),
        kwargs: kwargs.as_ref(),
    };
    let rendered = template
        .render_with(&messages, &opts)
        .map_err(|e| bad(e.to_string(), "messages"))?;
    let prompt = state.encode(&rendered)?;
    Ok(Prepared {
        rendered,
        prompt,
        agent,
    })
}

/// Anthropic's stop reason for how a request ended.
fn stop_reason(finish: Option<FinishReason>, stop_string: Option<&str>, used_tools: bool) -> &'static str {
    match (stop_string, finish) {
        (Some(_), _) => "stop_sequence",
        (None, Some(FinishReason::Length)) => "max_tokens",
        _ if used_tools => "tool_use",
        _ => "end_turn",
    }
}

/// Ids of tool uses: `toolu_` and 24 hex digits, then the call's index.
fn tool_use_prefix() -> String {
    format!("toolu_{:024x}_", rand::random::<u128>() >> 32)
}

pub async fn messages(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, AnthropicError> {
    let body = read_body(&state, body).await?;
    let req: MessagesRequest = parse_body(&body)?;
    let prepared = prepare(&state, &req)?;
    let mut request = req.to_engine_request(prepared.prompt, state.max_model_len)?;
    request.constraint = prepared.agent.constraint(&state.agent).await.map_err(|e| {
        bad(
            e.message,
            if e.param == "response_format" {
                "tools"
            } else {
                &e.param
            },
        )
    })?;
    let parser = prepared
        .agent
        .choice_parser(&state.agent, &prepared.rendered, tool_use_prefix());
    state.check_capacity(1)?;
    let mut streams = state.submit(&request, 1)?;
    let stream = streams.remove(0);
    let id = format!("msg_{:024}", stream.id.0);
    let prompt_tokens = request.prompt_token_ids.len();
    if req.stream {
        return Ok(stream_events(&state, stream, id, prompt_tokens, parser));
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
        return Err(ApiError::internal(
            "the engine failed the step computing this request (see the server log); other requests are unaffected",
        )
        .into());
    }
    let (out, used_tools): (ParsedOutput, bool) = parser.parse_all(&text);
    Ok(Json(json!({
        "id": id, "type": "message", "role": "assistant", "model": state.model_name,
        "content": content_blocks(&out),
        "stop_reason": stop_reason(finish, stop_string.as_deref(), used_tools),
        "stop_sequence": stop_string,
        "usage": { "input_tokens": prompt_tokens, "output_tokens": output_tokens },
    }))
    .into_response())
}

fn event(kind: &str, data: Value) -> Result<Event, std::convert::Infallible> {
    Ok(Event::default().event(kind).data(data.to_string()))
}

/// Anthropic's stream: `message_start`, then the content blocks (`content_block_start`,
/// `content_block_delta`s, `content_block_stop`; a `ping` after the first start), then
/// `message_delta` (stop reason, output tokens) and `message_stop`.
fn stream_events(
    state: &Arc<AppState>,
    stream: RequestStream,
    id: String,
    prompt_tokens: usize,
    mut parser: ChoiceParser,
) -> Response {
    let mut rx = pump(state, vec![stream]);
    let model = state.model_name.clone();
    let (tx, events) = mpsc::channel(64);
    tokio::spawn(async move {
        let start = event(
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": prompt_tokens, "output_tokens": 0 },
            }}),
        );
        if tx.send(start).await.is_err() {
            return;
        }
        let mut blocks = BlockStream::default();
        let mut pinged = false;
        let (mut output_tokens, mut finish, mut stop_string) = (0, None, None);
        while let Some((_, piece)) = rx.recv().await {
            output_tokens += piece.token_ids.len();
            let mut out = blocks.push(&parser.push(&piece.text));
            if piece.finish_reason.is_some() {
                finish = piece.finish_reason;
                stop_string = piece.stop_string.clone();
                out.extend(blocks.push(&parser.finish()));
                out.extend(blocks.finish());
            }
            for (name, data) in out {
                if tx.send(event(name, data)).await.is_err() {
                    return;
                }
                if !pinged && name == "content_block_start" {
                    pinged = true;
                    if tx.send(event("ping", json!({ "type": "ping" }))).await.is_err() {
                        return;
                    }
                }
            }
        }
        let closing = [
            event(
                "message_delta",
                json!({ "type": "message_delta",
                        "delta": { "stop_reason": stop_reason(finish, stop_string.as_deref(), parser.saw_calls()), "stop_sequence": stop_string },
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
    let prepared = prepare(&state, &req)?;
    Ok(Json(json!({ "input_tokens": prepared.prompt.len() })).into_response())
}
