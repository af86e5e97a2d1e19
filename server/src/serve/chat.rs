//! `POST /v1/chat/completions`: the chat template with tools and template
//! kwargs, structured outputs, and the answer split into `reasoning_content`,
//! `content` and `tool_calls` (also as stream deltas).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::agent::{call_id_prefix, AgentRequest, ChoiceParser, FieldError};
use super::error::ApiError;
use super::handlers::{collect, now_secs, read_body, sse_response, total_usage};
use super::protocol::{chat_logprobs, parse_body, ChatRequest};
use super::AppState;
use crate::agent::{OutputDelta, ParsedOutput};
use crate::chat_template::RenderOptions;

fn openai_error(e: FieldError) -> ApiError {
    ApiError::bad_request(e.message, Some(&e.param))
}

/// The finish reason a client sees: `tool_calls` when the output called tools.
fn finish_reason(reason: Option<&'static str>, called_tools: bool) -> Option<&'static str> {
    match reason {
        Some("stop") if called_tools => Some("tool_calls"),
        other => other,
    }
}

/// The `message` of a non-streamed choice.
fn message(out: &ParsedOutput) -> Value {
    let mut m = json!({ "role": "assistant" });
    m["content"] = if out.tool_calls.is_empty() || !out.content.is_empty() {
        json!(out.content)
    } else {
        Value::Null
    };
    if !out.reasoning.is_empty() {
        m["reasoning_content"] = json!(out.reasoning);
    }
    if !out.tool_calls.is_empty() {
        m["tool_calls"] = out
            .tool_calls
            .iter()
            .map(
                |c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }),
            )
            .collect();
    }
    m
}

/// The `delta` of a stream chunk; `None` when it says nothing.
fn delta(d: &OutputDelta) -> Option<Value> {
    if d.is_empty() {
        return None;
    }
    let mut v = json!({});
    if !d.reasoning.is_empty() {
        v["reasoning_content"] = json!(d.reasoning);
    }
    if !d.content.is_empty() {
        v["content"] = json!(d.content);
    }
    if !d.tool_calls.is_empty() {
        v["tool_calls"] = d
            .tool_calls
            .iter()
            .map(|t| {
                let mut call = json!({ "index": t.index, "function": { "arguments": t.arguments } });
                if let Some(id) = &t.id {
                    call["id"] = json!(id);
                    call["type"] = json!("function");
                }
                if let Some(name) = &t.name {
                    call["function"]["name"] = json!(name);
                }
                call
            })
            .collect();
    }
    Some(v)
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let req: ChatRequest = parse_body(&body)?;
    state.check_model(&req.model)?;
    let template = state.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions", Some("messages"))
    })?;
    let agent = AgentRequest::from_openai(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        req.response_format.as_ref(),
    )
    .map_err(openai_error)?;
    let rendered = template
        .render_with(
            &req.messages,
            &RenderOptions {
                add_generation_prompt: true,
                tools: agent.template_tools(),
                kwargs: req.chat_template_kwargs.as_ref(),
            },
        )
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    let prompt = state.encode(&rendered)?;
    let n = req.sampling.n()?;
    let mut request = req.to_engine_request(prompt, state.max_model_len)?;
    request.constraint = agent.constraint(&state.agent).await.map_err(openai_error)?;
    state.check_capacity(n)?;
    let parsers: Vec<ChoiceParser> = (0..n)
        .map(|_| agent.choice_parser(&state.agent, &rendered, call_id_prefix()))
        .collect();
    let streams = state.submit(&request, n)?;
    let id = format!("chatcmpl-{}", streams[0].id.0);
    let created = now_secs();
    let want_logprobs = req.logprobs;
    if !req.sampling.stream {
        let choices = collect(&state, streams).await?;
        let tok = state.tokenizer.as_deref();
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": choices.iter().zip(parsers).enumerate().map(|(i, (c, parser))| {
                let (out, called) = parser.parse_all(&c.text);
                json!({
                    "index": i,
                    "message": message(&out),
                    "finish_reason": finish_reason(c.finish_reason, called),
                    "logprobs": if want_logprobs { chat_logprobs(&c.logprobs, tok) } else { Value::Null },
                })
            }).collect::<Vec<_>>(),
            "usage": total_usage(&choices),
        });
        return Ok(Json(body).into_response());
    }
    let envelope =
        json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": state.model_name });
    let opening = (0..n as usize)
        .map(|i| json!({ "index": i, "delta": { "role": "assistant", "content": "" }, "finish_reason": null, "logprobs": null }))
        .collect();
    // A plain request streams one chunk per token, as before; one whose output is parsed
    // sends only chunks that say something.
    let passthrough = agent.template_tools().is_none() && agent.grammar().is_none() && state.agent.reasoning.is_none();
    let mut parsers = parsers;
    Ok(sse_response(
        &state,
        streams,
        envelope,
        opening,
        req.sampling.include_usage(),
        move |i, piece, st| {
            let parser = &mut parsers[i];
            let mut d = parser.push(&piece.text);
            if piece.finish_reason.is_some() {
                let tail = parser.finish();
                d.reasoning.push_str(&tail.reasoning);
                d.content.push_str(&tail.content);
                d.tool_calls.extend(tail.tool_calls);
            }
            let finish = finish_reason(piece.finish_reason.map(|r| r.as_str()), parser.saw_calls());
            let delta = match delta(&d) {
                Some(v) => v,
                None if passthrough && piece.finish_reason.is_none() => json!({ "content": "" }),
                None if finish.is_some() || want_logprobs => json!({}),
                None => return None,
            };
            Some(json!({
                "index": i, "delta": delta,
                "finish_reason": finish,
                "logprobs": if want_logprobs { chat_logprobs(&piece.logprobs, st.tokenizer.as_deref()) } else { Value::Null },
            }))
        },
    ))
}
