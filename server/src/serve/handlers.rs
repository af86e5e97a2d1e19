//! Endpoint handlers: completions and chat completions (whole or streamed as server-sent
//! events), models, health and metrics. Requests are validated here, then handed to the
//! engine; a client that goes away aborts its requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use moe_engine::engine::{RequestStream, TokenLogprobs};
use moe_engine::{EngineError, GenerationRequest, RequestOutput};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::protocol::{completion_logprobs, parse_body, usage, CompletionRequest};
use super::AppState;

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How much of a too-large body is read and dropped before answering 413, so that a client
/// still sending it gets the answer rather than a broken pipe (bounded by the body deadline too).
const DRAIN_AFTER_LIMIT_BYTES: usize = 64 << 20;

/// Reads the whole request body within the body deadline and size limit: 408 for a client
/// too slow to send it (a slow-loris), 413 for one too large, 400 for a broken one. The rest
/// of a too-large body is drained (up to [`DRAIN_AFTER_LIMIT_BYTES`], within the deadline)
/// before the 413 goes out (a declared length past that is refused at once), and both answers
/// close the connection ([`close_after_refused_body`]).
pub(super) async fn read_body(state: &AppState, mut body: Body) -> Result<Bytes, ApiError> {
    let limit = state.max_body_bytes;
    // A declared length past what would be drained is refused before reading anything.
    if axum::body::HttpBody::size_hint(&body).lower() as usize > limit.saturating_add(DRAIN_AFTER_LIMIT_BYTES) {
        return Err(ApiError::too_large(limit));
    }
    let deadline = tokio::time::Instant::now() + state.body_read_timeout;
    let mut bytes = Vec::new();
    let mut drained = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            // Past the limit, whatever ends the drain, the answer is the 413.
            Err(_) | Ok(Some(Err(_))) if drained > 0 => return Err(ApiError::too_large(limit)),
            Err(_) => return Err(ApiError::timeout(state.body_read_timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(
                    format!("cannot read the request body: {e}"),
                    None,
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        if drained > 0 || bytes.len() + data.len() > limit {
            drained += data.len();
            bytes = Vec::new();
            if drained > DRAIN_AFTER_LIMIT_BYTES {
                return Err(ApiError::too_large(limit));
            }
            continue;
        }
        bytes.extend_from_slice(&data);
    }
    if drained > 0 {
        return Err(ApiError::too_large(limit));
    }
    Ok(Bytes::from(bytes))
}

/// Marks `Connection: close` on HTTP/1 answers given without reading the request body to its
/// end: 408 and 413 always, and 401, 403, 404, 405 and 431 when the request declared a body
/// (those are answered before any handler reads it). The connection must not carry another
/// request; without the header a pooling client would send its next one into a closing socket.
pub(super) async fn close_after_refused_body(request: Request, next: Next) -> Response {
    let http1 = request.version() <= Version::HTTP_11;
    let headers = request.headers();
    let declared_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let mut response = next.run(request).await;
    let refused = match response.status() {
        StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE => true,
        StatusCode::UNAUTHORIZED
        | StatusCode::FORBIDDEN
        | StatusCode::NOT_FOUND
        | StatusCode::METHOD_NOT_ALLOWED
        | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => declared_body,
        _ => false,
    };
    if http1 && refused {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

impl AppState {
    pub(super) fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name {
            Ok(())
        } else {
            Err(ApiError::unknown_model(
                format!(
                    "the model `{model}` does not exist; this server serves `{}`",
                    self.model_name
                ),
                Some("model"),
            ))
        }
    }

    /// Refuses `n` more requests when they would push the waiting queue past its limit.
    pub(super) fn check_capacity(&self, n: u32) -> Result<(), ApiError> {
        let waiting = self.engine.stats().waiting;
        if waiting + n as usize > self.max_waiting {
            return Err(ApiError::overloaded(waiting));
        }
        Ok(())
    }

    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let tok = self
            .tokenizer
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("this model has no tokenizer; send token ids", Some("prompt")))?;
        tok.encode(text)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))
    }

    /// Submits `n` copies of `request` (seeds offset per choice, so choices differ).
    pub(super) fn submit(&self, request: &GenerationRequest, n: u32) -> Result<Vec<RequestStream>, ApiError> {
        let mut streams = Vec::with_capacity(n as usize);
        for i in 0..n {
            let mut r = request.clone();
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
            match self.engine.submit(r) {
                Ok(s) => streams.push(s),
                Err(e) => {
                    for s in &streams {
                        self.engine.abort(s.id);
                    }
                    return Err(match e {
                        EngineError::InvalidRequest(m) => ApiError::bad_request(m, None),
                        EngineError::DeviceFailed(m) => ApiError {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            ..ApiError::internal(format!("the device failed ({m}); the server is shutting down"))
                        },
                        other => ApiError::internal(other.to_string()),
                    });
                }
            }
        }
        self.metrics.requests.inc_by(n as u64);
        Ok(streams)
    }
}

/// One piece of one choice, tagged with the choice index.
pub(super) type Piece = (usize, RequestOutput);

/// Moves each stream's pieces onto one async channel, recording latency metrics. When the
/// receiving side is gone (the client disconnected), aborts the request at once.
pub(super) fn pump(state: &Arc<AppState>, streams: Vec<RequestStream>) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(256);
    for (index, mut stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut last: Option<Instant> = None;
            while let Some(piece) = stream.recv().await {
                let now = Instant::now();
                if !piece.token_ids.is_empty() {
                    match last {
                        None => state.metrics.ttft.observe(now.duration_since(start).as_secs_f64()),
                        Some(t) => state.metrics.inter_token.observe(now.duration_since(t).as_secs_f64()),
                    }
                    last = Some(now);
                }
                if let Some(reason) = piece.finish_reason {
                    let secs = now.duration_since(start).as_secs_f64();
                    state.metrics.e2e.observe(secs);
                    tracing::info!(
                        request = stream.id.0,
                        prompt_tokens = piece.usage.prompt_tokens,
                        completion_tokens = piece.usage.completion_tokens,
                        finish = reason.as_str(),
                        latency_ms = (secs * 1000.0) as u64,
                        "request finished"
                    );
                }
                if tx.send((index, piece)).await.is_err() {
                    state.engine.abort(stream.id);
                    tracing::info!(request = stream.id.0, "client went away; request aborted");
                    return;
                }
            }
        });
    }
    rx
}

/// Everything one choice produced, for non-streamed responses.
#[derive(Default)]
pub(super) struct Choice {
    pub(super) text: String,
    pub(super) token_ids: Vec<u32>,
    pub(super) logprobs: Vec<TokenLogprobs>,
    pub(super) finish_reason: Option<&'static str>,
    pub(super) prompt_tokens: usize,
}

pub(super) async fn collect(state: &Arc<AppState>, streams: Vec<RequestStream>) -> Result<Vec<Choice>, ApiError> {
    let n = streams.len();
    let mut rx = pump(state, streams);
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    while let Some((i, piece)) = rx.recv().await {
        let c = &mut choices[i];
        c.text.push_str(&piece.text);
        c.token_ids.extend(piece.token_ids);
        c.logprobs.extend(piece.logprobs);
        c.prompt_tokens = piece.usage.prompt_tokens;
        if let Some(r) = piece.finish_reason {
            c.finish_reason = Some(r.as_str());
        }
    }
    if choices.iter().any(|c| c.finish_reason.is_none()) {
        return Err(ApiError::internal(
            "the engine failed the step computing this request (see the server log); other requests are unaffected",
        ));
    }
    Ok(choices)
}

pub(super) fn total_usage(choices: &[Choice]) -> Value {
    let prompt = choices.first().map_or(0, |c| c.prompt_tokens);
    usage(prompt, choices.iter().map(|c| c.token_ids.len()).sum())
}

fn sse_event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// Streams choices as server-sent events, one chunk per choice object: first `opening`, then
/// one per piece of output (`choice_of` builds it), then a usage chunk when asked for, then
/// `[DONE]`. Every generated token gets its own chunk even when its text is empty (a partial
/// UTF-8 character, a special token), so clients can count tokens by chunks, unless
/// `choice_of` returns `None` for it (a parser holding back markup); the closing piece
/// (finish reason, no token) gets one more.
/// Each chunk is `envelope` (id, object, created, model) plus its `choices`.
pub(super) fn sse_response(
    state: &Arc<AppState>,
    streams: Vec<RequestStream>,
    envelope: Value,
    opening: Vec<Value>,
    include_usage: bool,
    mut choice_of: impl FnMut(usize, &RequestOutput, &AppState) -> Option<Value> + Send + 'static,
) -> Response {
    let mut rx = pump(state, streams);
    let (tx, events) = mpsc::channel(64);
    let st = state.clone();
    tokio::spawn(async move {
        let chunk = |choices: Value| {
            let mut c = envelope.clone();
            c["choices"] = choices;
            c
        };
        for choice in opening {
            if tx.send(sse_event(&chunk(json!([choice])))).await.is_err() {
                return;
            }
        }
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        while let Some((i, piece)) = rx.recv().await {
            prompt_tokens = piece.usage.prompt_tokens;
            completion_tokens += piece.token_ids.len();
            if piece.token_ids.is_empty() && piece.text.is_empty() && piece.finish_reason.is_none() {
                continue;
            }
            let Some(choice) = choice_of(i, &piece, &st) else {
                continue;
            };
            if tx.send(sse_event(&chunk(json!([choice])))).await.is_err() {
                return;
            }
        }
        if include_usage {
            let mut c = chunk(json!([]));
            c["usage"] = usage(prompt_tokens, completion_tokens);
            let _ = tx.send(sse_event(&c)).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(events))
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let req: CompletionRequest = parse_body(&body)?;
    state.check_model(&req.model)?;
    let request = req.to_engine_request(|text| state.encode(text), state.vocab_size, state.max_model_len)?;
    let n = req.sampling.n()?;
    state.check_capacity(n)?;
    let streams = state.submit(&request, n)?;
    let id = format!("cmpl-{}", streams[0].id.0);
    let created = now_secs();
    let want_logprobs = req.logprobs.is_some();
    let want_token_ids = req.return_token_ids;
    if !req.sampling.stream {
        let choices = collect(&state, streams).await?;
        let tok = state.tokenizer.as_deref();
        let body = json!({
            "id": id, "object": "text_completion", "created": created, "model": state.model_name,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let mut choice = json!({
                    "index": i, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": if want_logprobs { completion_logprobs(&c.logprobs, tok) } else { Value::Null },
                });
                if want_token_ids {
                    choice["token_ids"] = json!(c.token_ids);
                }
                choice
            }).collect::<Vec<_>>(),
            "usage": total_usage(&choices),
        });
        return Ok(Json(body).into_response());
    }
    let envelope = json!({ "id": id, "object": "text_completion", "created": created, "model": state.model_name });
    Ok(sse_response(
        &state,
        streams,
        envelope,
        vec![],
        req.sampling.include_usage(),
        move |i, piece, st| {
            let mut choice = json!({
                "index": i, "text": piece.text,
                "finish_reason": piece.finish_reason.map(|r| r.as_str()),
                "logprobs": if want_logprobs { completion_logprobs(&piece.logprobs, st.tokenizer.as_deref()) } else { Value::Null },
            });
            if want_token_ids {
                choice["token_ids"] = json!(piece.token_ids);
            }
            Some(choice)
        },
    ))
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name, "object": "model", "created": state.started, "owned_by": "moe-engine",
            "max_model_len": state.max_model_len,
        }],
    }))
}

/// 200 while the engine serves; 503 with the reason once its device failed (the server is
/// then draining and exits).
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.device_failure() {
        None => StatusCode::OK.into_response(),
        Some(failure) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal(format!("the device failed: {failure}"))
        }
        .into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let text = state.metrics.render(state.engine.stats());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
